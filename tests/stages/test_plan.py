"""`prunekit plan` (the table, the verdict and its fix, one-line errors) and the fit check the stages run before
training (the memory model itself: tests/core/test_memory_plan.py)."""
from __future__ import annotations

import json

import pytest
import yaml

from prunekit import PrunekitError
from prunekit.config import load_config
from prunekit.core.memory_plan import GiB
from tests.conftest import own_lines, run_cli
from tests.core.test_memory_plan import QWEN25_7B, QWEN25_15B, write_config


def test_plan_command_table_verdict_and_fix(tmp_path, capsys):
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", "--gpu-memory", "80GiB", "--set", "bf16=true",
                             "--set", "max_length=2048")
    assert code == 1 and not own_lines(err)
    assert "qwen7b (qwen2): 7.6B parameters" in out
    for row in ("weights", "gradients", "optimizer state (AdamW)", "bf16 autocast weight copies", "activations <-",
                "activations, gradient_checkpointing", "loss buffers (chunk 1024)", "peak", "GPU memory (--gpu-memory)",
                "host RAM per worker"):
        assert row in out, row
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("sft of qwen7b needs") and "GiB short; smallest fix:" in verdict

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({"model": "ignored", "train": "t.jsonl", "output_dir": "o", "bf16": True,
                                      "max_length": 2048, "gradient_checkpointing": True,
                                      "parallel": {"strategy": "fsdp"}, "ray": {"use_gpu": True}}))
    code, out, err = run_cli(capsys, "plan", model / "config.json", "--stage", "sft", "--gpus", 8, "--config", recipe,
                             "--gpu-memory", "80GiB")
    assert code == 0 and "fsdp2 over 8 GPUs" in out and out.strip().splitlines()[-1].startswith("fits: sft of qwen7b")
    assert "gathered units (fsdp / ZeRO-3)" in out and "activations, gradient_checkpointing <-" in out

    code, out, _ = run_cli(capsys, "plan", model, "--stage", "sft", "--gpus", 8, "--config", recipe,
                           "--gpu-memory", "80GiB", "--json")
    record = json.loads(out)
    assert code == 0 and record["fits"] is True and record["params"] == 7_615_616_512
    assert record["required_bytes"] < 80 * GiB

    # no GPU here and no --gpu-memory: the table, and no verdict
    code, out, _ = run_cli(capsys, "plan", model, "--stage", "sft")
    assert code == 0 and out.strip().splitlines()[-1].startswith("fit not checked")


def test_plan_command_distill_and_knockout(tmp_path, capsys):
    student = write_config(tmp_path / "student", {**QWEN25_7B, "num_hidden_layers": 20})
    teacher = write_config(tmp_path / "teacher", QWEN25_7B)
    code, out, _ = run_cli(capsys, "plan", student, "--stage", "distill", "--teacher", teacher, "--gpus", 8,
                           "--gpu-memory", "141GiB", "--set", "bf16=true", "--set", "param_dtype=bfloat16",
                           "--set", "parallel.strategy=fsdp", "--set", "gradient_checkpointing=true")
    assert code == 0 and "teacher 7.6B parameters" in out and "\nteacher " in out
    code, _, err = run_cli(capsys, "plan", student, "--stage", "distill", "--gpu-memory", "80GiB")
    assert code == 2 and err.strip() == ("prunekit plan: error: --stage distill: give the teacher (--teacher MODEL, "
                                         "or teacher: in --config)")
    # four knockout trials per GPU (tune.gpus_per_trial 0.25) of a 1.5B model on one 80 GiB GPU: fewer per GPU
    small = write_config(tmp_path / "q15", {**QWEN25_15B, "model_type": "qwen2"})
    code, out, _ = run_cli(capsys, "plan", small, "--stage", "knockout", "--gpu-memory", "80GiB",
                           "--set", "tune.gpus_per_trial=0.25", "--set", "max_length=2048", "--set", "bf16=true")
    assert code == 1 and "4 trials per GPU" in out and "peak (all trials on one GPU)" in out
    assert "tune.gpus_per_trial:" in out.strip().splitlines()[-1]


def test_plan_command_errors_are_one_line(tmp_path, capsys):
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    for argv, message in [
        (["--gpu-memory", "eighty"], "--gpu-memory: expected a size such as 80GiB, 80GB or 81920MiB, got 'eighty'"),
        (["--gpu-memory", "100MB"], "--gpu-memory: '100MB' is less than 0.25 GiB"),
        (["--gpus", "0"], "--gpus: must be >= 1, got 0"),
        (["--config", tmp_path / "missing.yaml"], f"--config {tmp_path / 'missing.yaml'}: cannot read"),
        (["--set", "batch_size=0"], "flags: config: batch_size must be >= 1"),
    ]:
        code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", *argv)
        assert code == 2 and not out, argv
        assert err.count("\n") == 1 and err.startswith(f"prunekit plan: error: {message}"), err
    code, _, err = run_cli(capsys, "plan", tmp_path / "nowhere", "--stage", "sft", "--gpu-memory", "80GiB")
    assert code == 2 and "MODEL" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "plan", tmp_path / "empty", "--stage", "sft", "--gpu-memory", "80GiB")
    assert code == 2 and err.strip().endswith("no config.json in that directory")
    # fits nowhere: the table on stdout, the one line on stderr, exit 2
    code, out, err = run_cli(capsys, "plan", model, "--stage", "sft", "--gpus", 1, "--gpu-memory", "16GiB")
    assert code == 2 and err.count("\n") == 1
    assert "cannot fit under any strategy on 1 GPU of 16.0 GiB" in err and "too much" in err


# ---- the check before training ------------------------------------------------------------------------------------

def _sft_cfg(model, data, tmp_path, **over):
    train, val = data
    return load_config("sft", None, {"model": str(model), "train": str(train), "val": str(val),
                                     "output_dir": str(tmp_path / "out"), "storage_path": str(tmp_path / "runs"),
                                     "wandb.mode": "disabled", **over})


def test_training_stage_fails_before_any_worker_when_the_plan_does_not_fit(tiny_chat_model_dir, chat_data, tmp_path):
    from prunekit.stages import training
    # 64 rows of 8192 tokens on the tiny model want ~40 GiB; the configured GPUs have 8
    cfg = _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192, gpu_memory="8GiB",
                   **{"ray.use_gpu": True, "launcher": "local"})
    with pytest.raises(PrunekitError) as e:
        training.sft(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("memory plan: sft of tiny-chat")
    assert "GiB short; smallest fix:" in msg and "memory_check: false skips this check" in msg
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()  # nothing started
    # memory_check: false skips it (the run then gets as far as the device: there is no GPU here)
    cfg = _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192, gpu_memory="8GiB",
                   memory_check=False, **{"ray.use_gpu": True, "launcher": "local"})
    with pytest.raises(PrunekitError, match="this process sees no GPU"):
        training.sft(cfg)
    # on CPU (ray.use_gpu false) no check runs, whatever gpu_memory says
    from prunekit.stages.plan import check_before_training
    check_before_training("sft", _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192,
                                          gpu_memory="8GiB"))
    # ... and without gpu_memory a machine without GPUs skips it silently
    check_before_training("sft", _sft_cfg(tiny_chat_model_dir, chat_data, tmp_path, batch_size=64, max_length=8192,
                                          **{"ray.use_gpu": True}))


def test_knockout_and_distill_check_before_training(tmp_path, tiny_chat_model_dir, chat_data):
    from prunekit.stages.plan import check_before_training
    train, val = chat_data
    model = write_config(tmp_path / "qwen7b", QWEN25_7B)
    ko = load_config("knockout", None, {"model": str(model), "train": str(train), "val": str(val),
                                        "output_dir": str(tmp_path / "ko"), "gpu_memory": "80GiB",
                                        "tune.gpus_per_trial": 1, "bf16": True})
    with pytest.raises(PrunekitError, match=r"^memory plan: knockout of qwen7b needs .* GiB short; smallest fix: "):
        check_before_training("knockout", ko)
    big = load_config("knockout", None, {"model": str(model), "train": str(train), "val": str(val),
                                         "output_dir": str(tmp_path / "ko"), "gpu_memory": "24GiB",
                                         "tune.gpus_per_trial": 1})
    with pytest.raises(PrunekitError, match="cannot fit under any strategy on 1 GPU of 24.0 GiB: even .* too much"):
        check_before_training("knockout", big)
    # the stage itself stops there, before any trial (and before loading the base weights)
    from prunekit.stages.knockout import knockout
    cfg = load_config("knockout", None, {"model": str(tiny_chat_model_dir), "train": str(train), "val": str(val),
                                         "output_dir": str(tmp_path / "ko2"), "storage_path": str(tmp_path / "runs"),
                                         "gpu_memory": "1GiB", "tune.gpus_per_trial": 0.5})
    with pytest.raises(PrunekitError, match="^memory plan: knockout of tiny-chat"):
        knockout(cfg)
    assert not (tmp_path / "runs").exists()
    # distillation: the teacher counts
    dist = load_config("distill", None, {"model": str(model), "teacher": str(model), "train": str(train),
                                         "output_dir": str(tmp_path / "d"), "gpu_memory": "80GiB", "bf16": True,
                                         "param_dtype": "bfloat16", "ray.use_gpu": True})
    with pytest.raises(PrunekitError, match="^memory plan: distill of qwen7b needs"):
        check_before_training("distill", dist)
