"""The training stages (sft, distill, lora) without Ray: the local launcher, text rows beside chat, image rows,
a teacher that does not fit, a non-finite loss, and bad training input as one-line errors before anything starts."""
from __future__ import annotations

import json
import math

import pytest
import torch

from prunekit import PrunekitError
from prunekit.config import load_config
from prunekit.core.datasets import easy_vqa_to_messages
from prunekit.stages import training
from tests.conftest import error_lines, run_cli, sft_args


def metrics_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cfg_for(stage, model, data, tmp_path, name, **over):
    train, val = data
    base = {"model": str(model), "train": str(train), "val": str(val), "output_dir": str(tmp_path / f"out-{name}"),
            "storage_path": str(tmp_path / "runs"), "name": name, "max_length": 64, "eval_max_samples": 16,
            "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled", **over}
    return load_config(stage, None, base)


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


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_local_launcher_runs_sharded_strategies_in_a_world_of_one(strategy, tiny_chat_model_dir, chat_data, tmp_path):
    """launcher: local with FSDP2 or ZeRO-2 (which need a process group Ray Train would have made) trains the same
    loss curve and weights as plain DDP in one process, and leaves no process group behind."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    runs = {s: training.sft(cfg_for("sft", tiny_chat_model_dir, chat_data, tmp_path, s, max_steps=3, batch_size=2,
                                    eval_interval=3, save_interval=3, launcher="local",
                                    **{"parallel.strategy": s, "parallel.zero_stage": 2}))
            for s in ("ddp", strategy)}
    assert not dist.is_initialized()
    a, b = (metrics_lines(runs[s].run_dir) for s in ("ddp", strategy))
    assert [m["step"] for m in b] == [0, 1, 2, 3]
    for x, y in zip(a[1:], b[1:]):
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-4)
    wa, wb = (load_file(runs[s].output / "model.safetensors") for s in ("ddp", strategy))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


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


# ---- bad training input fails before anything starts (issue 16) ---------------------------------------------------

def test_training_data_without_supervised_tokens_fails_before_launch(tiny_chat_model_dir, tmp_path, capsys):
    train = tmp_path / "long.jsonl"
    long = " ".join(["a very long question"] * 40)
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": long},
                                                      {"role": "assistant", "content": "ok"}]}) + "\n"
                             for _ in range(3)))
    code, _, err = run_cli(capsys, "sft", "--model", tiny_chat_model_dir, "--train", train, "--output-dir",
                           tmp_path / "out", "--max-steps", 2, "--set", "max_length=32",
                           "--set", f"storage_path={tmp_path / 'runs'}")  # launcher: ray, yet nothing starts
    assert code == 2 and error_lines(err) == [
        f"prunekit sft: error: train {train}: no row keeps an assistant token within max_length 32 (every prompt is "
        f"longer); raise max_length or shorten the prompts"], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting,message", [
    ("lr=-1", "lr must be a finite number > 0, got -1.0"), ("lr=.nan", "lr must be a finite number > 0, got nan"),
    ("lr=0", "lr must be a finite number > 0, got 0.0"), ("warmup_ratio=2", "warmup_ratio must be in [0, 1], got 2.0"),
    ("weight_decay=-0.1", "weight_decay must be a finite number >= 0"), ("grad_clip=0", "grad_clip must be a finite"),
])
def test_bad_optimizer_settings_fail_before_ray(setting, message, tmp_path, capsys):
    code, _, err = run_cli(capsys, "sft", "--model", "smollm2", "--train", tmp_path / "t.jsonl", "--output-dir",
                           tmp_path / "out", "--set", setting)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_all_empty_assistant_replies_warn(tiny_chat_model_dir, tmp_path, capsys):
    train = tmp_path / "empty-replies.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                      {"role": "assistant", "content": ""}]}) + "\n"
                             for i in range(4)))
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, (train, None), tmp_path, "out", "--set",
                                             "max_length=64"))  # the default system prompt alone is ~30 tokens
    assert code == 0, err
    assert [line for line in error_lines(err) if "warning" in line] == [
        f"prunekit: warning: train {train}: every assistant reply is empty; the model only learns to end its turn"]


def test_a_val_set_that_overlaps_train_warns(tiny_chat_model_dir, tmp_path, capsys):
    def row(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(row(f"question {i}", f"answer {i}")) + "\n" for i in range(4)))
    # a train row up to case and spacing, a train question with another answer, a new question
    val.write_text("".join(json.dumps(r) + "\n" for r in [row("Question  0", "ANSWER 0"), row("question 1", "other"),
                                                          row("new question", "answer 2")]))
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, (train, None), tmp_path, "out", "--val", val,
                                             "--set", "max_length=64"))
    assert code == 0, err
    assert [line for line in error_lines(err) if "warning" in line] == [
        f"prunekit: warning: val {val}: 1 of 3 rows are also in train {train} and 2 ask a train question: its numbers "
        f"measure fitting, not held-out recovery"]


def test_image_rows_on_a_text_only_model_are_one_line(tiny_chat_model_dir, tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
            {"messages": [{"role": "user", "content": "<image>what is it?"}, {"role": "assistant", "content": "a box"}],
             "images": [str(image)]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(capsys, *sft_args(tiny_chat_model_dir, (train, None), tmp_path, "out"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert f"{train} row 2: has images, but" in lines[0] and "text-only model" in lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage", ["sft", "distill"])
def test_training_loop_on_images(stage, tiny_vlm_chat_dir, tmp_path):
    """The recipe's worker path without Ray: build_worker tokenises image rows with the processor, the loop's
    collate batches them, and a few SFT / distillation steps run with finite losses (distillation with the
    hidden-state loss too: a VLM's text layers are hooked, a student that is its teacher matches layer to layer)."""
    from prunekit.config import load_config
    from prunekit.engine.loop import train
    from prunekit.engine.reporting import LocalReporter
    from prunekit.stages.training import build_worker, validate
    easy_vqa_to_messages(tmp_path / "train.jsonl", val_path=tmp_path / "val.jsonl", limit=8)
    over = {"teacher": str(tiny_vlm_chat_dir), "hidden_weight": 0.5} if stage == "distill" else {}
    cfg = load_config(stage, None, {"model": str(tiny_vlm_chat_dir), "train": str(tmp_path / "train.jsonl"),
                                    "val": str(tmp_path / "val.jsonl"), "output_dir": str(tmp_path / "out"),
                                    "storage_path": str(tmp_path / "runs"), "max_length": 128, "batch_size": 2,
                                    "max_steps": 3, "eval_interval": 3, "save_interval": 3, "lr": 1e-3,
                                    "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled", **over})
    validate(stage, cfg)
    model, objective, train_samples, val_samples, pad_id = build_worker(stage, cfg, torch.device("cpu"))
    assert len(train_samples) == 8 and all("pixel_values" in s for s in train_samples + val_samples)
    if stage == "distill":   # the student is its teacher: each text layer against the same layer
        assert objective.hidden_targets == list(range(len(objective.hidden_targets))) and objective.hidden_targets
    metrics = train(model, objective, cfg, train_samples, val_samples, pad_id,
                    LocalReporter(tmp_path / "runs" / "r", "r", cfg))
    assert metrics["train/tokens"] > 0 and math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["eval/loss"])


def test_distill_input_noise_reaches_teacher_and_student_alike_and_only_in_training(tiny_chat_model_dir, chat_data,
                                                                                    tmp_path):
    """distill input_noise: with the student as its own teacher the first step's forward-KL is 0, so both read the
    same noisy inputs; with another teacher the noise changes what that step learns; the step-0 eval is the clean
    run's, and the setting names its own run."""
    import shutil
    from transformers import AutoModelForCausalLM
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_chat_model_dir, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    runs = {}
    for name, teacher, noise in (("self-noisy", tiny_chat_model_dir, 0.3), ("clean", other, 0.0),
                                 ("noisy", other, 0.3)):
        runs[name] = metrics_lines(training.distill(cfg_for(
            "distill", tiny_chat_model_dir, chat_data, tmp_path, name, teacher=str(teacher), beta=0.0,
            input_noise=noise, max_steps=1, batch_size=4, eval_interval=1, save_interval=1,
            launcher="local")).run_dir)
    assert abs(runs["self-noisy"][1]["train/loss"]) < 1e-5
    assert runs["noisy"][0]["eval/loss"] == runs["clean"][0]["eval/loss"]
    assert runs["noisy"][1]["train/loss"] != pytest.approx(runs["clean"][1]["train/loss"], rel=1e-3)
    from prunekit.distributed.train import run_name
    base = {"model": "m", "train": "t", "output_dir": "o", "teacher": "t"}
    assert run_name("distill", load_config("distill", None, {**base, "input_noise": 0.1})) != \
        run_name("distill", load_config("distill", None, base))
    with pytest.raises(Exception, match="input_noise"):
        cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, "bad", teacher=str(tiny_chat_model_dir),
                input_noise=1.0)


def test_distill_hidden_weight_finds_each_layers_teacher_through_the_prune_lineage(chat_model_dir, chat_data,
                                                                                   tmp_path):
    """distill hidden_weight: the teacher layer each student layer is matched to comes from the prune steps in the
    student's prunekit.json, composed across steps (4 layers, drop 1, then drop the new 1 (the original 2): the
    student is the original 0 and 3, so its layer 0 hands on what the teacher's layer 2 outputs); the run trains
    with the hidden-state loss in its loss (the same curve under FSDP2, whose layers the hooks sit on too) and its
    output loads. A teacher outside the lineage with another layer
    count, targets of the wrong length and a negative weight are one-line errors before training."""
    from transformers import AutoModelForCausalLM
    from prunekit.stages.prune import prune
    teacher = chat_model_dir(4, seed=3)
    prune(str(teacher), tmp_path / "p1", drop_text=[1])
    prune(str(tmp_path / "p1"), tmp_path / "p2", drop_text=[1])
    over = dict(teacher=str(teacher), hidden_weight=1.0, beta=0.0, max_steps=2, batch_size=2, launcher="local")
    cfg = cfg_for("distill", tmp_path / "p2", chat_data, tmp_path, "hidden", **over)
    assert training.hidden_targets(cfg) == [2, 3]
    plain = metrics_lines(training.distill(cfg_for("distill", tmp_path / "p2", chat_data, tmp_path, "plain",
                                                   **{**over, "hidden_weight": 0.0})).run_dir)
    result = training.distill(cfg)
    hidden = metrics_lines(result.run_dir)
    assert hidden[0]["eval/loss"] > plain[0]["eval/loss"] + 1e-3   # the hidden-state term is in the loss
    assert math.isfinite(hidden[-1]["train/loss"])
    sharded = metrics_lines(training.distill(cfg_for("distill", tmp_path / "p2", chat_data, tmp_path, "hidden-fsdp",
                                                     **over, **{"parallel.strategy": "fsdp"})).run_dir)
    assert [m["train/loss"] for m in sharded[1:]] == pytest.approx([m["train/loss"] for m in hidden[1:]], rel=1e-4)
    assert AutoModelForCausalLM.from_pretrained(result.output).config.num_hidden_layers == 2
    for bad, message in (({"teacher": str(chat_model_dir(3, seed=4))}, "give hidden_targets"),
                         ({"hidden_targets": [0, 1, 2]}, "for each of the student's 2 layers")):
        with pytest.raises(PrunekitError) as err:
            training.distill(cfg_for("distill", tmp_path / "p2", chat_data, tmp_path, "bad", **{**over, **bad}))
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(Exception, match="hidden_weight"):
        cfg_for("distill", tmp_path / "p2", chat_data, tmp_path, "bad", **{**over, "hidden_weight": -1.0})
