"""Next-token cross-entropy, plain and fused with the LM head (chunked: no full [B, S, V] logits), and the
fused-linear-loss machinery the distillation loss shares."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from prunekit.core.losses.registry import register_loss

IGNORE_INDEX = -100


HOST_COPY = "host_copy"   # attribute of a device labels tensor: the same labels on the host (engine.loop._to)


def supervised_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices (into a ``[B*S, ...]`` view) of positions whose *next* label is supervised,
    and those next labels. Labels on a GPU that carry their host copy (``HOST_COPY``) are searched on the host and
    the result copied over without waiting: ``nonzero()`` on the GPU makes the host wait for every kernel queued
    before it (both models' forwards), so the loss, backward and optimizer launches could not run ahead."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    b, s = labels.shape
    host = getattr(labels, HOST_COPY, None)
    target = (labels if host is None else host)[:, 1:]
    pos = (target != ignore_index).nonzero()  # [N, 2] of (batch, t) with t in [0, s-1)
    rows, target = pos[:, 0] * s + pos[:, 1], target[pos[:, 0], pos[:, 1]]
    if host is not None and labels.device.type == "cuda":
        rows, target = (t.pin_memory().to(labels.device, non_blocking=True) for t in (rows, target))
    return rows, target


@register_loss("causal_lm")
def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over supervised tokens.

    Args:
        logits: ``[B, S, V]`` (any float dtype; the loss is computed in float32).
        labels: ``[B, S]`` token ids, ``ignore_index`` where unsupervised.

    Returns:
        ``(loss_sum, n_tokens, n_correct)``: float32 scalar summed over supervised tokens, and
        0-dim int64 tensors. ``n_correct / n_tokens`` is ms-swift's ``token_acc`` (argmax of the
        shifted logits equals the label).
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    rows, target = supervised_rows(labels, ignore_index)
    # Gather supervised rows first: unsupervised positions never get upcast to float32.
    sel = logits.reshape(-1, logits.shape[-1])[rows].float()
    loss_sum = F.cross_entropy(sel, target, reduction="sum")
    n_correct = (sel.detach().argmax(-1) == target).sum()
    return loss_sum, torch.full((), len(rows), dtype=torch.long, device=logits.device), n_correct


@register_loss("chunked_causal_lm")
def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
    row_loss: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`causal_lm_loss` computed from final hidden states and the lm_head weight.

    Logits are only ever built for ``chunk_size`` supervised positions at a time, and the gradient
    is formed chunk by chunk during forward (:class:`FusedLinearLoss`), so neither pass holds the
    full ``[B, S, V]`` logits and backward recomputes nothing. Assumes ``logits = hidden @ lm_head_weight.T`` (no
    bias, no softcapping).

    Args:
        hidden: ``[B, S, H]`` final (post-norm) hidden states.
        lm_head_weight: ``[V, H]``.
        labels: ``[B, S]``.
        row_loss: how a chunk's rows are reduced in training: ``compiled`` (torch.compile on GPU, eager elsewhere),
            ``triton`` (one kernel, ``prunekit.core.losses.triton_rows``; CUDA only) or ``auto``: ``triton`` on
            CUDA where Triton is installed, else ``compiled``.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    rows, target = supervised_rows(labels, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    n_tokens = torch.full((), len(rows), dtype=torch.long, device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
        loss_sum, n_correct = FusedLinearLoss.apply(h, lm_head_weight, None, target, chunk_size,
                                                     ce_row_loss(row_loss, h.device))
        return loss_sum, n_tokens, n_correct
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    n_correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for h_c, t_c in zip(h.split(chunk_size), target.split(chunk_size)):
        logits = (h_c @ lm_head_weight.T).float()
        l_c, c_c = F.cross_entropy(logits, t_c, reduction="sum"), (logits.argmax(-1) == t_c).sum()
        loss_sum, n_correct = loss_sum + l_c, n_correct + c_c
    return loss_sum, n_tokens, n_correct


def _ce_rows(logits: torch.Tensor, _extra, target: torch.Tensor):
    """Summed cross-entropy of ``[N, V]`` logit rows, its gradient w.r.t. the logits (in the logits' dtype) and
    the number of argmax hits (training's token_acc), from closed forms (softmax - onehot) rather than autograd."""
    x = logits.float()
    picked = x.gather(-1, target[:, None]).squeeze(-1)
    if torch.compiler.is_compiling():  # GPU: inductor fuses these into a few passes that write the gradient once
        lse = torch.logsumexp(x, dim=-1)
        probs = torch.exp(x - lse[:, None])
        # a hit when the target's logit is the row max: a plain max shares the logsumexp's pass, an argmax does not
        # (2.7 of 29.4 ms at 16k tokens x 152k vocab, bench/results/loss_kernels.json); a tie counts as a hit
        hits = (picked >= x.amax(-1)).sum()
    else:  # eager (CPU): few passes; one max gives the argmax too
        peak, best = x.max(-1)
        probs = torch.exp(x - peak[:, None])
        total = probs.sum(-1)
        lse = peak + total.log()
        probs.div_(total[:, None])
        hits = (best == target).sum()
    return (lse - picked).sum(), minus_onehot(probs, target).to(logits.dtype), hits


ROW_LOSSES = ("auto", "compiled", "triton")


def ce_row_loss(name: str, device: torch.device) -> Callable:
    """The cross-entropy row loss called ``name`` (ROW_LOSSES) for rows on ``device``. ``auto`` takes the Triton
    kernel on CUDA: on one H200 it made train_throughput's step 2% faster and its peak 4.7 GB smaller than the
    compiled rows (bench/results/train_throughput.json)."""
    if name == "auto":
        from prunekit.core.triton_support import default_on
        name = "triton" if default_on(device) else "compiled"
    if name == "compiled":
        return compiled_on_gpu(_ce_rows, device.type == "cuda")
    if name == "triton":
        from prunekit.core.losses.triton_rows import ce_rows_triton
        from prunekit.core.triton_support import unavailable
        if unavailable(device):
            raise ValueError(f"row_loss triton: {unavailable(device)}")
        return ce_rows_triton
    raise ValueError(f"row_loss: expected one of {', '.join(ROW_LOSSES)}, got {name!r}")


def minus_onehot(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``probs - one_hot(target)``: fused into its producer when compiled (an in-place scatter there keeps an extra
    float32 [N, V] buffer: bench/README.md, "Measured on the way"), in place when eager."""
    if torch.compiler.is_compiling():
        return probs - F.one_hot(target, probs.shape[-1]).to(probs.dtype)
    probs[torch.arange(len(target), device=probs.device), target] -= 1
    return probs


_COMPILED: dict = {}


def compiled_on_gpu(fn: Callable, on_gpu: bool) -> Callable:
    """``fn`` torch.compile'd on GPU: the half-dozen elementwise passes over [rows, vocab] of a row loss fuse into
    a few kernels (they dominate the loss otherwise). Eager elsewhere."""
    if not on_gpu:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class FusedLinearLoss(torch.autograd.Function):
    """sum over row chunks of `row_loss(h_c @ W.T, extra_c, target_c)`, with d/dh and d/dW computed chunk by chunk
    inside forward (the fused linear-loss trick): no B*S*V logits are kept, and nothing is recomputed in backward.
    `row_loss` returns (loss, d loss / d logits, *detached extras). Only the gradients autograd asks for are formed:
    a frozen head (LoRA) gets no d/dW, which would cost a [V, H] float32 sum and a matmul as large as the head's."""

    @staticmethod
    def forward(ctx, h, weight, extra, target, chunk_size, row_loss):
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(h) if want_h else None
        # several chunks' weight gradients are summed in float32; a single chunk's is used as it comes
        single = len(h) <= chunk_size
        grad_w = torch.zeros_like(weight, dtype=weight.dtype if single else torch.float32) if want_w else None
        total, parts = torch.zeros((), dtype=torch.float32, device=h.device), None
        extras = extra.split(chunk_size) if extra is not None else [None] * len(range(0, len(h), chunk_size))
        for h_c, e_c, t_c, start in zip(h.split(chunk_size), extras, target.split(chunk_size),
                                        range(0, len(h), chunk_size)):
            loss, g, *rest = row_loss(h_c @ weight.T, e_c, t_c)
            g = g.to(h.dtype)
            if want_h:
                grad_h[start:start + len(h_c)] = g @ weight
            if want_w and single:
                grad_w = g.T @ h_c
            elif want_w:
                grad_w += (g.T @ h_c).float()
            total += loss.detach()
            parts = rest if parts is None else [p + r for p, r in zip(parts, rest)]
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        ctx.mark_non_differentiable(*parts)
        return (total, *parts)

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_h, grad_w = (None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors)
        return grad_h, grad_w, None, None, None, None
