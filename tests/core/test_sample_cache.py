"""Tokenised samples on disk: a second load of the same file the same way reads them back (no tokenising), equal to
a fresh tokenisation; any change that could change them misses; a damaged entry is rebuilt."""
from __future__ import annotations

import json

import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "samples"


@pytest.fixture
def mix(tmp_path, chat_data):
    """Chat rows and text rows in one file (the recovery mixes' shape)."""
    rows = [json.loads(x) for x in chat_data[0].read_text().splitlines()[:120]]
    rows += [{"text": f"Plain text row {i}. " * (3 + i % 40)} for i in range(40)]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(tokenizer, path, model, **kw):
    from prunekit.core.samples import load_samples
    return load_samples(tokenizer, path, model=model, max_length=kw.pop("max_length", 64), **kw)


def _counting_tokenizer(monkeypatch):
    from prunekit.core import data as text_data
    calls = []
    real = text_data.tokenize_rows

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(text_data, "tokenize_rows", counted)
    return calls


@pytest.mark.parametrize("packing", [False, True])
def test_a_second_load_reads_the_same_samples_back_without_tokenising(cache, mix, smollm2_dir, monkeypatch, packing):
    from prunekit.core.loading import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    calls = _counting_tokenizer(monkeypatch)
    first = _load(tok, mix, smollm2_dir, packing=packing)
    assert calls and len(list(cache.glob("*.npz"))) == 1
    calls.clear()
    again = _load(tok, mix, smollm2_dir, packing=packing)
    assert not calls, "read from the cache"
    assert again == first and len(first) > 10
    assert set(first[0]) == ({"input_ids", "labels", "position_ids"} if packing else {"input_ids", "labels"})
    assert any(-100 in s["labels"] for s in first) and all(isinstance(s["input_ids"][0], int) for s in first)


def test_what_changes_the_samples_misses_the_cache(cache, mix, smollm2_dir, monkeypatch):
    from prunekit.core.loading import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    calls = _counting_tokenizer(monkeypatch)
    base = _load(tok, mix, smollm2_dir)
    for change in ("max_length", "limit", "file", "template"):
        calls.clear()
        if change == "max_length":
            out = _load(tok, mix, smollm2_dir, max_length=48)
            assert max(len(s["input_ids"]) for s in out) == 48
        elif change == "limit":
            out = _load(tok, mix, smollm2_dir, limit=10)
            assert len(out) <= 10
        elif change == "file":   # same size, one character changed
            text = mix.read_text()
            mix.write_text(text.replace("Plain text row 3.", "Plain text row 8.", 1))
            out = _load(tok, mix, smollm2_dir)
            assert out != base
        else:
            tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
            out = _load(tok, mix, smollm2_dir)
            assert out != base
        assert calls, f"a change of {change} re-tokenised"
    assert len(list(cache.glob("*.npz"))) == 5


def test_a_damaged_entry_is_rebuilt_and_old_entries_are_dropped(cache, mix, smollm2_dir, monkeypatch):
    from prunekit.core import sample_cache
    from prunekit.core.loading import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    first = _load(tok, mix, smollm2_dir)
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])   # cut short
    calls = _counting_tokenizer(monkeypatch)
    assert _load(tok, mix, smollm2_dir) == first and calls
    assert _load(tok, mix, smollm2_dir) == first   # and stored again whole
    monkeypatch.setattr(sample_cache, "KEEP", 3)
    for n in range(4, 9):
        _load(tok, mix, smollm2_dir, max_length=8 * n)
    assert len(list(cache.glob("*.npz"))) == 3 and not list(cache.glob("*.tmp*"))
    monkeypatch.setattr(sample_cache, "KEEP_BYTES", 1)   # over the byte cap: only the entry just written stays
    _load(tok, mix, smollm2_dir, max_length=96)
    assert len(list(cache.glob("*.npz"))) == 1
