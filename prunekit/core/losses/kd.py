"""Distillation: generalized Jensen-Shannon divergence between student and teacher (TRL GKD convention), from
logits or, fused with both LM heads, from final hidden states."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunekit.core.losses.ce import IGNORE_INDEX, FusedLinearLoss, compiled_on_gpu, minus_onehot, supervised_rows
from prunekit.core.losses.registry import register_loss


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
    grad = sft_alpha * minus_onehot(torch.exp(z - lse[:, None]), target)
    if idx is not None:
        grad = grad.scatter_add(-1, idx, g_s)
    else:
        grad = torch.cat([grad[:, :vocab] + g_s, grad[:, vocab:]], dim=-1)
    return kd + sft_alpha * ce, grad.to(s_logits.dtype), kd, ce, (z.argmax(-1) == target).sum()


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

    rows, _ = supervised_rows(labels, ignore_index)
    # Views, not copies: [B*S, V] with the padded vocab tail sliced off.
    student = student_logits.reshape(-1, student_logits.shape[-1])[:, :vocab]
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :vocab]
    n_tokens = torch.full((), len(rows), dtype=torch.long, device=student_logits.device)
    chunk = chunk_size or max(len(rows), 1)

    def fn(s, t):
        return _gjsd_rows(s, t, beta, temperature, top_k)

    if torch.is_grad_enabled() and student.requires_grad:
        return _ChunkedRowLoss.apply(student, teacher, rows, chunk, fn), n_tokens
    total = torch.zeros((), dtype=torch.float32, device=student.device)
    for r in rows.split(chunk):
        total += fn(student[r], teacher[r])
    return total, n_tokens


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
    rows, target = supervised_rows(labels, ignore_index)
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])[rows]
    with torch.no_grad():  # teacher logits: one chunk at a time too, never all rows
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows]
    w_t = teacher_head.detach()

    def kd_rows(s_logits, h_t_c, t_c):
        t_logits = (h_t_c @ w_t.T)[:, :vocab]
        kd_ce_rows = compiled_on_gpu(_kd_ce_rows, s_logits.is_cuda)
        return kd_ce_rows(s_logits, t_logits, t_c, beta, temperature, top_k, sft_alpha)

    n_tokens = torch.full((), len(rows), dtype=torch.long, device=student_hidden.device)
    if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
        loss, kd, ce, correct = FusedLinearLoss.apply(h_s, student_head, h_t, target, chunk_size, kd_rows)
        return loss, kd, ce, n_tokens, correct
    loss = kd = ce = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=student_hidden.device)
    for h_c, ht_c, t_c in zip(h_s.split(chunk_size), h_t.split(chunk_size), target.split(chunk_size)):
        l_c, _, k_c, c_c, n_c = kd_rows(h_c @ student_head.T, ht_c, t_c)
        loss, kd, ce, correct = loss + l_c, kd + k_c, ce + c_c, correct + n_c
    return loss, kd, ce, n_tokens, correct


def hidden_state_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], labels: torch.Tensor,
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Intermediate-layer distillation: each student layer's output ``[B, S, H]`` against the teacher hidden state
    it stands for, at the positions the KD loss supervises: 1 - cosine similarity per token (DistilBERT's hidden-state
    loss), averaged over the layer pairs; returns the sum over tokens, like every loss here. Direction, not norm:
    every sublayer reads the residual stream through an RMSNorm, and a squared error relative to the teacher's norm
    is dominated by the few tokens where a cut model grows an attention-sink activation (norms of ~26k against ~100
    in SmolLM2) that the teacher has elsewhere (bench/README.md)."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"{len(student)} student and {len(teacher)} teacher hidden states: give one pair per layer")
    supervised = labels[:, 1:] != ignore_index   # a mask, not indexes: no GPU sync for nonzero()
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher):
        cos = F.cosine_similarity(s[:, :-1].float(), t[:, :-1].float().detach(), dim=-1)
        total = total + ((1 - cos) * supervised).sum()
    return total / len(student)
