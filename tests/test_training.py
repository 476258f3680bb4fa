"""The training engine on Ray Train (CPU, gloo): DDP equivalence, DeepSpeed ZeRO-2, fault recovery, real data."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit import PrunekitError
from prunekit.config import load_config
from prunekit.stages import training


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg_for(stage, model, data, tmp_path, name, **over):
    train, val = data
    base = {"model": str(model), "train": str(train), "val": str(val), "output_dir": str(tmp_path / f"out-{name}"),
            "storage_path": str(tmp_path / "runs"), "name": name, "max_length": 64, "eval_max_samples": 16,
            "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled", **over}
    return load_config(stage, None, base)


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


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: smollm2\ntrain: t.jsonl\noutput_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(PrunekitError, match=r"sft.yaml: learning_rate: unknown key"):
        load_config("sft", bad)
    with pytest.raises(PrunekitError, match=r"parallel.strategy: Input should be 'ddp', 'fsdp' or 'deepspeed'"):
        load_config("sft", bad.with_name("none.yaml") if False else None,
                    {"model": "m", "train": "t", "output_dir": "o", "parallel.strategy": "zero"})


def test_teacher_with_another_tokenizer_is_refused_before_training(tiny_chat_model_dir, tiny_model_dir, chat_data,
                                                                    tmp_path):
    import shutil
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir("llama"), teacher)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(teacher)
    cfg = cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, "mismatch", teacher=str(teacher), max_steps=1)
    with pytest.raises(PrunekitError, match="use different tokenizers"):
        training.distill(cfg)
    assert not (tmp_path / "runs").exists()  # nothing started


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


def test_distill_teacher_prefetch_is_consumed_in_order_by_training_batches_only():
    """A teacher forward queued ahead (what a teacher on its own GPU does) gives the same loss as computing it in
    the step; eval batches never take a queued result, and a batch of another shape discards the queue."""
    from conftest import build_tiny
    from prunekit.core.data import collate
    from prunekit.engine.objectives import DistillObjective
    student, teacher = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    g = torch.Generator().manual_seed(0)
    samples = [{"input_ids": x, "labels": x} for x in torch.randint(3, 100, (4, 9), generator=g).tolist()]
    batch = collate(samples, pad_id=0)
    other = collate(samples[:2], pad_id=0)
    objective = DistillObjective(teacher, beta=0.5)
    direct = objective(student.train(), batch)["loss_sum"]
    elsewhere = torch.device("cpu", 0)  # != the teacher's "cpu": stands in for a teacher on another GPU
    objective.prefetch(batch, elsewhere)
    assert len(objective._ahead) == 1
    objective(student.eval(), batch)  # eval: the queued result stays for the training batch
    assert len(objective._ahead) == 1
    queued = objective(student.train(), batch)["loss_sum"]
    assert not objective._ahead and torch.allclose(queued, direct)
    objective.prefetch(batch, elsewhere)
    mismatched = objective(student.train(), other)["loss_sum"]  # wrong shape: recomputed, queue dropped
    assert not objective._ahead and torch.allclose(mismatched, objective(student.train(), other)["loss_sum"])


def test_tied_embeddings_stay_tied_when_the_state_comes_back_as_copies(tiny_chat_model_dir, tmp_path):
    """The GPU path's bug on CPU: a device -> host copy (or FSDP's full state dict) hands save_pretrained two
    tensors for the tied embedding and head; the output must still hold one, load with the same parameter count,
    and give the trained model's logits."""
    from types import SimpleNamespace
    from prunekit.core import report
    from prunekit.core.loading import load_model
    from prunekit.engine.loop import HF_DIR, write_checkpoint
    from prunekit.engine.reporting import LocalReporter
    model, _ = load_model(tiny_chat_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():  # "training" moved the shared matrix
        model.model.embed_tokens.weight.mul_(1.5)
    copies = {k: v.clone() for k, v in model.state_dict().items()}  # what .cpu() of CUDA tensors gives
    assert copies["lm_head.weight"].data_ptr() != copies["model.embed_tokens.weight"].data_ptr()
    strategy = SimpleNamespace(model=model, model_state_dict=lambda: copies, trainer_state=lambda: None,
                               save_sharded=lambda d: None, all_ranks_write_checkpoint=lambda: False)
    reporter = LocalReporter(tmp_path / "run", "tie", SimpleNamespace())
    write_checkpoint(strategy, reporter, 1, {}, final=True)
    out = reporter.last_checkpoint / HF_DIR
    shapes = report.checkpoint_shapes(out)
    assert "lm_head.weight" not in shapes and len(shapes) == len(report.checkpoint_shapes(tiny_chat_model_dir))
    reloaded, _ = load_model(out)
    assert reloaded.num_parameters() == model.num_parameters() == report.describe(out)["params"]["total"]
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_parameter_count_ignores_a_head_the_tie_overrides(tiny_chat_model_dir, tmp_path):
    """A file that holds a separate lm_head while config.json ties it (what the GPU path used to write) counts what
    transformers loads, and a training stage refuses to pass such an output off as the model."""
    import shutil
    from safetensors.torch import load_file, save_file
    from prunekit.core import report
    from prunekit.core.loading import load_model
    from prunekit.stages.training import check_same_model
    bad = tmp_path / "untied"
    shutil.copytree(tiny_chat_model_dir, bad)
    state = load_file(bad / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    model, _ = load_model(bad)
    assert report.describe(bad)["params"]["total"] == model.num_parameters()
    with pytest.raises(PrunekitError, match="separate lm_head tensor"):
        check_same_model(tiny_chat_model_dir, bad)
    check_same_model(tiny_chat_model_dir, tiny_chat_model_dir)


def test_local_launcher_trains_in_process_and_resumes_to_nothing(tiny_chat_model_dir, chat_data, tmp_path):
    """launcher: local runs the same loop without Ray: the same run directory layout, a loadable output with the
    input's parameter count, and re-running the finished run trains nothing and writes the same weights."""
    from safetensors.torch import load_file
    from prunekit.core import report
    cfg = cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, "local", max_steps=3, batch_size=2,
                  eval_interval=3, save_interval=2, launcher="local", teacher=str(tiny_chat_model_dir))
    first = training.distill(cfg)
    assert [m["step"] for m in metrics_lines(first.run_dir)] == [0, 1, 2, 3]
    assert report.describe(first.output)["params"] == report.describe(tiny_chat_model_dir)["params"]
    again = training.distill(cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, "local", max_steps=3,
                                     batch_size=2, eval_interval=3, save_interval=2, launcher="local",
                                     teacher=str(tiny_chat_model_dir), output_dir=str(tmp_path / "again")))
    assert [m["step"] for m in metrics_lines(again.run_dir)] == [0, 1, 2, 3]  # nothing trained twice
    a, b = load_file(first.output / "model.safetensors"), load_file(again.output / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PrunekitError, match="launcher: local runs one worker"):
        cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, "x", launcher="local", **{"parallel.workers": 2})


def test_distill_on_text_rows_mixed_with_chat_packed(tiny_chat_model_dir, chat_data, tmp_path):
    """Plain-text rows train beside messages rows in one file (every token supervised, packed) and as the val."""
    from prunekit.core.data import load_messages, save_messages
    from prunekit.core.text import general_text
    general_text(tmp_path / "text-train.jsonl", tmp_path / "text-eval.jsonl")
    mixed = load_messages(tmp_path / "text-train.jsonl")[:24] + load_messages(chat_data[0])[:24]
    save_messages(tmp_path / "mixed.jsonl", mixed)
    data = (tmp_path / "mixed.jsonl", tmp_path / "text-eval.jsonl")
    result = training.distill(cfg_for("distill", tiny_chat_model_dir, data, tmp_path, "text",
                                      teacher=str(tiny_chat_model_dir), max_steps=2, batch_size=2, eval_interval=2,
                                      save_interval=2, packing=True, eval_max_samples=4, launcher="local"))
    lines = metrics_lines(result.run_dir)
    assert [m["step"] for m in lines] == [0, 1, 2] and all(m["train/tokens"] > 0 for m in lines[1:])
    assert lines[-1]["eval/loss"] < 20 and (result.output / "model.safetensors").is_file()
    # what the workers trained on: text rows are supervised on every token but each sample's first, and packed
    from prunekit.core.loading import load_tokenizer
    from prunekit.core.samples import load_samples
    packs = load_samples(load_tokenizer(tiny_chat_model_dir), data[1], model=tiny_chat_model_dir, max_length=64,
                         packing=True)
    for p in packs:
        samples_in_pack = p["position_ids"].count(0)
        assert sum(x != -100 for x in p["labels"]) == len(p["input_ids"]) - samples_in_pack
    assert sum(p["position_ids"].count(0) for p in packs) == len(load_messages(data[1]))   # nothing dropped


def test_a_non_finite_loss_stops_the_run_before_a_checkpoint_holds_it(tiny_chat_model_dir, chat_data, tmp_path):
    """An lr that blows the weights up: the run stops with one line at the first NaN/inf loss or gradient norm, and
    every checkpoint it left holds finite weights."""
    cfg = cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, "nan", max_steps=8, batch_size=2, eval_interval=8,
                  save_interval=1, launcher="local", lr=1e12, grad_clip=None)
    with pytest.raises(PrunekitError, match=r"train/(loss|grad_norm) is (nan|inf) at step \d"):
        training.sft(cfg)
    for ckpt in (tmp_path / "runs" / "nan" / "checkpoints").glob("step-*"):
        state = torch.load(ckpt / "model_state.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state.values())
    assert not (tmp_path / "out-nan").exists()


def test_packed_masks_come_in_the_dtype_each_model_computes_in(tiny_chat_model_dir, chat_data):
    """A packed batch's additive 4D mask is built in the dtype of the attention that reads it: bf16 for a bf16
    teacher, bf16 for an fp32 student under bf16 autocast, fp32 otherwise (sdpa takes the mask as it is)."""
    from prunekit.core.loading import load_model, load_tokenizer
    from prunekit.core.samples import load_samples
    from prunekit.engine.loop import lm_batch
    from prunekit.engine.objectives import DistillObjective
    student, _ = load_model(tiny_chat_model_dir)
    teacher, _ = load_model(tiny_chat_model_dir, dtype=torch.bfloat16)
    samples = load_samples(load_tokenizer(tiny_chat_model_dir), chat_data[1], model=tiny_chat_model_dir,
                           max_length=64, packing=True, limit=16)
    batch = lm_batch(samples[:2], 0)
    seen = {}

    def spy(name):
        def hook(_module, args, kwargs):
            seen[name] = kwargs["attention_mask"].dtype
        return hook
    student.model.register_forward_pre_hook(spy("student"), with_kwargs=True)
    teacher.model.register_forward_pre_hook(spy("teacher"), with_kwargs=True)
    objective = DistillObjective(teacher)
    with torch.no_grad():
        assert torch.isfinite(objective(student.eval(), batch)["loss_sum"])
        assert seen == {"student": torch.float32, "teacher": torch.bfloat16}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(objective(student.eval(), batch)["loss_sum"])
        assert seen == {"student": torch.bfloat16, "teacher": torch.bfloat16}


def test_wandb_auto_follows_wandb_mode_and_wandb_disabled(monkeypatch, tmp_path):
    """`wandb.mode: auto` takes wandb's own environment convention first; an explicit mode in the config wins."""
    from types import SimpleNamespace

    from prunekit.engine.reporting import RunLogger, wandb_mode
    for var in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_DISABLED", "true")
    assert wandb_mode("auto") == "disabled" and wandb_mode("offline") == "offline"
    # a run under WANDB_DISABLED starts no wandb run at all
    logger = RunLogger(tmp_path, "run", SimpleNamespace(wandb=SimpleNamespace(mode="auto", project="p")))
    logger.progress_bar = False
    logger.start(0, 1)
    logger.log(1, {"train/loss": 1.0})
    logger.finish()
    assert logger.wandb is None and (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
