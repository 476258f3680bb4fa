"""Plain text -> {"text"} rows: chunking, `prunekit data text` (bad input writes nothing), the built-in general
English text (deterministic, train and eval disjoint), the pipeline's default eval file."""
from __future__ import annotations

import json

import pytest

from prunekit.cli import main
from prunekit.core.data import DataError, load_messages
from prunekit.core import text

PROSE = ("First paragraph, first sentence. Second sentence here! A third one?\n"
         "This line is hard-wrapped\ninto the paragraph.\n\n"
         "Second paragraph is short.\n\n\n" + "Long sentence number %d goes on for a while. " * 40)


def test_chunks_respect_the_limit_and_keep_every_word():
    for limit in (60, 200, 5000):
        chunks = text.chunk_text(PROSE % tuple(range(40)), limit)
        assert all(0 < len(c) <= limit for c in chunks)
        assert " ".join(" ".join(chunks).split()) == " ".join((PROSE % tuple(range(40))).split())
    small = text.chunk_text(PROSE % tuple(range(40)), 200)
    assert small[0] == ("First paragraph, first sentence. Second sentence here! A third one? This line is "
                        "hard-wrapped into the paragraph.\n\nSecond paragraph is short.")
    assert all(c.endswith(".") for c in small)      # long paragraphs split at sentence ends
    assert text.chunk_text("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]   # no boundary at all: a hard cut
    with pytest.raises(DataError):
        text.chunk_text("x", 0)


CODE = '''import heapq


def dijkstra(graph, start):
    """Shortest distances from start."""
    dist = {start: 0}
    queue = [(0, start)]
    while queue:
        d, node = heapq.heappop(queue)
        for nxt, w in graph[node]:
            if d + w < dist.get(nxt, float("inf")):
                dist[nxt] = d + w
                heapq.heappush(queue, (d + w, nxt))
    return dist


class Node:
    def __init__(self, value):
        self.value = value
'''


def test_keep_lines_chunks_code_with_its_lines_and_indentation(tmp_path):
    """--keep-lines (source code): every chunk is whole lines of the file, indentation kept, within the limit; a
    function longer than a chunk is cut at line ends; the prose chunker would have joined the lines."""
    lines = CODE.splitlines()
    for limit in (120, 200, 5000):
        chunks = text.chunk_text(CODE, limit, keep_lines=True)
        assert all(0 < len(c) <= limit for c in chunks)
        assert all(line in lines for c in chunks for line in c.split("\n"))   # whole lines, indentation kept
        assert [x for c in chunks for x in c.split("\n") if x.strip()] == [x for x in lines if x.strip()]
    assert text.chunk_text(CODE, 5000, keep_lines=True) == [CODE.strip("\n").replace("\n\n\n", "\n\n")]
    assert 'def dijkstra(graph, start): """Shortest' in text.chunk_text(CODE, 5000)[0]   # prose: lines joined
    code = tmp_path / "graph.py"
    code.write_text(CODE.replace("\n", "\r\n"), encoding="utf-8")
    out = tmp_path / "code.jsonl"
    assert main(["data", "text", str(code), "-o", str(out), "--chunk-chars", "200", "--keep-lines"]) == 0
    rows = load_messages(out)
    assert [r["text"] for r in rows] == text.chunk_text(CODE, 200, keep_lines=True)
    assert any('def dijkstra(graph, start):\n    """Shortest' in r["text"] for r in rows)   # CRLF read as lines
    first = tmp_path / "first.jsonl"
    assert main(["data", "text", str(code), "-o", str(first), "--chunk-chars", "200", "--keep-lines",
                 "--limit", "2"]) == 0
    assert load_messages(first) == rows[:2]
    assert main(["data", "text", str(code), "-o", str(tmp_path / "none.jsonl"), "--keep-lines", "--limit", "0"]) == 2
    assert not (tmp_path / "none.jsonl").exists()


def test_data_text_writes_rows_and_a_val_split(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(PROSE % tuple(range(40)), encoding="utf-8")
    b.write_text("\ufeffA file with a byte-order mark. Ünïcödé is fine.\n", encoding="utf-8")
    out, val = tmp_path / "out.jsonl", tmp_path / "val.jsonl"
    assert main(["data", "text", str(a), str(b), "-o", str(out), "--val", str(val), "--val-fraction", "0.25",
                 "--chunk-chars", "300"]) == 0
    train_rows, val_rows = load_messages(out), load_messages(val)
    assert all(set(r) == {"text", "source", "id"} and len(r["text"]) <= 300 for r in train_rows + val_rows)
    assert len(val_rows) == round(len(train_rows + val_rows) * 0.25)
    assert {r["id"] for r in train_rows}.isdisjoint(r["id"] for r in val_rows)
    assert any(r["text"] == "A file with a byte-order mark. Ünïcödé is fine." for r in train_rows + val_rows)
    assert "text rows to" in capsys.readouterr().out


@pytest.mark.parametrize("content,expected", [(b"caf\xe9 au lait\n", "not UTF-8 text (byte 0xe9 at offset 3)"),
                                              (b" \n\n \t\n", "empty file")])
def test_data_text_bad_file_is_one_line_and_writes_nothing(tmp_path, capsys, content, expected):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("Fine text. " * 50, encoding="utf-8")
    bad.write_bytes(content)
    out_dir = tmp_path / "out"
    rc = main(["data", "text", str(good), str(bad), "-o", str(out_dir / "t.jsonl"), "--val", str(out_dir / "v.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"prunekit data: error: {bad}: {expected}"]
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_general_text_is_deterministic_and_eval_is_held_out(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["data", "general", "-o", str(d / "train.jsonl"), "--eval", str(d / "eval.jsonl")]) == 0
    for name in ("train.jsonl", "eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    train, held = load_messages(a / "train.jsonl"), load_messages(a / "eval.jsonl")
    doc = lambda r: r["id"].rsplit(":", 1)[0]   # noqa: E731  lee:<article>:<chunk>
    assert {doc(r) for r in train}.isdisjoint(doc(r) for r in held)          # split by article
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert len({doc(r) for r in held}) == text.GENERAL_EVAL_DOCS and 200 <= len(held) <= 400
    assert all(len(r["text"]) <= text.DEFAULT_CHUNK_CHARS for r in train + held)
    assert 150_000 <= sum(len(r["text"]) for r in held) <= 600_000           # ~50k SmolLM2 tokens
    assert "Afghanistan" in " ".join(r["text"] for r in held + train)        # real English news prose
    assert {r["source"] for r in held} == {text.GENERAL_SOURCE}              # the eval split is news only
    wiki = [r for r in train if r["source"] == text.WIKI_SOURCE]
    assert len(wiki) > 1000 and sum(len(r["text"]) for r in wiki) > 2_000_000   # ~0.5M tokens of encyclopedia prose
    assert any(r["text"].startswith("Anarchism is a political philosophy") for r in wiki)
    assert not any(m in r["text"] for r in wiki for m in ("[[", "{{", "<ref", "&quot;", "''"))


def test_wiki_prose_keeps_the_prose_and_drops_the_markup():
    markup = ("{{Infobox|name=x {{nested|a}} }}\n\'\'\'Anarchism\'\'\' is a [[political philosophy]] that "
              "advocates [[self-governance|self-governed]] societies.&lt;ref&gt;{{cite|x}}&lt;/ref&gt; It is old "
              "and has many [http://example.org schools] of thought.\n==History==\n* a list item that is long "
              "enough to pass the length rule but is a list item\n[[File:x.png|thumb|a caption [[with link]]]]\n"
              "{| class=wikitable\n| a || b\n|}\nshort line")
    assert text.wiki_prose(markup) == ("Anarchism is a political philosophy that advocates self-governed societies. "
                                       "It is old and has many schools of thought.")


def test_pipeline_default_eval_file_is_the_eval_split(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    path = text.general_eval_file()
    assert path.is_relative_to(tmp_path / "cache") and text.general_eval_file() == path
    text.general_text(None, tmp_path / "eval.jsonl")
    assert path.read_bytes() == (tmp_path / "eval.jsonl").read_bytes()


def test_far_text_is_held_out_english_from_another_source(tmp_path):
    from prunekit.core.text import FAR_SOURCE, far_text
    assert far_text(tmp_path / "far.jsonl", rows=50) == 50
    rows = load_messages(tmp_path / "far.jsonl")
    assert len(rows) == 50 and {r["source"] for r in rows} == {FAR_SOURCE}
    assert rows[0]["text"].startswith("At the first God made the heaven and the earth.")
    assert len({r["id"] for r in rows}) == 50 and all(500 < len(r["text"]) <= 2000 for r in rows)
    assert not any("\\" in r["text"] or "  " in r["text"] for r in rows)   # verse marks and spacing cleaned
    far_text(tmp_path / "again.jsonl", rows=50)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "far.jsonl").read_bytes()


def test_openings_start_and_end_at_words_and_feed_generate(tmp_path, capsys):
    words = [f"word{k}" for k in range(400)]
    doc = " ".join(words)
    found = text.openings(doc, opening_chars=120, stride_chars=200)
    assert found[0].startswith("word0 ") and len(found) == len(range(0, len(doc) - 120, 200))
    for piece in found:
        assert 80 <= len(piece) <= 120 and " ".join(piece.split()) == piece
        assert all(w in words for w in piece.split())          # no word cut at either end
        assert doc.find(piece) >= 0
    # no word starts after a stride point: the openings end there (before, the opening at 0 came again)
    assert text.openings("word " * 30 + "x" * 600, 120, 200) == [("word " * 24).strip()]
    rows = tmp_path / "rows.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows.write_text("".join(json.dumps(r) + "\n" for r in ({"text": doc}, chat, {"text": "too short"})))
    out = tmp_path / "openings.jsonl"
    assert main(["data", "openings", str(rows), "-o", str(out), "--opening-chars", "120", "--stride-chars", "200"]) == 0
    assert [r["text"] for r in load_messages(out)] == found   # the messages row and the short text give none
    assert f"wrote {len(found)} openings to {out}" in capsys.readouterr().out


@pytest.mark.parametrize("content,expected", [
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
     "no {\"text\"} rows (messages rows are prompts already"),
    (b'{"text": "caf\xe9"}\n', "not UTF-8"),
    (b'{"text": "short"}\n', "no text of 80 characters or more"),
    (b"", "empty file")])
def test_data_openings_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, content, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    out = tmp_path / "out" / "openings.jsonl"
    assert main(["data", "openings", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"prunekit data: error: {bad}") and expected in err[0], err
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert main(["data", "openings", str(bad), "-o", str(out), "--opening-chars", "50"]) == 2
    assert "--opening-chars must be >= 80" in capsys.readouterr().err
