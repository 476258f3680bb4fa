"""Knockout sweeps on Ray Tune (CPU): a tiny text model with 2 concurrent trials (interrupted, then resumed), a tiny
Qwen2.5-VL's vision blocks, the report, the plan under a budget and `prune --plan`."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from prunekit import PrunekitError
from prunekit.cli import main
from prunekit.core.plan import make_plan
from prunekit.stages.knockout import knockout, validate
from tests.stages.test_knockout import STEPS, ko_config


@pytest.fixture(scope="module")
def chat4_dir(chat_model_dir):
    """A 4-layer tiny llama with SmolLM2's tokenizer (the shared tiny chat model has 2 layers)."""
    return chat_model_dir(4, seed=1)


@pytest.fixture(scope="module")
def text_sweep(ray_session, chat4_dir, chat_data, tmp_path_factory):
    """Run 1 stops after 3 trials (tune.max_trials) and one of them fails; run 2 (same name) finishes the sweep."""
    tmp = tmp_path_factory.mktemp("knockout-text")
    train, val = chat_data
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_TEST_FAIL_CANDIDATES", "text:1")  # test-only hook: this trial raises
        first = knockout(ko_config(chat4_dir, train, val, tmp, **{"tune.max_trials": 3}))
    first_report = json.loads((first.output / "results.json").read_text())
    baseline_result = first.run_dir / "trials" / "baseline" / "result.json"
    mtime = baseline_result.stat().st_mtime_ns
    second = knockout(ko_config(chat4_dir, train, val, tmp), resume=True)
    return {"first": first, "first_report": first_report, "second": second, "tmp": tmp, "model": chat4_dir,
            "baseline_untouched": baseline_result.stat().st_mtime_ns == mtime}


def test_text_sweep_rows_curves_and_report(text_sweep):
    result = text_sweep["second"]
    rows = {r["id"]: r for r in result.rows}
    assert list(rows) == ["baseline", "text:0", "text:1", "text:2", "text:3"]
    report = json.loads((result.output / "results.json").read_text())
    for cid, row in rows.items():
        assert row["status"] == "done" and row["eval_token_acc"] > 0 and row["params_removed"] >= 0
        curve = report["curves"][cid]
        assert sorted(map(int, curve["train_loss"])) == list(range(1, STEPS + 1))  # every step's train loss
        assert sorted(map(int, curve["eval"])) == [0, 2, 4]                          # step 0, every 2, final
        if cid != "baseline":
            assert row["verdict"] in ("free", "recoverable", "key")
            assert row["ratio"] == pytest.approx(row["eval_token_acc"] / rows["baseline"]["eval_token_acc"])
            assert row["early_excess"] is not None
            # what removing the candidate's layers removes, counted from the checkpoint's tensors
            from prunekit.core.plan import Candidate
            from prunekit.pipeline import text_layer_params
            per_layer = text_layer_params(text_sweep["model"])
            assert row["params_removed"] == sum(per_layer[i] for i in Candidate.parse(cid).text) > 0
            for metric in ("block_influence", "angular_distance", "nll_drop"):  # training-free scores beside
                assert isinstance(row[metric], float)
    with open(result.output / "results.csv") as f:
        assert [r["id"] for r in csv.DictReader(f)] == list(rows)
    summary = (result.output / "summary.md").read_text()
    assert "Spearman" in summary and "| text:2 |" in summary and "Suggested plan" in summary
    assert "block_influence/text" in report["correlations"]
    for png in ("ratio_text.png", "loss_curves.png", "text_block_influence.png", "text_nll_drop.png"):
        assert (result.output / png).stat().st_size > 1000
    assert json.loads((result.output / "prunekit.json").read_text())["stage"] == "knockout"


def test_resume_runs_only_the_unfinished_trials_and_errors_are_reported(text_sweep, chat4_dir, chat_data):
    first, second = text_sweep["first"], text_sweep["second"]
    assert sorted(first.ran) == ["baseline", "text:0", "text:1"]  # stopped after 3 trials (max_trials)
    assert "fails on purpose" in first.errors["text:1"]           # the failed trial is reported ...
    rows = {r["id"]: r for r in text_sweep["first_report"]["rows"]}
    assert rows["text:0"]["status"] == "done"                     # ... and did not stop the others
    assert rows["text:1"]["status"] == "error" and "fails on purpose" in rows["text:1"]["error"]
    assert rows["text:2"]["status"] == rows["text:3"]["status"] == "pending"
    assert sorted(second.ran) == ["text:1", "text:2", "text:3"]  # only the unfinished ones ran again
    assert text_sweep["baseline_untouched"] and not second.errors
    tune_runs = sorted(p.name for p in (second.run_dir / "tune").iterdir() if p.is_dir())
    assert tune_runs == ["attempt-0", "attempt-1"]
    # a changed trial setting under the same name is refused, not silently mixed
    with pytest.raises(PrunekitError, match="name sweep: that sweep .* ran with lr: 0.001, this config has 0.005"):
        validate(ko_config(chat4_dir, *chat_data, text_sweep["tmp"], lr=5e-3))


def test_plan_respects_the_budget_and_prune_applies_it(text_sweep, chat4_dir, tmp_path):
    result = text_sweep["second"]
    plan = json.loads((result.output / "plan.json").read_text())
    total = plan["params_total"]
    assert plan["params_removed"] <= 0.25 * total and len(plan["drop_text"]) <= 10
    assert len(plan["drop_text"]) < 4
    ratios = [p["ratio"] for p in plan["order"]]
    assert ratios == sorted(ratios, reverse=True)                 # best first
    assert main(["prune", str(chat4_dir), "--plan", str(result.output / "plan.json"), "-o", str(tmp_path / "p")]) == 0
    from prunekit.core.loading import load_model
    pruned, _ = load_model(tmp_path / "p")
    full, _ = load_model(chat4_dir)
    kept = [i for i in range(4) if i not in plan["drop_text"]]
    assert pruned.config.num_hidden_layers == len(kept)
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.down_proj.weight, full.model.layers[old].mlp.down_proj.weight)
    # a tighter budget on the same rows: one layer at most, or too few parameters for any
    rows = [r for r in result.rows if r["size"]]
    for r in rows:
        r["verdict"], r["ratio"] = "free", 1.0 - 0.01 * r["text"][0]
    one = make_plan(rows, total, 4, 0, max_params_fraction=0.25, max_layers=1)
    assert one["drop_text"] == [0] and [s["reason"] for s in one["skipped"]] == ["over budget"] * 3
    per_layer = rows[0]["params_removed"]
    two = make_plan(rows, total, 4, 0, max_params_fraction=2.5 * per_layer / total, max_layers=10)
    assert two["drop_text"] == [0, 1] and two["params_removed"] == 2 * per_layer
    all_free = make_plan(rows, total, 4, 0, max_params_fraction=1.0, max_layers=10)
    assert len(all_free["drop_text"]) == 3                        # never every layer


def test_vision_block_sweep(ray_session, tiny_vlm_chat_model_dir, tmp_path):
    from prunekit.core.datasets import easy_vqa_to_messages
    model = tiny_vlm_chat_model_dir("qwen2_5_vl")
    easy_vqa_to_messages(tmp_path / "train.jsonl", val_path=tmp_path / "val.jsonl", limit=8)
    cfg = ko_config(model, tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path, batch_size=2, lr=5e-3,
                    max_length=128, **{"candidates.text": "", "candidates.vision": "all", "importance": False})
    result = knockout(cfg)
    rows = {r["id"]: r for r in result.rows}
    assert list(rows) == ["baseline", "vision:0", "vision:1", "vision:2", "vision:3"]
    assert all(r["status"] == "done" and r["eval_token_acc"] is not None for r in rows.values())
    assert all(r["verdict"] in ("free", "recoverable", "key") and r["kind"] == "vision"
               for cid, r in rows.items() if cid != "baseline")
    curves = json.loads((result.output / "results.json").read_text())["curves"]
    assert all(sorted(map(int, c["eval"])) == [0, 2, 4] for c in curves.values())
    assert (result.output / "ratio_vision.png").stat().st_size > 1000
    assert set(result.plan) >= {"drop_text", "drop_vision"} and result.plan["drop_text"] == []


def test_a_trial_whose_process_dies_runs_once_more(ray_session, chat4_dir, chat_data, tmp_path, capsys):
    """A trial's worker process dying (on an H200, segfaults in 2 of 17 knockout trials) is not the trial's verdict:
    the sweep runs such trials once more in fresh processes and finishes. A trial whose code raises is not retried
    (test_resume_runs_only_the_unfinished_trials_and_errors_are_reported)."""
    train, val = chat_data
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_TEST_CRASH_AT_STEP", "1")   # test-only hook: each trial's process dies at its step 1, once
        result = knockout(ko_config(chat4_dir, train, val, tmp_path, **{"tune.max_trials": 2}))
    line = next(x for x in capsys.readouterr().out.splitlines() if "lost their worker process" in x)
    assert line.startswith("2 trial(s) lost their worker process (") and "running them once more" in line
    assert "baseline" in line and "text:0" in line and "died" in line
    assert not result.errors and sorted(result.ran) == ["baseline", "text:0"]
    report = json.loads((result.output / "results.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["baseline"]["status"] == rows["text:0"]["status"] == "done"
    for cid in ("baseline", "text_0"):   # each died once (the marker), then ran all its steps
        trial = result.run_dir / "trials" / cid
        assert (trial / ".crashed-at-step-1").is_file()
        assert json.loads((trial / "result.json").read_text())["steps"] == STEPS


def test_a_sweep_whose_first_trials_all_fail_the_same_way_stops(ray_session, chat4_dir, chat_data, tmp_path):
    """Every trial raising the same error (on an H200 every knockout trial died importing wandb, which the worker
    image lacked) stops the sweep once the first trials to end agree, in one line, instead of failing all of them."""
    from prunekit.distributed.tune import SYSTEMIC_AFTER
    train, val = chat_data
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_TEST_FAIL_CANDIDATES", "*")   # test-only hook: every trial raises the same error
        with pytest.raises(PrunekitError) as e:
            knockout(ko_config(chat4_dir, train, val, tmp_path, **{"tune.max_concurrent_trials": 1}))
    assert str(e.value) == (f"the first {SYSTEMIC_AFTER} trials all failed the same way, so the sweep stopped (re-run "
                            f"the same command once it is fixed): RuntimeError: PRUNEKIT_TEST_FAIL_CANDIDATES: every "
                            f"trial fails on purpose")
    trials = tmp_path / "runs" / "sweep" / "trials"
    assert len(list(trials.glob("*/error.json"))) == SYSTEMIC_AFTER   # the other 2 of the 5 never ran
    assert not list(trials.glob("*/result.json"))
