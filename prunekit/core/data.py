"""Training data rows: loading, tokenising, packing, collating.

A row is either a conversation in ms-swift's ``messages`` format, ``{"messages": [{"role":
"system"|"user"|"assistant", "content": str}, ...], "images": [path, ...] (optional), ...extra
columns}`` (image placeholders in content use ms-swift's ``<image>`` tag; only assistant turns are
trained on), or plain text, ``{"text": str, ...extra columns}`` (every token is trained on). Both
kinds may be mixed in one file. Files are a JSON list or JSONL.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from prunekit import PrunekitError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DataError(PrunekitError, ValueError):
    """A data file or row is malformed; the message is one line naming the file (and row)."""


# ----------------------------------------------------------------------------- loading


def _check_row(row: Any, base: Path) -> dict:
    """Validate one row and return it with image paths made absolute; raises ValueError(msg)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    if "text" in row:
        return _check_text_row(row)
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("'messages' must be a non-empty list (or give a plain-text row: {\"text\": ...})")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role {m.get('role')!r} is not one of {'/'.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message; only messages[0] may be")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant turn, so nothing to train on")
    images = row.get("images")
    if images is None:
        return row
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError("'images' must be a list of path strings")
    resolved = []
    for i, p in enumerate(images):
        full = (base / p).resolve()  # an absolute p stays as it is
        if not full.is_file():
            raise ValueError(f"images[{i}] {p!r} not found (looked at {full})")
        resolved.append(str(full))
    return {**row, "images": resolved}


def _check_text_row(row: dict) -> dict:
    if "messages" in row:
        raise ValueError("a row has 'messages' or 'text', not both")
    if "images" in row:
        raise ValueError("'images' need a 'messages' row; a 'text' row is text only")
    if not isinstance(row["text"], str):
        raise ValueError(f"'text' must be a string, got {type(row['text']).__name__}")
    if not row["text"].strip():
        raise ValueError("'text' is empty, so nothing to train on")
    return row


def is_text_row(row: dict) -> bool:
    return "text" in row


def read_json_rows(path: Path, label: str = "", missing: str = "data file not found") -> list[tuple[int, object]]:
    """(row number, parsed JSON) of a JSON-list or JSONL file (sniffed from the content, not the suffix; a JSONL
    row's number is its line). One-line DataErrors start with `label` + the path."""
    at = f"{label}{path}"
    if not path.is_file():
        raise DataError(f"{at}: {missing}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{at}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{at}: cannot read ({e.strerror or e})") from None
    if not text.strip():
        raise DataError(f"{at}: empty file")
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise DataError(f"{at}: invalid JSON at line {e.lineno}: {e.msg}") from None
    numbered = []
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+2029 and U+0085, which JSON leaves raw in strings
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                if not numbered and text.lstrip().startswith("{"):  # one pretty-printed object?
                    try:
                        json.loads(text)
                    except json.JSONDecodeError:
                        pass
                    else:
                        raise DataError(f"{at}: one JSON object, not rows: give a JSON list of rows or JSONL "
                                        f"(one row per line)") from None
                raise DataError(f"{at} row {n}: invalid JSON: {e.msg}") from None
    return numbered


def load_messages(path: str | os.PathLike) -> list[dict]:
    """Read and validate a JSON-list or JSONL file of conversation and/or plain-text rows.

    The format is sniffed from the content (a leading ``[`` means a JSON list), not the suffix.
    Relative image paths are resolved against the data file's folder. Any problem raises
    :class:`DataError` (a ``ValueError``) with a one-line message such as
    ``train.json row 7: messages[2].role 'bot' is not one of system/user/assistant``; rows are
    numbered from 1 (for JSONL, the row number is the line number).
    """
    path = Path(path)
    numbered = read_json_rows(path)
    if not numbered:
        raise DataError(f"{path}: no rows")
    rows = []
    for n, row in numbered:
        try:
            rows.append(_check_row(row, path.parent))
        except ValueError as e:
            raise DataError(f"{path} row {n}: {e}") from None
    return rows


def plain_text(content) -> str:
    """A message's text (a list of parts: its text parts), lower-cased with spacing collapsed."""
    items = content if isinstance(content, list) else [content]
    text = " ".join(i if isinstance(i, str) else str(i.get("text") or "") if isinstance(i, dict) else "" for i in items)
    return " ".join(text.lower().split())


def row_turns(row: dict) -> tuple[str, ...]:
    """A row's text, or its non-system turns, normalised: equal for the same row up to case and spacing."""
    if is_text_row(row):
        return (plain_text(row["text"]),)
    return tuple(plain_text(m.get("content")) for m in row["messages"] if m.get("role") != "system")


def val_overlap(val_rows: Sequence[dict], train_rows: Sequence[dict]) -> tuple[int, int]:
    """(val rows that are also train rows, val conversations whose first user turn is a train conversation's):
    either way the val measures fitting, not held-out recovery."""
    train = {row_turns(r) for r in train_rows}
    questions = {t[0] for t in train if t} - {""}
    val = [(row_turns(r), is_text_row(r)) for r in val_rows]
    return sum(t in train for t, _ in val), sum(not is_text and bool(t) and t[0] in questions for t, is_text in val)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_messages(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows atomically (temp file in the same folder, then ``os.replace``) as JSONL, or as a
    JSON list when the name ends in ``.json``. Returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(rows, f, ensure_ascii=False, indent=1)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(rows)


# ----------------------------------------------------------------------------- tokenising


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_token_chars: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def max_token_chars(tokenizer) -> int:
    """The longest token's string in the vocabulary (in characters; byte-level BPE writes one character per byte):
    no token covers more characters of a text than this."""
    if tokenizer not in _token_chars:
        _token_chars[tokenizer] = max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))
    return _token_chars[tokenizer]


def char_budget(tokenizer, max_length: int) -> int:
    """Characters of one text that can reach the first ``max_length`` tokens (with a margin of 8 tokens, so the
    tokens up to ``max_length`` are those of the whole text)."""
    return (max_length + 8) * max_token_chars(tokenizer)


def cut_messages(messages: list[dict], max_chars: int) -> list[dict]:
    """The messages with each content (a string, or its text items) cut to ``max_chars`` characters; the rows
    themselves are not modified."""
    def cut(content):
        if isinstance(content, str):
            return content[:max_chars]
        if isinstance(content, list):
            return [{**i, "text": i["text"][:max_chars]} if isinstance(i, dict) and isinstance(i.get("text"), str)
                    else i for i in content]
        return content
    return [{**m, "content": cut(m["content"])} if "content" in m else m for m in messages]


def tokenize_text(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    """Tokenise a plain-text row; every token is labelled. Special tokens (BOS/EOS) are added as the tokenizer does
    for plain text (``add_special_tokens=True``); no chat template. Right-truncated to ``max_length``."""
    return tokenize_rows(tokenizer, [{"text": text}], max_length)[0]


def tokenize_row(tokenizer, row: dict, max_length: int) -> dict[str, list[int]]:
    """A validated row (see :func:`load_messages`): plain text or a conversation."""
    return tokenize_rows(tokenizer, [row], max_length)[0]


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict[str, list[int]]:
    """Tokenise a conversation with the tokenizer's chat template; only assistant turns are labelled.

    Each assistant turn's span is found by rendering prefixes as text (:func:`conversation_pieces`); the text is then
    tokenised piece by piece, so the prompt/response boundary is tokenised exactly as at generation time (prompt
    tokenised alone, response generated after it). Special tokens come from the template only
    (``add_special_tokens=False``, as ``apply_chat_template`` does). Right-truncated to ``max_length``. Returns lists
    ``input_ids`` and ``labels`` (``-100`` where unsupervised).
    """
    return tokenize_rows(tokenizer, [{"messages": messages}], max_length)[0]


def conversation_pieces(tokenizer, messages: list[dict], max_length: int) -> list[tuple[str, bool]]:
    """A conversation's rendered text in pieces, each marked supervised or not: an assistant turn starts where the
    rendering of the preceding messages with ``add_generation_prompt=True`` ends, and ends where the rendering
    including the turn ends, less trailing whitespace (so ChatML labels ``content<|im_end|>`` but not the newline
    after it). Each message is cut by characters first (:func:`char_budget`): what the template and the tokenizer
    hold in memory does not grow with a message's length."""
    messages = cut_messages(messages, char_budget(tokenizer, max_length))
    full = _render(tokenizer, messages)
    cuts = [0]  # alternating boundaries: [prompt, response, prompt, response, ..., tail]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        # the last message's turn is the whole rendering (one template render fewer per row: most rows end there)
        turn = (full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])).rstrip()
        if not (full.startswith(prompt) and full.startswith(turn) and cuts[-1] <= len(prompt) <= len(turn)):
            raise ValueError(
                f"chat template does not render messages[{i}] as a prefix of the whole conversation; "
                "cannot locate the assistant turn"
            )
        cuts += [len(prompt), len(turn)]
    cuts.append(len(full))
    return [(full[a:b], k % 2 == 1) for k, (a, b) in enumerate(zip(cuts, cuts[1:])) if a < b]


TOKENIZE_CHUNK_ROWS = 2048   # rows whose text is tokenised in one batch call (bounds the strings held at once)


@contextlib.contextmanager
def tokenizer_threads():
    """A fast tokenizer's batch calls use every core while this is open. `prunekit.engine.loop` turns its threads
    off for the process (TOKENIZERS_PARALLELISM=false: a child forked after they ran would wait on threads it does
    not have), which left a 12M-token mix on one core: 13 s of encoding on 2 cores, ~10x that share on 16. The
    variable is read on every call and restored after, so a later fork still runs the tokenizer serially."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def tokenize_rows(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Validated rows (see :func:`load_messages`) as samples: plain text (:func:`tokenize_text`) or conversations
    (:func:`tokenize_conversation`). Templates are rendered row by row; the text is then tokenised in one batch call
    per chunk of rows, which a fast tokenizer spreads over the CPU's cores. The ids are those of one call per piece."""
    budget = char_budget(tokenizer, max_length)
    samples: list[dict[str, list[int]]] = []
    for first in range(0, len(rows), TOKENIZE_CHUNK_ROWS):
        chunk = rows[first:first + TOKENIZE_CHUNK_ROWS]
        plain = [r["text"][:budget] for r in chunk if is_text_row(r)]   # BOS/EOS as the tokenizer adds them
        pieces = [[] if is_text_row(r) else conversation_pieces(tokenizer, r["messages"], max_length) for r in chunk]
        templated = [text for row_pieces in pieces for text, _ in row_pieces]   # special tokens from the template
        with tokenizer_threads():
            plain_ids = iter(tokenizer(plain, add_special_tokens=True)["input_ids"] if plain else [])
            templated_ids = iter(tokenizer(templated, add_special_tokens=False)["input_ids"] if templated else [])
        for row, row_pieces in zip(chunk, pieces):
            if is_text_row(row):
                ids = list(next(plain_ids))[:max_length]
                samples.append({"input_ids": ids, "labels": list(ids)})
                continue
            input_ids: list[int] = []
            labels: list[int] = []
            for _, supervised in row_pieces:
                ids = list(next(templated_ids))
                input_ids += ids
                labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            samples.append({"input_ids": input_ids[:max_length], "labels": labels[:max_length]})
    return samples


# ----------------------------------------------------------------------------- batching


def pack_sequences(samples: Sequence[dict], max_length: int) -> list[dict[str, list[int]]]:
    """Greedily pack tokenised samples, in order, into rows of at most ``max_length`` tokens.

    Each packed row has ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 for every
    sample: with those position ids, varlen attention (flash-attn, or transformers' own packed
    detection with ``attention_mask=None, use_cache=False``) or :func:`packed_attention_mask`
    keeps samples from attending to each other. Each sample's first label is set to -100 so the shifted loss never
    asks the previous sample's last token to predict this sample's first token (that label is
    never a target in the unpacked sample either, so per-sample losses are unchanged).
    Samples longer than ``max_length`` are truncated.
    """
    packs: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for s in samples:
        ids = list(s["input_ids"])[:max_length]
        labels = list(s["labels"])[: len(ids)]
        if not ids:
            continue
        if len(cur["input_ids"]) + len(ids) > max_length:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += ids
        cur["labels"] += [IGNORE_INDEX] + [int(x) for x in labels[1:]]
        cur["position_ids"] += range(len(ids))
    if cur["input_ids"]:
        packs.append(cur)
    return packs


def replace_tokens(batch: dict, fraction: float, generator: torch.Generator) -> dict:
    """Input noise for distillation (`distill input_noise`): each supervised token of a collated batch is replaced,
    with probability `fraction`, by one drawn from the batch's own supervised tokens. The labels keep the clean
    tokens: what changes is the context every later position reads, for the teacher and the student alike, so a row
    seen for the tenth time still asks for a function the student has not fitted yet ("function matching", Beyer et
    al. 2022). Returns a new batch; prompts, padding and each sample's first token are left alone."""
    if fraction <= 0:
        return batch
    supervised = batch["labels"] != IGNORE_INDEX
    ids = batch["input_ids"]
    hit = supervised & (torch.rand(ids.shape, generator=generator) < fraction)
    if not bool(hit.any()):
        return batch
    pool = ids[supervised]
    noisy = ids.clone()
    noisy[hit] = pool[torch.randint(len(pool), (int(hit.sum()),), generator=generator)]
    return {**batch, "input_ids": noisy}


def collate(batch: Sequence[dict], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into ``[B, L]`` long tensors (``L``: the longest sample, or ``width`` if longer).

    Unpacked samples get ``input_ids``, ``labels`` (padded with -100) and a 0/1 ``attention_mask``.
    Packed samples (those with ``position_ids``) get ``position_ids`` instead of an attention
    mask, padded with 0 so each pad token is its own one-token sequence. Pass them with
    :func:`packed_attention_mask`, or with ``attention_mask=None`` and ``use_cache=False``:
    transformers (5.x) then detects the packing from ``position_ids``, but silently does not when
    a 2D attention mask is given or a KV cache exists (``use_cache`` defaults to True).

    Text samples only: :func:`prunekit.core.samples.collate` sends batches with images to the processor's collate.
    """
    import numpy as np
    width = max(width or 0, *(len(s["input_ids"]) for s in batch))
    packed = "position_ids" in batch[0]

    def pad(key: str, value: int) -> torch.Tensor:
        # rows copied into one numpy array: a third of torch.tensor's time on nested lists, once a training step
        out = np.full((len(batch), width), value, dtype=np.int64)
        for row, sample in zip(out, batch):
            row[:len(sample[key])] = sample[key]
        return torch.from_numpy(out)

    out = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX)}
    if packed:
        out["position_ids"] = pad("position_ids", 0)
    else:
        out["attention_mask"] = torch.from_numpy(
            (np.arange(width)[None, :] < np.array([len(s["input_ids"]) for s in batch])[:, None]).astype(np.int64))
    return out


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Block-diagonal causal additive mask ``[B, 1, S, S]`` from packed ``position_ids`` ``[B, S]``.

    A new sequence starts wherever a position is not the previous one plus 1 (the same rule as
    transformers' ``find_packed_sequence_indices``). Allowed entries are 0, others ``finfo.min``.
    transformers passes any 4D ``attention_mask`` through unchanged to the eager and sdpa
    attention, where it is added to the scores; every row keeps its diagonal, so no row is
    fully masked.
    """
    prev = torch.cat([position_ids[:, :1] - 1, position_ids[:, :-1]], dim=1)
    seq = (position_ids != prev + 1).cumsum(-1)  # [B, S] sequence index of each token
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
