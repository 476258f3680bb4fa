"""`prunekit pipeline` on Ray: rounds until the target, then the finishing stages; the state file (a failed stage,
then resume, then nothing left to do, then --redo), the summary."""
from __future__ import annotations

import json
import math

import pytest

from prunekit import PrunekitError
from prunekit import pipeline as pl
from prunekit.cli import main
from prunekit.pipeline import runner as pipeline_runner
from tests.pipeline.test_pipeline import recipe, write


@pytest.fixture(scope="module")
def chat4(chat_model_dir):
    """A 4-layer tiny llama with SmolLM2's tokenizer: room for two rounds of one layer each."""
    return chat_model_dir(4, seed=2)


_REAL_KV_CUT = pl.Runner._kv_cut


def _counting(fn, calls):
    def wrapper(self, stage_id, *a, **kw):
        calls.append(stage_id)
        return fn(self, stage_id, *a, **kw)
    return wrapper


def _forbidden(self, stage_id, *a, **kw):
    raise AssertionError(f"{stage_id} ran again")


def test_rounds_until_target_then_finish_resumable(ray_session, chat4, chat_data, tmp_path, monkeypatch, capsys):
    from prunekit.stages import training
    out = tmp_path / "out"
    path = write(tmp_path, recipe(chat4, chat_data, out))
    real_sft = training.sft

    # run 1: the first SFT fails -> one-line error; the stages before it stay finished
    def broken(cfg):
        raise PrunekitError("simulated worker loss")
    monkeypatch.setattr(training, "sft", broken)
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage r1-3-sft (sft) failed: simulated worker loss" in err[0]
    state = json.loads((out / pl.STATE_FILE).read_text())
    assert [s["id"] for s in state["stages"]] == ["r1-1-importance", "r1-2-prune"]
    assert state["status"].startswith("failed")

    # run 2: continues at r1-3-sft; two rounds of one layer reach the target, then the KV cut
    monkeypatch.setattr(training, "sft", real_sft)
    calls = []
    monkeypatch.setitem(pipeline_runner.STAGE_RUNNERS, "importance", _counting(pl.Runner._importance, calls))
    assert main(["pipeline", str(path)]) == 0
    assert calls == ["r2-1-importance"]       # round 1's importance was not recomputed
    state = json.loads((out / pl.STATE_FILE).read_text())
    ids = [s["id"] for s in state["stages"]]
    assert ids == ["r1-1-importance", "r1-2-prune", "r1-3-sft", "r2-1-importance", "r2-2-prune", "r2-3-sft",
                   "f-1-kv_cut"]
    assert state["status"] == "done"
    by_id = {s["id"]: s for s in state["stages"]}
    # each round dropped the least important interior layer of its own input
    for rnd, layers_in in ((1, 4), (2, 3)):
        imp, prune = by_id[f"r{rnd}-1-importance"], by_id[f"r{rnd}-2-prune"]
        assert prune["drop_text"] == [imp["least_important_first"][0]]
        assert 0 < prune["drop_text"][0] < layers_in - 1
        assert prune["input"] == (str(chat4) if rnd == 1 else by_id["r1-3-sft"]["output"])
    final = by_id["f-1-kv_cut"]
    assert final["facts"]["text_layers"] == 2 and final["facts"]["kv_heads"] == 1
    target = recipe(chat4, chat_data, out)["target"]["params"]
    assert by_id["r2-3-sft"]["facts"]["params"] <= target < by_id["r1-3-sft"]["facts"]["params"]
    # every output is a plain HF directory whose provenance chains back to the original
    prov = json.loads((out / "f-1-kv_cut" / "prunekit.json").read_text())
    assert prov["stage"] == "kv_cut" and prov["parent"] == by_id["r2-3-sft"]["output"]
    # the summary: one row per model, the table printed, the plot written
    summary = json.loads((out / "summary.json").read_text())
    assert [r["id"] for r in summary["rows"]] == ["original", "r1-2-prune", "r1-3-sft", "r2-2-prune", "r2-3-sft",
                                                  "f-1-kv_cut"]
    assert summary["final_model"] == str(out / "f-1-kv_cut")
    assert (out / "summary.png").stat().st_size > 10_000
    # every model is also measured on the built-in held-out general text (eval_text defaults to it)
    assert summary["eval_text"].endswith("-eval.jsonl")
    for row in summary["rows"]:
        t = row["eval_text"]
        assert t["tokens"] > 0 and 0 <= t["token_acc"] <= 1 and t["ppl"] == pytest.approx(math.exp(t["loss"]))
    # the chat val is in-domain from the first SFT on: its ratio there is not recovery
    assert summary["in_domain"] == ["f-1-kv_cut", "r1-3-sft", "r2-2-prune", "r2-3-sft"]
    md = (out / "summary.md").read_text()
    assert "text acc" in md and "in-domain" in md and "held-out general text" in md
    printed = capsys.readouterr().out
    assert "KV B/token" in printed and "f-1-kv_cut" in printed and "pipeline done" in printed
    assert "general text loss" in printed and "text vs orig" in printed

    # run 3: everything is finished -> no stage runs again
    for stage in ("importance", "prune", "sft", "kv_cut"):
        monkeypatch.setitem(pipeline_runner.STAGE_RUNNERS, stage, _forbidden)
    assert main(["pipeline", str(path)]) == 0
    assert json.loads((out / pl.STATE_FILE).read_text())["stages"] == state["stages"]

    # --redo forgets a stage and everything after it
    monkeypatch.setitem(pipeline_runner.STAGE_RUNNERS, "kv_cut", _REAL_KV_CUT)
    assert main(["pipeline", str(path), "--redo", "f-1-kv_cut"]) == 0
    assert [s["id"] for s in json.loads((out / pl.STATE_FILE).read_text())["stages"]] == ids
