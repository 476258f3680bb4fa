"""Surgery is exact where it must be: pruning equals skipping, and KV-cut of identical heads changes nothing."""
from __future__ import annotations

import json

import pytest
import torch

from prunekit.core.families import MODEL_FAMILIES, get_module
from prunekit.core.loading import load_model
from prunekit.core.surgery import KVCut, apply_to_model, kv_similarity_orders
from prunekit.stages.prune import prune
from tests.conftest import FAMILIES, TEXT_FAMILIES, VLM_FAMILIES, assert_same_outputs, inputs_for, text_inputs


def skip_modules(modules, indexes):
    """Make the listed layers/blocks return their input hidden states: the reference for 'removed'."""
    def identity(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return [modules[i].register_forward_hook(identity, with_kwargs=True) for i in indexes]


# Layers to drop per family: a middle one and the last (Qwen3-VL keeps layer 0, which receives deepstack features).
DROP_TEXT = {f: "1,3" for f in FAMILIES}
DROP_VISION = {"qwen2_vl": "0,2", "qwen2_5_vl": "1,2", "qwen3_vl": "2,3"}  # 2.5-VL: drops full-attention block 1


@pytest.mark.parametrize("family,part", [(f, "text") for f in FAMILIES] + [(f, "vision") for f in VLM_FAMILIES])
def test_pruning_equals_skipping(family, part, tiny_model_dir, tmp_path):
    src = tiny_model_dir(family)
    model_family = MODEL_FAMILIES[family]
    drop = DROP_TEXT[family] if part == "text" else DROP_VISION[family]
    result = prune(str(src), tmp_path / "out", **{f"drop_{part}": drop}, streaming=False)

    original, _ = load_model(src)
    pruned, _ = load_model(result.output)
    path = model_family.text_layers if part == "text" else model_family.vision_blocks
    dropped = [int(i) for i in drop.split(",")]
    assert len(get_module(pruned, path)) == len(get_module(original, path)) - len(dropped)
    for i, layer in enumerate(get_module(pruned, model_family.text_layers)):  # renumbered for the KV cache
        assert getattr(layer, model_family.attn_module).layer_idx == i
    skip_modules(get_module(original, path), dropped)

    assert_same_outputs(original, pruned, inputs_for(family))


def test_qwen2_config_fields_follow_the_kept_layers(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    before = json.loads((src / "config.json").read_text())
    assert before["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    out = prune(str(src), tmp_path / "out", drop_text="0,3", streaming=False).output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
    assert cfg["max_window_layers"] == 1


def test_qwen2_5_vl_fullatt_indexes_renumbered(tiny_model_dir, tmp_path):
    out = prune(str(tiny_model_dir("qwen2_5_vl")), tmp_path / "out", drop_vision="0,1", streaming=False).output
    vision = json.loads((out / "config.json").read_text())["vision_config"]
    assert vision["depth"] == 2 and vision["fullatt_block_indexes"] == [1]  # old block 3 is now block 1


def make_groups_identical(model, model_family, groups):
    """Copy K/V projection rows (and biases) so every head in a group equals the group's first head."""
    _, _, hd = model_family.attention_shape(model.config.to_dict())
    with torch.no_grad():
        for layer in get_module(model, model_family.text_layers):
            attn = getattr(layer, model_family.attn_module)
            for proj in (getattr(attn, model_family.k_proj), getattr(attn, model_family.v_proj)):
                for group in groups:
                    for p in [proj.weight] + ([proj.bias] if proj.bias is not None else []):
                        for h in group[1:]:
                            p[h * hd:(h + 1) * hd] = p[group[0] * hd:(group[0] + 1) * hd]


def kv_family_model(family):
    """A tiny model with 8 query heads over 4 KV heads, so there is room to group."""
    from tests.conftest import tiny_config
    from prunekit.core.loading import model_from_config
    config = tiny_config(family)
    text = getattr(config, "text_config", config)
    text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim = 128, 8, 4, 16
    text.initializer_range = 0.05  # logits of order 1, so 1e-5 measures exactness rather than fp32 rounding
    if hasattr(config, "vision_config"):
        config.vision_config.out_hidden_size = 128
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    return model_from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", TEXT_FAMILIES + ["qwen2_5_vl"])
def test_kv_cut_of_identical_heads_is_exact(family):
    model = kv_family_model(family)
    model_family = MODEL_FAMILIES[family]
    inputs = inputs_for(family)
    # adjacent groups: the mean rule is exact
    make_groups_identical(model, model_family, [(0, 1), (2, 3)])
    with torch.no_grad():
        ref = model(**inputs).logits
        cut = apply_to_model(model, KVCut(model_family, model.config.to_dict(), 2))
        assert cut.config.to_dict().get("text_config", cut.config.to_dict())["num_key_value_heads"] == 2
        assert (cut(**inputs).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_similarity_grouping_finds_non_adjacent_identical_heads(family):
    model = kv_family_model(family)
    model_family = MODEL_FAMILIES[family]
    make_groups_identical(model, model_family, [(0, 2), (1, 3)])  # identical pairs are NOT adjacent
    inputs = text_inputs()
    cfg = model.config.to_dict()
    with torch.no_grad():
        ref = model(**inputs).logits
        mean_cut = apply_to_model(model, KVCut(model_family, cfg, 2))
        assert (mean_cut(**inputs).logits - ref).abs().max().item() > 1e-3  # adjacent averaging is lossy here
        orders = kv_similarity_orders(model, model_family, [text_inputs(seed=1)], kv_heads=2)
        assert all(o[:2] in ([0, 2], [2, 0]) for o in orders.values())
        sim_cut = apply_to_model(model, KVCut(model_family, cfg, 2, head_order=orders))
        assert (sim_cut(**inputs).logits - ref).abs().max().item() <= 1e-5


# ---- calibrated KV cut ---------------------------------------------------------------------------------------------

def calibration_batches_for(family, seeds=(1, 2, 3)):
    """Right-padded random-token batches (the tiny models' calibration distribution)."""
    batches = []
    for seed in seeds:
        b = text_inputs(batch=4, length=48, seed=seed)
        b["attention_mask"][0, 30:] = 0   # one padded row per batch
        batches.append(b)
    return batches


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("family", TEXT_FAMILIES + ["qwen2_5_vl"])
def test_calibrated_kv_cut_of_identical_heads_is_exact(family, sequential):
    from prunekit.core.kv_calibration import CalibrationSettings, calibrate_kv_cut
    model = kv_family_model(family)
    model_family = MODEL_FAMILIES[family]
    make_groups_identical(model, model_family, [(0, 1), (2, 3)])
    inputs = inputs_for(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    cut = apply_to_model(model, KVCut(model_family, model.config.to_dict(), 2))
    record = calibrate_kv_cut(model, cut, model_family, calibration_batches_for(family),
                              CalibrationSettings(steps=5, sequential=sequential))
    assert record["sequential"] is sequential
    assert all(layer["relative_error_after"] <= 1e-10 for layer in record["layers"])
    with torch.no_grad():
        assert (model(**inputs).logits - ref).abs().max().item() == 0   # the original is untouched
        assert (cut(**inputs).logits - ref).abs().max().item() <= 1e-5


def make_groups_equivalent(model, model_family, groups, keys: bool, seed: int = 0):
    """Every head in a group computes its group's first head in another basis: keys scaled and turned by a random
    complex number per rotary pair (commutes with RoPE; with `keys`, else keys identical), values through a random
    orthogonal matrix. Averaging such heads is far off; aligning them first is exact."""
    _, _, hd = model_family.attention_shape(model.config.to_dict())
    half, gen = hd // 2, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in get_module(model, model_family.text_layers):
            attn = getattr(layer, model_family.attn_module)
            k, v = getattr(attn, model_family.k_proj), getattr(attn, model_family.v_proj)
            for group in groups:
                first = slice(group[0] * hd, (group[0] + 1) * hd)
                for h in group[1:]:
                    rows = slice(h * hd, (h + 1) * hd)
                    turn = torch.linalg.qr(torch.randn(hd, hd, generator=gen))[0]
                    scale = (0.5 + 1.5 * torch.rand(half, generator=gen)) * torch.exp(
                        2j * torch.pi * torch.rand(half, generator=gen))
                    for p in [v.weight] + ([v.bias] if v.bias is not None else []):
                        p[rows] = turn.T @ p[first] if p.dim() == 2 else p[first] @ turn
                    for p in [k.weight] + ([k.bias] if k.bias is not None else []):
                        z = torch.complex(p[first][:half], p[first][half:])
                        if keys:
                            z = z * (scale if z.dim() == 1 else scale[:, None])
                        p[rows] = torch.cat([z.real, z.imag])


@pytest.mark.parametrize("family,keys", [("llama", True), ("qwen2", True), ("qwen3", False)])
def test_aligned_kv_cut_of_heads_in_different_bases_is_exact(family, keys):
    """Heads equal up to a RoPE-commuting key scale and a value basis (Qwen3: values only, its k_norm does not
    commute with key scales) merge exactly with the alignment alone (no Adam, no o_proj refit); the mean does not."""
    from prunekit.core.kv_calibration import CalibrationSettings, calibrate_kv_cut
    model = kv_family_model(family)
    model_family = MODEL_FAMILIES[family]
    make_groups_equivalent(model, model_family, [(0, 1), (2, 3)], keys=keys)
    inputs = inputs_for(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    cuts = {align: apply_to_model(model, KVCut(model_family, model.config.to_dict(), 2)) for align in (True, False)}
    records = {align: calibrate_kv_cut(model, cut, model_family, calibration_batches_for(family),
                                       CalibrationSettings(steps=0, refit_o_proj=False, align=align))
               for align, cut in cuts.items()}
    assert records[True]["align"] and all(layer["aligned"] for layer in records[True]["layers"])
    assert all(layer["relative_error_before"] > 0.05 for layer in records[True]["layers"])
    assert all(layer["relative_error_after"] <= 1e-9 for layer in records[True]["layers"])
    assert all(layer["relative_error_after"] > 1e-3 for layer in records[False]["layers"])
    with torch.no_grad():
        assert (cuts[True](**inputs).logits - ref).abs().max().item() <= 1e-4


def heldout_kl(original, cut, inputs) -> float:
    with torch.no_grad():
        p, q = (m(**inputs).logits.float().log_softmax(-1) for m in (original, cut))
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family,grouping", [("llama", "mean"), ("qwen2", "similarity"), ("qwen3", "mean")])
def test_calibrated_kv_cut_beats_mean_pooling_on_random_heads(family, grouping):
    from prunekit.core.kv_calibration import CalibrationSettings, attention_output_errors, calibrate_kv_cut
    model = kv_family_model(family)
    model_family = MODEL_FAMILIES[family]
    cfg = model.config.to_dict()
    calib, heldout = calibration_batches_for(family, seeds=range(1, 9)), [text_inputs(batch=4, length=48, seed=20)]
    orders = kv_similarity_orders(model, model_family, calib, kv_heads=2) if grouping == "similarity" else None
    surgery = KVCut(model_family, cfg, 2, head_order=orders)
    pooled, calibrated = apply_to_model(model, surgery), apply_to_model(model, surgery)
    query_orders = {i: surgery.query_head_order(i) for i in range(4)}
    record = calibrate_kv_cut(model, calibrated, model_family, calib, CalibrationSettings(steps=30),
                              query_orders=query_orders)
    assert all(layer["mse_after"] < layer["mse_before"] for layer in record["layers"])
    pooled_errors = attention_output_errors(model, pooled, model_family, heldout)
    calibrated_errors = attention_output_errors(model, calibrated, model_family, heldout)
    assert sum(calibrated_errors) < sum(pooled_errors)
    assert heldout_kl(model, calibrated, heldout[0]) < heldout_kl(model, pooled, heldout[0])


def test_sequential_calibration_fits_each_layer_on_the_cut_models_own_inputs():
    """Layer 0 sees the same inputs either way; every later layer is fitted on what the cut model (its earlier
    layers calibrated already) feeds it, towards what the original layer gives on the original's inputs, and the
    result still beats mean pooling."""
    from prunekit.core.kv_calibration import (CalibrationSettings, _forward, _fp32_eager_copy, _squared_error,
                                              attention_output_errors, calibrate_kv_cut, capture_attention_inputs)
    model, model_family = kv_family_model("llama"), MODEL_FAMILIES["llama"]
    calib, heldout = calibration_batches_for("llama", seeds=range(1, 9)), [text_inputs(batch=4, length=48, seed=20)]
    surgery = KVCut(model_family, model.config.to_dict(), 2)
    pooled, forced, sequential = (apply_to_model(model, surgery) for _ in range(3))
    runs = {name: calibrate_kv_cut(model, cut, model_family, calib, CalibrationSettings(steps=10, sequential=seq))
            for name, cut, seq in (("forced", forced, False), ("sequential", sequential, True))}
    first, later = ([runs[n]["layers"][i]["mse_before"] for n in runs] for i in (0, 1))
    assert first[0] == pytest.approx(first[1], rel=1e-6) and later[0] != pytest.approx(later[1], rel=1e-3)
    # what layer 1 was fitted on: the calibrated cut model's own inputs there (one capture stops at that layer)
    own = capture_attention_inputs(sequential, model_family, calib, only=1)
    assert not own[0] and len(own[1]) == len(calib)
    every = capture_attention_inputs(sequential, model_family, calib)
    assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(own[1], every[1]))
    teacher = capture_attention_inputs(model, model_family, calib)[1]
    assert not torch.allclose(own[1][0].hidden, teacher[0].hidden)
    # layer 1's starting error: the merged (uncalibrated) layer on the cut model's inputs against the original
    # layer on the original's inputs
    merged, original = (_fp32_eager_copy(getattr(model_family.blocks(m)[1], model_family.attn_module))
                        for m in (pooled, model))
    before = _squared_error([_forward(merged, b)[0] for b in own[1]], [_forward(original, b)[0] for b in teacher],
                            teacher)
    tokens = sum(int(b.tokens.sum()) for b in teacher) * model.config.hidden_size
    assert runs["sequential"]["layers"][1]["mse_before"] == pytest.approx(before / tokens, rel=1e-5)
    assert sum(attention_output_errors(model, sequential, model_family, heldout)) < \
        sum(attention_output_errors(model, pooled, model_family, heldout))
    assert heldout_kl(model, sequential, heldout[0]) < heldout_kl(model, pooled, heldout[0])
