"""`prunekit kv-cut` as a stage: config and provenance, a calibrated cut that loads and generates the same with and
without the KV cache, and calibration data read as text rows or conversations (the cut's exactness:
tests/core/test_surgery.py)."""
from __future__ import annotations

import torch

from prunekit.core.loading import load_model
from prunekit.stages.kv_cut import kv_cut
from tests.conftest import generate_logits, text_inputs


def test_kv_cut_stage_writes_config_and_provenance(tiny_model_dir, tmp_path):
    result = kv_cut(str(tiny_model_dir("qwen3")), tmp_path / "out", kv_heads=1, streaming=False)
    assert result.before["kv_cache_bytes_per_token_bf16"] == 2 * result.after["kv_cache_bytes_per_token_bf16"]
    assert result.provenance["kv_heads"] == {"before": 2, "after": 1}
    model, _ = load_model(result.output)
    assert model.config.num_key_value_heads == 1
    assert model(**text_inputs()).logits.isfinite().all()


def test_calibrated_kv_cut_stage_loads_and_generates_the_same_with_and_without_cache(tiny_chat_model_dir, chat_data,
                                                                                    tmp_path, capsys):
    import transformers
    from prunekit.core.kv_calibration import CalibrationSettings
    train, _ = chat_data
    result = kv_cut(str(tiny_chat_model_dir), tmp_path / "out", kv_heads=1, grouping="similarity", data=train,
                    max_samples=16, calibrate=True, calibration=CalibrationSettings(steps=3))
    calibration = result.provenance["calibration"]
    assert calibration["samples"] == 16 and calibration["tokens"] > 16 and calibration["steps"] == 3
    assert len(calibration["layers"]) == 2
    assert all(layer["mse_after"] <= layer["mse_before"] for layer in calibration["layers"])
    bar = capsys.readouterr().err   # the per-layer progress bar, with each layer's held-out error before -> after
    assert "calibrate KV cut: 100%" in bar and "2/2 [" in bar and "error=" in bar
    assert result.provenance["grouping"] == "similarity"
    model = transformers.AutoModelForCausalLM.from_pretrained(result.output).eval()
    assert model.config.num_key_value_heads == 1
    inputs = text_inputs()
    ref_seq, ref_logits = generate_logits(model, inputs, use_cache=False)
    seq, logits = generate_logits(model, inputs, use_cache=True)
    assert torch.equal(ref_seq, seq) and (ref_logits - logits).abs().max().item() <= 1e-4


def test_kv_cut_calibration_reads_text_rows_without_chat_template(tiny_chat_model_dir, tmp_path):
    from prunekit.core.data import save_messages
    from prunekit.core.loading import load_tokenizer
    from prunekit.stages.kv_cut import calibration_batches
    tok = load_tokenizer(tiny_chat_model_dir)
    save_messages(tmp_path / "c.jsonl", [{"text": "Plain news prose."},
                                         {"messages": [{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "hello"}]}])
    plain, chat = list(calibration_batches(tok, tmp_path / "c.jsonl"))
    assert plain["input_ids"][0].tolist() == tok("Plain news prose.")["input_ids"]
    assert "<|im_start|>" in tok.decode(chat["input_ids"][0])
