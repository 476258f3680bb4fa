"""Gradual KV-head merging during training (prunekit.core.kv_merge): the pull schedule, the exact cut after it,
resume, and the one-line errors."""
from __future__ import annotations

import pytest
import torch

from prunekit import PrunekitError
from prunekit.core.families import family_for
from prunekit.core.kv_merge import KVHeadMerge
from prunekit.core.surgery import KVCut, apply_to_model
from prunekit.stages import training
from tests.conftest import TEXT_FAMILIES, assert_same_outputs, build_tiny, distill_killed_at, inputs_for
from tests.stages.test_training import cfg_for, metrics_lines


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_untrained_deviation_shrinks_linearly_then_the_mean_cut_is_exact(family):
    """Without training in between, the heads' deviation from their group mean after step t is (1 - t/T) of the
    first one, zero from step T on; the mean cut of the merged model then gives the same outputs (qwen2's K/V biases
    included)."""
    model = build_tiny(family)
    merge = KVHeadMerge(model, kv_heads=1, total_steps=8, ramp=0.5)
    assert merge.ramp_steps == 4 and len(merge.tensors) == 2 * 4 * (2 if family == "qwen2" else 1)
    first = merge.deviation()
    assert first > 0.5  # random heads
    for step in range(1, 7):
        merge.after_step(step)
        assert merge.deviation() == pytest.approx(first * max(0.0, 1 - step / 4), abs=1e-6)
    cut = apply_to_model(model, KVCut(family_for(model.config.to_dict()), model.config.to_dict(), 1))
    assert cut.config.num_key_value_heads == 1
    assert_same_outputs(model, cut, inputs_for(family))


def test_merging_only_moves_the_k_and_v_projections():
    model = build_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    KVHeadMerge(model, 1, total_steps=1, ramp=1.0).after_step(1)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(4) for p in "kv"}


def distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, name, **over):
    return cfg_for("distill", tiny_chat_model_dir, chat_data, tmp_path, name, teacher=str(tiny_chat_model_dir),
                   **{"max_steps": 4, "batch_size": 2, "eval_interval": 4, "save_interval": 2, "launcher": "local",
                      "merge_kv_heads": 1, "merge_kv_ramp": 0.5, **over})


@pytest.mark.slow  # two distillations, one in a subprocess
def test_distill_with_merging_then_kv_cut_is_exact_and_resumes_to_the_same_weights(tiny_chat_model_dir, chat_data,
                                                                                    tmp_path):
    """A distillation that merges 2 KV heads into 1 keeps the model's parameter count, ends with identical heads,
    and the kv_cut stage after it changes no output; a run killed at step 3 (mid-way, after the ramp) resumes to
    the same weights as one that was not."""
    from safetensors.torch import load_file
    from prunekit.core.loading import load_model
    from prunekit.stages.kv_cut import kv_cut
    whole = training.distill(distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, "whole"))
    trained, _ = load_model(whole.output, dtype="float32")
    k = trained.model.layers[0].self_attn.k_proj.weight.reshape(2, 16, -1)
    assert torch.equal(k[0], k[1])
    original = load_model(tiny_chat_model_dir, dtype="float32")[0].model.layers[0].self_attn.k_proj.weight
    assert not torch.equal(original.reshape(2, 16, -1)[0], original.reshape(2, 16, -1)[1])
    cut = kv_cut(str(whole.output), tmp_path / "cut", 1)
    cut_model, _ = load_model(cut.output, dtype="float32")
    assert cut_model.config.num_key_value_heads == 1
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    assert_same_outputs(trained, cut_model, {"input_ids": ids})

    crashed = distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, "crashed")
    distill_killed_at(crashed, 3, tmp_path)
    resumed = training.distill(crashed)
    assert [m["step"] for m in metrics_lines(resumed.run_dir)][-2:] == [3, 4]  # steps 3-4 trained after resuming
    a, b = load_file(whole.output / "model.safetensors"), load_file(resumed.output / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_merge_errors_are_one_line_before_training(tiny_chat_model_dir, chat_data, tmp_path):
    with pytest.raises(PrunekitError, match="merge_kv_heads: 4 must be between 1 and the current 2 KV heads"):
        training.distill(distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, "four", merge_kv_heads=4))
    assert not (tmp_path / "runs" / "four").exists()
    with pytest.raises(PrunekitError, match="merge_kv_ramp must be in"):
        distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, "ramp", merge_kv_ramp=0)
    with pytest.raises(PrunekitError, match="merge_kv_heads needs parallel.strategy ddp or fsdp"):
        distill_cfg(tiny_chat_model_dir, chat_data, tmp_path, "ds", launcher="ray", **{"parallel.strategy": "deepspeed"})
    with pytest.raises(PrunekitError, match="merge_kv_heads"):  # LoRA keeps the base (and its K/V) frozen
        cfg_for("lora", tiny_chat_model_dir, chat_data, tmp_path, "lora", merge_kv_heads=1)
