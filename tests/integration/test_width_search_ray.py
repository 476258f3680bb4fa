"""`prunekit width-search` on Ray Tune (CPU): FFN only, heads+FFN, hidden+FFN and depth at one parameter budget, each
pruned from the original, distilled from it for a few steps and measured on the general text; a failed trial, then
the same search again running only that one; the report."""
from __future__ import annotations

import csv
import json

import pytest

from prunekit.core.loading import load_model
from prunekit.stages.width_search import width_search
from tests.stages.test_width_search import STEPS, ws_config


@pytest.fixture(scope="module")
def wide_chat(chat_model_dir):
    """A 4-layer tiny llama with a wide FFN (4096) and SmolLM2's tokenizer (tests/stages/test_width_search.py)."""
    return chat_model_dir(4, seed=4, intermediate_size=4096)


@pytest.fixture(scope="module")
def search(ray_session, wide_chat, chat_data, tmp_path_factory):
    """Run 1: the depth trial fails on purpose; run 2 (same name) runs only that one."""
    tmp = tmp_path_factory.mktemp("width-search")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEKIT_TEST_FAIL_CANDIDATES", "depth")  # test-only hook: this trial raises
        first = width_search(ws_config(wide_chat, chat_data[0], tmp))
    results = {c: (first.run_dir / "trials" / c.replace("+", "_") / "result.json") for c in ("ffn", "hidden+ffn")}
    mtimes = {c: p.stat().st_mtime_ns for c, p in results.items()}
    second = width_search(ws_config(wide_chat, chat_data[0], tmp), resume=True)
    return {"first": first, "second": second, "untouched": all(p.stat().st_mtime_ns == mtimes[c]
                                                               for c, p in results.items())}


def test_candidates_at_one_budget_distilled_and_measured(search, wide_chat):
    result = search["second"]
    report = json.loads((result.output / "results.json").read_text())
    budget = report["budget"]
    total = budget["of"]
    assert "25% of the" in budget["text"] and "decoder-layer parameters" in budget["text"]
    rows = {r["id"]: r for r in result.rows}
    assert list(rows) == ["ffn", "heads+ffn", "hidden+ffn", "depth"]
    wanted = total - budget["params"]
    for cid, row in rows.items():
        assert row["status"] == "done", row
        assert row["params"] <= budget["params"] and total - row["params"] <= 1.25 * wanted   # the same size
        assert 0 <= row["token_acc_step0"] <= 1 and 0 <= row["token_acc"] <= 1 and row["loss"] > 0
        o = report["original"]["token_acc"]
        assert row["ratio"] == (pytest.approx(row["token_acc"] / o) if o else None)
        curve = report["curves"][cid]
        assert sorted(map(int, curve["train_loss"])) == list(range(1, STEPS + 1))
        trial = json.loads((result.run_dir / "trials" / cid.replace("+", "_") / "result.json").read_text())
        assert trial["extra"]["params"] == row["params"]   # the trial's model has the planned size
    assert (rows["ffn"]["intermediate_size"], rows["ffn"]["num_attention_heads"], rows["ffn"]["hidden_size"]) == \
        (3008, 4, 64)                                          # a multiple of 64
    assert rows["heads+ffn"]["num_attention_heads"] == 2 and rows["hidden+ffn"]["hidden_size"] == 56
    assert rows["depth"]["layers_removed"] and set(rows["depth"]["layers_removed"]) <= {1, 2}   # never first / last
    assert all(rows[c]["importance_removed"] > 0 for c in ("ffn", "heads+ffn", "hidden+ffn"))
    assert report["importance_pick"] in ("ffn", "heads+ffn", "hidden+ffn")
    best = max(rows.values(), key=lambda r: (r["token_acc"], -r["loss"]))
    assert json.loads((result.output / "best.json").read_text())["candidate"] == best["id"] == result.best["candidate"]
    assert result.best["command"].startswith("prunekit ")
    with open(result.output / "results.csv") as f:
        assert [r["id"] for r in csv.DictReader(f)] == list(rows)
    summary = (result.output / "summary.md").read_text()
    assert f"**Best: {best['id']}**" in summary and "| hidden+ffn |" in summary
    assert (result.output / "width_search.png").stat().st_size > 1000
    assert json.loads((result.output / "prunekit.json").read_text())["stage"] == "width-search"
    original, _ = load_model(wide_chat)
    assert report["original"]["params"] == original.num_parameters() == total


def test_a_failed_trial_is_reported_then_only_it_runs_again(search):
    first, second = search["first"], search["second"]
    assert sorted(first.ran) == ["depth", "ffn", "heads+ffn", "hidden+ffn"]
    assert "fails on purpose" in first.errors["depth"]
    assert {r["id"]: r["status"] for r in first.rows}["depth"] == "error"
    assert second.ran == ["depth"] and not second.errors and search["untouched"]
