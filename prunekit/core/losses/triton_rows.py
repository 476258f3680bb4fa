"""The cross-entropy row loss as one Triton kernel: per row of ``[N, V]`` logits, the logsumexp, the target's loss,
the token hit and the gradient ``softmax - onehot`` in two passes over the row, the gradient written over the logits.

Why: in train_throughput's profile (Qwen2.5-0.5B shape, 16,384 tokens x 151,936 vocab) inductor's reduction over the
logits took 8.7 of the step's 128 ms, reading them at ~0.6 TB/s, and the gradient took another pass. Two reads and
one write of the bf16 logits are ~15 GB at that shape: a few ms at the H200's bandwidth. It is the same function as
``prunekit.core.losses.ce._ce_rows`` (same loss, gradient, hit rule: a tie with the row max counts as a hit) and
runs where Triton does (``prunekit.core.triton_support``).
"""
from __future__ import annotations

import torch

from prunekit.core.triton_support import tl, triton

BLOCK = 4096      # logits per program step: a row of 151,936 takes 38 steps a pass
NUM_WARPS = 8
_FLOOR = -1.0e30  # the running max starts here, not at -inf: exp(-inf - -inf) would be NaN in lanes past the row end


if triton is not None:
    @triton.jit
    def _ce_rows_kernel(x_ptr, target_ptr, loss_ptr, hit_ptr, n_cols, row_stride,
                        BLOCK: tl.constexpr, FLOOR: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * row_stride
        target = tl.load(target_ptr + row)
        # pass 1: the running max and sum of exp per lane (online softmax), then folded across lanes
        run_max = tl.full([BLOCK], FLOOR, tl.float32)
        run_sum = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(x - new_max)
            run_max = new_max
        row_max = tl.max(run_max, 0)
        lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), 0))
        picked = tl.load(x_row + target).to(tl.float32)
        tl.store(loss_ptr + row, lse - picked)
        tl.store(hit_ptr + row, (picked >= row_max).to(tl.int32))
        # pass 2: softmax - onehot, over the logits (each element read, then written, by this program alone)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - (cols == target).to(tl.float32)
            tl.store(x_row + cols, grad.to(x_ptr.dtype.element_ty), mask=inside)


def ce_rows_triton(logits: torch.Tensor, _extra, target: torch.Tensor):
    """``_ce_rows`` in one kernel: (summed cross-entropy, d loss / d logits in the logits' dtype, token hits). The
    gradient is written over ``logits`` (a temporary of the fused linear loss), so no second [N, V] buffer."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got shape {tuple(logits.shape)}")
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    hits = torch.empty(rows, dtype=torch.int32, device=logits.device)
    if rows:
        _ce_rows_kernel[(rows,)](logits, target.contiguous(), loss, hits, vocab, logits.stride(0),
                                 BLOCK=BLOCK, FLOOR=_FLOOR, num_warps=NUM_WARPS)
    return loss.sum(), logits, hits.sum(dtype=torch.long)
