"""The CLI on bad input: one-line errors naming the argument or file, exit 2, input left byte-identical."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import run_cli, tree_hash


BAD_PRUNE = [
    (["--drop-text", "4"], "--drop-text: text layer 4 is out of range"),
    (["--drop-text", "1,1"], "--drop-text: index 1 is listed twice"),
    (["--drop-text", "0-3"], "--drop-text: cannot drop every text layer"),
    (["--drop-text", "x"], "--drop-text: cannot read 'x'"),
    (["--drop-vision", "0"], "--drop-vision: a llama model has no vision blocks"),
    ([], "nothing to remove"),
]


@pytest.mark.parametrize("flags,message", BAD_PRUNE)
def test_bad_prune_arguments(flags, message, llama_copy, tmp_path, capsys):
    before = tree_hash(llama_copy)
    code, _, err = run_cli(capsys, "prune", llama_copy, *flags, "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1
    assert tree_hash(llama_copy) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,field,value", [("--sequential-calibration", "calibration_sequential", True),
                                              ("--no-align", "calibration_align", False)])
def test_calibration_flags_without_calibrate_are_one_line(flag, field, value, llama_copy, tmp_path, capsys):
    before = tree_hash(llama_copy)
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", 1, flag, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and f"{flag}: " in err and "add --calibrate" in err
    assert tree_hash(llama_copy) == before and not (tmp_path / "out").exists()
    from prunekit.config import KVCutStageConfig
    with pytest.raises(ValueError, match=f"{field}: .* add calibrate: true"):
        KVCutStageConfig(kv_heads=1, **{field: value})
    assert field not in KVCutStageConfig(kv_heads=1, calibrate=True).model_dump()   # the default stays out of dumps


@pytest.mark.parametrize("kv,message", [(3, "does not divide the 4 attention heads"),
                                        (4, "must be between 1 and the current 2 KV heads"),
                                        (0, "must be between 1 and the current 2 KV heads"),
                                        (2, "equals the current 2 KV heads")])
def test_bad_kv_heads(kv, message, llama_copy, tmp_path, capsys):
    before = tree_hash(llama_copy)
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", kv, "-o", tmp_path / "out")
    assert code == 2 and f"--kv-heads: {kv} {message}" in err and err.count("\n") == 1
    assert tree_hash(llama_copy) == before


def test_similarity_needs_data(llama_copy, tmp_path, capsys):
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", 1, "--grouping", "similarity",
                           "-o", tmp_path / "out")
    assert code == 2 and "needs calibration data: --data" in err


def test_missing_and_non_model_directories(tmp_path, capsys):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "nope")
    assert code == 2 and "nope: no such directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "prune", tmp_path / "empty", "--drop-text", "1", "-o", tmp_path / "out")
    assert code == 2 and "not a model directory (no config.json)" in err


def test_output_equal_to_or_inside_input_is_refused(llama_copy, capsys):
    before = tree_hash(llama_copy)
    for out in (llama_copy, llama_copy / "sub"):
        code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", out)
        assert code == 2 and "must not be the input directory or inside it" in err
    assert tree_hash(llama_copy) == before


def test_existing_output_needs_overwrite(llama_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", out)
    assert code == 2 and "exists and is not empty (pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", out, "--overwrite")
    assert code == 0 and "% removed" in stdout
    assert not (out / "keep.txt").exists() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left behind


def test_pickle_weights_need_allow_pickle(tmp_path, capsys):
    import torch
    from tests.conftest import build_tiny
    d = tmp_path / "pickled"
    model = build_tiny("llama")
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    before = tree_hash(d)
    code, _, err = run_cli(capsys, "prune", d, "--drop-text", "1", "-o", tmp_path / "out")
    assert code == 2 and "only pickle (.bin) weights" in err and "--allow-pickle" in err
    code, _, _ = run_cli(capsys, "prune", d, "--drop-text", "1", "-o", tmp_path / "out", "--allow-pickle",
                         "--in-memory")
    assert code == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert tree_hash(d) == before


def test_corrupt_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 64)
    before = bad.read_bytes()
    code, _, err = run_cli(capsys, "inspect", bad)
    assert code == 2 and "broken.gguf: cannot read GGUF" in err and err.count("\n") == 1
    assert bad.read_bytes() == before


def test_remote_code_never_runs_without_the_flag(llama_copy, tmp_path):
    marker = tmp_path / "remote-code-ran"
    (llama_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n"
                                        "from transformers import LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli", "prune", str(llama_copy), "--drop-text", "1",
                           "-o", str(tmp_path / "out"), "--in-memory"], capture_output=True, text=True)
    assert not marker.exists(), proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_console_script_exit_code(tmp_path):
    exe = shutil.which("prunekit", path=str(__import__("pathlib").Path(sys.executable).parent))
    proc = subprocess.run([exe, "inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"prunekit inspect: error: MODEL {tmp_path / 'missing'}: no such "
                                                f"directory (give a Hugging Face directory, a .gguf file, or one "
                                                f"of: smollm2)"]


def test_inspect_table_and_json(tiny_model_dir, capsys):
    code, out, _ = run_cli(capsys, "inspect", tiny_model_dir("qwen2_5_vl"), "--json")
    info = json.loads(out)
    assert code == 0 and info["family"] == "qwen2_5_vl" and info["vision_blocks"] == 4 and info["text_layers"] == 4
    assert info["kv_cache_bytes_per_token_bf16"] == 2 * 4 * 2 * 16 * 2
    p = info["params"]
    assert p["total"] == p["text_layers"] + p["vision_blocks"] + p["embeddings"] + p["lm_head"] + p["vision_other"] + p["other"]
    assert p["vision_blocks"] > 0 and p["lm_head"] == 128 * 64
    code, out, _ = run_cli(capsys, "inspect", tiny_model_dir("qwen2_5_vl"))
    assert code == 0 and "vision blocks" in out and "KV cache / token (bf16)" in out


def test_prune_with_plan(tiny_model_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop_text": [2], "drop_vision": [0, 3]}))
    code, out, _ = run_cli(capsys, "prune", tiny_model_dir("qwen2_vl"), "--plan", plan, "-o", tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert code == 0 and cfg["text_config"]["num_hidden_layers"] == 3 and cfg["vision_config"]["depth"] == 2
    prov = json.loads((tmp_path / "out" / "prunekit.json").read_text())
    assert prov["removed"] == {"text_layers": [2], "vision_blocks": [0, 3]}
    assert prov["params"]["after"] < prov["params"]["before"]


@pytest.mark.parametrize("flags,message", [
    ([], "--calibrate needs calibration data: --data FILE"),
    (["--data", "DATA", "--streaming"], "--calibrate runs the model on --data, so it cannot stream"),
    (["--data", "DATA", "--samples", "0"], "--samples: 0 must be at least 1"),
])
def test_bad_calibrate_arguments(flags, message, llama_copy, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    before = tree_hash(llama_copy)
    flags = [str(data) if f == "DATA" else f for f in flags]
    code, _, err = run_cli(capsys, "kv-cut", llama_copy, "--kv-heads", 1, "--calibrate", *flags,
                           "-o", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1
    assert tree_hash(llama_copy) == before and not (tmp_path / "out").exists()
