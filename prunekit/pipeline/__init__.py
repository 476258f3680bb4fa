"""`prunekit pipeline recipe.yaml`: the whole workflow, repeated until the model is small enough.

recipe.py checks the recipe; measure.py measures every model and holds the guardrail; state.py is the resumable
state file; runner.py runs the rounds and finishing stages (one runner per stage name: STAGE_RUNNERS); summary.py
writes the table, summary.json and summary.png; demo.py is `prunekit demo`, a small pipeline on the embedded model.
"""
from prunekit.pipeline.measure import check_recovery, evaluate_model, model_facts, recovery_shortfall, text_layer_params
from prunekit.pipeline.recipe import PipelineResult, PipelineStopped, check_recipe, read_plan
from prunekit.pipeline.runner import STAGE_RUNNERS, Runner, pipeline
from prunekit.pipeline.state import STATE_FILE, State
from prunekit.pipeline.summary import summary_rows, summary_table, write_summary

__all__ = ["STAGE_RUNNERS", "STATE_FILE", "PipelineResult", "PipelineStopped", "Runner", "State", "check_recipe",
           "check_recovery", "evaluate_model", "model_facts", "pipeline", "read_plan", "recovery_shortfall",
           "summary_rows", "summary_table", "text_layer_params", "write_summary"]
