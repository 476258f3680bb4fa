"""RL prompt datasets: JSON/JSONL rows with a prompt (text or chat messages) and any other columns, which the
rewards receive (e.g. `answer`). Prompts go through the model's chat template with the generation prompt added."""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.data import read_json_rows


def read_rows(path: Path, prompt_column: str) -> list[dict]:
    path = Path(path)
    numbered = read_json_rows(path, label="prompts ", missing="not found")
    if not numbered:
        raise PrunekitError(f"prompts {path}: no rows")
    for n, row in numbered:
        if not isinstance(row, dict) or prompt_column not in row:
            raise PrunekitError(f"prompts {path}: row {n}: expected an object with a {prompt_column!r} field")
        p = row[prompt_column]
        ok = isinstance(p, str) or (isinstance(p, list) and p and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in p))
        if not ok:
            raise PrunekitError(f"prompts {path}: row {n}: {prompt_column} must be text or a list of "
                                "{role, content} messages")
    return [row for _, row in numbered]


def prompt_token_ids(tokenizer, prompt, system_prompt: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def tokenize_prompts(tokenizer, rows: list[dict], prompt_column: str, system_prompt: str | None, max_length: int,
                     source: Path) -> list[list[int]]:
    out = []
    for i, row in enumerate(rows):
        ids = prompt_token_ids(tokenizer, row[prompt_column], system_prompt)
        if len(ids) > max_length:
            raise PrunekitError(f"prompts {source}: row {i + 1}: {len(ids)} tokens > max_prompt_length {max_length}")
        out.append(ids)
    return out
