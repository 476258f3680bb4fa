"""Surgery shard by shard on a safetensors checkpoint, without building the model.

Peak memory is one tensor (plus its transformed copy), not one shard: tensors are read with plain file reads (no
mmap, so untouched pages never count) and written straight into the output shard, whose header is computed first
by running the same surgery on meta tensors.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from prunekit.core.checkpoint import safetensors_header

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def _read_tensor(f, header_len: int, info: dict) -> torch.Tensor:
    start, end = info["data_offsets"]
    f.seek(8 + header_len + start)
    buf = bytearray(end - start)
    f.readinto(buf)
    dtype = DTYPES[info["dtype"]]
    if not buf:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


def _write_shard(src: Path, dst: Path, surgery) -> dict[str, int]:
    """Transform one shard; returns {new_key: nbytes} of what it wrote (nothing written if every tensor went)."""
    header = safetensors_header(src)
    header_len = struct.unpack("<Q", src.open("rb").read(8))[0]
    entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
    entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
    plan, out_header, offset = [], {}, 0
    for key, info in entries:  # pass 1: output names, shapes and dtypes from meta tensors
        mapped = surgery(key, torch.empty(info["shape"], dtype=DTYPES[info["dtype"]], device="meta"))
        if mapped is None:
            continue
        new_key, meta = mapped
        nbytes = meta.numel() * meta.element_size()
        out_header[new_key] = {"dtype": DTYPE_NAMES[meta.dtype], "shape": list(meta.shape),
                               "data_offsets": [offset, offset + nbytes]}
        plan.append((key, info, new_key, nbytes))
        offset += nbytes
    if not plan:
        return {}
    out_header["__metadata__"] = header.get("__metadata__") or {"format": "pt"}
    blob = json.dumps(out_header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns tensor data to 8 bytes
    with src.open("rb") as fin, dst.open("wb") as fout:  # pass 2: one tensor in memory at a time
        fout.write(struct.pack("<Q", len(blob)))
        fout.write(blob)
        for key, info, new_key, nbytes in plan:
            _, tensor = surgery(key, _read_tensor(fin, header_len, info))
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            assert data.nbytes == nbytes, f"{new_key}: surgery changed shape between passes"
            fout.write(data)  # the array's own buffer: tobytes() would copy the whole tensor again
            del tensor, data
    return {new_key: nbytes for _, _, new_key, nbytes in plan}


def apply_streaming(src_dir: Path, dst_dir: Path, surgery) -> None:
    """Write the surgery's output checkpoint (shards, index, config.json) from src_dir into dst_dir."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    shards = sorted(p.name for p in src_dir.glob("*.safetensors"))
    weight_map, total = {}, 0
    for name in shards:
        written = _write_shard(src_dir / name, dst_dir / name, surgery)
        for key, nbytes in written.items():
            weight_map[key] = name
            total += nbytes
    if (src_dir / INDEX).is_file() or len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (dst_dir / "config.json").write_text(json.dumps(surgery.new_config, indent=2, sort_keys=True) + "\n")


def should_stream(model_dir: Path, threshold_bytes: int | None = None) -> bool:
    """Stream when the checkpoint would not comfortably fit in memory (default: > 40% of physical RAM)."""
    if threshold_bytes is None:
        env = os.environ.get("PRUNEKIT_STREAMING_BYTES")
        threshold_bytes = int(env) if env else int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return checkpoint_bytes(model_dir) > threshold_bytes
