"""The RL batch layout shared by the learners and the transformers rollout backend: prompt + completion token
rows, right-padded, with per-token values aligned to the token they score."""
from __future__ import annotations

import torch


def collate_rl(samples: list[dict], pad_id: int) -> dict:
    """Samples (prompt_ids, completion_ids, advantage, [rollout_logp, old_logp, ref_logp]) -> right-padded tensors;
    per-token values are aligned with the token they score (position t = log p(token t | < t))."""
    width = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    resp = torch.zeros((b, width), dtype=torch.float32)
    per_token = {k: torch.zeros((b, width), dtype=torch.float32) for k in ("rollout_logp", "old_logp", "ref_logp")
                 if k in samples[0]}
    for i, s in enumerate(samples):
        p, c = len(s["prompt_ids"]), len(s["completion_ids"])
        ids[i, :p + c] = torch.tensor(s["prompt_ids"] + s["completion_ids"])
        attn[i, :p + c] = 1
        resp[i, p:p + c] = 1
        for k, t in per_token.items():
            t[i, p:p + c] = torch.tensor(s[k], dtype=torch.float32)
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp, **per_token}
    if "advantage" in samples[0]:  # training samples; scoring (log-probs only) needs none
        batch["advantages"] = torch.tensor([float(s["advantage"]) for s in samples])
    return batch


def response_slices(logp: torch.Tensor, samples: list[dict]) -> list[list[float]]:
    """Each sample's completion-token values out of `[B, S]` per-token values of `collate_rl(samples)`."""
    out = []
    for i, s in enumerate(samples):
        p, c = len(s["prompt_ids"]), len(s["completion_ids"])
        out.append(logp[i, p:p + c].tolist())
    return out
