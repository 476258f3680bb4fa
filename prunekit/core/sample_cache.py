"""Tokenised samples kept on disk, so a run that starts again on the same data reads them back instead of tokenising
the file again: a resumed attempt (a chained call, a preempted job), a pipeline's later stage or comparison on the
same mix. Tokenising the outcome recipe's 12M-token mix (chat templates rendered in Python, then the tokenizer) was
most of the 51-60 s each distillation attempt spent loading on the H200 box; on 2 CPU cores it takes 17 s and reading
it back 3.5 s.

An entry is keyed by everything the samples depend on: the data file's bytes, the tokenizer (its whole definition
and chat template), the settings (max_length, packing, row limit) and the tokenising code itself (this package's
data modules and the transformers/tokenizers versions), so a change to any of them misses the cache rather than
reading stale samples. Entries live under `$PRUNEKIT_CACHE/samples` (default ~/.cache/prunekit), are written
atomically, and the least recently used beyond `KEEP` entries or `KEEP_BYTES` are removed. A damaged entry is
rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

KEEP = 16                 # entries kept (the least recently used go first) ...
KEEP_BYTES = 4 * 2**30    # ... and no more bytes than this (the outcome mix's entry is 142 MB)
_CODE = ("data.py", "samples.py", "sample_cache.py")   # the modules whose code decides what a sample is


def cache_root() -> Path:
    from prunekit.core.loading import cache_dir
    return cache_dir() / "samples"


def key_for(path: str | Path, tokenizer, **settings) -> str | None:
    """The cache key of `path` tokenised by `tokenizer` with `settings`; None when the tokenizer cannot be
    fingerprinted (a slow, Python-only tokenizer: such runs tokenise every time) or the file cannot be read."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from prunekit.core.corpus import file_sha256
        data = file_sha256(Path(path))
    except OSError:   # missing or unreadable: the loader says so, in its own words
        return None
    import tokenizers
    import transformers
    here = Path(__file__).parent
    parts = {
        "data": data,
        "tokenizer": hashlib.sha256(backend.to_str().encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "tokenizer_class": type(tokenizer).__name__,
        "settings": settings,
        "code": [hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE],
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read(entry: Path) -> list[dict] | None:
    import numpy as np
    try:
        with np.load(entry) as z:
            names = json.loads(str(z["names"]))
            offsets = z["offsets"].tolist()
            columns = {n: z[n].tolist() for n in names}
    except Exception:   # cut short, not an npz, a column missing: rebuild it
        entry.unlink(missing_ok=True)
        return None
    os.utime(entry)   # recently used
    return [{n: columns[n][a:b] for n in names} for a, b in zip(offsets, offsets[1:])]


def _write(entry: Path, samples: list[dict]) -> None:
    import numpy as np
    names = list(samples[0])
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s[names[0]]) for s in samples])
    columns = {n: np.fromiter((t for s in samples for t in s[n]), dtype=np.int32, count=int(offsets[-1]))
               for n in names}
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}.", suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, names=np.array(json.dumps(names)), offsets=offsets, **columns)
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    entries = sorted(entry.parent.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for n, old in enumerate(entries):
        total += old.stat().st_size
        if old != entry and (n >= KEEP or total > KEEP_BYTES):
            old.unlink(missing_ok=True)


def cacheable(samples: list[dict]) -> bool:
    """Text samples: the same keys in every sample, each a list of ints of one length per sample."""
    if not samples:
        return False
    names = set(samples[0])
    return all(set(s) == names and len({len(v) for v in s.values()}) == 1
               and all(isinstance(v, list) for v in s.values()) for s in samples)


def cached_samples(key: str | None, build) -> list[dict]:
    """`build()`'s samples, read from the cache entry `key` when there is one, else built and stored (key None:
    built every time). A cache that cannot be written (a read-only home) only costs the time it would have saved."""
    if key is None:
        return build()
    entry = cache_root() / f"{key}.npz"
    if entry.is_file():
        samples = _read(entry)
        if samples is not None:
            return samples
    samples = build()
    if cacheable(samples):
        try:
            _write(entry, samples)
        except OSError:
            pass
    return samples
