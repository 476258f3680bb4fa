"""`prunekit importance`: JSON and one plot per metric, then bad input as one-line errors (the scores themselves:
tests/core/test_importance.py)."""
from __future__ import annotations

import json

from prunekit.cli import main


def test_importance_cli_writes_json_and_plots(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    out = tmp_path / "imp"
    assert main(["importance", str(tiny_chat_model_dir), "--data", str(chat_data[1]), "-o", str(out),
                 "--samples", "6", "--max-length", "64", "--angular-n", "1,2"]) == 0
    record = json.loads((out / "importance.json").read_text())
    text = record["text"]
    assert record["samples"] == 6 and "vision" not in record
    assert len(text["block_influence"]) == len(text["nll_drop"]) == len(text["angular_distance_n1"]) == 2
    assert len(text["angular_distance_n2"]) == 1 and text["tokens"] > 0
    for metric in ("block_influence", "angular_distance_n1", "angular_distance_n2", "nll_drop"):
        assert (out / f"text_{metric}.png").stat().st_size > 1000
    assert "least important first" in capsys.readouterr().out
    # the output exists now: refused without --overwrite, one line
    assert main(["importance", str(tiny_chat_model_dir), "--data", str(chat_data[1]), "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["importance", str(tiny_chat_model_dir), "--data", str(empty), "-o", str(tmp_path / "o2")]) == 2
    assert "empty.jsonl row 1: no assistant turn" in capsys.readouterr().err
