"""What the surgery recipes (prune, kv-cut) share: input checks, in-memory vs streaming, atomic output."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks, report
from prunekit.core import streaming as streaming_surgery
from prunekit.core.families import family_for
from prunekit.core.loading import (check_output_dir, copy_side_files, load_model, quiet_transformers, read_config, read_provenance,
                                   resolve_model, write_atomically, write_provenance)
from prunekit.core.surgery import apply_to_model


@dataclass
class SurgeryResult:
    output: Path
    before: dict        # report.describe() of the input
    after: dict         # report.describe() of the output
    streaming: bool
    provenance: dict


@dataclass
class SurgeryInput:
    path: Path
    config: dict
    family: object

    @classmethod
    def open(cls, model: str, allow_pickle: bool = False) -> "SurgeryInput":
        path = resolve_model(model, allow_pickle=allow_pickle)
        cfg = read_config(path)
        return cls(path, cfg, family_for(cfg))


def write_surgery_output(src: SurgeryInput, surgery, out: str | Path, *, overwrite: bool = False,
                         streaming: bool | None = None, trust_remote_code: bool = False,
                         model=None, built=None, stage: str, extra_files: dict[str, str | bytes] | None = None
                         ) -> SurgeryResult:
    """Apply `surgery` to the input checkpoint and write OUT atomically (temp dir, then rename).

    streaming=None decides by checkpoint size. `model` may pass an already-loaded input model (in-memory path),
    `built` the output model already built from it (e.g. a calibrated KV cut) to save as is. `extra_files`
    ({name: text or bytes}) are written into OUT too (e.g. the importance scores a width cut used)."""
    out = check_output_dir(Path(out), [src.path], overwrite)
    with locks.hold((out, "-o")):  # one writer per OUT
        return _write_surgery_output(src, surgery, out, overwrite, streaming, trust_remote_code, model, built, stage,
                                     extra_files)


def _write_surgery_output(src, surgery, out, overwrite, streaming, trust_remote_code, model, built, stage,
                          extra_files):
    if streaming is None:
        streaming = model is None and streaming_surgery.should_stream(src.path)
    if streaming and not list(src.path.glob("*.safetensors")):
        raise PrunekitError(f"--streaming needs safetensors weights in {src.path}")
    before = report.describe(src.path)

    def write(tmp: Path):
        copy_side_files(src.path, tmp)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        if streaming:
            streaming_surgery.apply_streaming(src.path, tmp, surgery)
        else:
            with quiet_transformers():
                loaded = model if model is not None else load_model(src.path, dtype="auto",
                                                                   trust_remote_code=trust_remote_code)[0]
                (built if built is not None else apply_to_model(loaded, surgery)).save_pretrained(tmp)
        after_tmp = report.describe(tmp)
        write_provenance(tmp, {
            "stage": stage, "parent": str(src.path), **surgery.provenance(), "streaming": streaming,
            "params": {"before": before["params"]["total"], "after": after_tmp["params"]["total"]},
            "kv_cache_bytes_per_token_bf16": {"before": before["kv_cache_bytes_per_token_bf16"],
                                              "after": after_tmp["kv_cache_bytes_per_token_bf16"]},
        }, parent_dir=src.path)

    write_atomically(out, write, overwrite=overwrite)
    after = report.describe(out)
    return SurgeryResult(out, before, after, streaming, read_provenance(out))

