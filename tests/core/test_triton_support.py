"""Where prunekit's Triton kernels run (prunekit.core.triton_support): CUDA, or any device under Triton's
interpreter, read once at import as Triton reads it."""
from __future__ import annotations

import torch

from tests.conftest import run_in_triton_interpreter


def _cpu_is_usable_when_interpreted() -> None:
    from prunekit.core import triton_support
    assert triton_support.INTERPRETED and triton_support.unavailable(torch.device("cpu")) is None


def test_kernels_run_on_cpu_only_under_the_interpreter():
    from prunekit.core import triton_support
    assert triton_support.unavailable(torch.device("cpu")) == (   # the suite itself runs without TRITON_INTERPRET
        "Triton kernels run on CUDA (or under TRITON_INTERPRET=1), not on cpu")
    run_in_triton_interpreter("tests.core.test_triton_support", "_cpu_is_usable_when_interpreted")
