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
    """The JSON header of a .safetensors file: {name: {dtype, shape, data_offsets}} (+ __metadata__)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


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
