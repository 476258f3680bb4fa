"""Recipes: `sft`, `distill`, `lora` — one validated config in, a plain HF directory (or adapter) out.

Each reads: validate inputs on the driver (before any worker starts) -> launch the shared loop on Ray Train ->
write the final model atomically with provenance. `build_worker` is what every Ray worker runs first.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.families import family_for
from prunekit.core.data import load_messages, plain_text, val_overlap
from prunekit.core.samples import check_no_images, config_samples, has_labels, pad_id, tokenize
from prunekit.core.loading import (check_output_dir, check_writable, copy_side_files, load_model, load_tokenizer,
                                   quiet_transformers, read_config, resolve_model, write_atomically,
                                   write_provenance)


@dataclass
class TrainResult:
    output: Path
    run_dir: Path
    name: str
    metrics: dict


def check_supervised(cfg, train_rows: list, val_rows: list | None) -> None:
    """On the driver, before any worker starts: some training row must keep an assistant token within max_length
    after truncation (stops at the first that does); a val set without one only warns (no eval then), as does a val
    set that shares rows or questions with the train file (its numbers would be fitting, not recovery)."""
    import sys
    is_vlm = family_for(read_config(Path(cfg.model))).is_vlm
    with quiet_transformers():
        tokenizer = load_tokenizer(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)

    def supervised(rows, path) -> bool:
        done, end = 0, 64
        while done < len(rows):  # rows[done:end], end doubling: usually the first few rows answer
            # a VLM's rows from row 1 (its processor numbers rows in errors), text rows from `done`
            start = 0 if is_vlm else done
            samples = tokenize(tokenizer, rows[start:end], cfg.max_length, model=cfg.model, is_vlm=is_vlm,
                               trust_remote_code=cfg.trust_remote_code, source=path)[done - start:]
            if any(has_labels(s) for s in samples):
                return True
            done, end = end, end * 2
        return False
    replies = [m.get("content") for r in train_rows for m in (r.get("messages") or [])
               if m.get("role") == "assistant"]
    if all("messages" in r for r in train_rows) and not any(plain_text(c) for c in replies):
        print(f"prunekit: warning: train {cfg.train}: every assistant reply is empty; the model only learns to end "
              f"its turn", file=sys.stderr, flush=True)
    if not supervised(train_rows, cfg.train):
        raise PrunekitError(f"train {cfg.train}: no row keeps an assistant token within max_length {cfg.max_length} "
                            f"(every prompt is longer); raise max_length or shorten the prompts")
    if val_rows and any(overlap := val_overlap(val_rows, train_rows)):
        print(f"prunekit: warning: val {cfg.val}: {overlap[0]} of {len(val_rows)} rows are also in train {cfg.train} "
              f"and {overlap[1]} ask a train question: its numbers measure fitting, not held-out recovery",
              file=sys.stderr, flush=True)
    if val_rows and not supervised(val_rows[:cfg.eval_max_samples] if cfg.eval_max_samples else val_rows, cfg.val):
        print(f"prunekit: warning: val {cfg.val}: no row keeps an assistant token within max_length "
              f"{cfg.max_length}; the run is not evaluated", file=sys.stderr, flush=True)


def build_worker(stage: str, cfg, device, teacher_device=None, mark=lambda loaded: None):
    """Model (with LoRA for `lora`), objective, tokenized train/val samples and the pad id, on one worker.
    The distillation teacher goes to `teacher_device` (default: the student's). `mark(what)` is called as the
    models, then the samples, are loaded (the reporter's timing of an attempt's start)."""
    import torch
    with quiet_transformers():
        model, family = load_model(Path(cfg.model), dtype="float32", trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(Path(cfg.model), trust_remote_code=cfg.trust_remote_code)
    if stage == "lora":
        from prunekit.core.lora import apply_lora
        model = apply_lora(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                           target_modules=cfg.target_modules)
    teacher = None
    if stage == "distill":
        with quiet_transformers():
            teacher, _ = load_model(Path(cfg.teacher), dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                                    trust_remote_code=cfg.trust_remote_code)
        teacher = teacher.to(teacher_device or device)
    mark("models")
    train_samples, val_samples = config_samples(cfg, tokenizer, family.is_vlm)
    mark("data")
    objective = make_objective(stage, cfg, teacher)
    if stage == "distill":
        # hidden_weight: hooks on the student's layers, before the engine compiles them
        objective.watch(model, recomputed=cfg.gradient_checkpointing)
    if stage == "distill" and cfg.on_policy is not None:
        objective.on_policy = make_on_policy_rows(cfg, tokenizer)
    return model, objective, train_samples, val_samples, pad_id(tokenizer)


def on_policy_prompts(cfg, tokenizer) -> list[list[int]]:
    """distill on_policy: the user turns of the chat rows of `on_policy.prompts` (default: the train file), with the
    chat template's generation prompt, that leave max_new_tokens of room within max_length."""
    from prunekit.core.corpus import read_prompt_file
    from prunekit.rl.corpus import tokenize as tokenize_prompt
    path = cfg.on_policy.prompts or cfg.train
    flag = "on_policy.prompts" if cfg.on_policy.prompts else "train"
    chats = [p for p in read_prompt_file(path, flag) if "messages" in p]
    if not chats:
        raise PrunekitError(f"{flag} {path}: no chat row (messages with a user turn) to take on-policy prompts from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise PrunekitError(f"on_policy: the model {cfg.model} has no chat template to put prompts in")
    room = cfg.max_length - cfg.on_policy.max_new_tokens
    prompts = [ids for ids in (tokenize_prompt(tokenizer, p) for p in chats) if len(ids) <= room]
    if not prompts:
        raise PrunekitError(f"{flag} {path}: no prompt fits max_length {cfg.max_length} minus on_policy."
                            f"max_new_tokens {cfg.on_policy.max_new_tokens}")
    return prompts


def make_on_policy_rows(cfg, tokenizer):
    """The source of distill's on_policy rows (prunekit.engine.on_policy) for this worker."""
    from prunekit.config import on_policy_rows as rows_per_batch
    from prunekit.engine.on_policy import OnPolicyRows
    from prunekit.rl.rollout import eos_ids
    return OnPolicyRows(on_policy_prompts(cfg, tokenizer), rows_per_batch(cfg.on_policy.fraction, cfg.batch_size),
                        cfg.on_policy.max_new_tokens, cfg.on_policy.temperature, eos_ids(Path(cfg.model), tokenizer),
                        pad_id(tokenizer), cfg.seed, cfg.on_policy.every)


def make_objective(stage: str, cfg, teacher=None):
    """The stage's loss: distillation from `teacher` (compiled with the student when `compile`), else SFT."""
    from prunekit.engine.objectives import DistillObjective, SFTObjective
    if stage != "distill":
        return SFTObjective(chunk_size=cfg.loss_chunk_size)
    if cfg.compile:
        from prunekit.engine.loop import compile_model
        compile_model(teacher, cfg.compile_mode, cfg.compile_scope)
    return DistillObjective(teacher, beta=cfg.beta, temperature=cfg.temperature, top_k=cfg.top_k,
                            sft_alpha=cfg.sft_alpha, chunk_size=cfg.loss_chunk_size, hidden_weight=cfg.hidden_weight,
                            hidden_targets=hidden_targets(cfg) if cfg.hidden_weight else None)


def hidden_targets(cfg) -> list[int]:
    """distill hidden_weight: the teacher layer whose output each student layer's output is matched to. A student
    layer stands in for its own original layer and the removed ones after it, so it should hand on what the teacher
    hands to the next layer the student kept (the last one: the teacher's last layer's output)."""
    from prunekit.core.loading import layer_origins
    configs = {"student": read_config(Path(cfg.model)), "teacher": read_config(Path(cfg.teacher))}
    n_student, n_teacher = (family_for(c).num_text_layers(c) for c in configs.values())
    width_student, width_teacher = (family_for(c).text_config(c)["hidden_size"] for c in configs.values())
    if width_student != width_teacher:
        raise PrunekitError(f"hidden_weight: the student's hidden size {width_student} is not the teacher's "
                            f"{width_teacher}; hidden states can only be matched at the same width")
    if cfg.hidden_targets is not None:
        bad = [t for t in cfg.hidden_targets if not 0 <= t < n_teacher]
        if len(cfg.hidden_targets) != n_student or bad:
            raise PrunekitError(f"hidden_targets: give one teacher layer (0..{n_teacher - 1}) for each of the "
                                f"student's {n_student} layers; got {cfg.hidden_targets}")
        return list(cfg.hidden_targets)
    origins = layer_origins(Path(cfg.model), Path(cfg.teacher), n_teacher)
    if origins is None and n_student == n_teacher:
        origins = list(range(n_student))
    if origins is None or len(origins) != n_student:
        raise PrunekitError(f"hidden_weight: cannot tell which of the teacher's {n_teacher} layers each of the "
                            f"student's {n_student} stands for (the student's prunekit.json does not lead back to "
                            f"{cfg.teacher}); give hidden_targets")
    return [following - 1 for following in origins[1:]] + [n_teacher - 1]


def validate(stage: str, cfg) -> None:
    """Everything that can be checked before a worker starts: model, data, output, teacher tokenizer."""
    cfg.model = str(resolve_model(cfg.model).resolve())
    # workers run elsewhere (another cwd, maybe another node): hand them absolute paths
    cfg.train, cfg.output_dir, cfg.storage_path = (Path(p).resolve() for p in (cfg.train, cfg.output_dir, cfg.storage_path))
    cfg.val = Path(cfg.val).resolve() if cfg.val else None
    if stage == "distill":
        cfg.teacher = str(resolve_model(cfg.teacher).resolve())
    from prunekit.stages.plan import check_before_training
    check_before_training(stage, cfg)  # GPU runs: fail now, in one line, rather than out of memory later
    train_rows = load_messages(cfg.train)
    val_rows = load_messages(cfg.val) if cfg.val is not None else None
    if val_rows is not None and not val_rows:
        raise PrunekitError(f"val {cfg.val}: no rows")
    if getattr(cfg, "merge_kv_heads", None) is not None:
        from prunekit.core.kv_merge import check_merge_heads
        check_merge_heads(read_config(Path(cfg.model)), cfg.merge_kv_heads)
    if not family_for(read_config(Path(cfg.model))).is_vlm:
        check_no_images(train_rows, cfg.train, cfg.model)
        check_no_images(val_rows or [], cfg.val, cfg.model)
    check_supervised(cfg, train_rows, val_rows)
    check_output_dir(cfg.output_dir, [Path(cfg.model)], cfg.overwrite)
    check_writable(cfg.storage_path, "storage_path", inside=True)  # run directories and checkpoints go there
    if stage == "distill":
        from prunekit.engine.objectives import check_same_tokenizer
        if cfg.teacher_placement == "own_gpu" and not (cfg.ray.use_gpu and cfg.ray.gpus_per_worker >= 2):
            raise PrunekitError("teacher_placement: own_gpu needs ray.use_gpu: true and ray.gpus_per_worker: 2")
        if cfg.hidden_weight:
            hidden_targets(cfg)   # which teacher layer each student layer matches: known now, or one line
        with quiet_transformers():
            student_tokenizer = load_tokenizer(Path(cfg.model))
            check_same_tokenizer(student_tokenizer, load_tokenizer(Path(cfg.teacher)), cfg.model, cfg.teacher)
        if cfg.on_policy is not None:
            if cfg.on_policy.prompts:
                cfg.on_policy.prompts = str(Path(cfg.on_policy.prompts).resolve())
            if family_for(read_config(Path(cfg.model))).is_vlm:
                raise PrunekitError(f"on_policy: text models only; {cfg.model} is a vision-language model")
            on_policy_prompts(cfg, student_tokenizer)   # the prompt errors now, before any worker starts


def run_in_process(stage: str, cfg) -> tuple[Path, Path, str]:
    """`launcher: local`: the one training loop as a single worker in this process (no Ray), with the same run
    names, checkpoints and resume as a Ray Train run. Returns (final checkpoint dir with hf/, run dir, run name)."""
    import torch
    from prunekit.distributed.train import run_name
    from prunekit.engine.loop import train
    from prunekit.engine.reporting import LocalReporter
    from prunekit.engine.strategy import process_group_of_one
    name = run_name(stage, cfg)
    run_dir = Path(cfg.storage_path).resolve() / name
    device = torch.device("cuda" if cfg.ray.use_gpu else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunekitError("ray.use_gpu: true but this process sees no GPU (launcher: local)")
    reporter = LocalReporter(run_dir, name, cfg)   # made first: it times the models' and data's loading
    model, objective, train_samples, val_samples, pad = build_worker(stage, cfg, device, mark=reporter.mark)
    if not train_samples:
        raise PrunekitError(f"train {cfg.train}: no row has a supervised token within max_length {cfg.max_length}")
    sharded = cfg.parallel.strategy != "ddp"
    with process_group_of_one(device) if sharded else contextlib.nullcontext():
        train(model, objective, cfg, train_samples, val_samples, pad, reporter, device=device)
    final = reporter.restore()
    if final is None or not (final / "hf").is_dir():
        raise PrunekitError(f"{stage} run {name} finished without a final checkpoint (in {run_dir})")
    return final, run_dir, name


def run(stage: str, cfg) -> TrainResult:
    from prunekit.core import locks
    from prunekit.distributed.train import run_name
    validate(stage, cfg)
    # one writer per run directory and output: a second identical command fails now, naming this one
    with locks.hold((cfg.output_dir, "-o"), (Path(cfg.storage_path) / run_name(stage, cfg), "run directory")):
        return _run(stage, cfg)


def _run(stage: str, cfg) -> TrainResult:
    if cfg.launcher == "local":
        final_ckpt, run_dir, name = run_in_process(stage, cfg)
    else:
        from prunekit.distributed.train import launch
        final_ckpt, run_dir, name = launch(stage, cfg, build_worker)
    from prunekit.engine.manifest import copy_verified
    try:
        metrics = json.loads((final_ckpt / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise PrunekitError(f"checkpoint {final_ckpt} is damaged (metrics.json: {e}); nothing written") from None
    base = Path(cfg.model)

    def write(tmp: Path):
        copy_verified(final_ckpt, "hf", tmp)  # against the sizes and hashes recorded when it was written
        copy_side_files(base, tmp)
        if stage == "lora":  # the adapter points at its base by a relative path, never an absolute one
            adapter_cfg = json.loads((tmp / "adapter_config.json").read_text())
            adapter_cfg["base_model_name_or_path"] = os.path.relpath(base.resolve(), Path(cfg.output_dir).resolve())
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
        if stage != "lora":
            check_same_model(base, tmp)
        write_provenance(tmp, {"stage": stage, "parent": str(base), "run": str(run_dir),
                               "config": cfg.model_dump(mode="json"), "metrics": metrics}, parent_dir=base)

    out = write_atomically(Path(cfg.output_dir), write, overwrite=cfg.overwrite)
    if not final_ckpt.resolve().is_relative_to(run_dir.resolve()):  # a download from remote storage
        shutil.rmtree(final_ckpt, ignore_errors=True)
    return TrainResult(out, run_dir, name, metrics)


def check_same_model(base: Path, trained: Path) -> None:
    """Recovery never changes what a model is: the trained output has the input's parameter count (as
    transformers counts it) and tie flag, and no tensor the loaded model would ignore."""
    from prunekit.core import report
    before, after = report.describe(base), report.describe(trained)
    problems = []
    if after["params"]["total"] != before["params"]["total"]:
        problems.append(f"{after['params']['total']:,} parameters, the input {before['params']['total']:,}")
    if after["tied_embeddings"] != before["tied_embeddings"]:
        problems.append(f"tie_word_embeddings {after['tied_embeddings']}, the input {before['tied_embeddings']}")
    family = family_for(report.read_config(trained))
    if after["tied_embeddings"] and any(family.component(k) == "lm_head" for k in report.checkpoint_shapes(trained)):
        problems.append("a separate lm_head tensor although the embeddings are tied")
    if problems:
        raise PrunekitError(f"the trained model differs from its input {base}: {'; '.join(problems)} "
                            f"(nothing written)")


def sft(cfg) -> TrainResult:
    return run("sft", cfg)


def distill(cfg) -> TrainResult:
    return run("distill", cfg)


def lora(cfg) -> TrainResult:
    return run("lora", cfg)
