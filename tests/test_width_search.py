"""`prunekit width-search` on Ray Tune (CPU): FFN only, heads+FFN, hidden+FFN and depth at one parameter budget, each
pruned from the original, distilled from it for a few steps and measured on the general text; a failed trial, then
the same search again running only that one; the report; bad input as one-line errors."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from prunekit.cli import main
from prunekit.config import load_config
from prunekit.core.loading import load_model
from prunekit.stages.width_search import width_search

STEPS = 2


@pytest.fixture(scope="module")
def wide_chat(tmp_path_factory, tiny_chat_model_dir):
    """A 4-layer tiny llama with a wide FFN (4096) and SmolLM2's tokenizer: its decoder layers hold as many
    parameters as its embedding, so a hidden cut of one step (64 -> 56) is about a quarter of the layers' size."""
    import torch
    import transformers
    from conftest import TEXT
    d = tmp_path_factory.mktemp("wide-chat")
    torch.manual_seed(4)
    config = transformers.LlamaConfig(**{**TEXT, "vocab_size": 49152, "num_hidden_layers": 4, "intermediate_size": 4096,
                                         "initializer_range": 0.02, "tie_word_embeddings": True})
    transformers.LlamaForCausalLM(config).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(tiny_chat_model_dir / f, d / f)
    return d


def ws_config(model, train, tmp_path, **over):
    base = {"model": str(model), "train": str(train), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "name": "search", "max_steps": STEPS, "max_length": 64,
            "batch_size": 4, "eval_interval": 2, "log_interval": 1, "eval_max_samples": 8, "importance_samples": 8,
            "lr": 1e-3, "warmup_ratio": 0.0, "scheduler": "constant", "wandb.mode": "disabled",
            "tune.max_concurrent_trials": 2, **over}
    return load_config("width-search", None, base)


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


def _err(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_fails_before_any_trial(wide_chat, chat_data, tmp_path, capsys):
    import yaml
    good = {"model": str(wide_chat), "train": str(chat_data[0]), "output_dir": str(tmp_path / "report"),
            "storage_path": str(tmp_path / "runs"), "max_steps": 2}

    def bad(**over):
        path = tmp_path / "ws.yaml"
        path.write_text(yaml.safe_dump({**good, **over}))
        return _err(["width-search", "--config", path], capsys)
    assert "no candidate reaches the budget" in bad(params=1000)
    assert "depth: removing every layer but the first and last leaves" in bad(params=1000)
    assert "already within the budget" in bad(params=10 ** 9)
    assert "params_fraction must be in (0, 1)" in bad(params_fraction=1.5)
    assert "give one budget: params or layer_params_removed" in bad(params=10, layer_params_removed=0.2)
    assert "ws.yaml: candidates.0: Input should be" in bad(candidates=["width"])
    assert "nope.jsonl: data file not found" in bad(val=str(tmp_path / "nope.jsonl"))
    assert "ray: a width-search trial is one process" in bad(parallel={"workers": 2})
    assert not (tmp_path / "report").exists() and not (tmp_path / "runs").exists()


def test_ray_job_entry_point_is_wired():
    """`ray_jobs/width_search.py` is the `prunekit width-search` command (its --help needs no cluster)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "ray_jobs/width_search.py", "--help"], cwd=root, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0 and "usage: prunekit width-search" in out.stdout, out.stderr
    cfg = load_config("width-search", root / "recipes" / "width_search.yaml")
    assert cfg.candidates == ["ffn", "heads+ffn", "hidden+ffn", "depth"] and cfg.layer_params_removed == 0.25
