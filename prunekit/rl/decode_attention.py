"""One decode step's grouped-query attention as a Triton kernel (flash-decoding without the split): per (row, KV head)
one program reads that head's cache once for all of its query heads, with an online softmax, and skips the blocks of
cache positions the mask shuts entirely (left padding, and the static cache's positions not written yet).

Why: at the corpus generator's shape (SmolLM2-135M, batch 512, a static cache of up to ~450 positions) attention was
5.2 of a decode step's 9.9 ms of GPU time through SDPA (bench/results/rollout_throughput.json, `corpus_decode`),
where reading every layer's K/V once is ~1 ms at the H200's bandwidth, and on average about half of the cache's
positions are not written yet. Runs where Triton does (``prunekit.core.triton_support``).
"""
from __future__ import annotations

from typing import Optional

import torch

from prunekit.core.triton_support import INTERPRETED, tl, triton, unavailable

BLOCK_N = 64          # cache positions per step of the loop
_FLOOR = -1.0e30      # the running max starts here, not at -inf (exp(-inf - -inf) is NaN)
HEAD_SIZES = (16, 32, 64, 128, 256)


def available(query: torch.Tensor) -> str | None:
    """None when the kernel can take this query, else why not."""
    if query.shape[-1] not in HEAD_SIZES:
        return f"head size {query.shape[-1]} is not a power of two from 16 to 256"
    return unavailable(query.device)


def usable(query: torch.Tensor) -> bool:
    """`available` from the query's shape, dtype and device alone, for use inside a compiled decode step (float32 on
    CUDA stays with SDPA: the kernel's dots would run in TF32)."""
    return triton is not None and query.shape[-1] in HEAD_SIZES and (
        query.dtype != torch.float32 if query.is_cuda else INTERPRETED)


if triton is not None:
    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, n_cache, scale,
                       q_b, q_h, k_b, k_h, k_n, v_b, v_h, v_n, m_b, o_b, o_h,
                       KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, FLOOR: tl.constexpr):
        pid = tl.program_id(0)
        row = (pid // KV_HEADS).to(tl.int64)
        kv_head = pid % KV_HEADS
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g
        in_group = g < GROUP
        # the group's query heads ride as the rows of a [GROUP_PAD, HEAD_DIM] tile (padded to 16: tl.dot's minimum)
        q = tl.load(q_ptr + row * q_b + heads[:, None] * q_h + d[None, :], mask=in_group[:, None], other=0.0)
        run_max = tl.full([GROUP_PAD], FLOOR, tl.float32)
        run_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        k_base = k_ptr + row * k_b + kv_head * k_h
        v_base = v_ptr + row * v_b + kv_head * v_h
        for start in range(0, n_cache, BLOCK):
            n = start + tl.arange(0, BLOCK)
            keep = n < n_cache
            if HAS_MASK:
                keep = keep & (tl.load(mask_ptr + row * m_b + n, mask=n < n_cache, other=0) != 0)
            if tl.max(keep.to(tl.int32), 0) > 0:   # a block the mask shuts entirely is never read
                k = tl.load(k_base + n[:, None] * k_n + d[None, :], mask=keep[:, None], other=0.0)
                scores = tl.dot(q, tl.trans(k)) * scale                                   # [GROUP_PAD, BLOCK]
                scores = tl.where(keep[None, :], scores, float("-inf"))
                new_max = tl.maximum(run_max, tl.max(scores, 1))
                p = tl.exp(scores - new_max[:, None])
                rescale = tl.exp(run_max - new_max)
                v = tl.load(v_base + n[:, None] * v_n + d[None, :], mask=keep[:, None], other=0.0)
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
                run_sum = run_sum * rescale + tl.sum(p, 1)
                run_max = new_max
        out = acc / tl.maximum(run_sum, 1e-30)[:, None]   # a row the mask shuts entirely gets zeros, not NaN
        tl.store(out_ptr + row * o_b + heads[:, None] * o_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=in_group[:, None])


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of one new token per row: ``query`` [B, H, 1, D] against ``key``/``value`` [B, KV, N, D] (H a
    multiple of KV), ``mask`` None or [B, 1, 1, N] (True or nonzero where a position may be attended). Returns
    [B, H, 1, D] in the query's dtype, what SDPA returns for the same inputs."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads % kv_heads or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"decode_attention: one query position and H a multiple of KV with contiguous head "
                         f"dims, got query {tuple(query.shape)}, key {tuple(key.shape)}")
    return torch.ops.prunekit.decode_attention(query, key, value, mask, float(scale))


# A custom op, so that a compiled decode step (torch.compile, CUDA graphs) calls the kernel as it is: inductor's own
# handling of a Triton kernel it finds inside a graph failed to compile this one on the H200 (session 19).
@torch.library.custom_op("prunekit::decode_attention", mutates_args=())
def _decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float) -> torch.Tensor:
    batch, heads, _, head_dim = query.shape
    kv_heads, n_cache = key.shape[1], key.shape[2]
    group = heads // kv_heads
    query = query.contiguous()
    out = torch.empty_like(query)
    if mask is not None:   # [B or 1, 1, 1, N]: one row of positions per batch row
        mask = mask.expand(batch, 1, 1, n_cache).reshape(batch, n_cache)
        if mask.is_floating_point():   # an additive mask: 0 where a position may be attended
            mask = mask == 0
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
    _decode_kernel[(batch * kv_heads,)](
        query, key, value, mask if mask is not None else query, out, n_cache, scale,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), mask.stride(0) if mask is not None else 0,
        out.stride(0), out.stride(1),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK=BLOCK_N, HAS_MASK=mask is not None, FLOOR=_FLOOR, num_warps=4)
    return out


@_decode_attention_op.register_fake
def _(query, key, value, mask, scale):
    return query.new_empty(query.shape)
