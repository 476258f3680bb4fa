"""The built-in seed prompts: distinct, in a fixed order, every kind of task (programming too) early in the order,
and none of them a chatterbot question (the chat val's source)."""
from __future__ import annotations

from prunekit.core.data import load_messages
from prunekit.core.datasets import chatterbot_to_messages
from prunekit.core.seed_prompts import programming_prompts, seed_prompts


def test_seed_prompts_are_distinct_fixed_and_mix_programming_in_early(tmp_path):
    prompts = seed_prompts()
    assert len(prompts) == len(set(prompts)) > 2000
    assert seed_prompts() == prompts and seed_prompts(50) == prompts[:50]
    code = [p for p in prompts if p.startswith(("Write a Python", "Write a JavaScript", "Implement ", "Show me Python",
                                                 "How do I write a Python"))]
    assert len(code) > 100   # a share of the corpus, not a token
    assert any(p in code for p in prompts[:100])   # a prefix (a small --rows) mixes them in too
    asks_for_code = programming_prompts()   # the recovery probe's code answers: every seed prompt that asks for code
    assert set(code) < set(asks_for_code) < set(prompts) and len(asks_for_code) == len(set(asks_for_code))
    assert all("Python" in p or "JavaScript" in p for p in asks_for_code)
    chatterbot_to_messages(tmp_path / "train.jsonl", val_path=tmp_path / "val.jsonl", val_fraction=0.2)
    questions = {r["messages"][0]["content"].strip().lower()
                 for f in ("train.jsonl", "val.jsonl") for r in load_messages(tmp_path / f)}
    assert not questions & {p.lower() for p in prompts}
