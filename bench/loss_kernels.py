"""The LM-head loss alone (issue 14: where the step goes): forward + backward of next-token cross-entropy from final
hidden states through the LM head, at train_throughput's shape (Qwen2.5-0.5B: 8 x 2048 tokens, H 896, V 151936, bf16).

The profile of train_throughput's fast path put 8.7 ms of its 128 ms step in one inductor reduction (logsumexp +
argmax over the [16384, 151936] logits) and ~18 ms in the LM head's GEMMs. This measures the loss on its own, each
variant in one process, so a change to it can be judged in a minute:
  prunekit              chunked_causal_lm_loss as the engine calls it (FusedLinearLoss), chunk 16384, with the compiled
                        row loss (the engine's off CUDA; on CUDA it takes prunekit_triton_rows since session 19)
  prunekit_chunk4096    the same, chunk 4096 (4 chunks: float32 head-gradient sum, less logits memory)
  prunekit_eager_rows   the same, the row loss eager (what the compiled one saves)
  prunekit_argmax_rows  the same, token hits from an argmax (the engine's way until session 11; it now takes a hit
                        when the target's logit is the row max, a plain max the logsumexp's reduction shares)
  prunekit_nohit_rows   the same without counting hits at all (what token_acc costs)
  prunekit_triton_rows  the same, the row loss one Triton kernel (prunekit.core.losses.triton_rows: two passes over
                        each row, the gradient written over the logits; the engine's row loss on CUDA)
  torch_autograd        logits materialised, F.cross_entropy, autograd (the plain baseline)
  liger_flce            Liger's LigerFusedLinearCrossEntropyLoss, the peer (skipped with the reason when not installed)
Every variant's loss and hidden-state gradient are checked against torch_autograd's (float32 reference on a slice).

    python bench/loss_kernels.py [--tokens 16384] [--repeats 20]     # GPU: bench/results/loss_kernels.json
    python bench/loss_kernels.py --smoke                             # CPU, tiny sizes: the code paths
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("prunekit", "prunekit_chunk4096", "prunekit_eager_rows", "prunekit_argmax_rows", "prunekit_nohit_rows",
            "prunekit_triton_rows", "torch_autograd", "liger_flce")


def _ce_rows_hits_by(hits: str):
    """prunekit's row loss (its compiled path) with token hits counted by an argmax ("argmax") or not at all."""
    from prunekit.core.losses.ce import minus_onehot

    def rows(logits, _extra, target):
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        picked = x.gather(-1, target[:, None]).squeeze(-1)
        probs = torch.exp(x - lse[:, None])
        n_hits = ((x.argmax(-1) == target).sum() if hits == "argmax"
                  else torch.zeros((), dtype=torch.long, device=x.device))
        return (lse - picked).sum(), minus_onehot(probs, target).to(logits.dtype), n_hits
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(tokens: int, hidden: int, vocab: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(tokens, hidden, generator=g) * 1.0).to(device, dtype).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return h, w, target


def loss_fn(variant: str, tokens: int):
    """(h, w, target) -> summed loss, for one variant."""
    from prunekit.core.losses import ce, triton_rows
    labels_of = lambda t: torch.cat([t.new_full((1,), ce.IGNORE_INDEX), t])[None]  # noqa: E731 - next-token labels
    if variant.startswith("prunekit"):
        chunk = 4096 if variant == "prunekit_chunk4096" else tokens
        rows_fn = {"prunekit_eager_rows": ce._ce_rows,
                   "prunekit_argmax_rows": ce.compiled_on_gpu(_ce_rows_hits_by("argmax"), torch.cuda.is_available()),
                   "prunekit_nohit_rows": ce.compiled_on_gpu(_ce_rows_hits_by("none"), torch.cuda.is_available()),
                   "prunekit_triton_rows": triton_rows.ce_rows_triton}.get(variant)
        if rows_fn is not None:
            return lambda h, w, t: ce.FusedLinearLoss.apply(h, w, None, t, chunk, rows_fn)[0]
        # the engine's call: hidden [1, T+1, H] whose last position is never supervised
        return lambda h, w, t: ce.chunked_causal_lm_loss(
            torch.cat([h, h[-1:]])[None], w, labels_of(t), chunk_size=chunk, row_loss="compiled")[0]
    if variant == "torch_autograd":
        return lambda h, w, t: torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="sum")
    if variant == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        return lambda h, w, t: liger(w, h, t)
    raise ValueError(variant)


def measure(variant: str, args, device) -> dict:
    if variant == "liger_flce" and importlib.util.find_spec("liger_kernel") is None:
        return {"skipped": "liger-kernel is not installed (pip install liger-kernel)"}
    if variant == "prunekit_triton_rows":
        from prunekit.core.triton_support import unavailable
        if unavailable(device):
            return {"skipped": unavailable(device)}
    dtype = torch.float32 if args.smoke else torch.bfloat16
    h, w, t = inputs(args.tokens, args.hidden, args.vocab, device, dtype)
    fn = loss_fn(variant, args.tokens)
    # correctness on the full batch against a float32 reference
    ref_h = h.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_h @ w.detach().float().T, t, reduction="sum")
    ref.backward()
    loss = fn(h, w, t)
    loss.backward()
    rel_loss = abs(float(loss.detach()) - float(ref.detach())) / abs(float(ref.detach()))
    rel_grad = float((h.grad.float() - ref_h.grad).norm() / ref_h.grad.norm())
    del ref_h, ref
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    for i in range(args.warmup + args.repeats):
        h.grad = w.grad = None
        sync(device)
        t0 = time.perf_counter()
        fn(h, w, t).backward()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    out = {"ms": 1000 * statistics.median(times), "ms_min": 1000 * min(times),
           "loss_rel_err": rel_loss, "grad_h_rel_err": rel_grad}
    if device.type == "cuda":
        out["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 1024 ** 3
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated variants")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (not committed)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.repeats, args.warmup = 64, 32, 500, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        p.error("no GPU here: use --smoke")
    variants = [v for v in VARIANTS if not args.only or v in args.only.split(",")]
    results = {}
    for variant in variants:   # one after another; a crash is recorded as one line
        try:
            results[variant] = measure(variant, args, device)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not the end of the run
            results[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(variant, json.dumps(results[variant]), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results.get("torch_autograd", {}).get("ms")
    record = {"benchmark": "loss_kernels", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join(["python", "bench/loss_kernels.py", *(argv or sys.argv[1:])]),
        "machine": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab,
                  "dtype": "float32" if args.smoke else "bfloat16"},
        "results": results,
        "speedup_vs_torch_autograd": {k: base / v["ms"] for k, v in results.items() if base and "ms" in v}}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        "loss_kernels_smoke.json" if args.smoke else "loss_kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
