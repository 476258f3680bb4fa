"""GRPO / GSPO policy losses and their registries against hand-computed values (pure torch, no Ray)."""
from __future__ import annotations

import math

import pytest
import torch

from prunekit.core.losses import aggregate, get_policy_loss, policy_loss


def _mean(out, mask, aggregation="grpo", max_len=None):
    """The loss as the learner forms it: the sum over the normaliser it counts from the response lengths."""
    loss_sum, _ = out
    lengths = mask.sum(1).int().tolist()
    return (loss_sum / aggregate(aggregation).normaliser(lengths, max_len or mask.shape[1])).item()


def test_grpo_token_loss_hand_computed_with_clip_boundaries():
    eps, eps_high = 0.2, 0.3
    # one response, four tokens with ratios 1.0, 1.3 (exactly on the upper bound), 1.5 (above), 0.5 (below 0.8)
    ratios = torch.tensor([[1.0, 1.3, 1.5, 0.5]])
    old = torch.zeros(1, 4)
    logp = torch.log(ratios).requires_grad_()
    mask = torch.ones(1, 4)
    # positive advantage: the upper bound 1 + eps_high = 1.3 binds; 1.3 is exactly on it (not clipped), 1.5 is above
    loss_sum, stats = get_policy_loss("grpo")(logp, old, torch.tensor([2.0]), mask, eps=eps, eps_high=eps_high)
    want = -2.0 * (1.0 + 1.3 + 1.3 + 0.5) / 4  # max(-A r, -A clip(r)) = -A min(r, clip(r))
    assert loss_sum.item() == pytest.approx(want, rel=1e-6)  # one response: the grpo normaliser is 1
    assert stats["clipped"].item() == 1 and stats["clip_count"].item() == 4
    loss_sum.backward()
    # d/dlogp of -A r / 4 = -A r / 4 where unclipped; 0 where the clipped term is the max
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.65, 0.0, -0.25]]), atol=1e-6)

    # negative advantage: the lower bound 1 - eps = 0.8 binds for r = 0.5; r above the upper bound stays unclipped
    logp = torch.log(ratios).requires_grad_()
    loss_sum, stats = get_policy_loss("grpo")(logp, old, torch.tensor([-1.0]), mask, eps=eps, eps_high=eps_high)
    want = 1.0 * (1.0 + 1.3 + 1.5 + 0.8) / 4
    assert loss_sum.item() == pytest.approx(want, rel=1e-6)
    assert stats["clipped"].item() == 1
    loss_sum.backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.25, 0.325, 0.375, 0.0]]), atol=1e-6)


def test_aggregations_grpo_dapo_dr_grpo():
    # two responses of lengths 1 and 3, ratio 1 everywhere: token loss = -A
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, 3.0])
    kw = dict(eps=0.2)
    # grpo: mean over responses of the per-response mean: (-1 + -3) / 2
    assert _mean(policy_loss(logp, logp, adv, mask, aggregation="grpo", **kw), mask) == pytest.approx(-2.0)
    # dapo: mean over the 4 tokens: (-1 - 3 * 3) / 4
    assert _mean(policy_loss(logp, logp, adv, mask, aggregation="dapo", **kw), mask, "dapo") == pytest.approx(-2.5)
    # dr_grpo: token sum / (2 responses * max_len 8)
    assert _mean(policy_loss(logp, logp, adv, mask, aggregation="dr_grpo", **kw), mask, "dr_grpo",
                 max_len=8) == pytest.approx(-10 / 16)
    # the same under GSPO (ratio 1 is inside any clip range)
    assert _mean(policy_loss(logp, logp, adv, mask, level="sequence", aggregation="dapo", eps=3e-4,
                             eps_high=4e-4), mask, "dapo") == pytest.approx(-2.5)
    # responses without tokens count in none of the normalisers
    assert [aggregate(m).normaliser([1, 0, 3], 8) for m in ("grpo", "dapo", "dr_grpo")] == [2, 4, 16]


def test_gspo_sequence_ratio_and_its_clip_boundaries():
    # token log-ratios 0.001, 0.0003 (-> mean 0.00065 over 2 tokens; padding ignored)
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[0.001, 0.0003, 5.0]], requires_grad=True)
    s = math.exp(0.00065)  # 1.00065 > 1 + 4e-4: clipped for a positive advantage
    loss_sum, stats = get_policy_loss("gspo")(logp, old, torch.tensor([1.5]), mask)
    assert loss_sum.item() == pytest.approx(-1.5 * (1 + 4e-4), rel=1e-7)
    assert stats["clipped"].item() == 1 and stats["clip_count"].item() == 1
    assert stats["ratio_sum"].item() == pytest.approx(s, rel=1e-7)
    loss_sum.backward()
    assert torch.count_nonzero(logp.grad) == 0
    # negative advantage: min(s, clip) -> the unclipped ratio binds, gradient -A * s / |y| on each response token
    logp.grad = None
    loss_sum, stats = get_policy_loss("gspo")(logp, old, torch.tensor([-1.5]), mask)
    assert loss_sum.item() == pytest.approx(1.5 * s, rel=1e-7)
    assert stats["clipped"].item() == 0
    loss_sum.backward()
    assert torch.allclose(logp.grad, torch.tensor([[1.5 * s / 2, 1.5 * s / 2, 0.0]]), atol=1e-7)
    # just inside the upper bound: not clipped
    inside = torch.tensor([[3.9e-4, 3.9e-4, 0.0]])
    assert get_policy_loss("gspo")(inside, old, torch.tensor([1.0]), mask)[1]["clipped"].item() == 0


def test_gspo_ratio_is_length_normalised_property():
    """The sequence ratio depends on the mean token log-ratio, not the length: a response whose every token moves
    by d has ratio exp(d) whatever its length (a token-sum ratio would be exp(L d))."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch, width = 6, 40
        lengths = torch.randint(1, width + 1, (batch,), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).float()
        d = (torch.rand(batch, generator=g) - 0.5) * 0.02
        noise = torch.randn(batch, width, generator=g)
        old = noise
        logp = noise + d[:, None] * mask + 7.0 * (1 - mask)  # padding carries garbage that must not count
        _, stats = policy_loss(logp, old, torch.ones(batch), mask, level="sequence", eps=1.0, aggregation="grpo")
        assert stats["ratio_sum"].item() == pytest.approx(torch.exp(d).sum().item(), rel=1e-5)
        # permuting tokens inside a response (same multiset of log-ratios) leaves the loss unchanged
        perm_logp = logp.clone()
        for i, n in enumerate(lengths.tolist()):
            p = torch.randperm(n, generator=g)
            perm_logp[i, :n] = old[i, :n] + (logp[i, :n] - old[i, :n])[p]
        a = policy_loss(logp, old, torch.ones(batch), mask, level="sequence", eps=1.0)
        b = policy_loss(perm_logp, old, torch.ones(batch), mask, level="sequence", eps=1.0)
        assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)


def test_kl_penalty_k3_to_reference():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    mask = torch.ones(1, 2)
    out = policy_loss(logp, logp.clone(), torch.tensor([0.0]), mask, ref_logp=ref, kl_beta=0.1, aggregation="dapo")
    kl0 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    assert out[1]["kl_sum"].item() == pytest.approx(kl0, rel=1e-6)
    assert _mean(out, mask, "dapo") == pytest.approx(0.1 * kl0 / 2, rel=1e-6)
