"""LoRA + merge: the merged checkpoint computes what the unmerged adapter computed, touches only the LoRA targets
(never the vision tower), and an adapter finds its base through a relative path that survives moving both."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import VLM_FAMILIES, text_inputs, tree_hash, vlm_inputs
from prunekit import PrunekitError
from prunekit.core.families import MODEL_FAMILIES
from prunekit.core.loading import load_model, read_provenance
from prunekit.core.lora import apply_lora, resolve_adapter_base, save_adapter
from prunekit.stages.merge_lora import merge_lora
from prunekit.stages.prune import prune


def checkpoint(model_dir):
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def lora_on(model_dir, seed=0, **kw):
    """A LoRA model on the base in model_dir, with random non-zero B matrices (peft starts B at 0 = no-op)."""
    model, _ = load_model(model_dir)
    peft_model = apply_lora(model, rank=4, alpha=8, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return peft_model.eval()


def lora_targets(peft_model):
    """Module names (as in the base checkpoint, without the peft prefix) that carry a LoRA."""
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def one_line_error(fn, *args, match=None, **kw):
    with pytest.raises(PrunekitError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("family", ["llama", "qwen2_5_vl"])
def test_merged_equals_unmerged_and_only_targets_change(family, tiny_model_dir, tmp_path):
    base = tiny_model_dir(family)
    model_family = MODEL_FAMILIES[family]
    base_hash = tree_hash(base)
    peft_model = lora_on(base)

    targets = lora_targets(peft_model)
    assert targets and all(t.startswith(model_family.text_layers + ".") for t in targets)
    assert not any(".visual." in f".{t}" for t in targets)
    per_layer = {t.split(".", len(model_family.text_layers.split(".")) + 1)[-1] for t in targets}
    assert per_layer == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)

    inputs = vlm_inputs() if family in VLM_FAMILIES else text_inputs()
    with torch.no_grad():
        ref = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            plain = peft_model(**inputs).logits

    adapter_dir = save_adapter(peft_model, tmp_path / "model_family", base)
    adapter_hash = tree_hash(adapter_dir)
    result = merge_lora(adapter_dir, tmp_path / "merged")
    assert tree_hash(base) == base_hash and tree_hash(adapter_dir) == adapter_hash

    merged, _ = load_model(result.output)
    with torch.no_grad():
        got = merged(**inputs).logits
    assert (ref - got).abs().max().item() <= 1e-4
    assert (plain - got).abs().max().item() > 1e-3  # the adapter really changed the model

    before, after = checkpoint(base), checkpoint(result.output)
    assert after.keys() == before.keys()
    assert not any("lora_" in k or "base_layer" in k for k in after)
    for key, tensor in before.items():  # checkpoint keys may be spelled unlike module names (model.layers.N...)
        m = model_family.match_text_layer(key)
        targeted = bool(m) and m["rest"].removeprefix(".").removesuffix(".weight") in per_layer
        assert torch.equal(after[key], tensor) != targeted, key  # targets changed, everything else bit for bit
    if model_family.is_vlm:
        vision = [k for k in before if model_family.match_vision_block(k) or ".visual." in f".{k}"]
        assert vision and all(torch.equal(after[k], before[k]) for k in vision)

    prov = result.provenance
    assert prov["stage"] == "merge_lora" and prov["history"][-1]["stage"] == "lora"
    assert result.params == sum(t.numel() for t in after.values())


def test_explicit_and_unknown_target_modules(tiny_model_dir):
    peft_model = lora_on(tiny_model_dir("qwen2_5_vl"), target_modules="q_proj,mlp.down_proj")
    per_layer = {t.split("layers.", 1)[1].split(".", 1)[1] for t in lora_targets(peft_model)}
    assert per_layer == {"self_attn.q_proj", "mlp.down_proj"}  # vision blocks also have down_proj: untouched
    model, _ = load_model(tiny_model_dir("llama"))
    one_line_error(apply_lora, model, target_modules=["qkv"], match="qkv")


def test_adapter_finds_base_relative_after_moving(tiny_model_dir, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(tiny_model_dir("llama"), one / "models" / "base")
    (one / "models" / "base" / "chat_template.jinja").write_text("{{ messages }}")
    adapter_dir = save_adapter(lora_on(one / "models" / "base"), one / "runs" / "exp" / "model_family",
                               one / "models" / "base")

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.join("..", "..", "..", "models", "base")
    for f in adapter_dir.iterdir():  # no absolute path leaks into the model_family (config, model card)
        if f.suffix in (".json", ".md") and f.name != "prunekit.json":
            assert str(tmp_path) not in f.read_text(), f.name
    assert read_provenance(adapter_dir)["stage"] == "lora"
    assert read_provenance(adapter_dir)["parent_relative"] == cfg["base_model_name_or_path"]

    two = tmp_path / "two"  # move adapter + base together, keeping their layout
    shutil.copytree(one, two)
    shutil.rmtree(one)
    adapter_dir, base = two / "runs" / "exp" / "model_family", two / "models" / "base"
    assert resolve_adapter_base(adapter_dir).resolve() == base.resolve()
    result = merge_lora(adapter_dir, tmp_path / "merged")
    assert result.base.resolve() == base.resolve()
    assert (result.output / "chat_template.jinja").read_text() == "{{ messages }}"  # side files come from the base

    alt = shutil.copytree(base, tmp_path / "alt")  # an explicit --base wins over the recorded one
    assert merge_lora(adapter_dir, tmp_path / "merged-alt", base=alt).base.resolve() == alt.resolve()

    lonely = shutil.copytree(adapter_dir, tmp_path / "lonely" / "model_family")  # moved without its base
    one_line_error(merge_lora, lonely, tmp_path / "m3", match="--base")
    assert merge_lora(lonely, tmp_path / "m3", base=base).output.is_dir()

    one_line_error(merge_lora, adapter_dir, tmp_path / "m4", base=tmp_path / "nope", match="--base")
    one_line_error(merge_lora, adapter_dir, tmp_path / "m4", base=adapter_dir, match="config.json")
    one_line_error(merge_lora, adapter_dir, tmp_path / "m4", base=tiny_model_dir("qwen2_5_vl"), match="does not fit")
    pruned = prune(str(base), tmp_path / "pruned", drop_text="2", streaming=False).output  # adapter has layer 3
    one_line_error(merge_lora, adapter_dir, tmp_path / "m4", base=pruned, match="no module in the base")
    one_line_error(merge_lora, adapter_dir, adapter_dir / "out", match="must not be")
    one_line_error(merge_lora, adapter_dir, base / "out", match="must not be")
    one_line_error(merge_lora, adapter_dir, tmp_path / "merged", match="not empty")
    one_line_error(merge_lora, tmp_path / "alt", tmp_path / "m5", match="not an adapter")
    assert not (tmp_path / "m4").exists() and not list(tmp_path.glob(".m4*"))  # failed merges leave nothing
