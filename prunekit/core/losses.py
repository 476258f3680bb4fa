"""Training losses as pure torch functions.

Every loss returns *sums* (plus token counts) rather than means, so that callers can
weight correctly by tokens across micro-batches and data-parallel ranks:
``mean = all_reduce(loss_sum) / all_reduce(n_tokens)``.

Label convention (HF / ms-swift): ``labels`` has the shape of ``input_ids``; ``-100``
marks tokens that are not supervised, and the logits at position ``t`` predict
``labels[t + 1]`` (the shift is done here, not by the caller).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

LOSSES: dict[str, Callable] = {}


def register_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a loss function available as ``get_loss(name)``."""

    def deco(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> Callable:
    """Return the registered loss ``name``; unknown names give a one-line error."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}") from None


def _supervised_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices (into a ``[B*S, ...]`` view) of positions whose *next* label is supervised,
    and those next labels."""
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, seq], got shape {tuple(labels.shape)}")
    b, s = labels.shape
    target = labels[:, 1:]
    pos = (target != ignore_index).nonzero()  # [N, 2] of (batch, t) with t in [0, s-1)
    return pos[:, 0] * s + pos[:, 1], target[pos[:, 0], pos[:, 1]]


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
    rows, target = _supervised_rows(labels, ignore_index)
    # Gather supervised rows first: unsupervised positions never get upcast to float32.
    sel = logits.reshape(-1, logits.shape[-1])[rows].float()
    loss_sum = F.cross_entropy(sel, target, reduction="sum")
    n_correct = (sel.detach().argmax(-1) == target).sum()
    return loss_sum, torch.tensor(len(rows), device=logits.device), n_correct


@register_loss("chunked_causal_lm")
def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`causal_lm_loss` computed from final hidden states and the lm_head weight.

    Logits are only ever built for ``chunk_size`` supervised positions at a time, and the gradient
    is formed chunk by chunk during forward (:class:`_FusedLinearLoss`), so neither pass holds the
    full ``[B, S, V]`` logits and backward recomputes nothing. Assumes ``logits = hidden @ lm_head_weight.T`` (no bias, no softcapping).

    Args:
        hidden: ``[B, S, H]`` final (post-norm) hidden states.
        lm_head_weight: ``[V, H]``.
        labels: ``[B, S]``.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree on [batch, seq]")
    rows, target = _supervised_rows(labels, ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])[rows]
    n_tokens = torch.tensor(len(rows), device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad):
        loss_sum, n_correct = _FusedLinearLoss.apply(h, lm_head_weight, None, target, chunk_size,
                                                     _fast(_ce_rows, h.is_cuda))
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
    the number of argmax hits, from closed forms (softmax - onehot) rather than autograd."""
    x = logits.float()
    if torch.compiler.is_compiling():  # GPU: inductor fuses these into a few passes that write the gradient once
        lse, best = torch.logsumexp(x, dim=-1), x.argmax(-1)
        probs = torch.exp(x - lse[:, None])
    else:  # eager (CPU): few passes; one max gives the argmax too
        peak, best = x.max(-1)
        probs = torch.exp(x - peak[:, None])
        total = probs.sum(-1)
        lse = peak + total.log()
        probs.div_(total[:, None])
    picked = x.gather(-1, target[:, None]).squeeze(-1)
    return (lse - picked).sum(), _minus_onehot(probs, target).to(logits.dtype), (best == target).sum()


def _minus_onehot(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``probs - one_hot(target)``: fused into its producer when compiled (an in-place scatter there keeps a
    float32 [N, V] buffer: the Qwen2.5-0.5B bench step peaked at 39 GB instead of 29), in place when eager."""
    if torch.compiler.is_compiling():
        return probs - F.one_hot(target, probs.shape[-1]).to(probs.dtype)
    probs[torch.arange(len(target), device=probs.device), target] -= 1
    return probs


def _gjsd_rows(s: torch.Tensor, t: torch.Tensor, beta: float, temperature: float, top_k: int | None) -> torch.Tensor:
    """Summed generalized JSD for ``[N, V]`` student/teacher logit rows (same V), in float32."""
    s = s.float() / temperature
    t = t.float() / temperature
    if top_k is not None:
        # Teacher's top-k support; both distributions are renormalised over it by the log_softmax.
        t, idx = t.topk(top_k, dim=-1)
        s = s.gather(-1, idx)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    # F.kl_div(input=log q, target=log p, log_target=True) is KL(p || q): same calls as TRL's GKDTrainer.
    if beta == 0:
        return F.kl_div(ls, lt, reduction="sum", log_target=True)
    if beta == 1:
        return F.kl_div(lt, ls, reduction="sum", log_target=True)
    lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))  # log of the mixture, one fused kernel
    return beta * F.kl_div(lm, lt, reduction="sum", log_target=True) + (1 - beta) * F.kl_div(
        lm, ls, reduction="sum", log_target=True
    )


def _kd_ce_rows(s_logits, t_logits, target, beta: float, temperature: float, top_k, sft_alpha: float):
    """KD rows in closed form (no autograd): ``(kd + sft_alpha * ce, d/d s_logits, kd, ce, argmax hits)`` for
    student logits ``[N, Vs]`` and teacher logits ``[N, V]`` (V <= Vs; the student's padded tail gets no KD).

    With s = z / T and g = dL/d log p_s, the softmax chain rule gives dL/dz = p_s * (g - sum(p_s * g)) / T, where
    g = (1 - beta) * (log p_s - log m) for the mixture m = beta p_t + (1 - beta) p_s (the beta * p_t * log m
    terms cancel), g = log p_s - log p_t for beta = 1, and dL/dz = (p_s - p_t) / T for beta = 0 (forward KL)."""
    z = s_logits.float()
    vocab = t_logits.shape[-1]
    s, t = z[:, :vocab] / temperature, t_logits.float() / temperature
    idx = None
    if top_k is not None:  # the teacher's top-k support; both renormalised over it
        t, idx = t.topk(top_k, dim=-1)
        s = s.gather(-1, idx)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0:
        kd = (pt * (lt - ls)).sum()
        g_s = ps - pt
    else:
        if beta == 1:
            d, coef, kd = ls - lt, 1.0, None
        else:
            lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
            d, coef = ls - lm, 1 - beta
            kd = beta * (pt * (lt - lm)).sum()
        kd_s = (ps * d).sum()
        kd = kd_s if kd is None else kd + (1 - beta) * kd_s
        g_s = coef * ps * (d - (ps * d).sum(-1, keepdim=True))
    g_s = g_s / temperature
    lse = torch.logsumexp(z, dim=-1)
    ce = (lse - z.gather(-1, target[:, None]).squeeze(-1)).sum()
    grad = sft_alpha * _minus_onehot(torch.exp(z - lse[:, None]), target)
    if idx is not None:
        grad = grad.scatter_add(-1, idx, g_s)
    else:
        grad = torch.cat([grad[:, :vocab] + g_s, grad[:, vocab:]], dim=-1)
    return kd + sft_alpha * ce, grad.to(s_logits.dtype), kd, ce, (z.argmax(-1) == target).sum()


_COMPILED: dict = {}


def _fast(fn: Callable, on_gpu: bool) -> Callable:
    """``fn`` torch.compile'd on GPU: the half-dozen elementwise passes over [rows, vocab] of a row loss fuse into
    a few kernels (they dominate the loss otherwise). Eager elsewhere."""
    if not on_gpu:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class _ChunkedRowLoss(torch.autograd.Function):
    """Sum of ``fn(student[rows_c], teacher[rows_c])`` over row chunks, with the gradient w.r.t.
    ``student`` computed chunk by chunk during forward (the fused-loss trick): only one chunk's
    float32 intermediates are alive at a time, plus one gradient buffer the size of ``student``."""

    @staticmethod
    def forward(ctx, student, teacher, rows, chunk_size, fn):
        grad = torch.zeros_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for r in rows.split(chunk_size):
            with torch.enable_grad():
                s = student[r].detach().requires_grad_()
                loss = fn(s, teacher[r])
                (g,) = torch.autograd.grad(loss, s)
            grad[r] = g.to(grad.dtype)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None, None, None


@register_loss("generalized_jsd")
def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Jensen-Shannon divergence for distillation (TRL ``GKDTrainer`` convention).

    With ``p_s``/``p_t`` the student/teacher distributions at temperature ``temperature``:
    ``beta=0`` is forward KL(p_t || p_s), ``beta=1`` reverse KL(p_s || p_t), and otherwise
    ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``.

    Only supervised positions count, with the causal shift (logits at ``t`` vs ``labels[t+1]``).
    ``top_k`` keeps, per position, the teacher's top-k logits and the student's logits at the
    same indices, and renormalises both over those k. Vocab sizes may differ (padded embedding
    rows): both are truncated to ``min(Vs, Vt)``; the caller must check the tokenizers match.

    Work is done ``chunk_size`` supervised rows at a time (all at once if None), so the float32
    probability tensors of both models are never alive for the whole batch; the teacher gets no
    gradient. Returns ``(loss_sum, n_tokens)``: a float32 scalar summed over supervised positions
    and a 0-dim int64 tensor.
    """
    if student_logits.shape[:2] != labels.shape or teacher_logits.shape[:2] != labels.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and labels "
            f"{tuple(labels.shape)} disagree on [batch, seq]"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if top_k is not None and not 0 < top_k <= vocab:
        raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")

    rows, _ = _supervised_rows(labels, ignore_index)
    # Views, not copies: [B*S, V] with the padded vocab tail sliced off.
    student = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab]
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab]
    n_tokens = torch.tensor(len(rows), device=student_logits.device)
    chunk = chunk_size or max(len(rows), 1)

    def fn(s, t):
        return _gjsd_rows(s, t, beta, temperature, top_k)

    if torch.is_grad_enabled() and student.requires_grad:
        return _ChunkedRowLoss.apply(student, teacher, rows, chunk, fn), n_tokens
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for r in rows.split(chunk):
        total += fn(student[r], teacher[r])
    return total, n_tokens


class _FusedLinearLoss(torch.autograd.Function):
    """sum over row chunks of `row_loss(h_c @ W.T, extra_c, target_c)`, with d/dh and d/dW computed chunk by chunk
    inside forward (the fused linear-loss trick): no B*S*V logits are kept, and nothing is recomputed in backward.
    `row_loss` returns (loss, d loss / d logits, *detached extras)."""

    @staticmethod
    def forward(ctx, h, weight, extra, target, chunk_size, row_loss):
        grad_h = torch.zeros_like(h)
        # several chunks' weight gradients are summed in float32; a single chunk's is used as it comes
        single = len(h) <= chunk_size
        grad_w = torch.zeros_like(weight, dtype=weight.dtype if single else torch.float32)
        total, parts = torch.zeros((), dtype=torch.float32, device=h.device), None
        extras = extra.split(chunk_size) if extra is not None else [None] * len(range(0, len(h), chunk_size))
        for h_c, e_c, t_c, start in zip(h.split(chunk_size), extras, target.split(chunk_size),
                                        range(0, len(h), chunk_size)):
            loss, g, *rest = row_loss(h_c @ weight.T, e_c, t_c)
            g = g.to(h.dtype)
            grad_h[start:start + len(h_c)] = g @ weight
            if single:
                grad_w = g.T @ h_c
            else:
                grad_w += (g.T @ h_c).float()
            total += loss.detach()
            parts = rest if parts is None else [p + r for p, r in zip(parts, rest)]
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(*parts)
        return (total, *parts)

    @staticmethod
    def backward(ctx, grad_total, *_):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype), None, None, None, None


@register_loss("chunked_generalized_jsd")
def chunked_generalized_jsd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    chunk_size: int = 1024,
    sft_alpha: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`generalized_jsd_loss` + ``sft_alpha`` * the student's cross-entropy, from final hidden states and
    lm_head weights: both models' logits exist only ``chunk_size`` supervised rows at a time, and the student's
    gradient is formed chunk by chunk in forward. Returns ``(loss_sum, kd_sum, ce_sum, n_tokens, n_correct)``
    where loss_sum = kd_sum + sft_alpha * ce_sum is the differentiable one."""
    rows, target = _supervised_rows(labels, ignore_index)
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[rows]
    with torch.no_grad():  # teacher logits: one chunk at a time too, never all rows
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows]
    w_t = teacher_head.detach()

    def kd_rows(s_logits, h_t_c, t_c):
        t_logits = (h_t_c @ w_t.T)[:, :vocab]
        return _fast(_kd_ce_rows, s_logits.is_cuda)(s_logits, t_logits, t_c, beta, temperature, top_k, sft_alpha)

    n_tokens = torch.tensor(len(rows), device=student_hidden.device)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        loss, kd, ce, correct = _FusedLinearLoss.apply(h_s, student_head, h_t, target, chunk_size, kd_rows)
        return loss, kd, ce, n_tokens, correct
    loss = kd = ce = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    for h_c, ht_c, t_c in zip(h_s.split(chunk_size), h_t.split(chunk_size), target.split(chunk_size)):
        l_c, _, k_c, c_c, n_c = kd_rows(h_c @ student_head.T, ht_c, t_c)
        loss, kd, ce, correct = loss + l_c, kd + k_c, ce + c_c, correct + n_c
    return loss, kd, ce, n_tokens, correct


# ---- RL policy losses (GRPO, GSPO) --------------------------------------------------------------------------------

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def aggregation_normaliser(lengths, aggregation: str, max_len: int) -> float:
    """What the policy loss sum is divided by, from the response lengths (host ints: no device sync): responses
    with tokens (``grpo``), tokens (``dapo``), responses with tokens * ``max_len`` (``dr_grpo``). Callers sum it
    over micro-batches and ranks, like the loss sum."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    lengths = [int(n) for n in lengths]
    if aggregation == "dapo":
        return float(sum(lengths))
    n = sum(1 for x in lengths if x)
    return float(n * max_len) if aggregation == "dr_grpo" else float(n)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    eps: float = 0.2,
    eps_high: float | None = None,
    aggregation: str = "grpo",
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of GRPO (``level="token"``) or GSPO (``level="sequence"``) as a sum.

    Args:
        logp, old_logp: ``[B, T]`` log-probabilities of the sampled response tokens under the current policy and
            the policy that generated them (positions where ``mask`` is 0 are ignored).
        advantages: ``[B]`` one advantage per response.
        mask: ``[B, T]`` 1 on response tokens.
        level: ``token``: ratio r_t = exp(logp_t - old_logp_t) clipped per token (GRPO/PPO).
            ``sequence``: s = exp(mean_t(logp_t - old_logp_t)), the length-normalised sequence ratio, clipped per
            response (GSPO); every token of a response then carries its response's loss.
        eps, eps_high: the ratio is clipped to [1 - eps, 1 + eps_high] (eps_high defaults to eps).
        aggregation: ``grpo``: mean over responses of the per-response token mean; ``dapo``: mean over all tokens;
            ``dr_grpo``: token sum / (responses * max_len) (a constant normaliser).
        ref_logp, kl_beta: adds ``kl_beta`` * k3-KL(policy || reference) per token when both are given.

    Returns:
        ``(loss_sum, stats)``: the loss is ``loss_sum / aggregation_normaliser(...)``, the normaliser summed over
        micro-batches and ranks first (the caller counts it on the host). ``stats`` holds detached sums:
        ``clipped`` and ``clip_count`` (tokens for GRPO, responses for GSPO), ``kl_sum``, ``n_tokens``,
        ``ratio_sum``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    eps_high = eps if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype)
    lengths = mask.sum(1)
    log_ratio = (logp - old_logp) * mask
    if level == "token":
        ratio = torch.exp(log_ratio)
        unclipped = -adv[:, None] * ratio
        clipped = -adv[:, None] * ratio.clamp(1 - eps, 1 + eps_high)
        token_loss = torch.maximum(unclipped, clipped)
        is_clipped = ((clipped > unclipped).to(logp.dtype) * mask).sum()
        clip_count = lengths.sum()
        ratio_sum = (ratio.detach() * mask).sum()
    else:
        seq_ratio = torch.exp(log_ratio.sum(1) / lengths.clamp(min=1))
        unclipped = -adv * seq_ratio
        clipped = -adv * seq_ratio.clamp(1 - eps, 1 + eps_high)
        seq_loss = torch.maximum(unclipped, clipped)
        token_loss = seq_loss[:, None].expand_as(mask)
        has_tokens = (lengths > 0).to(logp.dtype)
        is_clipped = ((clipped > unclipped).to(logp.dtype) * has_tokens).sum()
        clip_count = has_tokens.sum()
        ratio_sum = (seq_ratio.detach() * has_tokens).sum()
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and kl_beta:
        delta = (ref_logp - logp) * mask
        kl = (torch.exp(delta) - delta - 1) * mask  # k3 estimator: unbiased, always >= 0
        token_loss = token_loss + kl_beta * kl
        kl_sum = kl.detach().sum()
    masked = token_loss * mask
    if aggregation == "grpo":  # each response weighs the same, whatever its length
        loss_sum = (masked.sum(1) / lengths.clamp(min=1)).sum()
    else:  # dapo, dr_grpo: each token weighs the same; they differ only in the normaliser
        loss_sum = masked.sum()
    stats = {"clipped": is_clipped.detach(), "clip_count": clip_count.detach(), "kl_sum": kl_sum,
             "n_tokens": lengths.sum().detach(), "ratio_sum": ratio_sum}
    return loss_sum, stats


@register_loss("grpo")
def grpo_loss(logp, old_logp, advantages, mask, eps: float = 0.2, eps_high: float | None = None, **kw):
    """GRPO: token-level clipped ratio (see :func:`policy_loss`)."""
    return policy_loss(logp, old_logp, advantages, mask, level="token", eps=eps, eps_high=eps_high, **kw)


@register_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, eps: float = 3e-4, eps_high: float | None = 4e-4, **kw):
    """GSPO: sequence-level, length-normalised ratio clipped to [1 - 3e-4, 1 + 4e-4] by default."""
    return policy_loss(logp, old_logp, advantages, mask, level="sequence", eps=eps, eps_high=eps_high, **kw)

