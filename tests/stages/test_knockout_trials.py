"""Knockout trial modes and trial sizes (CPU): LoRA trials (`trial_mode: lora`) beside full ones on the same tiny
model and data (the report says which mode made the verdicts; the shared base weights never change), trials of two
gloo workers (FSDP2 inside the trial) against the one-worker run, the memory plan of both, and their bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit import PrunekitError
from prunekit.config import load_config
from prunekit.core.plan import Candidate
from prunekit.stages.knockout import knockout, validate

STEPS = 8


@pytest.fixture(scope="module")
def chat4_dir(tmp_path_factory, smollm2_dir):
    """A 4-layer tiny llama with SmolLM2's tokenizer."""
    from tests.conftest import save_tiny_chat_model
    return save_tiny_chat_model(tmp_path_factory.mktemp("chat4-trials"), smollm2_dir, layers=4, seed=1)


def ko_config(model, data, tmp_path, **over):
    train, val = data
    base = {"model": str(model), "train": str(train), "val": str(val), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "max_steps": STEPS, "max_length": 64, "batch_size": 4,
            "eval_interval": 4, "log_interval": 1, "eval_max_samples": 16, "lr": 1e-2, "warmup_ratio": 0.0,
            "scheduler": "constant", "wandb.mode": "disabled", "importance": False, "candidates.text": "1,2", **over}
    return load_config("knockout", None, base)


@pytest.fixture(scope="module")
def sweeps(ray_session, chat4_dir, chat_data, tmp_path_factory):
    """The same candidates on the same data: full trials, LoRA trials, full trials of 2 gloo workers each."""
    out = {}
    sweeps = {"full": {}, "lora": {"trial_mode": "lora"}, "full_2_workers": {"tune.workers_per_trial": 2,
                                                                                  "tune.cpus_per_trial": 0.5}}
    for key, over in sweeps.items():
        out[key] = knockout(ko_config(chat4_dir, chat_data, tmp_path_factory.mktemp(f"ko-{key}"), **over))
    return out


def rows_of(result) -> dict[str, dict]:
    return {r["id"]: r for r in result.rows}


def trial_record(result, cid: str) -> dict:
    from prunekit.core.plan import trial_dir
    return json.loads((trial_dir(result.run_dir, Candidate.parse(cid)) / "result.json").read_text())


# ---- LoRA trials -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # a Ray cluster
def test_lora_trials_give_verdicts_and_the_report_names_the_mode(sweeps):
    full, lora = rows_of(sweeps["full"]), rows_of(sweeps["lora"])
    assert list(lora) == list(full) == ["baseline", "text:1", "text:2"]
    for cid, row in lora.items():
        assert row["status"] == "done" and row["trial_mode"] == "lora" and full[cid]["trial_mode"] == "full"
        assert row["eval_token_acc"] > 0
        # what a LoRA trial trains: the adapters, a small part of what a full trial trains
        assert 0 < row["params_trainable"] < 0.1 * full[cid]["params_trainable"]
        assert row["eval_loss"] != pytest.approx(full[cid]["eval_loss"], rel=1e-3)  # another measurement
        if cid != "baseline":
            assert row["verdict"] in ("free", "recoverable", "key")
            assert row["ratio"] == pytest.approx(row["eval_token_acc"] / lora["baseline"]["eval_token_acc"])
    assert sweeps["lora"].name != sweeps["full"].name  # a LoRA sweep never reuses full trials
    out = sweeps["lora"].output
    report = json.loads((out / "results.json").read_text())
    assert report["trial_mode"] == "lora" and report["trial"]["lora"]["rank"] == 16
    assert report["trial"]["trains"].startswith("LoRA adapters (rank 16, alpha 32) on the frozen pruned model")
    assert json.loads((out / "plan.json").read_text())["trial_mode"] == "lora"
    with open(out / "results.csv") as f:
        assert {r["trial_mode"] for r in csv.DictReader(f)} == {"lora"}
    assert "Trial mode: **lora**" in (out / "summary.md").read_text()
    assert "Trial mode: **full**" in (sweeps["full"].output / "summary.md").read_text()
    assert json.loads((sweeps["full"].output / "results.json").read_text())["trial_mode"] == "full"


# ---- trials of several workers -------------------------------------------------------------------------------

@pytest.mark.slow  # a Ray cluster
def test_two_worker_trials_match_the_one_worker_run(sweeps):
    one, two = rows_of(sweeps["full"]), rows_of(sweeps["full_2_workers"])
    assert list(two) == list(one)
    for cid, row in two.items():
        assert row["status"] == "done" and row["workers"] == 2 and one[cid]["workers"] == 1
        # the trial's batch split over its workers: the same steps, so the same numbers up to float sums
        assert row["eval_loss"] == pytest.approx(one[cid]["eval_loss"], rel=1e-4)
        assert row["eval_token_acc"] == pytest.approx(one[cid]["eval_token_acc"], abs=1e-6)
        assert (row["verdict"], row["early_spike"]) == (one[cid]["verdict"], one[cid]["early_spike"])
        curve1, curve2 = trial_record(sweeps["full"], cid), trial_record(sweeps["full_2_workers"], cid)
        assert sorted(map(int, curve2["train_loss"])) == list(range(1, STEPS + 1))
        for step, loss in curve1["train_loss"].items():
            assert curve2["train_loss"][step] == pytest.approx(loss, rel=1e-4)
        # both ranks took part, in processes of their own, each with half the batch, FSDP2 over them
        workers = curve2["extra"]["workers"]
        assert [w["rank"] for w in workers] == [0, 1] and workers[0]["pid"] != workers[1]["pid"]
        assert [(w["batch_size"], w["strategy"]) for w in workers] == [(2, "fsdp")] * 2
        assert [(w["rank"], w["batch_size"], w["strategy"]) for w in curve1["extra"]["workers"]] == [(0, 4, "ddp")]
        assert row["params_trainable"] == one[cid]["params_trainable"]
    assert sweeps["full_2_workers"].name == sweeps["full"].name  # the same trial settings


@pytest.mark.slow  # a Ray cluster
def test_worker_groups_ask_only_this_clusters_state_api(ray_session, monkeypatch):
    """Ray Train's placement-group cleaner asks a State API whether the run's controller lives; another Ray
    instance's would say no, and the cleaner would remove a live trial's placement group."""
    import os
    import requests
    from prunekit.distributed.train import NOWHERE, STATE_API_ENV, controller_knows_cluster, own_state_api
    ours = ray_session._private.worker.global_worker.node.session_name

    class Reply:
        def __init__(self, session):
            self.session = session

        def json(self):
            return {"session_name": self.session}
    monkeypatch.delenv(STATE_API_ENV, raising=False)
    monkeypatch.setattr(requests, "get", lambda url, **kw: Reply("session_of_another_instance"))
    assert own_state_api() == NOWHERE
    monkeypatch.setattr(requests, "get", lambda url, **kw: Reply(ours))
    assert own_state_api().startswith("http://") and own_state_api() != NOWHERE

    def refused(url, **kw):
        raise requests.ConnectionError("nothing listens")
    monkeypatch.setattr(requests, "get", refused)
    assert own_state_api() == NOWHERE
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    with controller_knows_cluster():  # travels to the controller (and its cleaner) with Ray Train's own variables
        assert os.environ[STATE_API_ENV] == get_env_vars_to_propagate()[STATE_API_ENV] == NOWHERE
    assert STATE_API_ENV not in os.environ

# ---- a LoRA trial in this process -------------------------------------------------------------------------------

def test_lora_trial_trains_adapters_and_never_writes_the_shared_base(chat4_dir, chat_data, tmp_path):
    from prunekit.distributed.tune import TuneTrialReporter
    from prunekit.engine.trial import load_shared_base, run_trial
    cfg = ko_config(chat4_dir, chat_data, tmp_path, trial_mode="lora")
    base = load_shared_base(cfg)
    before = {k: v.copy() for k, v in base["weights"].items()}
    built = {}

    def keep(model):
        built["model"] = model
        built["weights"] = {n: p for n, p in model.named_parameters()}
    reports: list[dict] = []
    reporter = TuneTrialReporter(tmp_path / "trial", "lora-trial", cfg, STEPS, reports.append)
    metrics = run_trial(cfg, base, Candidate.parse("text:1"), reporter, torch.device("cpu"),
                        before_training=keep)
    assert [r["step"] for r in reports if r["fresh_eval"]] == [0, 4, 8] and metrics["eval/token_acc"] > 0
    for key, array in base["weights"].items():  # the shared weights: bit for bit what they were
        assert np.array_equal(array, before[key]), key
    # the trial's frozen weights are the shared arrays themselves (no copy per trial), untouched by training
    q = built["weights"]["model.layers.0.self_attn.q_proj.weight"]
    assert np.shares_memory(q.detach().numpy(), base["weights"]["model.layers.0.self_attn.q_proj.weight"])
    assert not any(p.requires_grad for p in built["weights"].values())
    lora = {n: p for n, p in built["model"].named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # B starts at zero: it trained
    assert any(float(p.detach().abs().max()) > 0 for n, p in lora.items() if "lora_B" in n)
    assert metrics["params/trainable"] == sum(p.numel() for p in lora.values())
    assert metrics["params/trainable"] < 0.1 * sum(p.numel() for p in built["weights"].values())


def _lora_trial_rank(rank: int, port: int, cfg_json: dict, out_dir: str) -> None:
    """One process of a 2-process (gloo) LoRA trial: what a trial's Ray Train worker runs, without Ray."""
    import os
    import torch.distributed as dist
    from prunekit.config import KnockoutConfig
    from prunekit.distributed.tune import TuneTrialReporter
    from prunekit.engine.trial import load_shared_base, run_trial
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cfg = KnockoutConfig.model_validate(cfg_json)
        reporter = TuneTrialReporter(Path(out_dir) / "trial", "lora-trial", cfg, STEPS, lambda r: None)
        metrics = run_trial(cfg, load_shared_base(cfg), Candidate.parse("text:1"), reporter, torch.device("cpu"))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


def test_lora_trial_over_two_gloo_processes_matches_one(chat4_dir, chat_data, tmp_path):
    """LoRA adapters under FSDP2 (frozen base shards, trained adapters) take the one-process trial's steps."""
    import socket
    import torch.multiprocessing as mp
    from prunekit.distributed.tune import TuneTrialReporter
    from prunekit.engine.trial import load_shared_base, run_trial
    cfg = ko_config(chat4_dir, chat_data, tmp_path, trial_mode="lora")
    reporter = TuneTrialReporter(tmp_path / "one", "lora-trial", cfg, STEPS, lambda r: None)
    one = run_trial(cfg, load_shared_base(cfg), Candidate.parse("text:1"), reporter, torch.device("cpu"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_lora_trial_rank, args=(port, cfg.model_dump(mode="json"), str(tmp_path)), nprocs=2)
    two = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    same = ("eval/loss", "eval/token_acc", "train/loss", "train/grad_norm", "params/trainable")
    assert [two[0][k] for k in same] == [two[1][k] for k in same]  # both ranks: the all-reduced numbers
    for key in ("eval/loss", "train/loss"):
        assert two[0][key] == pytest.approx(one[key], rel=1e-4)
    assert two[0]["eval/token_acc"] == pytest.approx(one["eval/token_acc"], abs=1e-6)
    assert two[0]["params/trainable"] == one["params/trainable"]


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_lora_trials_on_a_family_without_lora_targets_fail_before_any_trial(chat4_dir, chat_data, tmp_path,
                                                                          monkeypatch):
    import dataclasses
    from prunekit.core import families
    # a family whose attention output projection is not where LoRA looks for it
    monkeypatch.setitem(families.MODEL_FAMILIES, "llama",
                        dataclasses.replace(families.MODEL_FAMILIES["llama"], o_proj="out"))
    with pytest.raises(PrunekitError) as e:
        validate(ko_config(chat4_dir, chat_data, tmp_path, trial_mode="lora"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("trial_mode: lora: family llama has no LoRA targets")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(PrunekitError, match="^trial_mode: lora: lora.target_modules: nope not among"):
        validate(ko_config(chat4_dir, chat_data, tmp_path, trial_mode="lora", **{"lora.target_modules": ["nope"]}))


def test_a_lora_sweep_names_its_whole_lora_block_and_a_full_one_none(chat4_dir, chat_data, tmp_path):
    """Trials default to LoRA dropout 0 now; sweeps named before that (dropout 0.05, the block left out of the name
    at its default) must never be resumed by a default LoRA sweep, and full sweeps keep their names."""
    from prunekit.engine.reporting import settings_dump
    from prunekit.stages.knockout import NOT_TRIAL_SETTINGS
    full, lora = (ko_config(chat4_dir, chat_data, tmp_path, **over) for over in ({}, {"trial_mode": "lora"}))
    assert full.lora is None and "lora" not in settings_dump(full, NOT_TRIAL_SETTINGS)
    assert settings_dump(lora, NOT_TRIAL_SETTINGS)["lora"] == {"rank": 16, "alpha": 32, "dropout": 0.0,
                                                               "target_modules": None}


@pytest.mark.parametrize("over, message", [
    ({"lora.rank": 4}, "lora: the adapters' settings need trial_mode: lora"),
    ({"trial_mode": "lora", "lora.rank": 0}, "lora: rank must be >= 1 and dropout in [0, 1)"),
    ({"trial_mode": "adapters"}, "trial_mode: Input should be 'full' or 'lora'"),
    ({"tune.gpus_per_trial": 1.5}, "gpus_per_trial: above 1 it is the GPUs of a trial, a whole number (got 1.5)"),
    ({"tune.workers_per_trial": 0}, "workers_per_trial must be >= 1"),
    ({"tune.workers_per_trial": 2, "tune.gpus_per_trial": 0.5}, "workers_per_trial: 2 workers need a GPU each"),
    ({"tune.workers_per_trial": 4, "tune.gpus_per_trial": 2}, "workers_per_trial: 4 disagrees with gpus_per_trial"),
    ({"tune.workers_per_trial": 3}, "batch_size 4 must split evenly over a trial's 3 workers"),
])
def test_bad_trial_settings_are_one_line_naming_the_key(chat4_dir, chat_data, tmp_path, over, message):
    with pytest.raises(PrunekitError) as e:
        ko_config(chat4_dir, chat_data, tmp_path, **over)
    assert "\n" not in str(e.value) and message in str(e.value)


def test_width_search_trials_stay_one_process(tmp_path):
    with pytest.raises(PrunekitError, match="tune: a width-search trial is one process"):
        load_config("width-search", None, {"model": "m", "train": "t", "output_dir": "o", "tune.gpus_per_trial": 2})


def test_trial_settings_at_their_defaults_keep_earlier_sweep_names(chat4_dir, chat_data, tmp_path):
    from prunekit.stages.knockout import sweep_name, trial_settings
    cfg = ko_config(chat4_dir, chat_data, tmp_path)
    dumped = cfg.model_dump(mode="json")
    assert not {"trial_mode", "lora"} & set(dumped) and "workers_per_trial" not in dumped["tune"]
    lora = ko_config(chat4_dir, chat_data, tmp_path, trial_mode="lora")
    assert trial_settings(lora)["trial_mode"] == "lora" and sweep_name(lora) != sweep_name(cfg)
    # the workers of a trial are not a trial setting: a sweep may finish on another number of them
    two = ko_config(chat4_dir, chat_data, tmp_path, **{"tune.workers_per_trial": 2})
    assert sweep_name(two) == sweep_name(cfg) and two.tune.workers == 2
    assert ko_config(chat4_dir, chat_data, tmp_path, **{"tune.gpus_per_trial": 4}).tune.workers == 4
    assert ko_config(chat4_dir, chat_data, tmp_path, **{"tune.gpus_per_trial": 0.25}).tune.workers == 1


# ---- the memory plan of LoRA and multi-GPU trials -----------------------------------------------------------------

TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": False}
QWEN25_7B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}


def plan_config(**over):
    return load_config("knockout", None, {"model": "m", "train": "t", "val": "v", "output_dir": "o", "batch_size": 4,
                                          "max_length": 32, "bf16": True, "param_dtype": "bfloat16", **over})


def test_memory_plan_of_lora_and_multi_gpu_trials_by_hand():
    from prunekit.core import memory_plan as mp
    shape = mp.model_shape(TINY)
    H, Q, K, I, V, L = 64, 64, 32, 128, 1000, 4
    P = 2 * V * H + L * (H * Q + 2 * H * K + Q * H + 3 * H * I + 2 * H) + H
    lora = L * 16 * ((H + Q) + 2 * (H + K) + (Q + H) + 2 * (H + I) + (I + H))  # A and B on all 7 projections
    assert (P, lora, shape.lora_params(16)) == (276_032, 65_536, 65_536)

    full = mp.settings_from_config("knockout", plan_config(**{"tune.gpus_per_trial": 1}))
    f = mp.plan(shape, full)
    assert (f.parts["weights"], f.parts["gradients"], f.parts["optimizer"]) == (2 * P, 2 * P, 4 * P)
    # LoRA trials: the frozen model's weights, gradients and AdamW state of the adapters only
    s = mp.settings_from_config("knockout", plan_config(trial_mode="lora", **{"tune.gpus_per_trial": 1}))
    assert (s.lora, s.lora_rank, s.lora_dropout, s.gpus, s.strategy) == (True, 16, 0.0, 1, "ddp")  # trials: no dropout
    p = mp.plan(shape, s)
    assert (p.parts["weights"], p.parts["gradients"], p.parts["optimizer"]) == (2 * P, 2 * lora, 4 * lora)
    assert mp.describe(s) == "1 trial per GPU, LoRA trials (rank 16), bf16 weights, batch 4 x 32 tokens"
    # LoRA dropout keeps each adapter input and its mask: the activations grow past a full trial's
    dropout = mp.settings_from_config("knockout", plan_config(trial_mode="lora", **{"tune.gpus_per_trial": 1,
                                                                                    "lora.dropout": 0.05}))
    assert mp.plan(shape, dropout).activations_full > f.activations_full > p.activations_full
    # a trial over 2 GPUs: FSDP2 shards of the model, half the trial's batch on each
    two = mp.settings_from_config("knockout", plan_config(**{"tune.gpus_per_trial": 2}))
    assert (two.gpus, two.strategy, two.batch_size, mp.gpus_used(two)) == (2, "fsdp", 2, 2)
    t = mp.plan(shape, two)
    root, unit = 2 * V * H + H, shape.largest_unit
    assert (t.parts["weights"], t.parts["gradients"], t.parts["optimizer"]) == (2 * P / 2, 2 * P / 2, 4 * P / 2)
    assert t.parts["gathered (fsdp/zero-3 working set)"] == 2 * 2 * (root + 2 * unit)
    assert mp.describe(two).startswith("each trial fsdp2 over 2 GPUs, bf16 weights, batch 2 x 32 tokens")
    # ... and LoRA trials over 2 GPUs gather no gradients of the frozen units
    both = mp.plan(shape, mp.settings_from_config("knockout", plan_config(
        trial_mode="lora", **{"tune.gpus_per_trial": 2})))
    assert (both.parts["gradients"], both.parts["optimizer"]) == (2 * lora / 2, 4 * lora / 2)
    assert both.parts["gathered (fsdp/zero-3 working set)"] == 2 * (root + 2 * unit)


def test_plan_points_a_knockout_that_fits_nowhere_to_lora_trials_or_more_gpus_per_trial(tmp_path):
    from prunekit.core import memory_plan as mp
    shape = mp.model_shape(QWEN25_7B)
    GiB = mp.GiB
    s = mp.settings_from_config("knockout", plan_config(max_length=2048, **{"tune.gpus_per_trial": 1}))
    # a 7B full trial needs 8 bytes a parameter before activations: not on one 48 GiB GPU, whatever the settings
    fits, line = mp.verdict_line(shape, s, 48 * GiB, max_gpus=1, what="knockout of qwen7b")
    assert not fits and "\n" not in line and "cannot fit under any strategy on 1 GPU of 48.0 GiB" in line
    assert "(LoRA trials fit: trial_mode: lora" in line
    lora = mp.settings_from_config("knockout", plan_config(max_length=2048, trial_mode="lora",
                                                            **{"tune.gpus_per_trial": 1}))
    assert mp.smallest_fix(shape, lora, 48 * GiB, max_gpus=1) is not None
    # with 4 GPUs a full trial spread over them fits: the fix names gpus_per_trial
    fits, line = mp.verdict_line(shape, s, 48 * GiB, max_gpus=4, what="knockout of qwen7b")
    assert not fits and "smallest fix:" in line and "tune.gpus_per_trial: " in line and "(each trial FSDP2 over" in line
