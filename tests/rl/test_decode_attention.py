"""The decode step's attention as one Triton kernel (prunekit.rl.decode_attention), run by Triton's interpreter on
CPU: what SDPA gives for the same inputs, and the same greedy tokens through transformers' generate.

The interpreter's tl.dot is wrong for bfloat16 operands (numpy has no bfloat16: a 16x16 product is off by ~1e10 in
Triton 3.9), so the kernel is checked in float32 and float16, which run the same code; bfloat16 is measured on a GPU
(bench/rollout_throughput.py)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import run_in_triton_interpreter


def _matches_sdpa(dtype_name: str) -> None:
    from prunekit.rl.decode_attention import BLOCK_N, decode_attention
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads in ((9, 3), (4, 4), (8, 1)):
        batch, cache, dim = 4, 2 * BLOCK_N + 22, 64
        q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
        k, v = (torch.randn(batch, kv_heads, cache, dim, generator=g).to(dtype) for _ in range(2))
        mask = torch.zeros(batch, 1, 1, cache, dtype=torch.bool)
        mask[0, ..., 5:100] = True               # left padding, then positions not written yet
        mask[1, ..., BLOCK_N + 3] = True         # one position: whole blocks shut on both sides
        mask[2] = True
        mask[3, ..., :BLOCK_N + 1] = True
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(heads // kv_heads, 1),
            v.float().repeat_interleave(heads // kv_heads, 1), attn_mask=mask, scale=dim ** -0.5)
        atol = 1e-5 if dtype == torch.float32 else 2e-3
        for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):   # boolean and additive
            out = decode_attention(q, k, v, m, dim ** -0.5)
            assert out.shape == q.shape and out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
        shared = mask[3:4]   # one mask row for the whole batch
        ref_shared = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(heads // kv_heads, 1),
            v.float().repeat_interleave(heads // kv_heads, 1), attn_mask=shared, scale=dim ** -0.5)
        torch.testing.assert_close(decode_attention(q, k, v, shared, dim ** -0.5).float(), ref_shared, atol=atol,
                                   rtol=0)
        out = decode_attention(q, k, v, None, dim ** -0.5)   # no mask: every position
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), k.float().repeat_interleave(heads // kv_heads, 1),
            v.float().repeat_interleave(heads // kv_heads, 1), scale=dim ** -0.5)
        torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
def test_decode_attention_kernel_gives_what_sdpa_gives(dtype_name):
    """3, 1 and 8 query heads per KV head; masks that leave whole blocks of the cache shut (left padding, positions
    not written yet), boolean or additive, or no mask."""
    run_in_triton_interpreter("tests.rl.test_decode_attention", "_matches_sdpa", dtype_name)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_triton_decode_generates_what_sdpa_generates(family):
    """Left-padded rows through generate with the kernel as the decode step's attention (dynamic and static KV cache;
    the tiny qwen2 has sliding-window layers): the tokens and logits SDPA gives."""
    run_in_triton_interpreter("tests.rl.test_rollout", "decode_kernel_generates_what_sdpa_generates", family,
                              "triton")


def _compiles_into_a_graph() -> None:
    from prunekit.rl.decode_attention import decode_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 32, generator=g), *(torch.randn(2, 2, 70, 32, generator=g) for _ in range(2))
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    mask[0, ..., :9] = False

    def step(q, k, v, mask):   # the kernel between other ops, as in a compiled decode step
        return decode_attention(q * 2.0, k, v, mask, 0.125) + 1
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v, mask), step(q, k, v, mask))


def test_decode_attention_compiles_into_a_graph():
    """torch.compile(fullgraph) of a step that calls the kernel gives the eager step's output: the kernel is a custom
    op that inductor calls as it is (its own compile of the kernel failed on the H200)."""
    run_in_triton_interpreter("tests.rl.test_decode_attention", "_compiles_into_a_graph")


def test_fast_path_takes_the_triton_kernel_on_cuda_only():
    """transformers' fast path decodes with the Triton kernel on CUDA (where Triton comes with torch), with grouped
    SDPA elsewhere."""
    from prunekit.core.triton_support import triton
    from prunekit.rl.decode import default_decode_kernel
    assert default_decode_kernel("cuda") == ("triton" if triton is not None else "sdpa")
    assert default_decode_kernel(torch.device("cpu")) == "sdpa"


def test_decode_attention_says_where_it_cannot_run():
    from prunekit.rl.decode import use_grouped_decode
    from prunekit.rl.decode_attention import available, decode_attention, usable
    assert "run on CUDA" in available(torch.zeros(1, 2, 1, 64)) and not usable(torch.zeros(1, 2, 1, 64))
    assert "head size 48" in available(torch.zeros(1, 2, 1, 48))
    with pytest.raises(ValueError, match="decode kernel: expected one of sdpa, triton, got 'flash'"):
        use_grouped_decode(None, kernel="flash")
    with pytest.raises(ValueError, match="one query position"):
        decode_attention(torch.zeros(1, 3, 2, 64), torch.zeros(1, 1, 5, 64), torch.zeros(1, 1, 5, 64), None, 0.125)
