"""The training engine on Ray Train (CPU, gloo): DDP, FSDP and DeepSpeed ZeRO-2 match one worker, a killed worker
resumes from its checkpoint, LoRA then merge."""
from __future__ import annotations

import json

import pytest

from prunekit.stages import training
from tests.stages.test_training import cfg_for, metrics_lines


def test_two_workers_ddp_fsdp_and_zero2_match_one_worker_with_double_batch(ray_session, tiny_chat_model_dir,
                                                                            chat_data, tmp_path):
    one = training.sft(cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, "one", max_steps=3, batch_size=4,
                               eval_interval=3, save_interval=3))
    others = {strategy: training.sft(cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, strategy, max_steps=3,
                                             batch_size=2, eval_interval=3, save_interval=3,
                                             **{"parallel.workers": 2, "parallel.strategy": strategy, "parallel.zero_stage": 2}))
              for strategy in ("ddp", "fsdp", "deepspeed")}
    a = metrics_lines(one.run_dir)
    for strategy, other in others.items():  # same global batches, token-weighted: the same loss curve
        b = metrics_lines(other.run_dir)
        assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3], strategy
        for x, y in zip(a[1:], b[1:]):
            assert x["train/tokens"] == y["train/tokens"], strategy
            assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4), strategy
        assert a[-1]["eval/loss"] == pytest.approx(b[-1]["eval/loss"], rel=1e-4), strategy
        assert (other.output / "model.safetensors").is_file()
    assert (one.output / "model.safetensors").is_file() and (one.output / "tokenizer.json").is_file()
    prov = json.loads((one.output / "prunekit.json").read_text())
    assert prov["stage"] == "sft" and prov["metrics"]["step"] == 3 and prov["config"]["batch_size"] == 4


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_session, tiny_chat_model_dir, chat_data, tmp_path,
                                                       monkeypatch):
    # the test-only hook reaches the workers of the session's Ray instance, started before the variable was set
    monkeypatch.setenv("PRUNEKIT_TEST_CRASH_AT_STEP", "2")
    cfg = cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, "fault", max_steps=4, batch_size=2,
                  eval_interval=4, save_interval=1, **{"ray.max_failures": 1})
    result = training.sft(cfg)
    run_dir = result.run_dir
    assert (run_dir / ".crashed-at-step-2").exists()  # the worker really died once
    steps = [m["step"] for m in metrics_lines(run_dir)]
    assert steps == [0, 1, 2, 3, 4]  # resumed at step 2: nothing lost, nothing replayed
    # the final checkpoint holds the deliverable only (no second weight copy, no optimizer state) ...
    final = max(run_dir.glob("checkpoint_*/"), key=lambda d: json.loads((d / "metrics.json").read_text())["step"])
    assert sorted(p.name for p in final.iterdir()) == ["hf", "manifest.json", "metrics.json", "trainer_state.pt"]
    # ... and re-running the finished run trains nothing and gives the same model
    monkeypatch.delenv("PRUNEKIT_TEST_CRASH_AT_STEP")
    again = training.sft(cfg.model_copy(update={"overwrite": True}))
    assert [m["step"] for m in metrics_lines(again.run_dir)] == steps
    assert (again.output / "model.safetensors").read_bytes() == (final / "hf" / "model.safetensors").read_bytes()
    clean = training.sft(cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, "clean", max_steps=4,
                                 batch_size=2, eval_interval=4, save_interval=4))
    for x, y in zip(metrics_lines(run_dir)[1:], metrics_lines(clean.run_dir)[1:]):
        assert x["train/tokens"] == y["train/tokens"]  # the same batches in the same order as a clean run
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-3)


def test_lora_then_merge(ray_session, tiny_chat_model_dir, chat_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from prunekit.stages.merge_lora import merge_lora
    result = training.lora(cfg_for("lora", tiny_chat_model_dir, chat_data, tmp_path, "lora", max_steps=2,
                                   batch_size=2, eval_interval=2, save_interval=2, rank=4, alpha=8, lr=1e-2))
    adapter_cfg = json.loads((result.output / "adapter_config.json").read_text())
    assert not adapter_cfg["base_model_name_or_path"].startswith("/")  # relative to the adapter
    merged = merge_lora(result.output, tmp_path / "merged").output
    ids = torch.tensor([[1, 42, 7, 99, 5]])
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, result.output).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)(ids).logits
    assert (got - want).abs().max() <= 1e-4 and (got - plain).abs().max() > 1e-4  # trained, and merged exactly
