"""Streaming surgery (shard by shard, no model built) must write exactly what in-memory surgery writes.

Tiny random fp32 models (a Qwen2 text model and a Qwen2.5-VL) are saved as many small shards plus an index; every
surgery is run twice, streaming=True and streaming=False, and the outputs are compared tensor by tensor (names and
bits), on the config fields surgery edits, and on the logits of the reloaded models.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

from prunekit.core.streaming import INDEX
from prunekit.stages.kv_cut import kv_cut
from prunekit.stages.prune import prune

VOCAB = 128
SHARD = "40KB"  # the tiny models are ~0.5-1 MB: many shards, several tensors per shard, some tensors alone


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.set_verbosity(level)
    hf_logging.enable_progress_bar()


def _save(model, path: Path) -> Path:
    model.save_pretrained(path, max_shard_size=SHARD)
    assert (path / INDEX).is_file() and len(list(path.glob("*.safetensors"))) > 3, "expected a sharded checkpoint"
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def text_model(request, tmp_path_factory) -> Path:
    """Qwen2 text model, with and without tied embeddings (a tied checkpoint stores no lm_head.weight)."""
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=request.param)
    path = _save(Qwen2ForCausalLM(cfg).float().eval(), tmp_path_factory.mktemp("qwen2"))
    assert ("lm_head.weight" in _tensors(path)) != request.param
    return path


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    head_dim = 64 // 4
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),  # sums to head_dim / 2
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1, 3], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56),
        image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103,
    )
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    return _save(Qwen2_5_VLForConditionalGeneration(cfg).float().eval(), tmp_path_factory.mktemp("qwen2_5_vl"))


# ---- helpers ---------------------------------------------------------------------------------------------------
def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, over every shard; a name in two shards is an error."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        part = load_file(shard)
        dup = out.keys() & part.keys()
        assert not dup, f"{shard.name}: tensors also in another shard: {sorted(dup)[:3]}"
        out.update(part)
    return out


def _index_matches_shards(model_dir: Path) -> None:
    index = json.loads((model_dir / INDEX).read_text())
    actual = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        actual.update({k: shard.name for k in load_file(shard)})
    assert index["weight_map"] == actual
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(model_dir).values())


def _assert_same_tensors(streamed: Path, in_memory: Path) -> dict[str, torch.Tensor]:
    a, b = _tensors(streamed), _tensors(in_memory)
    assert sorted(a) == sorted(b), (f"only streaming: {sorted(a.keys() - b.keys())[:5]}; "
                                    f"only in-memory: {sorted(b.keys() - a.keys())[:5]}")
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        # bit-identical, not just close: both paths run the same tensor map on the same stored values
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), f"{key} differs"
    return a


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _relevant(cfg: dict) -> dict:
    tc = cfg.get("text_config", cfg)
    vc = cfg.get("vision_config") or {}
    return {"model_type": cfg["model_type"],
            "num_hidden_layers": tc["num_hidden_layers"], "layer_types": tc.get("layer_types"),
            "max_window_layers": tc.get("max_window_layers"),
            "num_attention_heads": tc["num_attention_heads"], "num_key_value_heads": tc["num_key_value_heads"],
            "head_dim": tc.get("head_dim") or tc["hidden_size"] // tc["num_attention_heads"],
            "depth": vc.get("depth"), "fullatt_block_indexes": vc.get("fullatt_block_indexes")}


def _inputs(vlm: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    if not vlm:
        return {"input_ids": torch.randint(3, 100, (2, 12), generator=g)}
    # one 56x56 image: grid 1x4x4 patches -> 4 merged tokens; pixel rows are C * T * P * P = 3 * 2 * 14 * 14
    ids = [1, 5, 6, 102] + [100] * 4 + [103, 7, 8, 9]
    return {"input_ids": torch.tensor([ids]),
            "pixel_values": torch.randn(16, 3 * 2 * 14 * 14, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]])}


@torch.no_grad()
def _logits(model_dir: Path, vlm: bool) -> torch.Tensor:
    cls = Qwen2_5_VLForConditionalGeneration if vlm else Qwen2ForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model(**_inputs(vlm)).logits


def _run_both(tmp_path: Path, fn, src: Path, **kw):
    streamed = fn(str(src), tmp_path / "streamed", streaming=True, **kw)
    in_memory = fn(str(src), tmp_path / "in_memory", streaming=False, **kw)
    assert streamed.streaming is True and in_memory.streaming is False
    return streamed.output, in_memory.output


def _check(streamed: Path, in_memory: Path, vlm: bool) -> None:
    _assert_same_tensors(streamed, in_memory)
    _index_matches_shards(streamed)
    assert _relevant(_config(streamed)) == _relevant(_config(in_memory))
    s_logits, m_logits = _logits(streamed, vlm), _logits(in_memory, vlm)
    assert torch.equal(s_logits, m_logits)


# ---- the cases -------------------------------------------------------------------------------------------------
def test_text_layer_prune_streaming_matches_in_memory(text_model, tmp_path):
    streamed, in_memory = _run_both(tmp_path, prune, text_model, drop_text="1,2")
    _check(streamed, in_memory, vlm=False)
    cfg = _relevant(_config(streamed))
    assert cfg["num_hidden_layers"] == 2 and len(cfg["layer_types"]) == 2
    names = _tensors(streamed).keys()
    assert {k.split(".")[2] for k in names if k.startswith("model.layers.")} == {"0", "1"}
    # the renumbered layer 1 is the old layer 3, bit for bit
    src = _tensors(text_model)
    assert torch.equal(_tensors(streamed)["model.layers.1.mlp.up_proj.weight"], src["model.layers.3.mlp.up_proj.weight"])


def test_vlm_text_and_vision_prune_streaming_matches_in_memory(vl_model, tmp_path):
    streamed, in_memory = _run_both(tmp_path, prune, vl_model, drop_text="2", drop_vision="0,1")
    _check(streamed, in_memory, vlm=True)
    cfg = _relevant(_config(streamed))
    assert cfg["num_hidden_layers"] == 3 and len(cfg["layer_types"]) == 3
    # blocks 2,3 survive as 0,1; the full-attention block 3 becomes 1 (block 1 went)
    assert cfg["depth"] == 2 and cfg["fullatt_block_indexes"] == [1]


def test_vision_block_prune_streaming_matches_in_memory(vl_model, tmp_path):
    streamed, in_memory = _run_both(tmp_path, prune, vl_model, drop_vision="2")
    _check(streamed, in_memory, vlm=True)
    # the logits comparison goes through the vision tower: dropping a block changes them
    assert not torch.allclose(_logits(streamed, vlm=True), _logits(vl_model, vlm=True))
    cfg = _relevant(_config(streamed))
    assert cfg["num_hidden_layers"] == 4
    assert cfg["depth"] == 3 and cfg["fullatt_block_indexes"] == [1, 2]


def test_kv_cut_mean_streaming_matches_in_memory(text_model, tmp_path):
    streamed, in_memory = _run_both(tmp_path, kv_cut, text_model, kv_heads=1)
    _check(streamed, in_memory, vlm=False)
    cfg = _relevant(_config(streamed))
    assert cfg["num_key_value_heads"] == 1 and cfg["head_dim"] == 16
    assert _tensors(streamed)["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)


def test_vlm_kv_cut_mean_streaming_matches_in_memory(vl_model, tmp_path):
    streamed, in_memory = _run_both(tmp_path, kv_cut, vl_model, kv_heads=1)
    _check(streamed, in_memory, vlm=True)
    assert _relevant(_config(streamed))["num_key_value_heads"] == 1


# ---- memory ----------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class _Identity:
    """The smallest surgery: keep every tensor as is (what prune does to most of a checkpoint)."""
    new_config = {"model_type": "qwen2"}

    def __call__(self, key, tensor):
        return key, tensor


def test_streaming_peak_memory_is_about_one_tensor(tmp_path):
    """Streaming holds one tensor at a time and writes it without another copy: the peak RSS grows by about the
    largest tensor, not the shard and not twice the tensor (bench/surgery_memory.py measures the real-size case)."""
    from safetensors.torch import save_file

    from prunekit.core.streaming import apply_streaming
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux, as on CI)
    big = 64 * 2**20
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    save_file({"big": torch.ones(big // 4), "small.a": torch.zeros(1000), "small.b": torch.zeros(10)},
              str(src / "model-00001-of-00002.safetensors"))
    save_file({"other": torch.ones(big // 8)}, str(src / "model-00002-of-00002.safetensors"))
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS") * 1024
    apply_streaming(src, dst, _Identity())
    grew = _status_kib("VmHWM") * 1024 - before
    assert grew < 1.5 * big, f"peak RSS grew by {grew / 2**20:.0f} MiB for a {big / 2**20:.0f} MiB tensor"
    assert torch.equal(_tensors(dst)["big"], torch.ones(big // 4))
