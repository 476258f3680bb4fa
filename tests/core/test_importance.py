"""Training-free importance: an identity layer ranks least important under every metric (text layers and vision
blocks), NLL-drop equals the NLL of the really pruned model, and SLEB's iterative selection removes identity layers
first with the NLL of the model really pruned by each prefix of its order."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.families import family_for
from prunekit.core.importance import block_influence, iterative_nll_drop, layer_scores, nll_drop
from prunekit.core.losses import causal_lm_loss
from prunekit.core.surgery import LayerDrop, apply_to_model
from tests.conftest import build_tiny, text_inputs, vlm_inputs

# the projections that write into the residual stream: zero them and the layer returns its input
RESIDUAL_WRITERS = ("o_proj", "down_proj", "attn.proj", "mlp.linear_fc2")


def make_identity(model, model_family, component: str, index: int) -> None:
    layer = model_family.layers(model, component)[index]
    for name, module in layer.named_modules():
        if name.endswith(RESIDUAL_WRITERS):
            torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def self_labelled_batches(model, is_vlm: bool, n: int = 2) -> list[dict]:
    """Batches whose labels are the model's own greedy predictions: the full model fits them best, so a layer that
    matters raises their NLL when skipped (a random model on random labels could go either way)."""
    batches = []
    for seed in range(n):
        batch = vlm_inputs(seed=seed) if is_vlm else text_inputs(seed=seed)
        with torch.no_grad():
            pred = model(**batch).logits.argmax(-1)
        batch["labels"] = torch.cat([batch["input_ids"][:, :1], pred[:, :-1]], 1)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("family,component,identity", [("llama", "text", 2), ("qwen2", "text", 1),
                                                       ("qwen2_5_vl", "vision", 1), ("qwen2_5_vl", "text", 3)])
def test_identity_layer_ranks_least_important_in_every_metric(family, component, identity):
    model = build_tiny(family)
    model_family = family_for(model.config.to_dict())
    make_identity(model, model_family, component, identity)
    scores = layer_scores(model, model_family, self_labelled_batches(model, model_family.is_vlm), component,
                          angular_n=(1, 2))
    n = len(model_family.layers(model, component))
    for metric in ("block_influence", "angular_distance_n1", "nll_drop"):
        values = scores[metric]
        assert len(values) == n
        assert min(range(n), key=lambda i: values[i]) == identity, (metric, values)
        assert abs(values[identity]) < 1e-4 and sorted(values)[1] > 1e-3, (metric, values)
    assert len(scores["angular_distance_n2"]) == n - 1
    if component == "text":  # the demo's entry point agrees
        assert block_influence(model, model_family, self_labelled_batches(model, False)) == pytest.approx(
            layer_scores(model, model_family, self_labelled_batches(model, False), "text", (),
                         nll=False)["block_influence"])


@pytest.mark.parametrize("family,component", [("qwen2", "text"), ("qwen2_5_vl", "vision")])
def test_nll_drop_equals_the_pruned_models_nll(family, component):
    """Replaying cached layer outputs and skipping one layer gives exactly the NLL of the model with it removed."""
    model = build_tiny(family)
    model_family = family_for(model.config.to_dict())
    batches = self_labelled_batches(model, model_family.is_vlm)

    drops = nll_drop(model, model_family, batches, component)["nll_drop"]
    base = nll(model, batches)
    for i in range(len(drops)):
        kw = {"drop_text": [i]} if component == "text" else {"drop_vision": [i]}
        pruned = apply_to_model(model, LayerDrop(model_family, model.config.to_dict(), **kw))
        pruned.config._attn_implementation = "eager"
        assert drops[i] == pytest.approx(nll(pruned, batches) - base, abs=1e-4)


def nll(model, batches) -> float:
    s = n = 0
    for b in batches:
        with torch.no_grad():
            loss, k, _ = causal_lm_loss(model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"])
        s, n = s + float(loss), n + int(k)
    return s / n


def test_iterative_nll_drop_removes_identity_layers_first_and_matches_the_pruned_models():
    model = build_tiny("llama")
    model_family = family_for(model.config.to_dict())
    n = len(model_family.layers(model, "text"))
    identities = [1, n - 2]
    for i in identities:
        make_identity(model, model_family, "text", i)
    batches = self_labelled_batches(model, False)
    result = iterative_nll_drop(model, model_family, batches, n - 1)
    assert sorted(result["order"][:2]) == identities, result
    assert sorted(result["order"]) == sorted(set(result["order"])) and len(result["order"]) == n - 1
    assert result["baseline_nll"] == pytest.approx(nll(model, batches), abs=1e-4)
    for k, after in enumerate(result["nll"], 1):   # each step's NLL is the really pruned model's
        pruned = apply_to_model(model, LayerDrop(model_family, model.config.to_dict(), drop_text=result["order"][:k]))
        pruned.config._attn_implementation = "eager"
        assert after == pytest.approx(nll(pruned, batches), abs=1e-4), k
    assert result["nll"][1] == pytest.approx(result["baseline_nll"], abs=1e-4)   # two identities cost nothing
    with pytest.raises(ValueError, match="count must be 1"):
        iterative_nll_drop(model, model_family, batches, n)
