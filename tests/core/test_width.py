"""Width importance and the parameter budget on their own: activation importance finds the channels (FFN, heads,
hidden, vision MLP) that matter, and the budget rule keeps the mix that removes the least importance (the width
stage end to end: tests/stages/test_width.py)."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.families import MODEL_FAMILIES, get_module
from prunekit.core.width import (WidthShape, activation_importance, budget_mixes, choose_mix, count_params,
                                 resolve_targets, select_kept)
from tests.conftest import VLM_FAMILIES, text_inputs, vision_mlp, vlm_inputs, width_model

D, H, HD, I, L = 64, 4, 16, 128, 4   # the tiny models' shape (conftest.TEXT)
VI, VB = 64, 4                       # the tiny vision towers: MLP size, blocks (conftest.tiny_config)


def _budget_case(scores_edit):
    model_family = MODEL_FAMILIES["llama"]
    model = width_model("llama")
    cfg = model.config.to_dict()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    total = count_params(model_family, cfg, shapes)
    assert total == model.num_parameters()
    scores = {"ffn": [[1.0] * I for _ in range(L)], "heads": [[1.0] * H for _ in range(L)], "hidden": [1.0] * D}
    scores_edit(scores)
    mixes = budget_mixes(model_family, cfg, shapes, int(0.8 * total))
    chosen, records = choose_mix(model_family, cfg, shapes, mixes, scores)
    return chosen["mix"], {r["mix"]: r["importance_removed"] for r in records}


def test_budget_rule_keeps_the_mix_that_removes_the_least_importance():
    """With every channel equally important, each mix removes about 20% of the parameters at relative importance 1;
    nearly silent hidden channels make hidden+ffn the cheapest, nearly silent heads heads+ffn."""
    even_choice, even = _budget_case(lambda s: None)
    assert all(v == pytest.approx(0.2, abs=0.01) for v in even.values())

    def quiet_hidden(s):
        s["hidden"] = [1.0] * 32 + [1e-3] * 32

    def quiet_heads(s):
        s["heads"] = [[1.0, 1e-3, 1.0, 1e-3] for _ in range(L)]
    mix, costs = _budget_case(quiet_hidden)
    assert mix == "hidden+ffn" and costs["hidden+ffn"] < 0.5 * costs["ffn"]
    mix, costs = _budget_case(quiet_heads)
    assert mix == "heads+ffn" and costs["heads+ffn"] < 0.7 * costs["ffn"]


def test_importance_ranks_high_activation_channels_first():
    model_family = MODEL_FAMILIES["llama"]
    model = width_model("llama")
    cfg = model.config.to_dict()
    big_ffn, big_hidden = [7, 50, 99], [3, 30, 45, 61]
    layers = get_module(model, model_family.text_layers)
    with torch.no_grad():
        for layer in layers:
            layer.mlp.up_proj.weight[big_ffn] *= 20
        model.model.embed_tokens.weight[:, big_hidden] *= 100
        for layer in layers:                    # group 0: head 1 attends sharply, head 0 uniformly (averages V)
            q = layer.self_attn.q_proj.weight
            q[0:HD] = 0
            q[HD:2 * HD] *= 30
            layer.self_attn.v_proj.weight[HD:2 * HD] *= 10   # group 1 (heads 2, 3): larger values
    batches = [text_inputs(batch=2, length=24, seed=s) for s in (1, 2)]
    batches[1]["attention_mask"][1, 16:] = 0    # padding is not counted
    scores = activation_importance(model, model_family, batches)
    assert scores["tokens"] == 2 * 24 + 24 + 16
    for layer_scores in scores["ffn"]:
        assert sorted(sorted(range(I), key=lambda c: -layer_scores[c])[:3]) == big_ffn
    assert sorted(sorted(range(D), key=lambda c: -scores["hidden"][c])[:4]) == big_hidden
    for h in scores["heads"]:
        assert h[1] > h[0] and min(h[2], h[3]) > max(h[0], h[1])
    old = WidthShape.of(model_family, cfg)
    kept = select_kept(scores, old, resolve_targets(model_family, cfg, ffn=3, heads=2, hidden=4))
    assert kept["ffn"] == [big_ffn] * L and kept["hidden"] == big_hidden
    assert kept["heads"] == [[1, h[3] > h[2] and 3 or 2] for h in scores["heads"]]   # one per KV group


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_ffn_importance_ranks_boosted_channels_first(family):
    """Boosted vision MLP channels score highest in every block (gated: up_proj rows x 20, so act(gate) * up is 20x
    larger; fc1/fc2: a large fc1 bias, so act(fc1) is large and positive), and --vision-ffn keeps them; the scores
    count the image patches, not the text tokens."""
    model_family = MODEL_FAMILIES[family]
    model = width_model(family)
    cfg = model.config.to_dict()
    big = [5, 20, 41]
    with torch.no_grad():
        for b in range(VB):
            ins, _ = vision_mlp(model, model_family, b)
            if len(ins) == 2:   # gate_proj, up_proj
                ins[1].weight[big] *= 20
                ins[1].bias[big] *= 20
            else:
                ins[0].bias[big] += 30
    batches = [vlm_inputs(batch=2, seed=1), vlm_inputs(seed=2)]
    scores = activation_importance(model, model_family, batches)
    assert scores["vision_tokens"] == 3 * 16           # 16 patches per image, 3 images
    assert scores["tokens"] == 3 * 15
    assert len(scores["vision_ffn"]) == VB
    for block in scores["vision_ffn"]:
        assert sorted(sorted(range(VI), key=lambda c: -block[c])[:3]) == big
    old = WidthShape.of(model_family, cfg)
    assert (old.vision_blocks, old.vision_ffn) == (VB, VI)
    size = 32 if family == "qwen2_vl" else 3
    new = resolve_targets(model_family, cfg, vision_ffn=size)
    kept = select_kept(scores, old, new)
    assert kept["ffn"] is None and kept["heads"] is None and kept["hidden"] is None
    assert all(set(big) <= set(k) and len(k) == size for k in kept["vision_ffn"])
    if size == 3:
        assert kept["vision_ffn"] == [big] * VB
    text_only = activation_importance(model, model_family, [text_inputs()])   # no image: no vision scores
    assert text_only["vision_ffn"] is None and text_only["vision_tokens"] == 0
