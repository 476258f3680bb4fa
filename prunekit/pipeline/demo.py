"""Recipe: the one-command demo — a small pipeline on the embedded default model (SmolLM2-135M-Instruct, chatterbot
data, local Ray), sized for 2 CPU cores.

data -> inspect -> the pipeline recipe below: importance (block influence) -> a short knockout sweep over the least
important layers (Ray Tune) -> prune the plan -> short recovery SFT -> distillation from the original -> KV-cut to
1 KV head (MQA), calibrated layer by layer on 16 train conversations -> the summary table (chat val and held-out
general text), plus a sample answer from the original, the recovered and the cut model. The KV cut gets no recovery
training here: merging SmolLM2's 3 KV heads into 1 costs almost all token accuracy, the calibration brings back a
part of it, and the distillation that heals the rest (recipes/outcome.yaml) does not fit a CPU demo.
The recipe is written to OUT/recipe.yaml: `prunekit pipeline OUT/recipe.yaml` runs (or resumes) the same thing.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from prunekit.core import report
from prunekit.core.datasets import chatterbot_to_messages
from prunekit.core.loading import quiet_transformers, resolve_model

QUESTION = "What is the capital of France?"
TRAIN = {"max_length": 128, "batch_size": 4, "lr": 1.0e-4, "warmup_ratio": 0.0, "eval_max_samples": 32,
         "save_interval": 1000}

# SmolLM2-135M has 30 layers of ~3.5M parameters next to 28M of (tied) embeddings: removing 3 interior layers
# reaches 93% of the parameters in one round.
DEMO_RECIPE = {
    "target": {"params_fraction": 0.93},
    "max_rounds": 2,                # one round normally reaches the target; a second if the sweep keeps fewer layers
    "min_token_acc_ratio": 0.75,    # short CPU-sized recovery; real runs keep the default 0.9
    "rounds": ["importance", {"knockout": {"importance_candidates": 4}}, "prune", "sft", "distill"],
    "finish": ["kv_cut"],
    "stages": {
        "importance": {"samples": 16, "max_length": 128, "nll": False},
        "knockout": {**TRAIN, "max_steps": 2, "eval_interval": 2, "log_interval": 1, "eval_max_samples": 16,
                     "importance": False, "free_ratio": 0.9, "recoverable_ratio": 0.8,
                     "tune": {"max_concurrent_trials": 2}},
        "sft": {**TRAIN, "max_steps": 15, "eval_interval": 15},
        "distill": {**TRAIN, "max_steps": 10, "eval_interval": 10},
        "kv_cut": {"kv_heads": 1, "grouping": "similarity", "samples": 16, "calibrate": True, "calibration_steps": 30},
    },
    "eval_samples": 32,
    "eval_max_length": 128,
    "eval_text": "general",         # the held-out general English text: recovery that is not just chat fit
    "eval_text_samples": 32,        # of its ~220 rows: a CPU-sized look
    "wandb": {"mode": "disabled"},
}


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def _reply(path: Path) -> str:
    from prunekit.core.evaluate import greedy_reply
    from prunekit.core.loading import load_model, load_tokenizer
    with quiet_transformers():
        model, _ = load_model(path)
        tokenizer = load_tokenizer(path)
    return greedy_reply(model, tokenizer, QUESTION)


def demo(model: str = "smollm2", out: str | Path = "prunekit-demo", overwrite: bool = False):
    from prunekit.config import load_config
    from prunekit.pipeline import pipeline
    start = time.time()
    out = Path(out).resolve()
    t = _step("data: chatterbot-corpus English Q/A -> messages JSONL")
    counts = chatterbot_to_messages(out / "data" / "train.jsonl", val_path=out / "data" / "val.jsonl")
    print(f"{counts['train']} train / {counts['val']} val conversations in {out / 'data'} ({time.time() - t:.0f}s)")

    _step(f"inspect {model}")
    base = resolve_model(model)
    print(report.format_inspect(report.describe(base)))

    recipe = {"model": model, "train": str(out / "data" / "train.jsonl"), "val": str(out / "data" / "val.jsonl"),
              "output_dir": str(out / "pipeline"), **DEMO_RECIPE}
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text("# written by `prunekit demo`; run or resume it with `prunekit pipeline " +
                           f"{recipe_path}`\n" + yaml.safe_dump(recipe, sort_keys=False))
    if overwrite and (out / "pipeline").exists():
        shutil.rmtree(out / "pipeline")
    _step(f"pipeline {recipe_path}: importance -> knockout -> prune -> sft -> distill -> kv-cut")
    result = pipeline(load_config("pipeline", recipe_path), where=str(recipe_path))

    _step("sample answers")
    recovered = [r for r in result.stages if r["stage"] in ("sft", "distill")][-1]
    print(f"Q: {QUESTION}")
    for label, path in (("original", base), (f"{recovered['id']} (pruned + recovered)", recovered["output"]),
                        (f"{Path(result.final_model).name} (+ KV cut, calibrated, no training yet)", result.final_model)):
        print(f"  {label}: {_reply(Path(path))!r}", flush=True)
    print(f"\noutputs: every stage under {out / 'pipeline'} (plain HF directories with prunekit.json); "
          f"summary.md / summary.png there; final model {result.final_model}")
    print(f"demo finished in {time.time() - start:.0f}s")
    return result
