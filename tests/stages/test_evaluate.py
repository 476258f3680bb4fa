"""`prunekit eval`: loss, perplexity and token_acc on text rows and on messages; a missing file is one line."""
from __future__ import annotations

import json
import math

import pytest

from prunekit.cli import main
from prunekit.core import text


def test_eval_command_on_text_and_messages(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    rows = tmp_path / "t.jsonl"
    text.general_text(None, rows)
    assert main(["eval", str(tiny_chat_model_dir), "--data", str(rows), "--max-samples", "4", "--max-length", "32",
                 "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["rows"] == 4 and m["tokens"] == 4 * 31 and m["ppl"] == pytest.approx(math.exp(m["loss"]))
    assert main(["eval", str(tiny_chat_model_dir), "--data", str(chat_data[1]), "--max-samples", "4"]) == 0
    assert "token_acc" in capsys.readouterr().out
    assert main(["eval", str(tiny_chat_model_dir), "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err
