"""`prunekit pipeline` without Ray: local rounds (a given plan, width), the guardrails, the recipe checks (the
recipes/ files, the RayJob manifest, the demo) and bad input as one-line errors. The full run on Ray (rounds until
the target, a failed stage, resume, the summary) is tests/integration/test_pipeline_ray.py."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from prunekit import PrunekitError
from prunekit.cli import main
from prunekit.config import load_config
from prunekit import pipeline as pl
from prunekit.pipeline import runner as pipeline_runner
from tests.conftest import REPO


@pytest.fixture(scope="module")
def chat4(chat_model_dir):
    """A 4-layer tiny llama with SmolLM2's tokenizer: room for two rounds of one layer each."""
    return chat_model_dir(4, seed=2)


SFT = {"max_steps": 2, "max_length": 64, "batch_size": 2, "eval_interval": 2, "save_interval": 2,
       "eval_max_samples": 8, "lr": 1.0e-3}


def recipe(model, chat_data, out, **over) -> dict:
    train, val = chat_data
    layer = pl.text_layer_params(model)[0]
    base = {"model": str(model), "train": str(train), "val": str(val), "output_dir": str(out),
            # 1.5 layers' worth: with max_layers 1 per round, reaching it takes two rounds
            "target": {"params": pl.model_facts(model)["params"] - int(1.5 * layer)},
            "max_layers": 1, "min_token_acc_ratio": 0.0,
            "rounds": ["importance", "prune", "sft"], "finish": [{"kv_cut": {"kv_heads": 1}}],
            "stages": {"importance": {"samples": 8, "max_length": 64, "nll": False}, "sft": SFT},
            "eval_samples": 8, "eval_max_length": 64, "eval_text_samples": 8, "wandb": {"mode": "disabled"}}
    return {**base, **over}


def write(tmp_path, cfg: dict, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rec(params, acc, rid="x", text_acc=None):
    rec = {"id": rid, "output": rid, "facts": {"params": params}, "eval": {"token_acc": acc}}
    return rec if text_acc is None else {**rec, "eval_text": {"token_acc": text_acc}}


def test_recovery_guardrail_stops_below_min_ratio():
    cfg = load_config("pipeline", None, {"model": "m", "train": "t", "val": "v", "output_dir": "o",
                                         "target.params_fraction": 0.5, "min_token_acc_ratio": 0.9})
    pl.check_recovery(cfg, _rec(100, 0.50), _rec(80, 0.45), "after round 1")  # exactly 0.9: passes
    with pytest.raises(pl.PipelineStopped, match=r"after round 2: chat val token_acc 0.4000 is 0.800 of the "
                                                 r"original's 0.5000, below min_token_acc_ratio 0.9"):
        pl.check_recovery(cfg, _rec(100, 0.50), _rec(80, 0.40), "after round 2")
    # with general text measured, its ratio decides: an in-domain chat val of 140% does not hide the damage
    with pytest.raises(pl.PipelineStopped, match=r"general-text token_acc 0.1500 is 0.500 of the original's 0.3000"):
        pl.check_recovery(cfg, _rec(100, 0.50, text_acc=0.30), _rec(80, 0.70, text_acc=0.15), "after round 1")
    pl.check_recovery(cfg, _rec(100, 0.50, text_acc=0.30), _rec(80, 0.30, text_acc=0.29), "after round 1")


def test_plan_respects_guardrails_and_stops_at_the_target(tmp_path):
    """Knockout plan best first: skip what exceeds max_params_fraction / max_layers, stop once the target is met."""
    cfg = load_config("pipeline", None, {"model": "m", "train": "t", "val": "v", "output_dir": "o",
                                         "target.params": 1, "max_params_fraction": 0.35, "max_layers": 3})
    state = pl.State(tmp_path / pl.STATE_FILE, {"model": "m", "original": None, "status": "running", "stages": [
        {"id": "r1-1-knockout", "stage": "knockout", "round": 1, "output": "ko", "plan": {"order": [
            {"id": "text:7", "params_removed": 10}, {"id": "text:3-4", "params_removed": 30},   # 10 + 30 > 35% of 100
            {"id": "text:5", "params_removed": 10}, {"id": "text:9", "params_removed": 10},
            {"id": "text:2", "params_removed": 10}]}}]})
    runner = pl.Runner(cfg, state, tmp_path, tmp_path, "t")
    current = _rec(100, 1.0)
    assert runner._plan(1, current, target=1) == ([5, 7, 9], [], ["text:7", "text:5", "text:9"])  # max_layers 3
    assert runner._plan(1, current, target=85) == ([5, 7], [], ["text:7", "text:5"])  # 80 <= 85: stop there


def _err(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_recipes_are_one_line_errors(chat4, chat_data, tmp_path, capsys):
    out = tmp_path / "out"
    good = recipe(chat4, chat_data, out)

    def bad(**over):
        return _err(["pipeline", str(write(tmp_path, {**good, **over}, "bad.yaml"))], capsys)
    assert "rounds[1]: unknown stage 'pune'" in bad(rounds=["importance", "pune", "sft"])
    assert "rounds[2]: kv_cut cannot run in rounds" in bad(rounds=["importance", "prune", "kv_cut"])
    assert "rounds[2].sft.max_stepz: unknown key" in bad(rounds=["importance", "prune", {"sft": {"max_stepz": 3}}])
    assert "rounds[2].sft.max_stepz: unknown key" in bad(stages={"sft": {"max_stepz": 3}})
    assert "stages.rlhf: unknown stage" in bad(stages={"rlhf": {}})
    assert "rounds[1].prune.model: set by the pipeline" in bad(rounds=["importance", {"prune": {"model": "x"}}])
    assert "rounds[0]: prune needs a plan" in bad(rounds=["prune", "sft"])
    assert "finish[0]: lora must be followed by merge_lora" in bad(finish=[{"lora": {"max_steps": 1}}])
    assert "rounds[0].knockout.importance_candidates: needs an `importance` stage" in bad(
        rounds=[{"knockout": {"importance_candidates": 2}}, "prune"])
    assert "bad.yaml: colour: unknown key" in bad(colour="red")
    assert "target: give exactly one of target.params and target.params_fraction" in bad(target={})
    assert "target already met" in bad(target={"params": 10 ** 9})
    # a cluster address that does not answer: fails fast, before any stage
    assert "nothing answers at 127.0.0.1:9" in bad(ray={"address": "127.0.0.1:9"})
    assert not out.exists()


def test_rayjob_manifest_entrypoint_is_a_valid_pipeline_invocation():
    """The KubeRay RayJob's --set flags apply to recipes/pipeline.yaml, and the recipe passes check_recipe."""
    import shlex

    from prunekit.cli import _parse_set
    job = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    words = shlex.split(job["spec"]["entrypoint"])
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    cfg = load_config("pipeline", REPO / words[words.index("--config") + 1], _parse_set(sets))
    rounds, _ = pl.check_recipe(cfg)
    assert cfg.ray.use_gpu and str(cfg.output_dir).startswith("/mnt/prunekit")
    assert [s for s, _ in rounds][:3] == ["importance", "knockout", "prune"]


def test_pipeline_recipe_with_its_commented_finish_stages_is_valid(tmp_path):
    """recipes/pipeline.yaml's commented finish examples (LoRA, merge, RL), uncommented, pass check_recipe: a user
    who enables them gets a recipe that runs, not a validation error."""
    text = (REPO / "recipes" / "pipeline.yaml").read_text()
    enabled = text.replace("  # - ", "  - ")
    assert enabled.count("\n  - ") - text.count("\n  - ") == 3
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(enabled)
    _, finish = pl.check_recipe(load_config("pipeline", recipe), str(recipe))
    assert [s for s, _ in finish] == ["kv_cut", "distill", "lora", "merge_lora", "rl"]
    assert finish[-1][1]["rewards"] == [{"fn": "exact_match"}]
    recipe.write_text(enabled.replace("{fn: exact_match}", "{name: exact_match}"))  # the example as it was
    with pytest.raises(PrunekitError, match=r"finish\[4\]\.rl\.rewards\.0\.fn: Field required"):
        pl.check_recipe(load_config("pipeline", recipe), str(recipe))


def test_outcome_recipe_is_a_valid_pipeline_recipe(tmp_path, monkeypatch):
    """bench/outcome_smollm2.py's recipe passes check_recipe (its data files are written by the bench, so empty
    stand-ins here): one round of a given plan, a calibrated KV cut, then distillation."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for f in ("recovery.jsonl", "val.jsonl", "general-eval.jsonl"):
        (tmp_path / "data" / f).write_text("")
    recipe = tmp_path / "outcome.yaml"
    recipe.write_text((REPO / "recipes" / recipe.name).read_text().replace("bench/results/", f"{REPO}/bench/results/"))
    rounds, finish = pl.check_recipe(load_config("pipeline", recipe), str(recipe))
    assert [s for s, _ in rounds] == ["prune"] and [s for s, _ in finish] == ["kv_cut", "distill"]
    assert finish[0][1]["calibrate"] is True


def test_demo_recipe_is_a_valid_pipeline_recipe(tmp_path):
    """`prunekit demo` is a pipeline run: its recipe passes the same checks (the run itself is the README's first
    command, timed there)."""
    from prunekit.pipeline.demo import DEMO_RECIPE
    cfg = load_config("pipeline", None, {"model": "smollm2", "train": "t.jsonl", "val": "v.jsonl",
                                         "output_dir": str(tmp_path), **DEMO_RECIPE})
    rounds, finish = pl.check_recipe(cfg)
    assert [s for s, _ in rounds] == ["importance", "knockout", "prune", "sft", "distill"]
    assert [s for s, _ in finish] == ["kv_cut"]


@pytest.mark.slow  # ~7 s: prune, a calibrated KV cut, distillation
def test_local_pipeline_prunes_a_given_plan_without_ray(chat4, chat_data, tmp_path, monkeypatch):
    """launcher: local runs every stage in this process (no Ray): a knockout plan.json made earlier is pruned in
    round 1, which reaches the target, so the round guardrail (made to fail on every model here: the tiny random
    model's token_acc is 0) does not stop the pipeline: the finish stages (a KV cut calibrated on a mix of chat and text rows, then distillation) recover the model, and the
    final model's shortfall is a note in the status. Parameter counts are what transformers loads."""
    from prunekit.core.data import load_messages, save_messages
    from prunekit.core.loading import load_model
    from prunekit.core.text import general_text
    layer = pl.text_layer_params(chat4)[0]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop_text": [1, 2], "order": [{"id": "text:2", "params_removed": layer},
                                                               {"id": "text:1", "params_removed": layer}]}))
    general_text(tmp_path / "text.jsonl", None)
    mixed = tmp_path / "mixed.jsonl"
    save_messages(mixed, load_messages(chat_data[0]) + load_messages(tmp_path / "text.jsonl")[:40])
    out = tmp_path / "out"
    cfg = recipe(chat4, (mixed, chat_data[1]), out, launcher="local", rounds=[{"prune": {"plan": str(plan)}}],
                 target={"params": pl.model_facts(chat4)["params"] - int(1.5 * layer)}, max_layers=2,
                 finish=[{"kv_cut": {"kv_heads": 1, "calibrate": True, "samples": 16, "calibration_steps": 2}},
                         "distill"], stages={"distill": SFT})
    monkeypatch.setattr(pipeline_runner, "recovery_shortfall", lambda cfg, original, current: "token_acc 0.1 is 0.2 of ...")
    assert main(["pipeline", str(write(tmp_path, cfg))]) == 0
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert [r["id"] for r in state["stages"]] == ["r1-1-prune", "f-1-kv_cut", "f-2-distill"]
    assert state["stages"][0]["drop_text"] == [1, 2]
    assert state["status"] == "done; note: the final model's token_acc 0.1 is 0.2 of ..."
    calibration = json.loads((out / "f-1-kv_cut" / "prunekit.json").read_text())["calibration"]
    assert calibration["samples"] == 16 and calibration["steps"] == 2
    final = state["stages"][-1]
    model, _ = load_model(final["output"])
    assert final["facts"]["params"] == model.num_parameters() and final["facts"]["kv_heads"] == 1
    assert "f-2-distill" in (out / "summary.md").read_text()
    bad = recipe(chat4, chat_data, tmp_path / "bad", launcher="local", rounds=["importance", "knockout", "prune"])
    with pytest.raises(PrunekitError, match="knockout runs on Ray; it cannot run with launcher: local"):
        pl.check_recipe(load_config("pipeline", None, bad))
    with pytest.raises(PrunekitError, match="prune.plan: .*nope.json: no such file"):
        pl.check_recipe(load_config("pipeline", None, {**bad, "rounds": [{"prune": {"plan": "nope.json"}}]}))


def one_prune_recipe(chat4, chat_data, tmp_path) -> tuple:
    """(output_dir, recipe): a local pipeline whose one stage prunes layer 1 by a plan file."""
    layer = pl.text_layer_params(chat4)[0]
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop_text": [1], "order": [{"id": "text:1", "params_removed": layer}]}))
    out = tmp_path / "out"
    return out, recipe(chat4, chat_data, out, launcher="local", rounds=[{"prune": {"plan": str(plan)}}], finish=[],
                       target={"params": pl.model_facts(chat4)["params"] - layer}, max_layers=1)


def test_a_resumed_stage_reports_the_time_of_all_its_attempts(chat4, chat_data, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a stage, then the same command again: the state keeps what the cut attempt spent, and the
    finished stage's time_s counts both attempts (a resumed distillation reported only its last call's minutes)."""
    import time
    out, cfg = one_prune_recipe(chat4, chat_data, tmp_path)
    real, calls = pipeline_runner.STAGE_RUNNERS["prune"], []

    def slow_then_interrupted(runner, *args):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
            raise KeyboardInterrupt
        return real(runner, *args)

    monkeypatch.setitem(pipeline_runner.STAGE_RUNNERS, "prune", slow_then_interrupted)
    recipe_file = write(tmp_path, cfg)
    assert main(["pipeline", str(recipe_file)]) == 130
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert state["stages"] == [] and state["unfinished"]["r1-1-prune"]["attempts"] == 1
    assert state["status"] == "interrupted: the same command resumes"   # not "failed: KeyboardInterrupt"
    assert state["unfinished"]["r1-1-prune"]["time_s"] >= 1.5
    capsys.readouterr()
    assert main(["pipeline", str(recipe_file)]) == 0
    state = json.loads((out / pl.STATE_FILE).read_text())
    (stage,) = state["stages"]
    assert stage["id"] == "r1-1-prune" and stage["attempts"] == 2 and stage["time_s"] >= 1.5
    assert state["unfinished"] == {}
    assert f"finished in {stage['time_s']:.0f}s over 2 attempts" in capsys.readouterr().out


def test_an_attempt_killed_outright_still_counts_its_time(chat4, chat_data, tmp_path, capsys):
    """SIGKILL (or a lost node, or a crash in native code) mid-stage says nothing and runs no handler: the stage's
    heartbeat file keeps how long the attempt ran, and the next run counts it (an outcome call that died silently at
    its time limit had dropped 9 minutes of distillation from the stage's time)."""
    import os
    import signal
    import time
    from tests.processes import start_cli, wait_for
    out, cfg = one_prune_recipe(chat4, chat_data, tmp_path)
    recipe_file = write(tmp_path, cfg)
    ready, running = tmp_path / "ready", out / pl.state.RUNNING_FILE
    hang = (f"import pathlib, time\nfrom prunekit.pipeline import state as _s, runner as _r\n_s.HEARTBEAT_S = 0.2\n"
            f"def _hang(*a, **k):\n    pathlib.Path({str(ready)!r}).touch()\n    time.sleep(300)\n"
            f"_r.STAGE_RUNNERS['prune'] = _hang\n")
    proc = start_cli(["pipeline", recipe_file], tmp_path, patch=hang)
    wait_for(ready.exists, proc)
    wait_for(lambda: running.is_file() and json.loads(running.read_text() or "{}").get("time_s", 0) >= 1.0, proc,
             what="a heartbeat of a second")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    capsys.readouterr()
    t0 = time.time()
    assert main(["pipeline", str(recipe_file)]) == 0
    (stage,) = json.loads((out / pl.STATE_FILE).read_text())["stages"]
    assert stage["attempts"] == 2 and 1.0 <= stage["time_s"] <= 1.0 + (time.time() - t0) + 1
    assert "[r1-1-prune] an earlier attempt ended without a word" in capsys.readouterr().out
    assert not running.exists()


def _kv_cut_runner(train, launcher: str, use_gpu: bool):
    """A Runner with just what its kv_cut stage reads: the recipe's train file, launcher and ray.use_gpu."""
    from types import SimpleNamespace
    from prunekit.config import KVCutStageConfig
    runner = pl.Runner.__new__(pl.Runner)
    runner.cfg = SimpleNamespace(train=train, trust_remote_code=False, launcher=launcher,
                                 ray=SimpleNamespace(use_gpu=use_gpu))
    runner._config = lambda stage, settings, *_: KVCutStageConfig(**settings)
    return runner


def test_kv_cut_stage_calibrates_on_the_train_set(tiny_chat_model_dir, chat_data, tmp_path):
    runner = _kv_cut_runner(chat_data[0], "local", use_gpu=False)
    settings = {"kv_heads": 1, "calibrate": True, "samples": 8, "calibration_steps": 2}
    record = pl.Runner._kv_cut(runner, "f-1-kv_cut", settings, None, {"output": str(tiny_chat_model_dir)}, None,
                               tmp_path / "out")
    assert record["calibrate"] is True and record["grouping"] == "mean"
    calibration = json.loads((tmp_path / "out" / "prunekit.json").read_text())["calibration"]
    assert calibration["samples"] == 8 and calibration["steps"] == 2 and len(calibration["layers"]) == 2


def test_kv_cut_stage_calibrates_where_the_pipeline_runs_model_sized_work(tiny_chat_model_dir, chat_data, tmp_path):
    """A Ray pipeline on GPUs calibrates the cut on a GPU worker (on_worker), as it evaluates: on the driver's CPU
    the cut of SmolLM2's 18 layers took ~130 s a layer on an H200 box (session 33)."""
    from prunekit.stages.kv_cut import kv_cut
    runner = _kv_cut_runner(chat_data[0], "ray", use_gpu=True)
    sent = []

    def on_worker(fn, *args, **kwargs):   # what the pipeline would hand a GPU worker, run here on CPU
        sent.append((fn, kwargs))
        return fn(*args, **kwargs)
    runner.on_worker = on_worker
    settings = {"kv_heads": 1, "calibrate": True, "samples": 4, "calibration_steps": 1}
    pl.Runner._kv_cut(runner, "f-1-kv_cut", settings, None, {"output": str(tiny_chat_model_dir)}, None,
                      tmp_path / "out")
    assert [fn for fn, _ in sent] == [kv_cut] and "device" not in sent[0][1]   # on_worker picks the device
    assert (tmp_path / "out" / "prunekit.json").is_file()


@pytest.fixture(scope="module")
def wide4(chat_model_dir):
    """A 4-layer tiny llama with a wide FFN (2048) and SmolLM2's tokenizer: a third of its parameters sit in the FFNs
    (the shared tiny chat models are almost all embedding, which only a hidden cut can shrink)."""
    return chat_model_dir(4, seed=3, intermediate_size=2048)


@pytest.mark.slow  # ~9 s: two rounds of width + SFT
def test_local_pipeline_rounds_of_width_within_the_guardrail(wide4, chat_data, tmp_path, capsys):
    """rounds: [width, sft] with launcher: local: round 1 removes what max_params_fraction allows (no mix may remove
    more), round 2 reaches the target; parameters are counted like every other stage (model_facts = what
    transformers loads). Sizes beyond the round's allowance stop the pipeline before any surgery."""
    from prunekit.core.loading import load_model
    facts = pl.model_facts(wide4)
    out = tmp_path / "out"
    cfg = recipe(wide4, chat_data, out, launcher="local", rounds=["width", "sft"], finish=[],
                 target={"params_fraction": 0.8}, max_params_fraction=0.12,
                 stages={"sft": SFT, "width": {"samples": 8, "max_length": 64}})
    assert main(["pipeline", str(write(tmp_path, cfg))]) == 0
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert [r["id"] for r in state["stages"]] == ["r1-1-width", "r1-2-sft", "r2-1-width", "r2-2-sft"]
    target = int(0.8 * facts["params"])
    inputs = [facts["params"], state["stages"][1]["facts"]["params"]]
    for rec, before in zip(state["stages"][0::2], inputs):
        after = rec["facts"]["params"]
        assert (1 - 0.12) * before <= after < before   # the guardrail, counted by model_facts
        model, _ = load_model(rec["output"])
        assert model.num_parameters() == after and model.config.intermediate_size == rec["sizes"]["intermediate_size"]
        assert rec["facts"]["text_layers"] == 4       # width, not depth
    r1, r2 = (json.loads((out / f"r{i}-1-width" / "prunekit.json").read_text())["budget"] for i in (1, 2))
    assert r1["at_least"] is True and r1["params"] == math.ceil(0.88 * facts["params"])   # the guardrail binds
    assert "hidden+ffn" in [m["mix"] for m in r1["mixes"] if m["reason"]]                 # its step removes too much
    assert r2["params"] == target and state["stages"][2]["facts"]["params"] <= target     # the target binds
    assert state["stages"][-1]["facts"]["params"] <= target and state["status"] == "done"
    # explicit sizes that remove more than the round allows: stopped before anything is written
    runner = pl.Runner(load_config("pipeline", None, cfg), pl.State(tmp_path / "s.json", {"stages": []}), tmp_path,
                       tmp_path, "t")
    current = {"output": str(wide4), "facts": facts}
    with pytest.raises(pl.PipelineStopped, match=r"round 1: width ffn 0.25 leaves .* below the .* the round's "
                                                 r"max_params_fraction 0.12 allows"):
        runner._width("r1-1-width", {"ffn": 0.25}, 1, current, target, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    capsys.readouterr()

    def bad(**over):
        return _err(["pipeline", str(write(tmp_path, {**cfg, "output_dir": str(tmp_path / "bad"), **over},
                                           "bad.yaml"))], capsys)
    assert "rounds[0].width.settings: give sizes (ffn / heads / hidden) or params_fraction, not both" in bad(
        rounds=[{"width": {"ffn": 0.5, "params_fraction": 0.5}}, "sft"])
    assert "rounds[0].width.params_fraction: must be in (0, 1)" in bad(
        rounds=[{"width": {"params_fraction": 1.5}}])
    assert "rounds: a round must prune (add `prune` after `knockout` or `importance`, or `width`)" in bad(rounds=["sft"])
