"""Teacher-sampled corpora (data-free distillation): sample answers from the model being compressed, in its own
style, to prompts from a file and/or the built-in seed prompts, into an appendable `messages` JSONL; or, with
`unconditioned`, text sampled from the start token alone (LLM-QAT's data-free generation): `{"text"}` rows in the
style of what the teacher was pretrained on, far more varied than answers to a few thousand prompts.

Generation runs on the RL rollout backends (`make_backend`: vLLM where installed and supported, transformers'
static-cache fast path on GPU, plain `generate` otherwise). This module does not import Ray: `InProcess` runs one
backend here; the `data generate` stage passes a pool of Ray rollout actors with the same two methods instead.

Work is a stream of units (prompt index, pass): unit (p, k) asks for samples k*n .. k*n+n-1 of prompt p
(n = n_per_prompt), so ids are "<p>:<sample>" and a `rows`/`tokens` target larger than one pass over the prompts
takes more samples of the same prompts. Units whose ids are all in the file already are skipped (resume).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.corpus import (CorpusFile, answer_key, dedup_prompts, file_sha256, length_stats, read_prompt_file,
                                  row_answer)
from prunekit.rl.rollout import Sampling, eos_ids, make_backend

DEFAULT_BATCH = {"cuda": 512, "cpu": 16}
JOB_BATCHES = {"slots": 8}   # rows per job, in batches: the slot decoder drains only at the end of a job


@dataclass
class Job:
    units: list[tuple[int, int]]          # (prompt index, pass)
    prompt_ids: list[list[int]]
    sampling: Sampling
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = len(self.units) * self.sampling.n


class InProcess:
    """One rollout backend in this process (no Ray)."""

    def resolve_device(self, device: str) -> str:
        import torch
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def start(self, backend: str, model_dir: Path, device: str, **kw) -> "InProcess":
        self.backend = make_backend(backend, model_dir, device=device, **kw)
        self.backend_name = self.backend.name
        self.workers = 1
        return self

    def run(self, next_job, on_result) -> None:
        while (job := next_job()) is not None:
            on_result(job, self.backend.generate(job.prompt_ids, job.sampling))

    def close(self) -> None:
        self.backend.close()


def _positive(value, flag: str, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PrunekitError(f"{flag} {value}: must be a positive integer")
    return value


def _validate_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0:
        raise PrunekitError(f"--temperature {temperature}: must be >= 0")
    if not 0 < top_p <= 1:
        raise PrunekitError(f"--top-p {top_p}: must be in (0, 1]")


def teacher_name(spec: str | Path, model_dir: Path) -> str:
    from prunekit.core.loading import ALIASES
    return str(spec) if str(spec) in ALIASES else Path(model_dir).name


UNCONDITIONED = {"text": ""}   # the one "prompt" of an unconditioned corpus: the start token alone


def collect_prompts(prompts: str | Path | None, seed_prompts: bool | int | None,
                    unconditioned: bool = False) -> tuple[list[dict], dict]:
    """The prompt list (file prompts first, then seed prompts) and its identity for the settings record."""
    from prunekit.core.seed_prompts import seed_prompts as builtin
    if unconditioned:
        if prompts is not None or seed_prompts:
            raise PrunekitError("--unconditioned samples from the start token alone: give it without --prompts and "
                                "--seed-prompts (generate a second corpus for those)")
        return [dict(UNCONDITIONED)], {"unconditioned": True}
    if seed_prompts is None:
        seed_prompts = prompts is None  # the built-in prompts are the default source
    items, identity = [], {}
    if prompts is not None:
        items += read_prompt_file(prompts)
        identity["file_sha256"] = file_sha256(Path(prompts))
    if seed_prompts:
        limit = None if seed_prompts is True else _positive(seed_prompts, "--seed-prompts")
        seeds = builtin(limit)
        items += [{"messages": [{"role": "user", "content": p}]} for p in seeds]
        identity["seed_prompts"] = len(seeds)
    return dedup_prompts(items), identity


def start_token(tokenizer) -> int:
    """What an unconditioned sample starts from: the BOS token, else the end-of-text token that separates
    pretraining documents (Qwen-style tokenizers have no BOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise PrunekitError("--unconditioned: the teacher's tokenizer has neither a BOS nor an EOS token to start from")
    return token


def tokenize(tokenizer, prompt: dict) -> list[int]:
    if prompt == UNCONDITIONED:
        return [start_token(tokenizer)]
    if "text" in prompt:
        return list(tokenizer(prompt["text"])["input_ids"])
    text = tokenizer.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate_corpus(teacher: str | Path, out: str | Path, prompts: str | Path | None = None,
                    seed_prompts: bool | int | None = None, rows: int | None = None, tokens: int | None = None,
                    n_per_prompt: int = 1, temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 256,
                    seed: int = 0, backend: str = "auto", device: str = "auto", batch_size: int | None = None,
                    dtype: str | None = None, gpu_memory_utilization: float = 0.85, progress: bool = True,
                    pool=None, unconditioned: bool = False) -> dict:
    """Sample a corpus from `teacher` into `out` (JSONL), appending only what an earlier run left missing.

    prompts: a messages/text JSONL or JSON file; seed_prompts: True (all), N (the first N) or False; default: the
    built-in prompts when no file is given; unconditioned: text from the start token alone instead of prompts.
    Stop at `rows` rows or `tokens` completion tokens (one of them; with neither, one pass over a prompt file).
    backend: auto | vllm | transformers | slots (prunekit.rl.decode); device: auto | cpu | cuda.
    `pool`: where generation runs (default `InProcess()`; the stage passes Ray rollout actors).
    Returns the statistics written to `out.stats.json`."""
    from prunekit.core.loading import load_tokenizer, quiet_transformers, read_config, resolve_model
    # ---- validate everything before anything is written or loaded -------------------------------------------
    rows, tokens = _positive(rows, "--rows"), _positive(tokens, "--tokens")
    if rows is not None and tokens is not None:
        raise PrunekitError("--rows and --tokens: give one target, not both")
    _positive(n_per_prompt, "--n-per-prompt", allow_none=False)
    _positive(max_new_tokens, "--max-new-tokens", allow_none=False)
    _positive(batch_size, "--batch-size")
    _validate_sampling(temperature, top_p)
    if backend not in ("auto", "vllm", "transformers", "slots"):
        raise PrunekitError(f"--backend {backend}: expected auto, vllm, transformers or slots")
    items, prompt_identity = collect_prompts(prompts, seed_prompts, unconditioned)
    if rows is None and tokens is None and prompts is None:
        source_name = "the start token alone" if unconditioned else "the built-in seed prompts"
        raise PrunekitError(f"--rows or --tokens: say how much to generate from {source_name}")
    teacher_dir = resolve_model(teacher)
    with quiet_transformers():
        tok = load_tokenizer(teacher_dir)
    if any("messages" in p for p in items) and not getattr(tok, "chat_template", None):
        raise PrunekitError(f"--model {teacher}: the tokenizer has no chat template, so it cannot answer chat "
                            "prompts; give --prompts with {\"text\": ...} rows")
    cfg = read_config(teacher_dir)
    limit = cfg.get("text_config", cfg).get("max_position_embeddings") or 1 << 30
    prompt_ids = [tokenize(tok, p) for p in items]
    usable = [i for i, ids in enumerate(prompt_ids) if 0 < len(ids) and len(ids) + max_new_tokens <= limit]
    if not usable:
        raise PrunekitError(f"--max-new-tokens {max_new_tokens}: no prompt fits the teacher's context of {limit} "
                            "tokens with room for the answer")
    settings = {"model": str(Path(teacher_dir).resolve()), "prompts": prompt_identity, "n_per_prompt": n_per_prompt,
                "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    corpus = CorpusFile(out, settings)
    corpus.check()
    device = (pool or InProcess()).resolve_device(device)
    # ---- resume ---------------------------------------------------------------------------------------------
    corpus.open()
    source = f"teacher:{teacher_name(teacher, teacher_dir)}"
    n = n_per_prompt
    max_passes = None if rows or tokens else 1

    def units():
        k = 0
        while max_passes is None or k < max_passes:
            for p in usable:
                if any(f"{p}:{k * n + j}" not in corpus.ids for j in range(n)):
                    yield p, k
            k += 1

    def finished() -> bool:
        return (rows is not None and len(corpus.tokens) >= rows) or (tokens is not None and
                                                                      corpus.token_total >= tokens)

    stats_run = {"generated_rows": 0, "generated_tokens": 0, "duplicates_dropped": 0, "empty_dropped": 0,
                 "kept_rows": 0, "repaired_torn_bytes": corpus.repaired_bytes, "prompts": len(items),
                 "prompts_too_long": len(items) - len(usable)}
    t_start = time.perf_counter()
    if not finished():
        batch = batch_size or DEFAULT_BATCH.get(device, 16)
        dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
        eos = eos_ids(teacher_dir, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        longest = max(len(prompt_ids[i]) for i in usable) + max_new_tokens
        max_model_len = min(limit, -(-longest // 64) * 64)
        pool = (pool or InProcess()).start(backend, teacher_dir, device, batch_size=batch, dtype=dtype, eos=eos,
                                            pad_id=pad, max_model_len=max_model_len, max_num_seqs=batch, seed=seed,
                                            gpu_memory_utilization=gpu_memory_utilization,
                                            enforce_eager=device != "cuda")  # CUDA graphs: no weight reloads here
        stats_run["backend"], stats_run["workers"], stats_run["device"] = pool.backend_name, pool.workers, device
        stats_run["load_seconds"] = round(time.perf_counter() - t_start, 2)
        try:
            _run(pool, corpus, units(), prompt_ids, items, tok, eos, source, stats_run, rows=rows, tokens=tokens,
                 n=n, batch=batch, sampling=Sampling(n=n, temperature=temperature, top_p=top_p,
                                                     max_new_tokens=max_new_tokens, seed=seed, logprobs=False),
                 progress=progress, finished=finished)
        finally:
            pool.close()
    seconds = time.perf_counter() - t_start - stats_run.get("load_seconds", 0.0)
    stats_run["seconds"] = round(seconds, 2)
    stats_run["tokens_per_s"] = round(stats_run["generated_tokens"] / seconds, 1) if stats_run["generated_rows"] else 0
    runs = corpus.history.get("runs", []) + ([stats_run] if stats_run["generated_rows"] else [])
    stats = {**length_stats(corpus.tokens, corpus.finishes),
             "duplicates_dropped": sum(r.get("duplicates_dropped", 0) for r in runs),
             "empty_dropped": sum(r.get("empty_dropped", 0) for r in runs),
             "tokens_per_s": stats_run["tokens_per_s"], "complete": finished() or max_passes is not None,
             "target": {"rows": rows, "tokens": tokens}, "source": source, "runs": runs}
    if corpus.tokens:
        corpus.write_sidecar(stats)
    return {"output": str(corpus.path), **stats}


def _run(pool, corpus: CorpusFile, units, prompt_ids, items, tok, eos, source, stats_run, *, rows, tokens, n, batch,
         sampling: Sampling, progress: bool, finished) -> None:
    """Hand jobs to the pool until the target is met (or the prompts run out), writing each job's rows as it
    comes back."""
    from tqdm.auto import tqdm
    eos = set(eos)
    inflight = {"rows": 0}
    stalled = {"samples": 0}  # samples in a row that added nothing: a teacher that only repeats itself stops
    stall_limit = max(len(prompt_ids) * n, batch) * 2   # one unconditioned "prompt": two batches
    by_tokens = tokens is not None
    total = tokens if by_tokens else rows
    done = corpus.token_total if by_tokens else len(corpus.tokens)
    bar = tqdm(total=total, initial=min(done, total) if total else done, unit="tok" if by_tokens else "row",
               desc="generate", dynamic_ncols=True, disable=not progress)

    def next_job() -> Job | None:
        if finished() or stalled["samples"] > stall_limit:
            return None
        # the slot decoder refills its `batch` slots as rows finish: a job of several batches keeps them busy
        want = batch * JOB_BATCHES.get(pool.backend_name, 1)
        if rows is not None:
            want = min(want, rows - len(corpus.tokens) - inflight["rows"])
        elif by_tokens:  # rows still needed, guessed from the mean answer length so far
            mean = corpus.token_total / len(corpus.tokens) if corpus.tokens else sampling.max_new_tokens / 2
            want = min(want, math.ceil((tokens - corpus.token_total) / max(mean, 1)) - inflight["rows"])
        if want <= 0:
            return None
        chunk = list(itertools.islice(units, max(1, want // n)))  # whole units; the last may overshoot a little
        if not chunk:
            return None
        # vLLM: no per-request seed (one generator per request turns its sampler into a Python loop); its engine is
        # seeded instead. transformers: a seed that depends only on the work, so a chunk is reproducible.
        p0, k0 = chunk[0]
        job_seed = None if pool.backend_name == "vllm" else sampling.seed * 1_000_003 + k0 * 7919 + p0
        job = Job(chunk, [prompt_ids[p] for p, _ in chunk],
                  Sampling(n, sampling.temperature, sampling.top_p, sampling.max_new_tokens, job_seed, False))
        inflight["rows"] += job.rows
        return job

    def on_result(job: Job, samples: list[dict]) -> None:
        inflight["rows"] -= job.rows
        out, out_tokens = [], 0
        for u, (p, k) in enumerate(job.units):
            for j in range(n):
                ids = list(samples[u * n + j]["completion_ids"])
                stats_run["generated_rows"] += 1
                stats_run["generated_tokens"] += len(ids)
                row_id = f"{p}:{k * n + j}"
                if row_id in corpus.ids:
                    continue
                if (rows is not None and len(corpus.tokens) + len(out) >= rows) or (
                        by_tokens and corpus.token_total + out_tokens >= tokens):
                    continue  # the target is met: the rest of the chunk is not needed
                row = _row(items[p], ids, eos, tok, sampling.max_new_tokens, row_id, source)
                if row is None:
                    stats_run["empty_dropped"] += 1
                    continue
                seen = corpus.answers.setdefault(p, set())
                key = answer_key(row_answer(row))
                if key in seen:
                    stats_run["duplicates_dropped"] += 1
                    continue
                seen.add(key)
                out.append(row)
                out_tokens += row["tokens"]
        corpus.append(out)
        stats_run["kept_rows"] += len(out)
        stalled["samples"] = 0 if out else stalled["samples"] + job.rows
        bar.update(out_tokens if by_tokens else len(out))
        bar.set_postfix(dropped=stats_run["duplicates_dropped"] + stats_run["empty_dropped"], refresh=False)

    try:
        pool.run(next_job, on_result)
    finally:
        bar.close()
    if stalled["samples"] > stall_limit:
        stats_run["stopped"] = ("the teacher repeated earlier answers (or gave empty ones) for two passes' (at least "
                                "two batches') worth of samples")


def _row(prompt: dict, ids: list[int], eos: set[int], tok, max_new_tokens: int, row_id: str,
         source: str) -> dict | None:
    """One corpus row, or None for an empty answer. `finish` is "length" when the answer was cut at
    max_new_tokens (kept: the text is still the teacher's; a trainer can filter on it)."""
    stopped = bool(ids) and ids[-1] in eos
    if stopped:
        ids = ids[:-1]
    finish = "length" if not stopped and len(ids) >= max_new_tokens else "stop"
    text = tok.decode(ids, skip_special_tokens=True)
    meta = {"id": row_id, "source": source, "finish": finish, "tokens": len(ids)}
    if "text" in prompt:   # a continuation keeps its prompt; an unconditioned sample is its text alone
        continued = prompt["text"] + text.rstrip() if prompt["text"] else text.strip()
        return {"text": continued, **meta} if text.strip() else None
    answer = text.strip()
    if not answer:
        return None
    return {"messages": [*prompt["messages"], {"role": "assistant", "content": answer}], **meta}
