"""The family table on every family: checkpoint tensors split into components that add up to what transformers
counts, per-layer parameters, the repeated blocks, backbone and head, and an unknown family as one line."""
from __future__ import annotations

import pytest

from prunekit import PrunekitError
from prunekit.core.families import MODEL_FAMILIES, backbone_and_head, family_for, family_of
from tests.conftest import FAMILIES, TEXT, VLM_FAMILIES, build_tiny


@pytest.mark.parametrize("family", FAMILIES)
def test_components_count_what_transformers_counts(family):
    model = build_tiny(family)
    cfg = model.config.to_dict()
    model_family = family_of(model)
    assert model_family is family_for(cfg) is MODEL_FAMILIES[family] and model_family.name == family
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    params = model_family.component_params(shapes, cfg)
    assert params["total"] == model.num_parameters()
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    assert params["embeddings"] == params["lm_head"] == TEXT["vocab_size"] * TEXT["hidden_size"]   # untied
    assert ("vision_blocks" in params) == (family in VLM_FAMILIES)
    per_layer = model_family.text_layer_params(shapes, cfg)
    assert len(per_layer) == TEXT["num_hidden_layers"] and len(set(per_layer)) == 1
    assert sum(per_layer) == params["text_layers"]
    if family in VLM_FAMILIES:
        assert params["vision_blocks"] == sum(p.numel() for p in model_family.layers(model, "vision").parameters())
        assert params["vision_other"] > 0


def test_a_tied_head_counts_once():
    model = build_tiny("llama")
    cfg = {**model.config.to_dict(), "tie_word_embeddings": True}
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    params = MODEL_FAMILIES["llama"].component_params(shapes, cfg)
    assert params["lm_head"] == 0 and params["embeddings"] == TEXT["vocab_size"] * TEXT["hidden_size"]


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_blocks_backbone_and_head(family):
    model = build_tiny(family)
    model_family = family_of(model)
    blocks = model_family.blocks(model)
    text = list(model_family.layers(model, "text"))
    assert blocks[:len(text)] == text and len(text) == TEXT["num_hidden_layers"]
    vision = list(model_family.layers(model, "vision")) if model_family.is_vlm else []
    assert blocks[len(text):] == vision and (len(vision) == 4) == (family in VLM_FAMILIES)
    backbone, head = backbone_and_head(model)
    assert backbone is model.model and head is model.lm_head
    if not model_family.is_vlm:
        with pytest.raises(ValueError, match="a llama model has no vision layers"):
            model_family.layers(model, "vision")
    assert model_family.missing_weights(["lm_head.weight", "model.norm.weight"]) == ["model.norm.weight"]


def test_an_unknown_family_is_one_line():
    with pytest.raises(PrunekitError, match=r"^model_type 'gpt2' is not supported; supported families: llama, "):
        family_for({"model_type": "gpt2"})
