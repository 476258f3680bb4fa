"""What a model directory says without loading it: config.json and the tensor shapes in its safetensors headers.
The lowest layer of `prunekit.core` (no prunekit imports), so loading, checks and report can all stand on it."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from prunekit import PrunekitError


def read_config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"{model_dir}/config.json: cannot read ({e})") from None
    if not isinstance(cfg, dict):
        raise PrunekitError(f"{model_dir}/config.json: expected a JSON object of settings, got {type(cfg).__name__}")
    return cfg


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}} (+ __metadata__). A file whose
    size disagrees with its header (cut short by a full disk or an interrupted copy) is a one-line error here, not a
    loader traceback later."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8).rjust(8, b"\0"))
        if 8 + n > size:
            raise PrunekitError(f"{path}: damaged ({size:,} bytes, too short for its {n:,}-byte header)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrunekitError(f"{path}: damaged (its header is not JSON: {e})") from None
    try:
        need = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        raise PrunekitError(f"{path}: damaged (its header is not a safetensors tensor list)") from None
    if size != need:
        raise PrunekitError(f"{path}: damaged ({size:,} bytes where its header describes {need:,}: "
                            f"{'cut short' if size < need else 'trailing bytes'})")
    return header


def checkpoint_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor shapes from safetensors headers; for a pickle-only checkpoint (accepted with --allow-pickle), from
    a weights-only, memory-mapped load."""
    shapes = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for k, v in safetensors_header(f).items():
            if k != "__metadata__":
                shapes[k] = v["shape"]
    if not shapes:
        import torch
        for f in sorted(Path(model_dir).glob("*.bin")):
            shapes.update({k: list(t.shape) for k, t in
                           torch.load(f, map_location="cpu", weights_only=True, mmap=True).items()})
    return shapes
