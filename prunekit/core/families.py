"""The one table of model-family knowledge.

Everything prunekit needs to know about a family lives in its `ModelFamily` entry: where decoder layers and vision
blocks sit (as module paths and as checkpoint-key patterns), the backbone and LM head the losses read, which config
fields change when layers, blocks or KV heads go, the attention shape and projection layout, whether the head is
tied to the embedding, and which component a checkpoint tensor belongs to. Surgery, streaming surgery, inspection,
parameter counting, training and the rollout backends read this table; besides the memory plan's per-family
parameter formulas (`core/memory_plan.py`), nothing else in prunekit checks a model's family. Adding a family =
adding one entry to `MODEL_FAMILIES`.

Config edits work on the plain `config.json` dict so the same code serves in-memory and streaming surgery.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from prunekit import PrunekitError


@dataclass(frozen=True)
class ModelFamily:
    name: str                         # the config's model_type
    auto_class: str                   # transformers class used to load the full model
    text_layers: str                  # module path of the decoder-layer ModuleList
    text_key: str                     # regex over checkpoint keys: group 'idx' is the decoder layer index
    backbone: str = "model"           # module path of the model returning the last hidden states (the head's input)
    lm_head: str = "lm_head"          # module path of the LM head
    vision_blocks: str | None = None  # module path of the vision-block ModuleList (VLMs)
    vision_key: str | None = None     # regex over checkpoint keys: group 'idx' is the vision block index
    vision_depth_field: str = "depth"
    # vision-config lists of block indexes that must be renumbered when blocks go (e.g. Qwen2.5-VL full attention)
    vision_index_fields: tuple[str, ...] = ()
    # vision-config index lists whose blocks cannot be dropped (their outputs feed other modules)
    vision_protected_fields: tuple[str, ...] = ()
    # text layers whose index is meaningful to another module (Qwen3-VL injects deepstack features into the first
    # len(deepstack_visual_indexes) layers), so dropping them would not equal skipping them
    protected_text_layers_from: str | None = None
    # text attention layout: separate q/k/v/o projections under `<layer>.self_attn`
    attn_module: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    fused_qkv: bool = False
    # the text config field the attention reads head_dim from; None = always hidden_size // heads (Qwen2-VL, 2.5-VL)
    head_dim_field: str | None = "head_dim"
    # width surgery (FFN channels, query heads, hidden channels): the gated MLP inside a decoder layer, the norms
    # over the hidden size (per layer, and the final one beside the layer list), per-head norms that width leaves
    # alone, and the top-level text tensors (embedding, final norm, LM head) as a regex: group 'name'
    mlp_module: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: tuple[str, ...] = ("q_norm", "k_norm")
    final_norm: str = "norm"
    norm_eps_field: str = "rms_norm_eps"   # the text config's epsilon of the norms over the hidden size
    # the family's transformers config refuses a hidden_size that is not a multiple of num_attention_heads
    # (LlamaConfig.validate_architecture), even with head_dim explicit
    hidden_multiple_of_heads: bool = False
    text_top_key: str = (r"^(?:model\.)?(?:language_model\.)?(?:model\.)?(?P<name>embed_tokens|norm)\.(?:weight|bias)$"
                         r"|^(?P<head>lm_head)\.(?:weight|bias)$")
    # VLMs: every checkpoint key of the vision tower, and the vision -> text projections whose output rows live in
    # the text hidden size (sliced with it), with the vision-config field that holds that size
    vision_module_key: str | None = None
    vision_out_key: str | None = None
    vision_out_field: str | None = None
    # VLMs, width of the vision blocks' MLP (`prunekit width --vision-ffn`): the projections into its hidden units
    # (output rows cut) and the one out of them (input columns cut), as module paths inside a vision block, and the
    # vision-config field holding its size; with `vision_ffn_ratio_of` the size is field x that field (Qwen2-VL:
    # int(embed_dim * mlp_ratio), and transformers types mlp_ratio as an int)
    vision_mlp_in: tuple[str, ...] = ()
    vision_mlp_out: str | None = None
    vision_ffn_field: str = "intermediate_size"
    vision_ffn_ratio_of: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_vlm(self) -> bool:
        return self.vision_blocks is not None

    # ---- config access (dict-based) -------------------------------------------------------------------------
    def text_configs(self, cfg: dict) -> list[dict]:
        """The dicts holding text-model fields: `text_config` for VLMs (and the root too when an older
        checkpoint keeps copies there), the root for text models."""
        if not self.is_vlm:
            return [cfg]
        out = [cfg["text_config"]] if isinstance(cfg.get("text_config"), dict) else []
        if "num_hidden_layers" in cfg or not out:
            out.append(cfg)
        return out

    def text_config(self, cfg: dict) -> dict:
        return self.text_configs(cfg)[0]

    def vision_config(self, cfg: dict) -> dict | None:
        return cfg.get("vision_config") if self.is_vlm else None

    def num_text_layers(self, cfg: dict) -> int:
        return int(self.text_config(cfg)["num_hidden_layers"])

    def num_vision_blocks(self, cfg: dict) -> int:
        vc = self.vision_config(cfg)
        return int(vc[self.vision_depth_field]) if vc else 0

    def attention_shape(self, cfg: dict) -> tuple[int, int, int]:
        """(attention heads, KV heads, head_dim) of the text model."""
        tc = self.text_config(cfg)
        heads = int(tc["num_attention_heads"])
        kv = int(tc.get("num_key_value_heads") or heads)
        head_dim = int((self.head_dim_field and tc.get(self.head_dim_field)) or tc["hidden_size"] // heads)
        return heads, kv, head_dim

    def qkv_bias(self, cfg: dict) -> bool:
        tc = self.text_config(cfg)
        return bool(self.extra.get("qkv_bias", tc.get("attention_bias", False)))

    def ties_embeddings(self, cfg: dict) -> bool:
        """Whether the LM head shares the input embedding's weight (transformers reads the flag at the root;
        VLM checkpoints may keep it only in text_config)."""
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
        return bool(self.text_config(cfg).get("tie_word_embeddings", False))

    def protected_text_layers(self, cfg: dict) -> set[int]:
        if not self.protected_text_layers_from:
            return set()
        return set(range(len(self.vision_config(cfg).get(self.protected_text_layers_from) or [])))

    # ---- config edits ---------------------------------------------------------------------------------------
    def drop_text_layers_config(self, cfg: dict, kept: list[int]) -> None:
        """Edit cfg in place so it describes a model keeping only the text layers `kept` (old indexes, sorted)."""
        for tc in self.text_configs(cfg):
            old_n = int(tc["num_hidden_layers"])
            tc["num_hidden_layers"] = len(kept)
            for key, value in list(tc.items()):  # per-layer lists (layer_types, ...) keep the surviving entries
                if isinstance(value, list) and len(value) == old_n and key not in ("architectures",):
                    tc[key] = [value[i] for i in kept]
            if isinstance(tc.get("max_window_layers"), int):  # layers below it keep their attention kind
                tc["max_window_layers"] = sum(1 for i in kept if i < tc["max_window_layers"])

    def drop_vision_blocks_config(self, cfg: dict, kept: list[int]) -> None:
        vc = self.vision_config(cfg)
        vc[self.vision_depth_field] = len(kept)
        new_index = {old: new for new, old in enumerate(kept)}
        for key in self.vision_index_fields + self.vision_protected_fields:
            if vc.get(key) is not None:
                vc[key] = [new_index[i] for i in vc[key] if i in new_index]

    def set_kv_heads_config(self, cfg: dict, kv_heads: int) -> None:
        _, _, head_dim = self.attention_shape(cfg)
        for tc in self.text_configs(cfg):
            tc["num_key_value_heads"] = kv_heads
            if self.head_dim_field:
                tc[self.head_dim_field] = head_dim  # pin it: a derived head_dim must not change with the heads

    def set_width_config(self, cfg: dict, intermediate: int, heads: int, hidden: int) -> None:
        """Edit cfg in place for a width-pruned text model: the same FFN size, query heads and hidden size in every
        layer, head_dim pinned where the family reads it from the config (it does not change with the heads).

        A norm over fewer hidden channels averages x² over fewer of them: with its weight scaled by sqrt(old/new)
        (the surgery does that) and its epsilon by old/new (here), it gives exactly the old output whenever the
        removed channels are zero. (Per-head norms that read the same epsilon, Qwen3's q_norm / k_norm, see it
        scaled too: a change of order eps relative to the per-head RMS², ~1e-6.)"""
        _, _, head_dim = self.attention_shape(cfg)
        old_hidden = int(self.text_config(cfg)["hidden_size"])
        for tc in self.text_configs(cfg):
            tc["intermediate_size"] = intermediate
            tc["num_attention_heads"] = heads
            tc["hidden_size"] = hidden
            if self.head_dim_field:
                tc[self.head_dim_field] = head_dim
            if hidden != old_hidden and isinstance(tc.get(self.norm_eps_field), (int, float)):
                tc[self.norm_eps_field] = tc[self.norm_eps_field] * old_hidden / hidden
        vc = self.vision_config(cfg)
        if self.vision_out_field and vc is not None and int(vc.get(self.vision_out_field, 0)) == old_hidden:
            vc[self.vision_out_field] = hidden

    def vision_ffn_size(self, cfg: dict) -> int:
        """Hidden units of every vision block's MLP."""
        vc = self.vision_config(cfg)
        if self.vision_ffn_ratio_of:
            return int(vc[self.vision_ffn_ratio_of] * vc[self.vision_ffn_field])
        return int(vc[self.vision_ffn_field])

    def vision_ffn_step(self, cfg: dict) -> int:
        """The vision MLP sizes the config can state are the multiples of this (1 unless it stores a ratio)."""
        return int(self.vision_config(cfg)[self.vision_ffn_ratio_of]) if self.vision_ffn_ratio_of else 1

    def set_vision_ffn_config(self, cfg: dict, size: int) -> None:
        """Edit cfg in place for vision blocks whose MLPs have `size` hidden units (a multiple of vision_ffn_step)."""
        vc = self.vision_config(cfg)
        step = self.vision_ffn_step(cfg)
        if size % step:
            raise PrunekitError(f"{self.name}: vision MLP size {size} is not a multiple of {step}")
        vc[self.vision_ffn_field] = size // step if self.vision_ffn_ratio_of else size

    def text_module_path(self, name: str) -> str:
        """Module path of a sibling of the decoder-layer list (e.g. the final norm)."""
        return f"{self.text_layers.rsplit('.', 1)[0]}.{name}"

    # ---- modules of a loaded model (peft-wrapped or not) ------------------------------------------------------
    def layers(self, model, component: str = "text"):
        """The ModuleList of text decoder layers ("text") or vision blocks ("vision")."""
        if component == "text":
            return get_module(base_model(model), self.text_layers)
        if component == "vision" and self.is_vlm:
            return get_module(base_model(model), self.vision_blocks)
        raise ValueError(f"a {self.name} model has no {component} layers")

    def blocks(self, model) -> list:
        """Every text decoder layer and vision block: the repeated units compile and FSDP take one at a time."""
        components = ["text", "vision"] if self.is_vlm else ["text"]
        return [block for component in components for block in self.layers(model, component)]

    def missing_weights(self, missing: list[str]) -> list[str]:
        """The keys `load_state_dict` reports missing, less the LM head's weight: a state from a model whose head is
        tied to the embedding may hold it once, under the embedding's name (tie_weights restores the head)."""
        head = f"{self.lm_head}.weight"
        return [k for k in missing if not k.endswith(head)]

    # ---- checkpoint keys ------------------------------------------------------------------------------------
    def component(self, key: str) -> str:
        """The part of the model a checkpoint tensor belongs to: text_layers, vision_blocks, embeddings, lm_head,
        vision_other (the rest of a vision tower) or other (final norm, ...)."""
        if self.match_text_layer(key):
            return "text_layers"
        if self.match_vision_block(key):
            return "vision_blocks"
        top = self.match_text_top(key)
        if top and top["name"] == "embed_tokens":
            return "embeddings"
        if top and top["head"]:
            return "lm_head"
        return "vision_other" if self.is_vision_key(key) else "other"

    def component_params(self, shapes: dict[str, list[int]], cfg: dict) -> dict[str, int]:
        """Parameters per component (`component`) of a checkpoint whose tensor shapes are `shapes`, and their total.
        Where `cfg` ties the LM head to the embedding an `lm_head` tensor in the file counts nothing: transformers
        loads the model with one shared matrix, and the counts are what `num_parameters()` reports."""
        out = {"text_layers": 0, "vision_blocks": 0, "embeddings": 0, "lm_head": 0, "vision_other": 0, "other": 0}
        tied = self.ties_embeddings(cfg)
        for key, shape in shapes.items():
            part = self.component(key)
            if not (tied and part == "lm_head"):
                out[part] += math.prod(shape)
        if not self.is_vlm:
            del out["vision_blocks"], out["vision_other"]
        out["total"] = sum(out.values())
        return out

    def text_layer_params(self, shapes: dict[str, list[int]], cfg: dict) -> list[int]:
        """Parameters of each text decoder layer of a checkpoint whose tensor shapes are `shapes`."""
        counts = [0] * self.num_text_layers(cfg)
        for key, shape in shapes.items():
            if m := self.match_text_layer(key):
                counts[int(m["idx"])] += math.prod(int(d) for d in shape)
        return counts

    def match_text_layer(self, key: str) -> re.Match | None:
        return re.match(self.text_key, key)

    def match_vision_block(self, key: str) -> re.Match | None:
        return re.match(self.vision_key, key) if self.vision_key else None

    def match_text_top(self, key: str) -> re.Match | None:
        """Embedding / final norm (group 'name') or LM head (group 'head') of the text model."""
        return re.match(self.text_top_key, key)

    def is_vision_key(self, key: str) -> bool:
        return bool(self.vision_module_key and re.match(self.vision_module_key, key))

    def is_vision_out_key(self, key: str) -> bool:
        return bool(self.vision_out_key and re.match(self.vision_out_key, key))


# Decoder layers of text models and of VLM language models; keys with and without the `model.` prefix
# (transformers 5 saves `model.language_model.layers.N`, older VLM checkpoints `model.layers.N`).
_TEXT = r"^(?P<prefix>(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.)(?P<idx>\d+)(?P<rest>\..*)$"
_VISION = r"^(?P<prefix>(?:model\.)?visual\.blocks\.)(?P<idx>\d+)(?P<rest>\..*)$"

_TEXT_COMMON = dict(auto_class="AutoModelForCausalLM", text_layers="model.layers", text_key=_TEXT)
_VLM_COMMON = dict(text_layers="model.language_model.layers", text_key=_TEXT,
                   vision_blocks="model.visual.blocks", vision_key=_VISION,
                   vision_module_key=r"^(?:model\.)?visual\.")
# the patch merger's last linear maps vision features into the text hidden size (Qwen3-VL: the deepstack mergers too)
_QWEN2_VL_OUT = dict(vision_out_key=r"^(?:model\.)?visual\.merger\.mlp\.2\.(?:weight|bias)$")
# the vision blocks' MLPs: fc1 -> act -> fc2 (Qwen2-VL, size mlp_ratio x embed_dim), gated (Qwen2.5-VL),
# linear_fc1 -> act -> linear_fc2 (Qwen3-VL)
_QWEN2_VL_MLP = dict(vision_mlp_in=("mlp.fc1",), vision_mlp_out="mlp.fc2", vision_ffn_field="mlp_ratio",
                     vision_ffn_ratio_of="embed_dim")
_QWEN2_5_VL_MLP = dict(vision_mlp_in=("mlp.gate_proj", "mlp.up_proj"), vision_mlp_out="mlp.down_proj")
_QWEN3_VL_MLP = dict(vision_mlp_in=("mlp.linear_fc1",), vision_mlp_out="mlp.linear_fc2")
_QWEN3_VL_OUT = dict(
    vision_out_key=r"^(?:model\.)?visual\.(?:merger|deepstack_merger_list\.\d+)\.linear_fc2\.(?:weight|bias)$")

MODEL_FAMILIES: dict[str, ModelFamily] = {f.name: f for f in [
    ModelFamily("llama", **_TEXT_COMMON, hidden_multiple_of_heads=True),
    ModelFamily("mistral", **_TEXT_COMMON),
    ModelFamily("qwen2", **_TEXT_COMMON, extra={"qkv_bias": True}),
    ModelFamily("qwen3", **_TEXT_COMMON),
    ModelFamily("qwen2_vl", auto_class="Qwen2VLForConditionalGeneration", **_VLM_COMMON, head_dim_field=None,
                **_QWEN2_VL_OUT, vision_out_field="hidden_size", **_QWEN2_VL_MLP, extra={"qkv_bias": True}),
    ModelFamily("qwen2_5_vl", auto_class="Qwen2_5_VLForConditionalGeneration", **_VLM_COMMON, head_dim_field=None,
                vision_index_fields=("fullatt_block_indexes",), **_QWEN2_VL_OUT, vision_out_field="out_hidden_size",
                **_QWEN2_5_VL_MLP, extra={"qkv_bias": True}),
    ModelFamily("qwen3_vl", auto_class="Qwen3VLForConditionalGeneration", **_VLM_COMMON,
                vision_protected_fields=("deepstack_visual_indexes",),
                protected_text_layers_from="deepstack_visual_indexes", **_QWEN3_VL_OUT,
                vision_out_field="out_hidden_size", **_QWEN3_VL_MLP),
]}


def family_for(cfg: dict) -> ModelFamily:
    """The family of a config dict; a one-line error naming the supported families otherwise."""
    model_type = cfg.get("model_type")
    if model_type not in MODEL_FAMILIES:
        raise PrunekitError(f"model_type {model_type!r} is not supported; supported families: "
                            f"{', '.join(MODEL_FAMILIES)}")
    return MODEL_FAMILIES[model_type]


def family_of(model) -> ModelFamily:
    """The family of a loaded model, peft-wrapped or not."""
    return family_for({"model_type": base_model(model).config.model_type})


def backbone_and_head(model) -> tuple:
    """(the model returning the last hidden states, the LM head) of a loaded model, peft-wrapped or not: the losses
    apply the head themselves, a chunk of rows at a time."""
    inner = base_model(model)
    family = family_of(inner)
    return get_module(inner, family.backbone), get_module(inner, family.lm_head)


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_module(model, path: str):
    """Resolve a dotted module path such as 'model.language_model.layers'."""
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj
