"""Recipe: merge a LoRA adapter into its base and save a plain Hugging Face checkpoint (no peft needed to load it)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks, report
from prunekit.core.checkpoint import safetensors_header
from prunekit.core.loading import (check_output_dir, copy_side_files, load_model, quiet_transformers, read_provenance,
                                   write_atomically, write_provenance)
from prunekit.core.lora import ADAPTER_WEIGHTS, read_adapter_config, resolve_adapter_base


@dataclass
class MergeResult:
    output: Path
    params: int          # parameters of the merged model (= the base's: merging adds none)
    base: Path
    adapter: Path
    provenance: dict


def _adapter_keys(adapter_dir: Path) -> set[str] | None:
    f = adapter_dir / ADAPTER_WEIGHTS
    return {k for k in safetensors_header(f) if k != "__metadata__"} if f.is_file() else None


def _check_keys(peft_model, adapter_dir: Path, base_dir: Path) -> None:
    """Every adapter tensor must land on a base module and every LoRA module must get weights: peft silently drops
    tensors for modules the base lacks (an adapter trained before layers were pruned) and only warns about the rest."""
    from peft import get_peft_model_state_dict
    saved = _adapter_keys(adapter_dir)
    if saved is None:
        return
    expected = set(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    unused, missing = sorted(saved - expected), sorted(expected - saved)
    if unused or missing:
        what = (f"{len(unused)} adapter tensors have no module in the base (e.g. {unused[0]})" if unused else
                f"{len(missing)} LoRA tensors are missing from the adapter (e.g. {missing[0]})")
        raise PrunekitError(f"ADAPTER {adapter_dir} does not fit base {base_dir}: {what}; was it trained on "
                            f"another base?")


def merge_lora(adapter_dir: str | Path, out: str | Path, base: str | Path | None = None, *, overwrite: bool = False,
               trust_remote_code: bool = False, allow_pickle: bool = False) -> MergeResult:
    """Load the base (its saved dtype), apply the adapter, merge_and_unload, write OUT atomically with the base's
    tokenizer / processor / chat-template files and provenance. The adapter and base are never modified."""
    from peft import PeftModel
    adapter_dir = Path(adapter_dir).expanduser()
    peft_cfg = read_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        if (adapter_dir / "adapter_model.bin").is_file() and not allow_pickle:
            raise PrunekitError(f"ADAPTER {adapter_dir}: only pickle (.bin) weights, which can run code when loaded; "
                                f"convert to safetensors or pass --allow-pickle")
        if not (adapter_dir / "adapter_model.bin").is_file():
            raise PrunekitError(f"ADAPTER {adapter_dir}: no adapter weights ({ADAPTER_WEIGHTS})")
    base_dir = resolve_adapter_base(adapter_dir, base, allow_pickle=allow_pickle)
    out = check_output_dir(Path(out), [adapter_dir, base_dir], overwrite)

    def write(tmp: Path):
        copy_side_files(base_dir, tmp)
        with quiet_transformers():
            model, _ = load_model(base_dir, dtype="auto", trust_remote_code=trust_remote_code)
            with warnings.catch_warnings():  # _check_keys reports missing keys (and the unused ones peft skips)
                warnings.filterwarnings("ignore", message="Found missing adapter keys")
                try:
                    peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
                except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch, unknown modules, bad config
                    msg = " ".join(str(e).split())[:300]
                    raise PrunekitError(f"ADAPTER {adapter_dir} does not fit base {base_dir} "
                                        f"({type(e).__name__}: {msg})") from None
            _check_keys(peft_model, adapter_dir, base_dir)
            if not hasattr(peft_model, "merge_and_unload"):
                raise PrunekitError(f"ADAPTER {adapter_dir}: peft type {peft_cfg.get('peft_type')!r} cannot be merged")
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(tmp)
        parent = adapter_dir if read_provenance(adapter_dir) else base_dir
        write_provenance(tmp, {
            "stage": "merge_lora", "parent": str(adapter_dir.resolve()), "adapter": str(adapter_dir.resolve()),
            "base": str(base_dir.resolve()),
            "lora": {"peft_type": peft_cfg.get("peft_type"), "rank": peft_cfg.get("r"),
                     "alpha": peft_cfg.get("lora_alpha"), "target_modules": peft_cfg.get("target_modules")},
            "params": report.describe(tmp)["params"]["total"],
        }, parent_dir=parent)

    with locks.hold((out, "-o")):  # one writer per OUT
        write_atomically(out, write, overwrite=overwrite)
        provenance = read_provenance(out)
        return MergeResult(out, provenance["params"], base_dir, adapter_dir.resolve(), provenance)
