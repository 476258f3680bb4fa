import json

import pytest

from prunekit import PrunekitError
from prunekit.rl.prompts import read_rows


def test_read_rows_jsonl_and_json_list(tmp_path):
    rows = [{"prompt": "add 2\u2028and 3", "answer": "5"}, {"prompt": [{"role": "user", "content": "hi"}]}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps(rows))
    assert read_rows(jsonl, "prompt") == rows == read_rows(listed, "prompt")


@pytest.mark.parametrize("text, expected", [
    ('{"prompt": "a"}\n{"prompt": \n', "row 2: invalid JSON"),
    ('{"prompt": "a"}\n{"question": "b"}\n', "row 2: expected an object with a 'prompt' field"),
    ('{"prompt": 3}\n', "row 1: prompt must be text"),
    ("[]", "no rows"),
])
def test_read_rows_errors_name_the_file_and_row(tmp_path, text, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(PrunekitError) as err:
        read_rows(path, "prompt")
    assert str(err.value).startswith(f"prompts {path}") and expected in str(err.value)
    with pytest.raises(PrunekitError, match="not found"):
        read_rows(tmp_path / "missing.jsonl", "prompt")
