"""prunekit's own sampling loop for text decoders: a fixed set of batch slots, refilled as their rows finish.

`generate` (transformers) decodes a batch until its longest row is done, so a slot whose answer ended early idles
until then (teacher answers of at most 256 tokens average ~180: ~30% of every batch), and it reads the finished
flags back after every token. Here every slot keeps its own position in a preallocated KV cache (no left padding:
a row starts at position 0), a finished slot gets the next prompt (a prefill of just the new rows, written into
that slot's cache rows), and the host looks at the slots only every `refill_every` steps. The decode step itself —
the model's own decoder layers, temperature and transformers' top-p filter, sampling — has fixed shapes and no host
sync, so on a GPU it is recorded once as a CUDA graph and replayed (no compilation).

Also here: `grouped_decode_attention`, the decode-step attention both this loop and the transformers backend's fast
path use. The decoder layers are the model's own modules, called with a cache object that writes each row at its own
position (`_SlotCache`), so every family's attention (biases, q/k norms, RoPE) is transformers' code; supported:
the text families whose model is `embed_tokens -> layers -> norm` with one rotary embedding, each layer's attention
full or a sliding window (`slots_supported`).
"""
from __future__ import annotations

import torch

from prunekit.core.families import family_for


GROUPED_DECODE = "prunekit_grouped_decode"
TRITON_DECODE = "prunekit_triton_decode"   # the decode step's attention as one Triton kernel (decode_attention.py)
DECODE_KERNELS = {"sdpa": GROUPED_DECODE, "triton": TRITON_DECODE}


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for grouped-query attention that never copies K/V per query head while decoding.

    With a padding mask, transformers' SDPA path repeats every KV head for each of its query heads (the fused kernels
    that take grouped K/V refuse masks), which at batch 512 makes attention most of a decode step. One new token's
    query heads of a group all read the same K/V under the same mask, so they can ride as that KV head's query rows:
    [B, H, 1, D] -> [B, KV, H/KV, D], exact. Prefill and everything else goes to transformers' own SDPA function.
    (SmolLM2-135M on an H200, batch 512 x 256 new tokens: 23.0k -> 33.1k tokens/s.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, head_dim = query.shape
    if q_len != 1 or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.reshape(batch, heads // groups, groups, head_dim)
    mask = attention_mask
    if mask is not None:   # [B, 1, 1, L]: the same row for every query head of the group
        mask = mask.expand(batch, 1, groups, mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, head_dim).transpose(1, 2), None


def triton_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                            **kwargs):
    """`grouped_decode_attention` with the decode step on the Triton kernel of `decode_attention` where it can run
    (CUDA in bf16/fp16, or Triton's interpreter); everything else as `grouped_decode_attention` does it."""
    from prunekit.rl import decode_attention as kernel
    fits = key.stride(-1) == 1 and value.stride(-1) == 1 and query.shape[1] % key.shape[1] == 0
    if query.shape[2] == 1 and not dropout and fits and kernel.usable(query):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return kernel.decode_attention(query, key, value, attention_mask, scale).transpose(1, 2), None
    return grouped_decode_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)


def default_decode_kernel(device: torch.device | str) -> str:
    """The decode kernel the transformers backend's fast path takes on `device`: the Triton kernel on CUDA (1.55x the
    grouped SDPA step at the corpus generator's shape on one H200, bench/results/rollout_throughput.json
    `corpus_decode`; it falls back to grouped SDPA in float32), grouped SDPA elsewhere."""
    from prunekit.core.triton_support import default_on
    return "triton" if default_on(torch.device(device)) else "sdpa"


def use_grouped_decode(model, kernel: str = "sdpa") -> bool:
    """Switch a text model on transformers' SDPA attention to `grouped_decode_attention` (`kernel` "sdpa") or to
    `triton_decode_attention` ("triton"); False (and no change) when it uses another attention implementation."""
    if kernel not in DECODE_KERNELS:
        raise ValueError(f"decode kernel: expected one of {', '.join(DECODE_KERNELS)}, got {kernel!r}")
    if model.config._attn_implementation not in ("sdpa", *DECODE_KERNELS.values()):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    name = DECODE_KERNELS[kernel]
    AttentionInterface.register(name, triton_decode_attention if kernel == "triton" else grouped_decode_attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return True


def slots_supported(model) -> str | None:
    """None if the slot decoder can run `model`, else why not."""
    family = family_for(model.config.to_dict())
    if family.is_vlm:
        return f"{family.name} is a vision-language model"
    base = getattr(model, "model", None)
    if not all(hasattr(base, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} is not embed_tokens -> layers -> norm with a rotary embedding"
    kinds = set(_layer_kinds(model))
    if kinds - {"full_attention", "sliding_attention"}:
        return f"attention layers of kinds {sorted(kinds)}"
    return None


def _layer_kinds(model) -> list[str]:
    """Each decoder layer's attention: full, or sliding over the last `config.sliding_window` positions."""
    layers = len(model.model.layers)
    kinds = getattr(model.config, "layer_types", None)
    if kinds:
        return list(kinds)
    sliding = getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * layers


def _masks(kinds: list[str], window: int | None, queries: torch.Tensor, keys: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's boolean mask [rows, 1, q, k] (True: attend) for query positions `queries` [rows, q] over key
    positions `keys` [k]: causal, and for a sliding layer only the last `window` positions (transformers'
    rule: kv > q - window)."""
    q, k = queries[:, None, :, None], keys[None, None, None, :]
    causal = k <= q
    sliding = causal & (k > q - window) if window else causal
    return [sliding if kind == "sliding_attention" else causal for kind in kinds]


class _SlotCache:
    """What a decoder layer's attention asks of transformers' Cache (`update`): decoding writes one token per slot
    at that slot's position and attends over the slot's whole cache row (the mask hides what lies past the
    position); a prefill writes fresh rows' prompts at positions 0.. of their slots and attends within them."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.positions: torch.Tensor | None = None   # decoding: [slots], the position each slot writes
        self.prefill_slots: torch.Tensor | None = None   # prefilling: the slots the rows go to

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if self.prefill_slots is not None:
            width = key.shape[2]
            self.keys[layer_idx][self.prefill_slots, :, :width] = key
            self.values[layer_idx][self.prefill_slots, :, :width] = value
            return key, value
        at = self.positions.view(-1, 1, 1, 1).expand(-1, key.shape[1], 1, key.shape[3])
        self.keys[layer_idx].scatter_(2, at, key)
        self.values[layer_idx].scatter_(2, at, value)
        return self.keys[layer_idx], self.values[layer_idx]


def _sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The next token of each row: argmax when temperature is 0, else a sample from softmax(logits / T) within
    transformers' top-p nucleus (its own warper), drawn as argmax(log p - log E), E ~ Exp(1): the same distribution
    as multinomial, with no host sync (so it can live in a CUDA graph)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scores = logits / temperature
    if top_p < 1:
        from transformers.generation.logits_process import TopPLogitsWarper
        scores = TopPLogitsWarper(top_p)(None, scores)
    return (scores - torch.empty_like(scores).exponential_().log()).argmax(-1)


class SlotDecoder:
    """Sample completions for many prompts through `slots` batch slots (see the module docstring)."""

    def __init__(self, model, slots: int, eos: list[int], refill_every: int = 8, graph: bool | None = None,
                 compile: bool = False):
        why = slots_supported(model)
        if why:
            raise ValueError(f"the slot decoder cannot run this model: {why}")
        if model.config._attn_implementation not in ("sdpa", *DECODE_KERNELS.values()):
            raise ValueError("the slot decoder needs the model on SDPA attention (its masks are boolean)")
        self.model, self.slots, self.refill_every = model, slots, max(1, refill_every)
        self.base = model.model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos = torch.tensor(sorted(set(eos)) or [-1], device=self.device)
        self.graph = self.device.type == "cuda" if graph is None else graph
        cfg = model.config
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kinds, self.window = _layer_kinds(model), getattr(cfg, "sliding_window", None)
        # compile: the step's model part fused by inductor (default mode) before the CUDA graph records it
        self._logits = torch.compile(self._step_logits, dynamic=False) if compile else self._step_logits
        self.length = 0   # the cache length the buffers (and the recorded step) were made for
        self.max_new_tokens = self.temperature = self.top_p = None
        self.replay = None

    # ---- one decode step over every slot: fixed shapes, state in place, no host sync ----------------------------
    def _layers(self, x, positions, masks, cache, last: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder layers over x [rows, q, hidden]; the hidden state at each row's `last` position (default:
        the final one)."""
        cos_sin = self.base.rotary_emb(x, positions)
        for layer, layer_mask in zip(self.base.layers, masks):
            out = layer(x, attention_mask=layer_mask, position_ids=positions, past_key_values=cache, use_cache=True,
                        position_embeddings=cos_sin)
            x = out[0] if isinstance(out, tuple) else out
        return x[:, -1] if last is None else x[torch.arange(len(x), device=x.device), last]

    def _step_logits(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.base.embed_tokens(tokens[:, None])
        masks = _masks(self.kinds, self.window, positions[:, None], self.state["span"])
        return self.model.lm_head(self.base.norm(self._layers(x, positions[:, None], masks, self.cache))).float()

    def _step(self) -> None:
        s = self.state
        new = _sample(self._logits(s["tokens"], s["pos"]), self.temperature, self.top_p)
        live = ~s["done"]
        # a finished slot's token goes to the spare last column; its count and position stay
        column = torch.where(live, s["count"], torch.full_like(s["count"], s["out"].shape[1] - 1))
        s["out"].scatter_(1, column[:, None], new[:, None])
        s["count"].add_(live.long())
        s["done"].logical_or_(torch.isin(new, self.eos) | (s["count"] >= self.max_new_tokens))
        s["pos"].add_(live.long())
        s["tokens"].copy_(torch.where(live, new, s["tokens"]))

    # ---- the host loop ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0) -> list[list[int]]:
        """Completions (up to and including the first EOS, at most `max_new_tokens`) in the prompts' order."""
        if not prompts:
            return []
        self._buffers(max(len(p) for p in prompts) + max_new_tokens, max_new_tokens, temperature, top_p)
        self.state["done"].fill_(True)   # every slot free (a call that raised may have left some mid-answer)
        step = self.replay or self._step
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar widths prefill together
        waiting, row_of = list(reversed(order)), [None] * self.slots
        results: list[list[int] | None] = [None] * len(prompts)
        while True:
            done = self.state["done"].tolist()
            free = [i for i in range(self.slots) if done[i]]
            finished = [i for i in free if row_of[i] is not None]
            if finished:
                counts = self.state["count"][finished].tolist()
                outs = self.state["out"][finished].tolist()
                for slot, n, out in zip(finished, counts, outs):
                    results[row_of[slot]] = out[:n]
                    row_of[slot] = None
            if waiting and free:
                take = free[:len(waiting)]
                rows = [waiting.pop() for _ in take]
                self._prefill(take, [prompts[r] for r in rows])
                for slot, r in zip(take, rows):
                    row_of[slot] = r
            if all(r is None for r in row_of):
                break
            for _ in range(self.refill_every):
                step()
        return results

    def _prefill(self, slots: list[int], prompts: list[list[int]]) -> None:
        """Fresh rows into free slots: their prompts through the layers (right-padded, causal), K/V written at
        positions 0.. of those slots, the first token sampled from each prompt's last position."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        ids = ids.to(self.device)
        at = torch.tensor(slots, device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        positions = torch.arange(width, device=self.device)[None].expand(len(prompts), -1)
        # right padding under a causal mask: a prompt's own tokens never see the padding after them
        masks = _masks(self.kinds, self.window, positions[:1], positions[0])
        self.cache.prefill_slots = at
        try:
            hidden = self._layers(self.base.embed_tokens(ids), positions, masks, self.cache, last)
        finally:
            self.cache.prefill_slots = None
        logits = self.model.lm_head(self.base.norm(hidden)).float()
        first = _sample(logits, self.temperature, self.top_p)
        s = self.state
        s["tokens"][at] = first
        s["pos"][at] = last + 1
        s["out"][at, 0] = first
        s["count"][at] = 1
        s["done"][at] = torch.isin(first, self.eos) | (self.max_new_tokens <= 1)

    def _buffers(self, length: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
        """The KV cache and the slots' state, kept from one `generate` to the next (and so is the recorded step)
        unless this call needs a longer cache or other sampling settings; lengths go up in steps of 64."""
        length = -(-length // 64) * 64
        sampling = (max_new_tokens, temperature, top_p)
        if self.length >= length and (self.max_new_tokens, self.temperature, self.top_p) == sampling:
            return
        self.max_new_tokens, self.temperature, self.top_p = sampling
        self.length, self.replay, self.cache, self.state = length, None, None, None
        layers = len(self.base.layers)
        shape = (self.slots, self.kv_heads, length, self.head_dim)
        self.cache = _SlotCache([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)],
                                [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(layers)])
        long = dict(dtype=torch.long, device=self.device)
        self.state = {"tokens": torch.zeros(self.slots, **long), "pos": torch.zeros(self.slots, **long),
                      "count": torch.zeros(self.slots, **long),
                      "done": torch.ones(self.slots, dtype=torch.bool, device=self.device),
                      "out": torch.zeros(self.slots, max_new_tokens + 1, **long),
                      "span": torch.arange(length, **long)}
        self.cache.positions = self.state["pos"]
        if self.graph:
            self.replay = self._recorded_step()

    def _recorded_step(self):
        """The decode step as a CUDA graph (recorded with every slot idle, then the state reset), replayed per
        token: one launch instead of a few hundred kernels."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture: cuBLAS workspaces, lazy allocations
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        for name in ("tokens", "pos", "count", "out"):
            self.state[name].zero_()
        self.state["done"].fill_(True)
        return graph.replay
