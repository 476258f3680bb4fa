"""Converters from offline datasets shipped in installed packages to the ``messages`` format.

The packages are located with ``importlib.util.find_spec`` and their files read directly, so
nothing is imported from them. Output files are written atomically by
:func:`prunekit.core.data.save_messages` (JSONL, or a JSON list for a ``.json`` name).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import yaml

from prunekit.core.data import DataError, row_turns, save_messages


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {pip_name!r} is not installed (pip install {pip_name})")
    return Path(spec.submodule_search_locations[0])


def chatterbot_to_messages(
    out_path: str | os.PathLike,
    val_path: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    system: str | None = None,
) -> dict[str, int]:
    """Convert the English ``chatterbot-corpus`` conversations into ``messages`` rows.

    Each conversation's utterances alternate user/assistant, starting with the user; a trailing
    user utterance (odd count) is dropped so every row ends on an assistant turn, and entries
    with fewer than 2 utterances are skipped. Rows carry ``id`` (``"<topic>:<index>"``) and
    ``source`` columns. The corpus repeats itself (2,025 conversations, 898 distinct): repeats
    (same turns up to case and spacing) are dropped. With ``val_path``, a seeded shuffle of the
    distinct first user turns sends whole groups there until ``round(n * val_fraction)`` rows are
    reached, so no val question is ever a train question (a random row split had put 114 of 202 val
    rows in train verbatim); deterministic for a given seed. Returns ``{"train": n, "val": m}``.
    """
    data_dir = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    rows = []
    for yml in sorted(data_dir.glob("*.yml")):
        doc = yaml.safe_load(yml.read_text(encoding="utf-8")) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            turns = [str(u) for u in conv] if isinstance(conv, list) else []
            turns = turns[: len(turns) // 2 * 2]
            if not turns:
                continue
            msgs = [{"role": "system", "content": system}] if system else []
            msgs += [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns)]
            rows.append({"messages": msgs, "id": f"{yml.stem}:{i}", "source": "chatterbot-corpus"})
    if not rows:
        raise DataError(f"{data_dir}: no conversations found")
    seen: set = set()
    rows = [r for r in rows if (key := row_turns(r)) not in seen and not seen.add(key)]
    val: list[dict] = []
    if val_path is not None:
        if not 0 < val_fraction < 1:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        by_question: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            by_question.setdefault(row_turns(r)[0], []).append(k)
        questions = sorted(by_question)
        random.Random(seed).shuffle(questions)
        n_val, val_idx = max(1, round(len(rows) * val_fraction)), set()
        for q in questions:
            if len(val_idx) >= n_val:
                break
            val_idx.update(by_question[q])
        val = [r for k, r in enumerate(rows) if k in val_idx]
        rows = [r for k, r in enumerate(rows) if k not in val_idx]
        save_messages(val_path, val)
    save_messages(out_path, rows)
    return {"train": len(rows), "val": len(val)}


def _easy_vqa_rows(root: Path, split: str, limit: int | None, image_dir: Path | None) -> list[dict]:
    # easy_vqa's questions.json is a list of [question, answer, image_id]; images are <id>.png.
    questions = json.loads((root / "data" / split / "questions.json").read_text(encoding="utf-8"))
    rows = []
    for question, answer, image_id in questions[:limit]:
        image = root / "data" / split / "images" / f"{image_id}.png"
        if image_dir is not None:
            # Train and test image ids overlap, so keep the split in the copied path.
            dest = image_dir / split / image.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(image, dest)
            image = dest
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": "<image>" + question},
                    {"role": "assistant", "content": str(answer)},
                ],
                "images": [str(image.resolve())],
                "source": f"easy-vqa/{split}",
            }
        )
    return rows


def easy_vqa_to_messages(
    out_path: str | os.PathLike,
    val_path: str | os.PathLike | None = None,
    limit: int | None = None,
    image_dir: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Convert the ``easy-vqa`` package's questions into single-image VQA ``messages`` rows.

    The train split goes to ``out_path`` and, with ``val_path``, the test split there; ``limit``
    caps the rows per split (the first ones, so the output is deterministic). Rows reference the
    package's PNGs by absolute path, or copies under ``image_dir/<split>/`` when given (to make
    the dataset self-contained). The user turn is ``"<image>" + question``, as in ms-swift.
    Returns ``{"train": n, "val": m}``.
    """
    root = _package_dir("easy_vqa", "easy-vqa")
    image_dir = Path(image_dir) if image_dir is not None else None
    train = _easy_vqa_rows(root, "train", limit, image_dir)
    save_messages(out_path, train)
    n_val = 0
    if val_path is not None:
        n_val = save_messages(val_path, _easy_vqa_rows(root, "test", limit, image_dir))
    return {"train": len(train), "val": n_val}
