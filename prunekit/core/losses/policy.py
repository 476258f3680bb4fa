"""RL policy losses (veRL style): `@register_policy_loss(name)` functions that RLObjective looks up by the
algorithm's name, the loss aggregations (`aggregate(mode)`) and the k3 KL estimator."""
from __future__ import annotations

from typing import Callable

import torch

from prunekit.core.losses.registry import Registry

POLICY_LOSSES = Registry("policy loss")
AGGREGATIONS = Registry("aggregation")


def register_policy_loss(name: str) -> Callable[[Callable], Callable]:
    """Decorator: a policy loss RL configs can name (``algorithm.name``). It is called as
    ``fn(logp, old_logp, advantages, mask, *, eps, eps_high, aggregation, ref_logp, kl_beta)`` and returns
    ``(loss_sum, stats)`` like :func:`policy_loss`."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    """The registered policy loss ``name``; unknown names give a one-line error listing the known ones."""
    return POLICY_LOSSES.lookup(name)


def register_aggregation(name: str) -> Callable[[type], type]:
    """Decorator: an aggregation RL configs can name (``algorithm.aggregation``): a class with static
    ``loss_sum(masked_token_loss [B, T], lengths [B]) -> tensor`` and ``normaliser(lengths: list[int], max_len)
    -> float``; the loss is the sum over micro-batches and ranks of the first over the same sum of the second."""
    return AGGREGATIONS.register(name)


def aggregate(mode: str):
    """The aggregation ``mode`` (``grpo``, ``dapo``, ``dr_grpo``); unknown modes give a one-line error."""
    return AGGREGATIONS.lookup(mode)


def _responses(lengths: list[int]) -> int:
    return sum(1 for n in lengths if n)


@register_aggregation("grpo")
class ResponseMean:
    """Each response weighs the same whatever its length: the mean over responses of the per-response token mean."""

    @staticmethod
    def loss_sum(masked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return (masked.sum(1) / lengths.clamp(min=1)).sum()

    @staticmethod
    def normaliser(lengths: list[int], max_len: int) -> float:
        return float(_responses(lengths))


@register_aggregation("dapo")
class TokenMean:
    """Each token weighs the same (DAPO): the mean over all response tokens."""

    @staticmethod
    def loss_sum(masked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return masked.sum()

    @staticmethod
    def normaliser(lengths: list[int], max_len: int) -> float:
        return float(sum(lengths))


@register_aggregation("dr_grpo")
class TokenSumOverMaxLen(TokenMean):
    """Dr. GRPO: the token sum over a constant, responses * max_len, so neither length nor group size biases it."""

    @staticmethod
    def normaliser(lengths: list[int], max_len: int) -> float:
        return float(_responses(lengths) * max_len)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference) from sampled tokens' log-probs: exp(d) - d - 1 with
    d = ref_logp - logp; unbiased and never negative (Schulman's "Approximating KL divergence")."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        aggregation: an :func:`aggregate` mode: ``grpo``: mean over responses of the per-response token mean;
            ``dapo``: mean over all tokens; ``dr_grpo``: token sum / (responses * max_len).
        ref_logp, kl_beta: adds ``kl_beta`` * :func:`k3_kl` (policy || reference) per token when both are given.

    Returns:
        ``(loss_sum, stats)``: the loss is ``loss_sum / aggregate(aggregation).normaliser(...)``, the normaliser
        summed over micro-batches and ranks first (the caller counts it on the host). ``stats`` holds detached
        sums: ``clipped`` and ``clip_count`` (tokens for GRPO, responses for GSPO), ``kl_sum``, ``n_tokens``,
        ``ratio_sum``.
    """
    agg = aggregate(aggregation)
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
        kl = k3_kl(logp * mask, ref_logp * mask) * mask
        token_loss = token_loss + kl_beta * kl
        kl_sum = kl.detach().sum()
    loss_sum = agg.loss_sum(token_loss * mask, lengths)
    stats = {"clipped": is_clipped.detach(), "clip_count": clip_count.detach(), "kl_sum": kl_sum,
             "n_tokens": lengths.sum().detach(), "ratio_sum": ratio_sum}
    return loss_sum, stats


@register_policy_loss("grpo")
def grpo_loss(logp, old_logp, advantages, mask, eps: float = 0.2, eps_high: float | None = None, **kw):
    """GRPO: token-level clipped ratio (see :func:`policy_loss`)."""
    return policy_loss(logp, old_logp, advantages, mask, level="token", eps=eps, eps_high=eps_high, **kw)


@register_policy_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, eps: float = 3e-4, eps_high: float | None = 4e-4, **kw):
    """GSPO: sequence-level, length-normalised ratio clipped to [1 - 3e-4, 1 + 4e-4] by default."""
    return policy_loss(logp, old_logp, advantages, mask, level="sequence", eps=eps, eps_high=eps_high, **kw)
