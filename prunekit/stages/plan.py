"""`prunekit plan MODEL --stage sft|distill|lora|knockout [--gpus N] [--config FILE] [--gpu-memory 80GiB]`, and the
same fit check before every training stage.

The numbers come from `prunekit.core.memory_plan` (config.json and the training settings only: no weights are
loaded); this module reads the configs, asks the GPUs this machine sees how much memory they have free (in a child
process, so the caller never holds a CUDA context of its own), prints the table, and turns a run that cannot fit
into one line before any worker starts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prunekit import PrunekitError
from prunekit.core import memory_plan as mp
from prunekit.core.loading import read_config, resolve_model
from prunekit.core.report import human

PLAN_STAGES = ("sft", "distill", "lora", "knockout")


def read_model_config(spec: str, flag: str = "MODEL") -> tuple[dict, str]:
    """(config.json dict, display name) of a model directory, a config.json file, or anything `resolve_model`
    takes (alias, .gguf): only the config is read."""
    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PrunekitError(f"{flag} {spec}: cannot read the config ({str(e).splitlines()[0]})") from None
        if not isinstance(cfg, dict):
            raise PrunekitError(f"{flag} {spec}: expected a config.json mapping")
        return cfg, path.parent.name or path.name
    if path.is_dir() and not (path / "config.json").is_file():
        raise PrunekitError(f"{flag} {spec}: no config.json in that directory")
    model_dir = path if path.is_dir() else resolve_model(spec)
    return read_config(model_dir), Path(model_dir).name


def visible_gpus() -> list[tuple[int, int]]:
    """(free, total) bytes of every GPU this process can see ([] without CUDA). torch.cuda.mem_get_info runs in a
    child process: a CUDA context here would hold GPU memory for as long as the driver runs."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():  # asks the driver only: no context
        return []
    code = ("import json, torch; print(json.dumps([list(torch.cuda.mem_get_info(i)) "
            "for i in range(torch.cuda.device_count())]))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        return [tuple(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return []


def gpu_budget(gpu_memory: str | None, flag: str) -> tuple[float | None, int, str]:
    """(bytes one GPU offers, GPUs seen here, where the figure comes from); bytes None when unknown."""
    gpus = visible_gpus()
    if gpu_memory is not None:
        return mp.parse_memory(gpu_memory, flag), len(gpus), flag
    if gpus:
        return min(free for free, _ in gpus), len(gpus), f"free on the smallest of {len(gpus)} visible GPU(s)"
    return None, 0, ""


def _file_keys(path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # load_config says what is wrong with it
    return raw if isinstance(raw, dict) else {}


def load_stage_config(stage: str, model: str, config: str | None, teacher: str | None, sets: dict):
    """The stage's validated config with MODEL (and --teacher) in place; the data and output paths the plan does
    not need get placeholders when the file has none."""
    from prunekit.config import load_config
    raw = _file_keys(config) if config else {}
    overrides = {k: "(plan)" for k in ("train", "output_dir") if k not in raw}
    if stage == "knockout" and "val" not in raw:
        overrides["val"] = "(plan)"
    if stage == "distill":
        if teacher is None and "teacher" not in raw and "teacher" not in sets:
            raise PrunekitError("--stage distill: give the teacher (--teacher MODEL, or teacher: in --config)")
        overrides["teacher"] = teacher
    overrides.update(model=model, **sets)
    return load_config(stage, config, overrides)


def settings_for(stage: str, cfg, gpus: int | None = None) -> tuple[mp.ModelShape, mp.Settings, str]:
    model_cfg, name = read_model_config(cfg.model, "model")
    shape = mp.model_shape(model_cfg)
    teacher = None
    if stage == "distill":
        teacher = mp.model_shape(read_model_config(cfg.teacher, "teacher")[0])
    return shape, mp.settings_from_config(stage, cfg, gpus, teacher), name


@dataclass
class PlanResult:
    text: str
    fits: bool | None              # None: no GPU memory known, not checked
    fixable: bool = True
    record: dict = field(default_factory=dict)


def _row(name: str, value: float) -> list[str]:
    return [name, f"{value / mp.GiB:,.1f}"]


def plan(model: str, stage: str, gpus: int | None = None, config: str | None = None, gpu_memory: str | None = None,
         teacher: str | None = None, sets: dict | None = None) -> PlanResult:
    if stage not in PLAN_STAGES:
        raise PrunekitError(f"--stage: expected one of {', '.join(PLAN_STAGES)}, got {stage!r}")
    if gpus is not None and gpus < 1:
        raise PrunekitError(f"--gpus: must be >= 1, got {gpus}")
    budget, seen, source = gpu_budget(gpu_memory, "--gpu-memory")
    cfg = load_stage_config(stage, model, config, teacher, sets or {})
    shape, s, name = settings_for(stage, cfg, gpus)
    if stage == "distill" and s.teacher_placement == "own_gpu" and gpus is not None and gpus < 2:
        raise PrunekitError("--gpus: teacher_placement: own_gpu takes 2 GPUs per worker; give --gpus 2 or more")
    p = mp.plan(shape, s)
    from prunekit.core.report import table
    rows = [_row("weights", p.parts["weights"]), _row("gradients", p.parts["gradients"]),
            _row("optimizer state (AdamW)", p.parts["optimizer"])]
    if p.parts["gathered (fsdp/zero-3 working set)"]:
        rows.append(_row("gathered units (fsdp / ZeRO-3)", p.parts["gathered (fsdp/zero-3 working set)"]))
    if p.parts["autocast bf16 weight copies"]:
        rows.append(_row("bf16 autocast weight copies", p.parts["autocast bf16 weight copies"]))
    used = " <-" if s.gradient_checkpointing else ""
    rows += [[f"activations{'' if s.gradient_checkpointing else ' <-'}", f"{p.activations_full / mp.GiB:,.1f}"],
             [f"activations, gradient_checkpointing{used}", f"{p.activations_checkpointed / mp.GiB:,.1f}"],
             _row(f"loss buffers (chunk {min(s.loss_chunk_size, s.batch_size * s.max_length)})",
                  p.parts["loss buffers"])]
    if s.stage == "distill":
        rows.append(_row("teacher" + (" (its head and hidden states)" if s.teacher_placement == "own_gpu" else ""),
                         p.parts["teacher"]))
    rows.append(_row("peak" + (" (all trials on one GPU)" if s.trials_per_gpu > 1 else ""), p.peak))
    if p.teacher_gpu_peak:
        rows.append(_row("peak on the teacher's GPU", p.teacher_gpu_peak))
    rows.append(_row(f"needed (+{mp.HEADROOM_BYTES / mp.GiB:g} GiB + {mp.HEADROOM_FRACTION:.0%} headroom)",
                     p.required))
    if budget is not None:
        rows.append(_row(f"GPU memory ({source})", budget))
    rows.append(_row("host RAM per worker (load in fp32" + (", offload" if s.cpu_offload else "") + ")", p.host))
    parts = [f"text layers {human(shape.text_layer_params)}",
             f"embeddings{'' if shape.tied else ' + LM head'} {human(shape.embedding_params * (1 if shape.tied else 2))}"]
    if shape.is_vlm:
        parts.append(f"vision tower {human(shape.vision_params)}")
    if s.lora:
        parts.append(f"trained: LoRA rank {s.lora_rank}, {human(shape.lora_params(s.lora_rank))}")
    lines = [f"{name} ({shape.family}): {human(shape.params)} parameters ({', '.join(parts)})",
             f"{stage}: {mp.describe(s)}" + (f"; teacher {human(s.teacher.params)} parameters" if s.teacher else ""),
             "", table(rows, ["per GPU", "GiB"]), ""]
    lines += [f"note: {n}" for n in p.notes]
    record = {"model": str(cfg.model), "family": shape.family, "params": shape.params, "stage": stage,
              "settings": mp.describe(s), "per_gpu_bytes": {k: int(v) for k, v in p.parts.items()},
              "activations_bytes": {"full": int(p.activations_full), "checkpointing": int(p.activations_checkpointed)},
              "peak_bytes": int(p.peak), "teacher_gpu_peak_bytes": int(p.teacher_gpu_peak),
              "required_bytes": int(p.required), "host_bytes_per_worker": int(p.host), "gpu_bytes": budget}
    if budget is None:
        lines.append("fit not checked: no GPU visible here; give --gpu-memory (e.g. 80GiB)")
        return PlanResult("\n".join(lines), None, record=record)
    max_gpus = max(mp.gpus_used(s), seen, gpus or 0)
    fits, line = mp.verdict_line(shape, s, budget, max_gpus, what=f"{stage} of {name}")
    lines.append(line)
    fixable = fits or "cannot fit under any strategy" not in line
    record.update(fits=fits, verdict=line)
    return PlanResult("\n".join(lines), fits, fixable, record)


def check_before_training(stage: str, cfg) -> None:
    """The plan's fit check, run where a training stage validates its config (before Ray or any worker starts).
    Only for GPU runs, and only when this machine sees GPUs or `gpu_memory` is set; a run that cannot fit fails
    with one line: by how much, and the smallest change that fits."""
    if not getattr(cfg, "memory_check", True):
        return
    on_gpu = cfg.tune.gpus_per_trial > 0 if stage == "knockout" else cfg.ray.use_gpu
    if not on_gpu:
        return
    budget, seen, _ = gpu_budget(cfg.gpu_memory, "gpu_memory")
    if budget is None:
        return
    shape, s, name = settings_for(stage, cfg)
    fits, line = mp.verdict_line(shape, s, budget, max(mp.gpus_used(s), seen), what=f"{stage} of {name}")
    if not fits:
        raise PrunekitError(f"memory plan: {line} (`prunekit plan` shows the breakdown; memory_check: false skips "
                            f"this check)")
