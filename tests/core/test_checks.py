"""config.json against the weights beside it (issue 16, cases 2 and 11): a config that disagrees with the weights,
or is not a config at all, is one line naming what disagrees, for every command that reads it, and nothing is
written."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import error_lines, run_cli, sft_args, tree_hash


def edit_config(model_dir, text_key=None, **changes):
    cfg = json.loads((model_dir / "config.json").read_text())
    (cfg[text_key] if text_key else cfg).update(changes)
    (model_dir / "config.json").write_text(json.dumps(cfg))


MISMATCHES = [
    ({"num_hidden_layers": 6}, "config.json says 6 text layers, the weights hold 4"),
    ({"num_hidden_layers": 2}, "config.json says 2 text layers, the weights hold 4"),
    ({"hidden_size": 32}, "config.json says hidden_size 32, the weights' model.embed_tokens.weight has 64 columns"),
    ({"vocab_size": 256}, "config.json says vocab_size 256, the weights' model.embed_tokens.weight has 128 rows"),
    ({"num_key_value_heads": 4}, "config.json says num_key_value_heads 4 x head_dim 16 = 64, the weights' "
                                 "model.layers.0.self_attn.k_proj.weight has 32 rows (2 heads)"),
]


@pytest.mark.parametrize("changes,message", MISMATCHES)
def test_config_that_disagrees_with_the_weights_is_one_line(changes, message, llama_copy, tmp_path, capsys):
    edit_config(llama_copy, **changes)
    before = tree_hash(llama_copy)
    code, _, err = run_cli(capsys, "inspect", llama_copy)
    assert code == 2 and message in err and err.count("\n") == 1, err
    for mode in ("--streaming", "--in-memory"):
        code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out", mode)
        assert code == 2 and message in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", "1", "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert tree_hash(llama_copy) == before and not (tmp_path / "out").exists()


def test_training_refuses_a_config_that_disagrees_with_the_weights(tiny_chat_model_dir, chat_data, tmp_path, capsys):
    model = tmp_path / "chat"
    shutil.copytree(tiny_chat_model_dir, model)
    edit_config(model, num_hidden_layers=3)
    code, _, err = run_cli(capsys, *sft_args(model, chat_data, tmp_path, "out"))
    assert code == 2 and error_lines(err) == [
        f"prunekit sft: error: MODEL {model}: config.json says 3 text layers, the weights hold 2 "
        f"(config.json and the weights disagree; nothing done)"], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_vlm_vision_depth_that_disagrees_with_the_weights(tiny_model_dir, tmp_path, capsys):
    d = tmp_path / "vlm"
    shutil.copytree(tiny_model_dir("qwen2_vl"), d)
    edit_config(d, "vision_config", depth=6)
    capsys.readouterr()  # the fixture's own output
    code, _, err = run_cli(capsys, "inspect", d)
    assert code == 2 and "config.json says 6 vision blocks, the weights hold 4" in err and err.count("\n") == 1


@pytest.mark.parametrize("text,message", [
    ("[]", "config.json: expected a JSON object of settings, got list"),
    ('"llama"', "config.json: expected a JSON object of settings, got str"),
    ('{"model_type": "llama"}', "config.json: no num_hidden_layers"),
    ('{"model_type": "llama", "num_hidden_layers": "4", "num_attention_heads": 4, "hidden_size": 64}',
     "config.json: num_hidden_layers: '4' is not a positive integer"),
    ('{"num_hidden_layers": 4}', "model_type None is not supported"),
])
def test_config_json_of_the_wrong_shape_is_one_line(text, message, llama_copy, tmp_path, capsys):
    (llama_copy / "config.json").write_text(text)
    for argv in (["inspect", llama_copy], ["prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "where its header describes"),        # cut short: a full disk, an interrupted copy
    (lambda b: b + b"\0" * 16, "where its header describes"),           # trailing bytes
    (lambda b: b[:6], "too short for its"),                             # not even a whole header length
    (lambda b: b[:8] + b"{not json" + b[17:], "its header is not JSON"),
])
def test_damaged_weights_file_is_one_line_for_every_command(damage, message, llama_copy, chat_data, tmp_path, capsys):
    weights = llama_copy / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _, val = chat_data
    for argv in (["inspect", llama_copy], ["prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out"],
                 ["prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out", "--in-memory"],
                 ["kv-cut", llama_copy, "--kv-heads", "1", "-o", tmp_path / "out"],
                 ["eval", llama_copy, "--data", val]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and str(weights) in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "out").exists()
