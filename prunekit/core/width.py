"""Width surgery (Minitron-style): remove FFN channels, query heads and hidden (embedding) channels of the text
model by activation importance, with the same sizes in every layer so config.json stays standard.

Importance (one forward pass over calibration batches, forward hooks, padding excluded; higher = more important):
- FFN channel c of layer l: mean over tokens of |act(gate(x)) * up(x)|_c, the input of down_proj;
- query head h of layer l: mean over tokens of the L2 norm of its slice of the attention output before o_proj;
- hidden channel c: mean over tokens of |norm(x)|_c, summed over every norm over the hidden size (both norms of
  each layer and the final norm): the residual stream is shared, so one set of hidden channels is kept everywhere;
- VLMs, vision MLP channel c of vision block b (`--vision-ffn`): mean over image patches of the |input|_c of the
  MLP's output projection (act(gate) * up for gated MLPs, act(fc1) for fc1/fc2 MLPs); the same size in every block.

Surgery is a pure tensor map like `prunekit.core.surgery` (in-memory and streaming give identical tensors):
rows/columns of every projection, bias, embedding, norm and LM head are selected; query heads are kept per KV
group (every KV head keeps the same number of query heads, so GQA stays consistent; the KV heads stay). Norms over
the hidden size compute their RMS over fewer channels after a hidden cut, so their weights are scaled by
sqrt(old/new): removing channels that carry nothing leaves every layer's output unchanged (up to the norm's eps).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from prunekit import PrunekitError
from prunekit.core.families import ModelFamily, get_module

IMPORTANCE_KIND = "prunekit width importance"
FFN_ALIGN = 64   # fractions of a real-size FFN (>= 1024 channels, a multiple of 64) keep a multiple of 64


@dataclass
class WidthShape:
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    # VLMs whose family table knows the vision MLP: vision blocks and their MLP size (None: a text model, or in a
    # target shape: the vision tower unchanged)
    vision_blocks: int = 0
    vision_ffn: int | None = None

    @classmethod
    def of(cls, family: ModelFamily, cfg: dict) -> "WidthShape":
        tc = family.text_config(cfg)
        heads, kv, head_dim = family.attention_shape(cfg)
        vision = family.is_vlm and family.vision_mlp_out is not None
        return cls(family.num_text_layers(cfg), int(tc["intermediate_size"]), heads, kv, head_dim,
                   int(tc["hidden_size"]), family.num_vision_blocks(cfg) if vision else 0,
                   family.vision_ffn_size(cfg) if vision else None)

    def as_dict(self) -> dict:
        vision = ({"vision_depth": self.vision_blocks, "vision_intermediate_size": self.vision_ffn}
                  if self.vision_ffn is not None else {})
        return {"num_hidden_layers": self.layers, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "hidden_size": self.hidden, **vision}

    def vision_changed(self, old: "WidthShape") -> bool:
        return self.vision_ffn is not None and self.vision_ffn != old.vision_ffn


# ---- targets ------------------------------------------------------------------------------------------------------
def _ffn_size(spec, intermediate: int, flag: str = "--ffn", unit: str = "FFN", where: str = "the model has") -> int:
    """--ffn: an integer is the new intermediate size, a number with a point a fraction of the current one."""
    text = str(spec).strip()
    try:
        size = int(text)
        fraction = None
    except ValueError:
        try:
            fraction = float(text)
        except ValueError:
            raise PrunekitError(f"{flag}: cannot read {text!r} (a fraction such as 0.75 or an intermediate size "
                                f"such as {intermediate * 3 // 4})") from None
    if fraction is not None:
        if not 0 < fraction <= 1 or math.isnan(fraction):
            raise PrunekitError(f"{flag}: {text} must be a fraction above 0 and at most 1 (or an intermediate size)")
        align = FFN_ALIGN if intermediate >= 1024 and intermediate % FFN_ALIGN == 0 else 1
        size = max(align, round(intermediate * fraction / align) * align)
    if size < 1:
        raise PrunekitError(f"{flag}: {text} must keep at least 1 {unit} channel")
    if size > intermediate:
        raise PrunekitError(f"{flag}: {size} is more {unit} channels than the {intermediate} {where}")
    return size


def _vision_ffn_size(spec, family: ModelFamily, cfg: dict) -> int:
    """--vision-ffn: the vision MLP size (the same in every vision block), as --ffn reads it; a size the vision
    config cannot state (Qwen2-VL: an integer mlp_ratio x embed_dim) is refused."""
    if not family.is_vlm:
        raise PrunekitError(f"--vision-ffn: {family.name} is a text-only model (no vision tower to cut); "
                            f"use --ffn for its FFN")
    if family.vision_mlp_out is None:
        raise PrunekitError(f"--vision-ffn: the family table has no vision MLP layout for {family.name}")
    old = family.vision_ffn_size(cfg)
    size = _ffn_size(spec, old, "--vision-ffn", "vision MLP", "each vision block has")
    step = family.vision_ffn_step(cfg)
    if size % step:
        vc = family.vision_config(cfg)
        ok = ", ".join(f"{k * step} ({k * step / old:g})" for k in range(1, old // step + 1))
        raise PrunekitError(f"--vision-ffn: {size} cannot be stated by {family.name}'s vision config, whose MLP "
                            f"size is {family.vision_ffn_field} (an integer in transformers) x "
                            f"{family.vision_ffn_ratio_of} {vc[family.vision_ffn_ratio_of]}: give one of {ok}")
    return size


def resolve_targets(family: ModelFamily, cfg: dict, ffn=None, heads: int | None = None,
                    hidden: int | None = None, vision_ffn=None) -> WidthShape:
    """The output's shape from --ffn / --heads / --hidden / --vision-ffn (None: unchanged); one-line errors for
    impossible ones."""
    old = WidthShape.of(family, cfg)
    new_vision = old.vision_ffn if vision_ffn is None else _vision_ffn_size(vision_ffn, family, cfg)
    new_ffn = old.intermediate if ffn is None else _ffn_size(ffn, old.intermediate)
    new_heads = old.heads if heads is None else int(heads)
    new_hidden = old.hidden if hidden is None else int(hidden)
    if new_heads < 1 or new_heads > old.heads:
        raise PrunekitError(f"--heads: {new_heads} must be between 1 and the {old.heads} query heads the model has")
    if new_heads % old.kv_heads:
        raise PrunekitError(f"--heads: {new_heads} is not a multiple of the {old.kv_heads} KV heads (every KV head "
                            f"keeps the same number of query heads)")
    if new_hidden < 1 or new_hidden > old.hidden:
        raise PrunekitError(f"--hidden: {new_hidden} must be between 1 and the {old.hidden} hidden channels the "
                            f"model has")
    if not _head_dim_consistent(family, old, new_heads, new_hidden):
        raise PrunekitError(
            f"--hidden: {family.name} computes head_dim as hidden_size / num_attention_heads, so the hidden size "
            f"must stay heads x {old.head_dim}: with {new_heads} heads give --hidden {new_heads * old.head_dim}, "
            f"or --heads {new_hidden // old.head_dim} with --hidden {new_hidden // old.head_dim * old.head_dim} "
            f"(got --heads {new_heads}, --hidden {new_hidden})")
    if family.hidden_multiple_of_heads and new_hidden % new_heads:
        near = sorted({max(new_heads, new_hidden // new_heads * new_heads), -(-new_hidden // new_heads) * new_heads})
        raise PrunekitError(f"--hidden: {new_hidden} is not a multiple of the {new_heads} query heads, which "
                            f"transformers' {family.name} config requires (e.g. --hidden "
                            f"{' or '.join(str(n) for n in near if n <= old.hidden)})")
    new = WidthShape(old.layers, new_ffn, new_heads, old.kv_heads, old.head_dim, new_hidden, old.vision_blocks,
                     new_vision)
    if (new_ffn, new_heads, new_hidden, new_vision) == (old.intermediate, old.heads, old.hidden, old.vision_ffn):
        flags = [f"--ffn below {old.intermediate}", f"--heads below {old.heads}", f"--hidden below {old.hidden}"]
        if old.vision_ffn is not None:
            flags.append(f"--vision-ffn below {old.vision_ffn}")
        raise PrunekitError(f"nothing to remove: give {', '.join(flags[:-1])} and/or {flags[-1]}")
    return new


def _head_dim_consistent(family: ModelFamily, old: WidthShape, heads: int, hidden: int) -> bool:
    """A family without a head_dim config field derives it as hidden / heads: that must stay the old head_dim."""
    return bool(family.head_dim_field) or (heads, hidden) == (old.heads, old.hidden) or hidden == heads * old.head_dim


# ---- importance ---------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, d] activations -> [n, d] float rows of the real (unpadded) tokens."""
    x = x.detach().float()
    if x.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def activation_importance(model, family: ModelFamily, batches) -> dict:
    """{"ffn": [layers][intermediate], "heads": [layers][heads], "hidden": [hidden], "tokens": n} from one pass
    over `batches` (dicts of model inputs; `labels` is ignored, `attention_mask` excludes padding). VLMs add
    "vision_ffn": [vision blocks][vision MLP size] over every image patch the vision tower saw ("vision_tokens"
    of them), None when no batch had images."""
    cfg = model.config.to_dict()
    shape = WidthShape.of(family, cfg)
    layers = get_module(model, family.text_layers)
    ffn = torch.zeros(shape.layers, shape.intermediate, dtype=torch.float64)
    heads = torch.zeros(shape.layers, shape.heads, dtype=torch.float64)
    hidden = torch.zeros(shape.hidden, dtype=torch.float64)
    vision = torch.zeros(shape.vision_blocks, shape.vision_ffn or 0, dtype=torch.float64)
    vision_rows = [0]
    mask: list[torch.Tensor | None] = [None]

    def ffn_hook(i):
        def fn(_m, args):
            ffn[i] += _rows(args[0], mask[0]).abs().sum(0).double().cpu()
        return fn

    def head_hook(i):
        def fn(_m, args):
            r = _rows(args[0], mask[0])
            heads[i] += r.reshape(r.shape[0], shape.heads, shape.head_dim).norm(dim=-1).sum(0).double().cpu()
        return fn

    def norm_hook(_m, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        hidden.add_(_rows(out, mask[0]).abs().sum(0).double().cpu())

    def vision_hook(b):
        def fn(_m, args):   # the vision tower sees every patch of every image: no padding to exclude
            r = _rows(args[0], None)
            vision[b] += r.abs().sum(0).double().cpu()
            if b == 0:
                vision_rows[0] += r.shape[0]
        return fn

    handles = []
    for i, layer in enumerate(layers):
        handles.append(get_module(layer, f"{family.mlp_module}.{family.down_proj}").register_forward_pre_hook(
            ffn_hook(i)))
        handles.append(get_module(layer, f"{family.attn_module}.{family.o_proj}").register_forward_pre_hook(
            head_hook(i)))
        handles += [get_module(layer, n).register_forward_hook(norm_hook) for n in family.hidden_norms]
    handles.append(get_module(model, family.text_module_path(family.final_norm)).register_forward_hook(norm_hook))
    if shape.vision_ffn is not None:
        for b, block in enumerate(get_module(model, family.vision_blocks)):
            handles.append(get_module(block, family.vision_mlp_out).register_forward_pre_hook(vision_hook(b)))
    tokens = 0
    try:
        for batch in batches:
            m = batch.get("attention_mask")
            mask[0] = m.bool() if m is not None else None
            model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
            tokens += int(mask[0].sum()) if mask[0] is not None else int(batch["input_ids"].numel())
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise PrunekitError("--data: the calibration data produced no tokens")
    out = {"tokens": tokens, "ffn": (ffn / tokens).tolist(), "heads": (heads / tokens).tolist(),
           "hidden": (hidden / tokens).tolist()}
    if shape.vision_ffn is not None:
        out["vision_tokens"] = vision_rows[0]
        out["vision_ffn"] = (vision / vision_rows[0]).tolist() if vision_rows[0] else None
    return out


def importance_record(scores: dict, shape: WidthShape, **meta) -> dict:
    """The importance.json document (scores rounded to 6 significant digits)."""
    def r(values):
        return [r(v) for v in values] if isinstance(values, list) else float(f"{values:.6g}")
    vision = ({"vision_tokens": scores.get("vision_tokens"), "vision_ffn": r(scores["vision_ffn"])}
              if scores.get("vision_ffn") is not None else {})
    return {"kind": IMPORTANCE_KIND, **meta, "tokens": scores.get("tokens"), "shape": shape.as_dict(),
            "higher_is_more_important": True,
            "ffn": r(scores["ffn"]), "heads": r(scores["heads"]), "hidden": r(scores["hidden"]), **vision}


def check_importance(record, shape: WidthShape, where: str, need_vision: bool = False) -> dict:
    """Validate a loaded importance.json against the model it is applied to; returns the record. `need_vision`:
    the vision MLP is cut, so the record must hold its scores."""
    if not isinstance(record, dict) or record.get("kind") != IMPORTANCE_KIND:
        raise PrunekitError(f"{where}: not a width importance file (written by `prunekit width`, "
                            f"kind {IMPORTANCE_KIND!r})")
    want = shape.as_dict()
    got = record.get("shape") or {}
    for key in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "hidden_size"):
        if got.get(key) != want[key]:
            raise PrunekitError(f"{where}: the scores are for {key} {got.get(key)}, the model has {want[key]}")
    ok = (_matrix(record.get("ffn"), shape.layers, shape.intermediate)
          and _matrix(record.get("heads"), shape.layers, shape.heads)
          and _matrix([record.get("hidden")], 1, shape.hidden))
    if not ok:
        raise PrunekitError(f"{where}: ffn / heads / hidden scores do not have the shapes its 'shape' states")
    if record.get("vision_ffn") is not None:
        if got.get("vision_intermediate_size") != shape.vision_ffn or got.get("vision_depth") != shape.vision_blocks:
            raise PrunekitError(f"{where}: the vision MLP scores are for {got.get('vision_depth')} blocks of "
                                f"{got.get('vision_intermediate_size')} channels, the model has "
                                f"{shape.vision_blocks} of {shape.vision_ffn}")
        if not _matrix(record["vision_ffn"], shape.vision_blocks, shape.vision_ffn):
            raise PrunekitError(f"{where}: vision_ffn scores do not have the shape its 'shape' states")
    elif need_vision:
        raise PrunekitError(f"{where}: has no vision MLP scores (scored on data without image rows); score "
                            f"--vision-ffn on --data with image rows")
    return record


def _matrix(value, rows: int, cols: int) -> bool:
    return (isinstance(value, list) and len(value) == rows and
            all(isinstance(r, list) and len(r) == cols and
                all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r)
                for r in value))


def _top(scores: list[float], k: int) -> list[int]:
    """Indexes of the k highest scores (ties: the lower index), sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def select_kept(scores: dict, old: WidthShape, new: WidthShape) -> dict:
    """{"ffn": per layer, "heads": per layer, "hidden": [...]} indexes to keep (None where nothing changes). Query
    heads are chosen within each KV group: group g keeps its new.heads / kv best heads."""
    kept: dict = {"ffn": None, "heads": None, "hidden": None, "vision_ffn": None}
    if new.intermediate != old.intermediate:
        kept["ffn"] = [_top(layer, new.intermediate) for layer in scores["ffn"]]
    if new.heads != old.heads:
        per_old, per_new = old.heads // old.kv_heads, new.heads // old.kv_heads
        kept["heads"] = [[g * per_old + h for g in range(old.kv_heads)
                          for h in _top(layer[g * per_old:(g + 1) * per_old], per_new)] for layer in scores["heads"]]
    if new.hidden != old.hidden:
        kept["hidden"] = _top(scores["hidden"], new.hidden)
    if new.vision_changed(old):
        kept["vision_ffn"] = [_top(block, new.vision_ffn) for block in scores["vision_ffn"]]
    return kept


# ---- surgery ------------------------------------------------------------------------------------------------------
@dataclass
class WidthCut:
    """Keep the listed FFN channels (per layer), query heads (per layer, whole GQA groups consistent), hidden
    channels (one list for the whole residual stream) and vision MLP channels (per vision block, VLMs); None = that
    dimension unchanged."""
    family: ModelFamily
    config: dict
    ffn_keep: list[list[int]] | None = None
    head_keep: list[list[int]] | None = None
    hidden_keep: list[int] | None = None
    importance: dict = field(default_factory=dict)   # where the scores came from (recorded in the provenance)
    budget: dict | None = None   # --params / --params-fraction: the mix chosen and the alternatives (provenance)
    vision_ffn_keep: list[list[int]] | None = None

    def __post_init__(self):
        family = self.family
        self.old = old = WidthShape.of(family, self.config)
        if family.fused_qkv:
            raise PrunekitError(f"width: {family.name} has a fused QKV projection, which width surgery does not cut")
        n_ffn = len(self.ffn_keep[0]) if self.ffn_keep else old.intermediate
        n_heads = len(self.head_keep[0]) if self.head_keep else old.heads
        n_hidden = len(self.hidden_keep) if self.hidden_keep is not None else old.hidden
        n_vision = old.vision_ffn
        if self.vision_ffn_keep is not None:
            if old.vision_ffn is None:
                raise PrunekitError(f"width: {family.name} has no vision MLP in the family table to cut")
            n_vision = len(self.vision_ffn_keep[0]) if self.vision_ffn_keep else 0
            if len(self.vision_ffn_keep) != old.vision_blocks or len({len(x) for x in self.vision_ffn_keep}) != 1:
                raise PrunekitError("width: vision_ffn needs one equally long keep list per vision block")
            for x in self.vision_ffn_keep:
                _check_keep(x, old.vision_ffn, "vision_ffn")
            if n_vision % family.vision_ffn_step(self.config):
                raise PrunekitError(f"width: {family.name}'s vision config cannot state a vision MLP of {n_vision} "
                                    f"(a multiple of {family.vision_ffn_step(self.config)})")
        self.new = WidthShape(old.layers, n_ffn, n_heads, old.kv_heads, old.head_dim, n_hidden, old.vision_blocks,
                              n_vision)
        if family.hidden_multiple_of_heads and n_hidden % n_heads:
            raise PrunekitError(f"width: {family.name} needs hidden_size ({n_hidden}) to be a multiple of the query "
                                f"heads ({n_heads})")
        if not _head_dim_consistent(family, old, n_heads, n_hidden):
            raise PrunekitError(f"width: {family.name} derives head_dim from hidden_size / num_attention_heads: "
                                f"{n_hidden} hidden channels need {n_hidden / old.head_dim:g} heads, not {n_heads}")
        for name, lists, total in (("ffn", self.ffn_keep, old.intermediate), ("heads", self.head_keep, old.heads)):
            if lists is not None:
                if len(lists) != old.layers or len({len(x) for x in lists}) != 1:
                    raise PrunekitError(f"width: {name} needs one equally long keep list per layer")
                for x in lists:
                    _check_keep(x, total, name)
        if self.head_keep is not None:
            per_old, per_new = old.heads // old.kv_heads, n_heads // old.kv_heads
            for x in self.head_keep:
                if n_heads % old.kv_heads or any(x[g * per_new + j] // per_old != g
                                                 for g in range(old.kv_heads) for j in range(per_new)):
                    raise PrunekitError("width: every KV group must keep the same number of its own query heads")
        if self.hidden_keep is not None:
            _check_keep(self.hidden_keep, old.hidden, "hidden")
        self.norm_scale = math.sqrt(old.hidden / n_hidden)
        self._ffn = [torch.tensor(x) for x in self.ffn_keep] if self.ffn_keep else None
        hd = torch.arange(old.head_dim)
        self._heads = ([torch.cat([h * old.head_dim + hd for h in x]) for x in self.head_keep]
                       if self.head_keep else None)
        self._hidden = torch.tensor(self.hidden_keep) if self.hidden_keep is not None else None
        self._vision = [torch.tensor(x) for x in self.vision_ffn_keep] if self.vision_ffn_keep else None
        self.new_config = copy.deepcopy(self.config)
        family.set_width_config(self.new_config, n_ffn, n_heads, n_hidden)
        if self._vision is not None:
            family.set_vision_ffn_config(self.new_config, n_vision)

    # index selection; None = keep all
    @staticmethod
    def _take(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(dim, idx.to(t.device)).contiguous()

    def _scale_norm(self, t: torch.Tensor) -> torch.Tensor:
        t = self._take(t, 0, self._hidden)
        if self._hidden is None or not t.is_floating_point():
            return t
        return (t.float() * self.norm_scale).to(t.dtype)

    def __call__(self, key: str, tensor: torch.Tensor):
        family, hid = self.family, self._hidden
        m = family.match_text_layer(key)
        if m:
            return key, self._layer_tensor(int(m["idx"]), m["rest"], key, tensor)
        if family.is_vision_out_key(key):          # vision features projected into the text hidden size
            return key, self._take(tensor, 0, hid)
        if self._vision is not None and (m := family.match_vision_block(key)):
            return key, self._vision_tensor(int(m["idx"]), m["rest"], tensor)
        if family.is_vision_key(key):
            return key, tensor
        top = family.match_text_top(key)
        if top and top["name"] == family.final_norm:
            return key, self._scale_norm(tensor)
        if top and tensor.dim() == 2:          # embedding [vocab, hidden], LM head [vocab, hidden]
            return key, self._take(tensor, 1, hid)
        if top and top["head"] and tensor.dim() == 1:   # an LM-head bias is per vocabulary entry
            return key, tensor
        raise PrunekitError(f"width: {family.name} tensor {key} {list(tensor.shape)} is not in the family table's "
                            f"width layout; nothing written")

    def _layer_tensor(self, layer: int, rest: str, key: str, t: torch.Tensor) -> torch.Tensor:
        family, hid = self.family, self._hidden
        ffn = self._ffn[layer] if self._ffn else None
        heads = self._heads[layer] if self._heads else None
        module, _, kind = rest[1:].rpartition(".")
        weight = kind == "weight"
        if module in family.hidden_norms:
            return self._scale_norm(t)
        if module in (f"{family.attn_module}.{n}" for n in family.head_norms):
            return t
        if module == f"{family.attn_module}.{family.q_proj}":
            t = self._take(t, 0, heads)
            return self._take(t, 1, hid) if weight else t
        if module in (f"{family.attn_module}.{family.k_proj}", f"{family.attn_module}.{family.v_proj}"):
            return self._take(t, 1, hid) if weight else t
        if module == f"{family.attn_module}.{family.o_proj}":
            t = self._take(t, 0, hid)
            return self._take(t, 1, heads) if weight else t
        if module in (f"{family.mlp_module}.{family.gate_proj}", f"{family.mlp_module}.{family.up_proj}"):
            t = self._take(t, 0, ffn)
            return self._take(t, 1, hid) if weight else t
        if module == f"{family.mlp_module}.{family.down_proj}":
            t = self._take(t, 0, hid)
            return self._take(t, 1, ffn) if weight else t
        raise PrunekitError(f"width: {family.name} tensor {key} {list(t.shape)} is not in the family table's width "
                            f"layout; nothing written")

    def _vision_tensor(self, block: int, rest: str, t: torch.Tensor) -> torch.Tensor:
        """A vision-block tensor: the MLP's input projections lose output rows (weight and bias), its output
        projection input columns; everything else in the block stays."""
        family = self.family
        module, _, kind = rest[1:].rpartition(".")
        if module in family.vision_mlp_in:
            return self._take(t, 0, self._vision[block])
        if module == family.vision_mlp_out and kind == "weight":
            return self._take(t, 1, self._vision[block])
        return t

    def provenance(self) -> dict:
        old, new = self.old.as_dict(), self.new.as_dict()
        sizes = {k: {"before": old[k], "after": new[k]}
                 for k in ("intermediate_size", "num_attention_heads", "hidden_size")}
        if self.vision_ffn_keep is not None:
            sizes["vision_intermediate_size"] = {"before": old["vision_intermediate_size"],
                                                 "after": new["vision_intermediate_size"]}
        return {"operation": "width", "sizes": sizes, "importance": self.importance,
                **({"budget": self.budget} if self.budget is not None else {}),
                "norm_scale": self.norm_scale if self.hidden_keep is not None else None,
                "kept": {"hidden": self.hidden_keep, "heads": self.head_keep,
                         "ffn": "importance.json: kept.ffn" if self.ffn_keep else None,
                         **({"vision_ffn": "importance.json: kept.vision_ffn"} if self.vision_ffn_keep else {})}}


def _check_keep(keep: list[int], total: int, name: str) -> None:
    if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= total:
        raise PrunekitError(f"width: the {name} keep list must be sorted, distinct indexes in 0-{total - 1}")


def width_cut_from_scores(family: ModelFamily, cfg: dict, new: WidthShape, scores: dict,
                          importance: dict | None = None, budget: dict | None = None) -> WidthCut:
    kept = select_kept(scores, WidthShape.of(family, cfg), new)
    return WidthCut(family, cfg, kept["ffn"], kept["heads"], kept["hidden"], importance=importance or {},
                    budget=budget, vision_ffn_keep=kept["vision_ffn"])


# ---- a parameter budget (--params / --params-fraction): prunekit picks the mix ---------------------------------
# Candidate mixes, each solved to the budget with standard sizes (FFN a multiple of 64 where it is >= 1024, query
# heads a multiple of the KV heads, hidden a multiple of 64 where >= 1024 else of 8, and of the heads where the family
# requires it). Two-dimension mixes cut both by about the same fraction: every legal size of the other dimension is
# tried with the largest FFN that meets the budget, and the pair whose kept fractions are closest wins.
MIXES = ("ffn", "heads+ffn", "hidden+ffn")
# a mix that removes more than this much beyond what the closest mix removes is not at the same size: listed, not chosen
BUDGET_SLACK = 0.25
BUDGET_RULE = ("each mix solved to the largest standard sizes within the budget; mixes removing more than "
               f"{BUDGET_SLACK:.0%} beyond the closest one are not at the same size; of the rest, the one with the "
               "least importance-weighted parameters removed (parameters removed x the mean score of the removed "
               "channels relative to the mean score of their kind) is chosen")


def shape_cut(family: ModelFamily, cfg: dict, new: WidthShape) -> WidthCut:
    """A WidthCut to `new` keeping the first channels of each kind: for counting and config checks (no scores)."""
    old = WidthShape.of(family, cfg)
    ffn = [list(range(new.intermediate))] * old.layers if new.intermediate != old.intermediate else None
    per_old, per_new = old.heads // old.kv_heads, new.heads // old.kv_heads
    heads = ([[g * per_old + j for g in range(old.kv_heads) for j in range(per_new)]] * old.layers
             if new.heads != old.heads else None)
    hidden = list(range(new.hidden)) if new.hidden != old.hidden else None
    vision = [list(range(new.vision_ffn))] * old.vision_blocks if new.vision_changed(old) else None
    return WidthCut(family, cfg, ffn, heads, hidden, vision_ffn_keep=vision)


def count_params(family: ModelFamily, cfg: dict, shapes: dict, surgery=None) -> int:
    """Parameters as `prunekit inspect` (and the pipeline's guardrails) count them, of the checkpoint whose tensor
    shapes are `shapes`, after `surgery` (its tensor map run on meta tensors: the family table's layout, no data)."""
    new = {}
    for key, shape in shapes.items():
        if surgery is None:
            new[key] = list(shape)
            continue
        mapped = surgery(key, torch.empty([int(d) for d in shape], device="meta"))
        if mapped is not None:
            new[mapped[0]] = list(mapped[1].shape)
    return family.component_params(new, surgery.new_config if surgery is not None else cfg)["total"]


def _align(size: int, big: int = 1024, step: int = 64, small: int = 1) -> int:
    return step if size >= big and size % step == 0 else small


def legal_heads(old: WidthShape) -> list[int]:
    """Query-head counts below the current one that keep whole GQA groups, largest first."""
    return list(range(old.heads - old.kv_heads, 0, -old.kv_heads))


def legal_hidden(family: ModelFamily, old: WidthShape) -> list[int]:
    """Hidden sizes below the current one that keep the config standard, largest first ([] where the family derives
    head_dim from hidden / heads: the hidden size cannot change without the heads)."""
    if not family.head_dim_field:
        return []
    step = _align(old.hidden, small=8 if old.hidden % 8 == 0 else 1)
    if family.hidden_multiple_of_heads:
        step = math.lcm(step, old.heads)
    return list(range((old.hidden - 1) // step * step, 0, -step))


def _solve_ffn(family, cfg, shapes, old: WidthShape, heads: int, hidden: int, budget: int,
               at_least: bool = False) -> tuple[int, int] | None:
    """(largest standard FFN size, parameters) with the given heads and hidden size within `budget`; None if even
    the smallest FFN is over it. `at_least`: the smallest FFN size that keeps at least `budget` parameters (None if
    even the full FFN keeps fewer). Parameters are linear in the FFN size, so two counts place it, a third checks."""
    align = _align(old.intermediate, small=1)

    def count(f):
        shape = WidthShape(old.layers, f, heads, old.kv_heads, old.head_dim, hidden)
        if (f, heads, hidden) == (old.intermediate, old.heads, old.hidden):
            return count_params(family, cfg, shapes)
        return count_params(family, cfg, shapes, shape_cut(family, cfg, shape))
    low, high = count(align), count(old.intermediate)
    per = (high - low) / max(old.intermediate - align, 1)
    if at_least:
        if high < budget:
            return None
        if low >= budget:
            return align, low
        f = align + -(-int(math.ceil((budget - low) / per)) // align) * align
        f = max(align, min(f, old.intermediate))
        n = count(f)
        while n < budget and f < old.intermediate:   # rounding guard
            f += align
            n = count(f)
        return f, n
    if low > budget:
        return None
    if high <= budget:
        return old.intermediate, high
    f = align + int((budget - low) / per) // align * align
    f = max(align, min(f, old.intermediate))
    n = count(f)
    while n > budget and f > align:      # rounding guard
        f -= align
        n = count(f)
    return f, n


def budget_mixes(family: ModelFamily, cfg: dict, shapes: dict, budget: int, at_least: bool = False,
                 min_params: int | None = None) -> list[dict]:
    """Every mix of MIXES solved to `budget` parameters: {"mix", "shape" (WidthShape or None), "params", "reason"
    (why it is not a candidate, or None)}. `at_least`: keep at least `budget` parameters instead (remove at most a
    guardrail's allowance); `min_params`: mixes leaving fewer are not candidates (the pipeline round's guardrail)."""
    old = WidthShape.of(family, cfg)
    out = []
    for mix in MIXES:
        best, reason = None, None
        if mix == "ffn":
            others = [(old.heads, old.hidden)]
        elif mix == "heads+ffn":
            others = [(h, old.hidden) for h in legal_heads(old)
                      if _head_dim_consistent(family, old, h, old.hidden)
                      and not (family.hidden_multiple_of_heads and old.hidden % h)]
            reason = None if others else (f"{family.name}: no smaller head count keeps whole GQA groups and a "
                                          f"standard config")
        else:
            others = [(old.heads, d) for d in legal_hidden(family, old)]
            reason = None if others else (f"{family.name} derives head_dim from hidden_size / heads: the hidden "
                                          f"size cannot change alone")
        for heads, hidden in others:
            solved = _solve_ffn(family, cfg, shapes, old, heads, hidden, budget, at_least)
            if solved is None:
                continue
            f, n = solved
            if (f, heads, hidden) == (old.intermediate, old.heads, old.hidden):
                continue
            gap = abs(f / old.intermediate - (heads / old.heads if mix == "heads+ffn" else hidden / old.hidden))
            if best is None or gap < best[0] - 1e-12:
                best = (gap, WidthShape(old.layers, f, heads, old.kv_heads, old.head_dim, hidden), n)
        if best is None:
            out.append({"mix": mix, "shape": None, "params": None, "reason": reason or (
                "every standard size of it removes more than allowed" if at_least else
                "cannot reach the budget (even the smallest sizes are over it)")})
        else:
            out.append({"mix": mix, "shape": best[1], "params": best[2], "reason": None})
    if min_params is not None:
        for m in out:
            if m["shape"] is not None and m["params"] < min_params:
                m["reason"] = f"leaves {m['params']:,} parameters, below the minimum {min_params:,}"
    reachable = [m for m in out if m["shape"] is not None and m["reason"] is None]
    if reachable:
        total = count_params(family, cfg, shapes)
        if at_least:
            closest = total - min(m["params"] for m in reachable)
            for m in reachable:
                if (total - m["params"]) * (1 + BUDGET_SLACK) < closest:
                    m["reason"] = (f"removes {total - m['params']:,} parameters, less than 1/{1 + BUDGET_SLACK:g} of "
                                   f"the {closest:,} of the closest mix (its steps are too coarse)")
        else:
            closest = total - max(m["params"] for m in reachable)
            for m in reachable:
                if total - m["params"] > closest * (1 + BUDGET_SLACK):
                    m["reason"] = (f"removes {total - m['params']:,} parameters, more than {1 + BUDGET_SLACK:g}x the "
                                   f"{closest:,} of the closest mix (its smallest step is too coarse)")
    return out


def _relative_removed(values: list[list[float]], kept: list[list[int]]) -> float:
    """Mean score of the removed entries / mean score of all (1.0: as important as the average one)."""
    total = sum(sum(v) for v in values)
    n_all = sum(len(v) for v in values)
    removed = sum(sum(v) - sum(v[i] for i in k) for v, k in zip(values, kept))
    n_removed = n_all - sum(len(k) for k in kept)
    if n_removed == 0 or total <= 0:
        return 0.0
    return (removed / n_removed) / (total / n_all)


def choose_mix(family: ModelFamily, cfg: dict, shapes: dict, mixes: list[dict], scores: dict) -> tuple[dict, list]:
    """The chosen mix (BUDGET_RULE) and every mix as a JSON-able record with its sizes, parameters and score."""
    old = WidthShape.of(family, cfg)
    total = count_params(family, cfg, shapes)
    records = []
    for m in mixes:
        rec = {"mix": m["mix"], "params": m["params"], "reason": m["reason"]}
        if m["shape"] is not None:
            new = m["shape"]
            kept = select_kept(scores, old, new)
            parts = {}
            for dim, values, k, single in (
                    ("ffn", scores["ffn"], kept["ffn"], WidthShape(old.layers, new.intermediate, old.heads,
                                                                   old.kv_heads, old.head_dim, old.hidden)),
                    ("heads", scores["heads"], kept["heads"], WidthShape(old.layers, old.intermediate, new.heads,
                                                                         old.kv_heads, old.head_dim, old.hidden)),
                    ("hidden", [scores["hidden"]], [kept["hidden"]] if kept["hidden"] is not None else None,
                     WidthShape(old.layers, old.intermediate, old.heads, old.kv_heads, old.head_dim, new.hidden))):
                if k is None:
                    continue
                alone = total - count_params(family, cfg, shapes, shape_cut(family, cfg, single))
                parts[dim] = {"params_removed_alone": alone, "relative_importance": _relative_removed(values, k)}
            weight = sum(p["params_removed_alone"] for p in parts.values())
            mean_rel = sum(p["params_removed_alone"] * p["relative_importance"] for p in parts.values()) / weight
            rec.update(sizes={"intermediate_size": new.intermediate, "num_attention_heads": new.heads,
                              "hidden_size": new.hidden},
                       params_removed=total - m["params"], removed=parts,
                       importance_removed=(total - m["params"]) / total * mean_rel)
        records.append(rec)
    valid = [r for r in records if r["reason"] is None]
    chosen = min(valid, key=lambda r: (r["importance_removed"], MIXES.index(r["mix"])))
    return chosen, records


def budget_error(flag: str, family: ModelFamily, cfg: dict, shapes: dict, budget: int, mixes: list[dict],
                 at_least: bool = False) -> str:
    old = WidthShape.of(family, cfg)
    total = count_params(family, cfg, shapes)
    if budget >= total:
        return f"{flag}: the model has {total:,} parameters, already within {budget:,}; nothing to remove"
    if at_least or any(m["shape"] is not None for m in mixes):
        return (f"{flag}: no width mix fits ({'; '.join(m['mix'] + ': ' + m['reason'] for m in mixes)})")
    smallest = WidthShape(old.layers, _align(old.intermediate), old.kv_heads, old.kv_heads, old.head_dim, old.hidden)
    floor = count_params(family, cfg, shapes, shape_cut(family, cfg, smallest))
    return (f"{flag}: no width mix reaches {budget:,} of the {total:,} parameters (FFN {smallest.intermediate} "
            f"and {smallest.heads} query heads still leave {floor:,}; "
            f"{'; '.join(m['mix'] + ': ' + m['reason'] for m in mixes if m['reason'])}); give a larger budget or "
            f"remove layers too (`prunekit prune`)")


def resolve_budget(params, params_fraction, total: int) -> tuple[str, int]:
    """(the flag as given, the budget in parameters) from --params N or --params-fraction F of `total`."""
    if params is not None and params_fraction is not None:
        raise PrunekitError("give --params or --params-fraction, not both")
    if params is not None:
        flag = f"--params {params}"
        try:
            budget = int(params)
        except (TypeError, ValueError):
            raise PrunekitError(f"--params: cannot read {params!r} (a parameter count such as 100000000)") from None
        if budget < 1 or budget != float(params):
            raise PrunekitError(f"--params: {params} must be a whole number of parameters >= 1")
        return flag, budget
    flag = f"--params-fraction {params_fraction}"
    try:
        fraction = float(params_fraction)
    except (TypeError, ValueError):
        raise PrunekitError(f"--params-fraction: cannot read {params_fraction!r} (a fraction such as 0.75)") from None
    if not 0 < fraction < 1:   # also false for NaN
        raise PrunekitError(f"--params-fraction: {params_fraction} must be a fraction above 0 and below 1 of the "
                            f"model's {total:,} parameters")
    return flag, int(fraction * total)
