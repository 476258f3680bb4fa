"""Checkpoint manifests: every file's size and sha256, recorded when a checkpoint is written and checked before a
run resumes from it or copies its model out. A node that dies mid-write, a full disk or a truncated copy then
shows up as one line naming the file, never as an output that does not load.

`manifest.json` lists what rank 0 wrote; ranks that write their own shards (DeepSpeed) add `manifest.rank<N>.json`.
A checkpoint without a manifest (written before manifests existed) is checked by its safetensors headers only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.corpus import file_sha256

MANIFEST = "manifest.json"
_CHUNK = 8 << 20
_verified: dict = {}  # (checkpoint, (file, size, mtime) ...) -> problem, so one process hashes a checkpoint once


def manifest_name(rank: int) -> str:
    return MANIFEST if rank == 0 else f"manifest.rank{rank}.json"


def _is_manifest(rel: str) -> bool:
    return "/" not in rel and rel.startswith("manifest") and rel.endswith(".json")


def write_manifest(ckpt_dir: Path, rank: int = 0) -> None:
    """Record size and sha256 of every file under `ckpt_dir` (written last: a manifest means the files were)."""
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for f in sorted(ckpt_dir.rglob("*")):
        rel = f.relative_to(ckpt_dir).as_posix()
        if f.is_file() and not _is_manifest(rel):
            files[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    if not files:
        return
    tmp = ckpt_dir / f".{manifest_name(rank)}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, ckpt_dir / manifest_name(rank))


def read_manifest(ckpt_dir: Path) -> dict[str, dict] | None:
    """{relative path: {size, sha256}} over all ranks' manifests; None when the checkpoint has none."""
    paths = sorted(Path(ckpt_dir).glob("manifest*.json"))
    if not paths:
        return None
    files: dict[str, dict] = {}
    for p in paths:
        try:
            files.update(json.loads(p.read_text())["files"])
        except (OSError, ValueError, KeyError, TypeError):
            files[p.name] = {"size": -1, "sha256": "unreadable manifest"}
    return files


def safetensors_problem(path: Path) -> str | None:
    """A structural check of a .safetensors file from its header (no weights read): the header parses and the
    tensors' byte ranges end exactly at the end of the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size:,} bytes, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                return f"{path.name} is {size:,} bytes, shorter than its own header says ({8 + n:,})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"{path.name} has an unreadable safetensors header ({type(e).__name__})"
    if 8 + n + end != size:
        return f"{path.name} is {size:,} bytes, its tensors need {8 + n + end:,}"
    return None


def _file_problem(path: Path, rel: str, entry: dict | None) -> str | None:
    if not path.is_file():
        return f"{rel} is missing"
    if entry is not None:
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{rel} is {size:,} bytes, {entry.get('size'):,} when written"
        if file_sha256(path) != entry.get("sha256"):
            return f"{rel} does not match the sha256 recorded when it was written"
    elif path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem:
            return problem.replace(path.name, rel, 1)
    return None


def checkpoint_problem(ckpt_dir: Path) -> str | None:
    """None when every file the manifest lists is there with its recorded size and sha256 (without a manifest:
    when its safetensors files are whole); else what is wrong, naming the file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return "the directory is missing"
    files = read_manifest(ckpt_dir)
    if files is None:
        files = {f.relative_to(ckpt_dir).as_posix(): None for f in sorted(ckpt_dir.rglob("*.safetensors"))}
    stamp = []
    for rel in files:
        try:
            st = (ckpt_dir / rel).stat()
            stamp.append((rel, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((rel, None, None))
    key = (str(ckpt_dir.resolve()), tuple(stamp))
    if key not in _verified:
        _verified[key] = next((p for rel, entry in files.items()
                               if (p := _file_problem(ckpt_dir / rel, rel, entry))), None)
    return _verified[key]


def newest_intact(candidates: list[Path], run_dir: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint of `candidates` (newest first). A damaged newer one is skipped with one warning
    line; when none is intact, a one-line error names the damaged file."""
    damaged: list[tuple[Path, str]] = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged and warn:
                bad, why = damaged[0]
                print(f"prunekit: warning: checkpoint {bad} is damaged ({why}); resuming from {ckpt.name}",
                      file=sys.stderr, flush=True)
            return ckpt
        damaged.append((ckpt, problem))
    if damaged:
        bad, why = damaged[0]
        raise PrunekitError(f"checkpoint {bad} is damaged ({why}) and no earlier checkpoint is intact; "
                            f"delete {run_dir} (or pick another run name) to start over")
    return None


def copy_verified(ckpt_dir: Path, sub: str, dst: Path) -> None:
    """Copy the files of `ckpt_dir/sub` into `dst`, hashing while copying and comparing with the manifest (one
    read of each file); a mismatch raises naming the checkpoint file. Safetensors files are checked structurally
    too (the only check for a checkpoint written before manifests)."""
    ckpt_dir, dst = Path(ckpt_dir), Path(dst)
    files = read_manifest(ckpt_dir)
    src_dir = ckpt_dir / sub
    listed = sorted(rel for rel in (files or {}) if rel.startswith(f"{sub}/"))
    names = [rel[len(sub) + 1:] for rel in listed] if files is not None else \
        sorted(f.name for f in src_dir.iterdir() if f.is_file())
    for name in names:
        src, rel = src_dir / name, f"{sub}/{name}"
        if not src.is_file():
            raise PrunekitError(f"checkpoint {ckpt_dir} is damaged ({rel} is missing); nothing written")
        out = dst / name
        out.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        with open(src, "rb") as fi, open(out, "wb") as fo:
            while chunk := fi.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fo.write(chunk)
        shutil.copystat(src, out)
        entry = files.get(rel) if files is not None else None
        problem = None
        if entry is not None and size != entry.get("size"):
            problem = f"{rel} is {size:,} bytes, {entry.get('size'):,} when written"
        elif entry is not None and h.hexdigest() != entry.get("sha256"):
            problem = f"{rel} does not match the sha256 recorded when it was written"
        elif out.suffix == ".safetensors" and (p := safetensors_problem(out)):
            problem = p.replace(out.name, rel, 1)
        if problem:
            raise PrunekitError(f"checkpoint {ckpt_dir} is damaged ({problem}); nothing written")
