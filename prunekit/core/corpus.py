"""The files of a teacher-sampled corpus (`prunekit data generate`): prompt files in, an append-only JSONL out.

Prompt files are JSON lists or JSONL of ms-swift `messages` rows (every user turn becomes a prompt, with the system
message and the earlier turns as context) or `{"text": ...}` rows (a raw prompt the teacher continues).

The corpus `OUT.jsonl` holds one row per sample:
    {"messages": [...prompt, {"role": "assistant", "content": answer}], "id": "<prompt>:<sample>",
     "source": "teacher:<model>", "finish": "stop"|"length", "tokens": <completion tokens>}
(text prompts give `{"text": prompt + continuation, ...}` with the same fields, for the text-row loader). It only
ever grows by whole lines, each chunk written with one write() and fsynced, so an interrupted run leaves complete
rows; a torn last line (a crash mid-write) is cut off when the next run opens the file. `OUT.jsonl.stats.json`
records the settings the rows were made with (a resume with other settings is refused) and the length statistics.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.data import read_json_rows

ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- prompts in

def _parse_rows(path: Path, flag: str = "--prompts") -> list[tuple[int, object]]:
    """(row number, parsed JSON) of a prompt file; one-line errors naming the flag and the file."""
    return read_json_rows(path, label=f"{flag} ", missing="file not found")


def _user_turn_prompts(messages, where: str) -> list[list[dict]]:
    """Every user turn with what comes before it (system message, earlier turns) as one prompt."""
    if not isinstance(messages, list) or not messages:
        raise PrunekitError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PrunekitError(f"{where}: messages[{i}] must be {{role: system/user/assistant, content: text}}")
        if m["role"] == "system" and i != 0:
            raise PrunekitError(f"{where}: messages[{i}] is a system message; only messages[0] may be")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompts = [clean[:i + 1] for i, m in enumerate(clean) if m["role"] == "user"]
    if not prompts:
        raise PrunekitError(f"{where}: no user turn to use as a prompt")
    return prompts


def read_prompt_file(path: str | os.PathLike, flag: str = "--prompts") -> list[dict]:
    """Prompts from a file: `{"messages": [...]}` (one per user turn) or `{"text": str}`; duplicates dropped,
    first occurrence kept, so a prompt's index depends only on the file. Errors name `flag`."""
    path = Path(path)
    prompts: list[dict] = []
    for n, row in _parse_rows(path, flag):
        where = f"{flag} {path} row {n}"
        if isinstance(row, dict) and "messages" in row:
            prompts += [{"messages": p} for p in _user_turn_prompts(row["messages"], where)]
        elif isinstance(row, dict) and "text" in row:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise PrunekitError(f"{where}: 'text' must be non-empty text")
            prompts.append({"text": row["text"]})
        else:
            raise PrunekitError(f"{where}: expected an object with 'messages' or 'text'")
    if not prompts:
        raise PrunekitError(f"{flag} {path}: no rows")
    return dedup_prompts(prompts)


def dedup_prompts(prompts: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the corpus out

def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".stats.json")


def answer_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def row_answer(row: dict) -> str:
    """What dedup compares: the assistant answer, or the whole text of a continuation row (same prompt prefix)."""
    return row["messages"][-1]["content"] if "messages" in row else row["text"]


def prompt_of(row_id: str) -> int:
    return int(row_id.split(":", 1)[0])


class CorpusFile:
    """The append-only JSONL plus its sidecar. `open()` checks the settings against an earlier run's, repairs a
    torn last line and loads what is needed to resume: the ids present, per-prompt answer hashes (dedup), and the
    per-row token counts and finish reasons (statistics)."""

    def __init__(self, out: str | os.PathLike, settings: dict):
        self.path = Path(out)
        self.sidecar = sidecar_path(self.path)
        self.settings = settings
        self.ids: set[str] = set()
        self.answers: dict[int, set[str]] = {}
        self.tokens: list[int] = []       # completion tokens per row, in file order
        self.token_total = 0
        self.finishes: list[str] = []
        self.history: dict = {}           # the sidecar of an earlier run of the same corpus
        self.repaired_bytes = 0
        self._recorded = False            # this run's settings are in the sidecar

    def check(self) -> None:
        """Validate an existing corpus against these settings without changing anything."""
        if self.path.exists() and not self.path.is_file():
            raise PrunekitError(f"-o {self.path}: exists and is not a file")
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        if not self.sidecar.is_file():
            raise PrunekitError(f"-o {self.path}: exists without {self.sidecar.name}, so it is not a corpus this "
                                "command can resume; use another -o")
        try:
            self.history = json.loads(self.sidecar.read_text())
            before = self.history["settings"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise PrunekitError(f"{self.sidecar}: unreadable ({e}); use another -o") from None
        for key in sorted(set(before) | set(self.settings)):
            if before.get(key) != self.settings.get(key):
                raise PrunekitError(f"-o {self.path} was generated with {key}={before.get(key)!r}, this run asks "
                                    f"{self.settings.get(key)!r} (settings in {self.sidecar.name}); re-run with the "
                                    "same settings to resume, or use another -o")

    def open(self) -> None:
        """check(), then cut a torn last line and load the existing rows."""
        self.check()
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        complete = data[:data.rfind(b"\n") + 1]
        for n, line in enumerate(complete.splitlines(), 1):
            try:
                row = json.loads(line)
                row_id, tokens, finish = row["id"], int(row["tokens"]), row["finish"]
                answer = row_answer(row)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
                raise PrunekitError(f"-o {self.path} row {n}: not a corpus row ({type(e).__name__}); the file was "
                                    "changed outside prunekit, use another -o") from None
            self.ids.add(row_id)
            self.answers.setdefault(prompt_of(row_id), set()).add(answer_key(answer))
            self.tokens.append(tokens)
            self.token_total += tokens
            self.finishes.append(finish)
        if len(complete) < len(data):  # a crash mid-write: drop the partial line so every row is whole
            self.repaired_bytes = len(data) - len(complete)
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())

    def append(self, rows: list[dict]) -> None:
        """Write whole rows with one write() and fsync; the first write records the settings first."""
        if not rows:
            return
        if not self._recorded:  # the settings go on record before the first row they made
            self.write_sidecar({k: v for k, v in self.history.items() if k != "settings"})
            self._recorded = True
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it in one call; loop only for the exotic short write
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        for r in rows:
            self.ids.add(r["id"])
            self.tokens.append(r["tokens"])
            self.token_total += r["tokens"]
            self.finishes.append(r["finish"])

    def write_sidecar(self, stats: dict) -> None:
        record = {"settings": self.settings, **stats}
        self.sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.sidecar.parent, prefix=f".{self.sidecar.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.sidecar)


def length_stats(tokens: list[int], finishes: list[str]) -> dict:
    """Completion-length statistics of the whole corpus."""
    if not tokens:
        return {"rows": 0, "tokens": 0}
    ordered = sorted(tokens)
    return {"rows": len(tokens), "tokens": sum(tokens), "mean_tokens": round(sum(tokens) / len(tokens), 2),
            "median_tokens": statistics.median(ordered), "p90_tokens": ordered[min(len(ordered) - 1,
                                                                                   int(0.9 * len(ordered)))],
            "max_tokens": ordered[-1], "hit_max_new_tokens": round(finishes.count("length") / len(finishes), 4)}
