"""Merge KV heads gradually while a model trains, so that cutting them afterwards loses nothing.

A KV cut (3 -> 1 heads on SmolLM2) replaces each group of K/V projections by their mean at once: the model loses
most of what it can do and recovery starts from there (bench/results/outcome_smollm2_b32_steps5000.json: 2% of the
original's general-text token_acc right after a mean cut, 30% after a calibrated one). Here the heads of each group are
pulled toward the group's mean after every optimizer step instead, a little more each step: the part of each head's
deviation from the mean that training leaves alone shrinks linearly to zero over the first `ramp` of the steps, and
the heads stay identical after that. Training adapts the rest of the model (queries, o_proj, MLPs) while the heads
converge, and the `kv_cut` that follows (mean grouping: groups of adjacent heads, as here) is exact.
"""
from __future__ import annotations

import math

import torch

from prunekit import PrunekitError
from prunekit.core.families import family_for, get_module


def check_merge_heads(config: dict, kv_heads: int):
    """The same head-count rules as the cut that follows (one-line errors naming merge_kv_heads); returns the
    model's family."""
    from prunekit.core.surgery import KVCut
    family = family_for(config)
    try:
        KVCut(family, config, kv_heads)
    except PrunekitError as e:
        raise PrunekitError(str(e).replace("--kv-heads", "merge_kv_heads")) from None
    return family


class KVHeadMerge:
    """The K/V projection weights (and biases) of every text layer, merged to `kv_heads` per layer by `total_steps`
    * `ramp` (rounded up); call `after_step(done)` after each optimizer step."""

    def __init__(self, model, kv_heads: int, total_steps: int, ramp: float):
        config = model.config.to_dict()
        family = check_merge_heads(config, kv_heads)
        _, self.old_kv, self.head_dim = family.attention_shape(config)
        self.kv_heads = kv_heads
        self.ramp_steps = max(1, math.ceil(ramp * total_steps))
        self.tensors = []
        for layer in get_module(model, family.text_layers):
            attention = getattr(layer, family.attn_module)
            for name in (family.k_proj, family.v_proj):
                projection = getattr(attention, name)
                self.tensors += [t for t in (projection.weight, projection.bias) if t is not None]

    def left(self, step: int) -> float:
        """The fraction of the heads' deviation from their group mean still allowed after `step` steps."""
        return max(0.0, 1.0 - step / self.ramp_steps)

    @torch.no_grad()
    def after_step(self, done: int) -> None:
        before, after = self.left(done - 1), self.left(done)
        keep = after / before if before > 0 else 0.0
        for tensor in self.tensors:
            _assign(tensor, self._pull(_full(tensor), keep))

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        # rows of a K/V projection are heads x head_dim; adjacent heads form a group (the kv_cut mean grouping)
        return t.float().reshape(self.kv_heads, self.old_kv // self.kv_heads, self.head_dim, *t.shape[1:])

    def _pull(self, t: torch.Tensor, keep: float) -> torch.Tensor:
        heads = self._grouped(t)
        mean = heads.mean(1, keepdim=True)
        merged = mean.expand_as(heads) if keep == 0 else mean + keep * (heads - mean)
        return merged.reshape(t.shape).to(t.dtype)

    @torch.no_grad()
    def deviation(self) -> float:
        """The largest distance of a head from its group mean, relative to the mean's norm (0: identical heads)."""
        worst = 0.0
        for tensor in self.tensors:
            heads = self._grouped(_full(tensor))
            mean = heads.mean(1, keepdim=True)
            dims = tuple(range(2, heads.dim()))
            worst = max(worst, float(((heads - mean).norm(dim=dims) / mean.norm(dim=dims).clamp_min(1e-12)).max()))
        return worst


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an FSDP2 shard is gathered: K/V projections are small)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    if hasattr(param, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)
