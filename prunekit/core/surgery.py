"""Layer, vision-block and KV-head surgery as pure tensor maps.

A surgery is a new config dict plus a function `(key, tensor) -> (new_key, new_tensor) | None` applied to every
tensor of a checkpoint independently. The same object drives in-memory surgery (over a model's state dict,
`apply_to_model`) and streaming surgery (shard by shard, `prunekit.core.streaming`), so both give identical tensors.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from prunekit import PrunekitError
from prunekit.core.families import ModelFamily, get_module


def parse_index_list(spec: str | list[int] | None, flag: str) -> list[int]:
    """'3,5-7' -> [3, 5, 6, 7]; a one-line error naming `flag` for bad syntax or duplicates."""
    if spec is None or spec == "" or spec == []:
        return []
    if isinstance(spec, (list, tuple)):
        items = [int(i) for i in spec]
    else:
        items = []
        for part in str(spec).split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if hi < lo:
                        raise ValueError
                    items.extend(range(lo, hi + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise PrunekitError(f"{flag}: cannot read {part!r} (use e.g. 3,5-7)") from None
    seen = set()
    for i in items:
        if i in seen:
            raise PrunekitError(f"{flag}: index {i} is listed twice")
        seen.add(i)
    return sorted(items)


def _check_indexes(drop: list[int], total: int, flag: str, what: str) -> None:
    for i in drop:
        if i < 0 or i >= total:
            raise PrunekitError(f"{flag}: {what} {i} is out of range (the model has {total}: 0-{total - 1})")
    if drop and len(drop) >= total:
        raise PrunekitError(f"{flag}: cannot drop every {what} ({total} of {total})")


@dataclass
class LayerDrop:
    """Remove text decoder layers and/or vision blocks, renumbering the rest."""
    family: ModelFamily
    config: dict
    drop_text: list[int] = field(default_factory=list)
    drop_vision: list[int] = field(default_factory=list)

    def __post_init__(self):
        family, cfg = self.family, self.config
        n_text, n_vision = family.num_text_layers(cfg), family.num_vision_blocks(cfg)
        _check_indexes(self.drop_text, n_text, "--drop-text", "text layer")
        if self.drop_vision and not family.is_vlm:
            raise PrunekitError(f"--drop-vision: a {family.name} model has no vision blocks")
        _check_indexes(self.drop_vision, n_vision, "--drop-vision", "vision block")
        if not self.drop_text and not self.drop_vision:
            raise PrunekitError("nothing to remove: give --drop-text and/or --drop-vision (or --plan)")
        for i in self.drop_text:
            if i in family.protected_text_layers(cfg):
                raise PrunekitError(f"--drop-text: layer {i} receives {family.protected_text_layers_from} features in "
                                    f"{family.name}; dropping it would change the model beyond skipping it")
        for key in family.vision_protected_fields:
            for i in self.drop_vision:
                if i in (family.vision_config(cfg).get(key) or []):
                    raise PrunekitError(f"--drop-vision: block {i} is listed in vision_config.{key}; it cannot go")
        self.text_kept = [i for i in range(n_text) if i not in set(self.drop_text)]
        self.vision_kept = [i for i in range(n_vision) if i not in set(self.drop_vision)]
        self._text_new = {old: new for new, old in enumerate(self.text_kept)}
        self._vision_new = {old: new for new, old in enumerate(self.vision_kept)}
        self.new_config = copy.deepcopy(cfg)
        if self.drop_text:
            family.drop_text_layers_config(self.new_config, self.text_kept)
        if self.drop_vision:
            family.drop_vision_blocks_config(self.new_config, self.vision_kept)

    def __call__(self, key: str, tensor: torch.Tensor):
        for match, new_index in ((self.family.match_vision_block(key), self._vision_new),
                                 (self.family.match_text_layer(key), self._text_new)):
            if match:
                idx = int(match["idx"])
                if idx not in new_index:
                    return None
                return f"{match['prefix']}{new_index[idx]}{match['rest']}", tensor
        return key, tensor

    def provenance(self) -> dict:
        return {"operation": "prune", "removed": {"text_layers": self.drop_text, "vision_blocks": self.drop_vision}}


@dataclass
class KVCut:
    """Reduce the text model's KV heads to `kv_heads` by averaging the K/V projections of each group of heads.

    `head_order[layer]` optionally permutes a layer's old KV heads before grouping (similarity grouping): groups
    are then consecutive runs of the permuted order, and the query heads and o_proj input columns are permuted the
    same way so every query head keeps attending through the merged head that contains its original KV head.
    Without it, groups are adjacent heads (the GQA conversion rule).
    """
    family: ModelFamily
    config: dict
    kv_heads: int
    head_order: dict[int, list[int]] | None = None
    calibration: dict | None = None   # set by prunekit.core.kv_calibration (recorded in the provenance)

    def __post_init__(self):
        heads, old_kv, head_dim = self.family.attention_shape(self.config)
        n = self.kv_heads
        if n >= 1 and heads % n:
            raise PrunekitError(f"--kv-heads: {n} does not divide the {heads} attention heads")
        if n < 1 or n > old_kv:
            raise PrunekitError(f"--kv-heads: {n} must be between 1 and the current {old_kv} KV heads")
        if old_kv % n:
            raise PrunekitError(f"--kv-heads: {n} does not divide the current {old_kv} KV heads into equal groups")
        if n == old_kv:
            raise PrunekitError(f"--kv-heads: {n} equals the current {old_kv} KV heads; nothing to cut")
        self.heads, self.old_kv, self.head_dim = heads, old_kv, head_dim
        self.group = old_kv // n
        self.new_config = copy.deepcopy(self.config)
        self.family.set_kv_heads_config(self.new_config, n)

    def _order(self, layer: int) -> list[int] | None:
        order = (self.head_order or {}).get(layer)
        return None if order is None or list(order) == list(range(self.old_kv)) else list(order)

    def __call__(self, key: str, tensor: torch.Tensor):
        family = self.family
        m = family.match_text_layer(key)
        if not m:
            return key, tensor
        rest = m["rest"]  # e.g. ".self_attn.k_proj.weight"
        prefix = f".{family.attn_module}."
        if not rest.startswith(prefix):
            return key, tensor
        proj, _, kind = rest[len(prefix):].partition(".")
        order = self._order(int(m["idx"]))
        if proj in (family.k_proj, family.v_proj):
            return key, self._merge_kv(tensor, order)
        if order is not None and proj == family.q_proj:
            return key, self._permute_heads(tensor, order, dim=0)
        if order is not None and proj == family.o_proj and kind == "weight":
            return key, self._permute_heads(tensor, order, dim=1)
        return key, tensor

    def _merge_kv(self, t: torch.Tensor, order: list[int] | None) -> torch.Tensor:
        heads = t.reshape(self.old_kv, self.head_dim, *t.shape[1:])
        if order is not None:
            heads = heads[order]
        merged = heads.float().reshape(self.kv_heads, self.group, self.head_dim, *t.shape[1:]).mean(1)
        return merged.to(t.dtype).reshape(self.kv_heads * self.head_dim, *t.shape[1:]).contiguous()

    def query_head_order(self, layer: int) -> list[int] | None:
        """For each query head of the cut layer, the original query head it is (None: unchanged order)."""
        order = self._order(layer)
        if order is None:
            return None
        q_per_kv = self.heads // self.old_kv
        return [kv * q_per_kv + j for kv in order for j in range(q_per_kv)]

    def _permute_heads(self, t: torch.Tensor, order: list[int], dim: int) -> torch.Tensor:
        q_per_kv = self.heads // self.old_kv
        q_order = [kv * q_per_kv + j for kv in order for j in range(q_per_kv)]
        rows = torch.arange(self.heads * self.head_dim).reshape(self.heads, self.head_dim)[q_order].reshape(-1)
        return t.index_select(dim, rows).contiguous()

    def provenance(self) -> dict:
        record = {"operation": "kv_cut", "kv_heads": {"before": self.old_kv, "after": self.kv_heads},
                  "grouping": "similarity" if self.head_order else "mean",
                  "head_order": {str(k): v for k, v in (self.head_order or {}).items()}}
        if self.calibration is not None:
            record["calibration"] = self.calibration
        return record


def group_heads_by_similarity(similarity: torch.Tensor, group: int) -> list[int]:
    """Order heads so consecutive runs of `group` heads are similar: greedily seed a group with the first free head
    and add its most similar free heads. `similarity` is [kv, kv]; returns a permutation of range(kv)."""
    kv = similarity.shape[0]
    free = list(range(kv))
    order: list[int] = []
    while free:
        seed = free.pop(0)
        ranked = sorted(free, key=lambda h: -float(similarity[seed, h]))
        members = ranked[: group - 1]
        free = [h for h in free if h not in members]
        order += [seed] + sorted(members)
    return order


@torch.no_grad()
def kv_similarity_orders(model, family: ModelFamily, batches, kv_heads: int) -> dict[int, list[int]]:
    """Per text layer, a KV-head order for similarity grouping, from the K/V projection outputs on calibration
    batches (dicts of model inputs). Similarity of two heads = cosine of their flattened K outputs + of V."""
    _, old_kv, head_dim = family.attention_shape(model.config.to_dict())
    layers = get_module(model, family.text_layers)
    outputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, family.attn_module)
        for name in (family.k_proj, family.v_proj):
            def hook(_m, _inp, out, key=(i, name)):
                outputs.setdefault(key, []).append(out.detach().float().reshape(-1, old_kv, head_dim).cpu())
            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if not outputs:
        raise PrunekitError("--data: the calibration data produced no tokens")
    orders = {}
    for i in range(len(layers)):
        sim = torch.zeros(old_kv, old_kv)
        for name in (family.k_proj, family.v_proj):
            x = torch.cat(outputs[(i, name)]).transpose(0, 1).reshape(old_kv, -1)
            x = torch.nn.functional.normalize(x, dim=1)
            sim += x @ x.T
        orders[i] = group_heads_by_similarity(sim, old_kv // kv_heads)
    return orders


def apply_to_model(model, surgery):
    """Build the model the surgery describes from an in-memory model: same class, new config, mapped weights."""
    new_sd = {}
    for key, tensor in model.state_dict().items():
        mapped = surgery(key, tensor)
        if mapped is not None:
            new_sd[mapped[0]] = mapped[1]
    config = type(model.config).from_dict(surgery.new_config)
    with torch.device("cpu"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(model.dtype if model.dtype.is_floating_point else prev)
        try:
            new_model = type(model)(config)
        finally:
            torch.set_default_dtype(prev)
    missing, unexpected = new_model.load_state_dict(new_sd, strict=False, assign=True)
    tied = set(getattr(new_model, "_tied_weights_keys", None) or [])
    missing = [k for k in surgery.family.missing_weights(missing) if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"surgery produced mismatched weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if surgery.family.ties_embeddings(surgery.new_config):
        new_model.tie_weights()
    return new_model.eval()
