"""LoRA on the text model: attach (peft), save with a base path relative to the adapter, find the base again.

The LoRA targets only modules under the family table's `text_layers` path, so a VLM's vision tower is never touched
(its blocks reuse names such as `gate_proj` / `down_proj`, so plain leaf names would match them too). The target is
written as one peft regex (matched with `re.fullmatch` against full module names), which also lands verbatim in
adapter_config.json.

An adapter directory records its base as a path relative to itself (`base_model_name_or_path`), so an adapter and
its base moved together (copied to another disk, another machine) still find each other.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from prunekit import PrunekitError
from prunekit.core.families import ModelFamily, family_of, get_module
from prunekit.core.loading import (check_output_dir, model_from_config, quiet_transformers, resolve_model,
                                   write_atomically, write_provenance)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _layer_linears(model, family: ModelFamily) -> list[str]:
    """Paths (relative to one decoder layer, e.g. 'mlp.down_proj') of every nn.Linear in the text decoder layers."""
    names: dict[str, None] = {}
    for layer in get_module(model, family.text_layers):
        for name, module in layer.named_modules():
            if name and isinstance(module, torch.nn.Linear):
                names[name] = None
    return list(names)


def default_target_modules(model, family: ModelFamily | None = None) -> list[str]:
    """The text model's attention projections (from the family table) and the other linear layers of its decoder
    layers (the MLP projections), as paths relative to one decoder layer."""
    family = family or family_of(model)
    linears = _layer_linears(model, family)
    projs = (family.q_proj,) if family.fused_qkv else (family.q_proj, family.k_proj, family.v_proj)
    attn = [f"{family.attn_module}.{p}" for p in (*projs, family.o_proj)]
    missing = [a for a in attn if a not in linears]
    if missing:
        raise PrunekitError(f"family {family.name} has no LoRA targets: its attention projections "
                            f"{', '.join(missing)} are not linear layers of {family.text_layers}")
    return attn + sorted(n for n in linears if n not in attn)


def target_regex(model, target_modules=None, family: ModelFamily | None = None) -> str:
    """A peft target regex restricted to the text decoder layers.

    target_modules: None (attention + MLP projections), a list of names, or a comma-separated string; each name is
    a leaf name ('q_proj') or a path inside a decoder layer ('mlp.down_proj')."""
    family = family or family_of(model)
    if target_modules is None:
        rel = default_target_modules(model, family)
    else:
        wanted = [t.strip() for t in (target_modules.split(",") if isinstance(target_modules, str)
                                      else target_modules) if t and t.strip()]
        if not wanted:
            raise PrunekitError("--target-modules: no module names given")
        linears = _layer_linears(model, family)
        rel, unknown = [], []
        for t in wanted:
            hits = [n for n in linears if n == t or n.endswith(f".{t}")]
            if not hits:
                unknown.append(t)
            rel += [h for h in hits if h not in rel]
        if unknown:
            raise PrunekitError(f"--target-modules: {', '.join(unknown)} not among the text layers' linear modules "
                                f"({', '.join(linears)})")
    return rf"{re.escape(family.text_layers)}\.\d+\.(?:{'|'.join(re.escape(r) for r in rel)})"


def config_target_regex(model_dir: Path, target_modules=None, trust_remote_code: bool = False) -> str:
    """`target_regex` of the model in `model_dir`, found on a skeleton of it on the meta device: config.json only,
    no weights, no memory (checks a run's LoRA targets before anything is loaded)."""
    from transformers import AutoConfig
    with quiet_transformers():
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = model_from_config(config)
    return target_regex(model, target_modules)


def apply_lora(model, rank: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules=None):
    """Wrap `model` in a peft LoRA model (task CAUSAL_LM) whose adapters sit only on the text decoder layers.

    Base weights are frozen; only the LoRA A/B matrices train. target_modules: see `target_regex`."""
    from peft import LoraConfig, get_peft_model
    if int(rank) < 1:
        raise PrunekitError(f"--lora-rank: must be >= 1 (got {rank})")
    if not 0 <= float(dropout) < 1:
        raise PrunekitError(f"--lora-dropout: must be in [0, 1) (got {dropout})")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
                        target_modules=target_regex(model, target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _relative_base(base_dir: Path, out_dir: Path) -> str:
    try:
        return os.path.relpath(os.path.abspath(base_dir), os.path.abspath(out_dir))
    except ValueError:  # different drives (Windows): there is no relative path
        raise PrunekitError(f"adapter {out_dir}: base {base_dir} cannot be recorded relative to it "
                            f"(different drives); keep them on one drive") from None


def save_adapter(peft_model, out_dir: str | Path, base_dir: str | Path, *, overwrite: bool = False,
                 record: dict | None = None) -> Path:
    """Write the adapter (safetensors + adapter_config.json + prunekit.json) to out_dir atomically.

    adapter_config.json's base_model_name_or_path is base_dir relative to out_dir, never absolute. `record` adds
    fields (training numbers, ...) to the provenance."""
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise PrunekitError(f"save_adapter: base {base_dir} is not a model directory (no config.json)")
    out = check_output_dir(Path(out_dir), [base_dir], overwrite)
    rel = _relative_base(base_dir, out)
    base_model = peft_model.get_base_model()
    configs = dict(peft_model.peft_config)

    def write(tmp: Path):
        # peft writes the base path into adapter_config.json and the model card (README.md): give it the relative
        # one for the duration of the save. Embeddings are never targeted, so no embedding check (it would look the
        # relative path up on the Hub).
        saved = {name: cfg.base_model_name_or_path for name, cfg in configs.items()}
        saved_names = (base_model.config._name_or_path, base_model.__dict__.get("name_or_path"))
        try:
            for cfg in configs.values():
                cfg.base_model_name_or_path = rel
            base_model.config._name_or_path = rel
            if saved_names[1] is not None:
                base_model.name_or_path = rel
            peft_model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        finally:
            for name, cfg in configs.items():
                cfg.base_model_name_or_path = saved[name]
            base_model.config._name_or_path = saved_names[0]
            if saved_names[1] is not None:
                base_model.name_or_path = saved_names[1]
        cfg = configs.get("default") or next(iter(configs.values()))
        write_provenance(tmp, {
            "stage": "lora", "parent": str(base_dir.resolve()), "parent_relative": rel,
            "lora": {"rank": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
                     "target_modules": cfg.target_modules},
            "trainable_params": sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n),
            **(record or {}),
        }, parent_dir=base_dir)

    return write_atomically(out, write, overwrite=overwrite)


def read_adapter_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise PrunekitError(f"ADAPTER {adapter_dir}: no such directory")
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise PrunekitError(f"ADAPTER {adapter_dir}: not an adapter directory (no {ADAPTER_CONFIG})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PrunekitError(f"ADAPTER {adapter_dir}/{ADAPTER_CONFIG}: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise PrunekitError(f"ADAPTER {adapter_dir}/{ADAPTER_CONFIG}: expected a JSON object")
    return cfg


def resolve_adapter_base(adapter_dir: str | Path, base: str | os.PathLike | None = None, *,
                         allow_pickle: bool = False) -> Path:
    """The base model directory of an adapter.

    An explicit `base` (directory, .gguf or alias) wins; otherwise adapter_config.json's base_model_name_or_path,
    resolved relative to the adapter directory (absolute values are accepted as they are)."""
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    if base is not None:
        where, spec = "--base", str(base)
    else:
        recorded = cfg.get("base_model_name_or_path")
        if not recorded:
            raise PrunekitError(f"ADAPTER {adapter_dir}: {ADAPTER_CONFIG} names no base model; pass --base")
        spec = os.path.normpath(os.path.join(os.path.abspath(adapter_dir), os.path.expanduser(recorded)))
        where = f"ADAPTER {adapter_dir}: base {recorded!r} (from {ADAPTER_CONFIG}, pass --base to override)"
    try:
        return resolve_model(spec, allow_pickle=allow_pickle)
    except PrunekitError as e:  # "MODEL <spec>: <why>" -> "<where> -> <spec>: <why>"
        why = str(e).split(": ", 1)[-1]
        raise PrunekitError(f"{where}: {spec}: {why}") from None


__all__ = ["apply_lora", "save_adapter", "resolve_adapter_base", "read_adapter_config", "default_target_modules",
           "target_regex"]
