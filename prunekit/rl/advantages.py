"""Advantages for GRPO/GSPO: each prompt's samples form a group; a sample's advantage is its reward minus the
group mean, optionally scaled by the group's or the batch's std. Pure torch."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages: rewards ``[G * group_size]`` (a prompt's samples adjacent) minus their group
    mean, divided by the group std (``group``), the whole batch's std (``batch``) or nothing (``none``)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (r.std(1, keepdim=True, unbiased=group_size > 1) + eps) if group_size > 1 else centred
    elif scale == "batch":
        centred = centred / (rewards.double().std() + eps) if rewards.numel() > 1 else centred
    elif scale != "none":
        raise ValueError(f"advantage scale must be group, batch or none, got {scale!r}")
    return centred.view(-1).to(rewards.dtype if rewards.is_floating_point() else torch.float32)
