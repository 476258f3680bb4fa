"""Training-free layer importance (no Ray, no training), for text decoder layers and vision blocks alike.

Every score reads "higher = more important":
- block influence: 1 - cos(hidden state entering a layer, hidden state leaving it) (ShortGPT);
- angular distance of n consecutive layers: arccos(cos(entering layer i, leaving layer i+n-1)) / pi (Gromov et al.);
- NLL-drop: calibration NLL with the layer skipped minus the full model's NLL (SLEB's score);
`iterative_nll_drop` is SLEB's selection: layers removed one at a time, the rest scored again after each removal.

Block influence and angular distance come from one forward pass with hooks. NLL-drop runs one pass per layer on
the same loaded model: the layers before the skipped one replay the outputs cached in the full pass (no
recompute), the skipped layer returns its input, and only the layers after it run again.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from prunekit.core.evaluate import TokenTotals
from prunekit.core.families import ModelFamily
from prunekit.core.losses import causal_lm_loss


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _token_rows(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[B, S, d] text states -> the [n, d] rows of real (unpadded) tokens; [N, d] vision states -> all rows."""
    h = hidden.float()
    if h.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(h.shape[:2]):
        return h[mask]
    return h.reshape(-1, h.shape[-1])


@torch.no_grad()
def hidden_state_scores(model, family: ModelFamily, batches, component: str = "text",
                        angular_n: tuple[int, ...] = (1,)) -> dict:
    """Block influence per layer and angular distance per block of n consecutive layers (index = first layer),
    averaged over tokens. Empty dict if no batch reached these layers (e.g. vision blocks on text-only rows)."""
    layers = family.layers(model, component)
    n_layers = len(layers)
    angular_n = tuple(n for n in angular_n if 1 <= n <= n_layers)
    bi_sum = torch.zeros(n_layers, dtype=torch.float64)
    ang_sum = {n: torch.zeros(n_layers - n + 1, dtype=torch.float64) for n in angular_n}
    entering: dict[int, torch.Tensor] = {}
    leaving: dict[int, torch.Tensor] = {}
    count = 0

    def pre_hook(i):
        def fn(_m, args, kwargs):
            entering[i] = _hidden(args, kwargs).detach()
        return fn

    def hook(i):
        def fn(_m, _args, _kwargs, output):
            leaving[i] = _first(output).detach()
        return fn

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            entering.clear()
            leaving.clear()
            model(**_model_inputs(batch), use_cache=False)
            if len(leaving) != n_layers:
                continue
            mask = batch.get("attention_mask")
            mask = mask.bool() if mask is not None else None
            rows_in = [_token_rows(entering[i], mask) for i in range(n_layers)]
            rows_out = [_token_rows(leaving[i], mask) for i in range(n_layers)]
            for i in range(n_layers):
                bi_sum[i] += float((1 - torch.cosine_similarity(rows_in[i], rows_out[i], dim=-1)).sum())
            for n in angular_n:
                for i in range(n_layers - n + 1):
                    cos = torch.cosine_similarity(rows_in[i], rows_out[i + n - 1], dim=-1).clamp(-1, 1)
                    ang_sum[n][i] += float((torch.arccos(cos) / math.pi).sum())
            count += rows_in[0].shape[0]
    finally:
        for h in handles:
            h.remove()
        entering.clear()
        leaving.clear()
    if count == 0:
        return {}
    out = {"block_influence": (bi_sum / count).tolist()}
    for n in angular_n:
        out[f"angular_distance_n{n}"] = (ang_sum[n] / count).tolist()
    out["tokens"] = count
    return out


@contextmanager
def _patched_forward(module, fn):
    """Replace one module instance's forward (the class and every other instance stay untouched)."""
    module.forward = fn
    try:
        yield
    finally:
        del module.forward


@torch.no_grad()
def nll_drop(model, family: ModelFamily, batches, component: str = "text") -> dict:
    """Per layer: mean NLL over supervised tokens (labels != -100) with that layer skipped, minus the full model's.
    Batches carry `labels`. Empty dict if no batch reached these layers."""
    layers = family.layers(model, component)
    n_layers = len(layers)
    full, skipped = TokenTotals(), [TokenTotals() for _ in range(n_layers)]
    outputs: dict[int, list] = {}

    def record(i):
        def fn(_m, _args, output):
            # a copy: the model may change the returned tensor in place later in the forward
            outputs.setdefault(i, []).append(output.clone() if torch.is_tensor(output) else output)
        return fn

    for batch in batches:
        inputs, labels = _model_inputs(batch), batch["labels"]
        outputs.clear()
        handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
        try:
            loss_sum, n, _ = causal_lm_loss(model(**inputs, use_cache=False).logits.float(), labels)
        finally:
            for h in handles:
                h.remove()
        if len(outputs) != n_layers or int(n) == 0:
            continue
        replayable = all(len(v) == 1 for v in outputs.values())  # each layer ran once: its output can be replayed
        for skip in range(n_layers):
            patches = []
            if replayable:
                for j in range(skip):
                    cached = outputs[j][0]
                    patches.append((layers[j], lambda *a, _c=cached, **k: _c.clone() if torch.is_tensor(_c) else _c))
            patches.append((layers[skip], _skipped_like(outputs[skip][0])))
            with _stack(patches):
                s, _, _ = causal_lm_loss(model(**inputs, use_cache=False).logits.float(), labels)
            skipped[skip].add(s, n)
        full.add(loss_sum, n)
    outputs.clear()
    if full.tokens == 0:
        return {}
    base = full.means()["loss"]
    return {"nll_drop": [t.means()["loss"] - base for t in skipped], "baseline_nll": base, "nll_tokens": full.tokens}


def _skipped_like(output):
    """A forward that hands its input on, shaped like the layer's real `output` (a tensor or a tuple)."""
    def identity(*args, **kwargs):
        h = _hidden(args, kwargs)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return identity


@torch.no_grad()
def iterative_nll_drop(model, family: ModelFamily, batches, count: int, component: str = "text") -> dict:
    """SLEB's selection: remove `count` layers one at a time, each time the one whose removal (with those removed
    before it) raises the calibration NLL least; layers that are each harmless alone need not be together, which
    one-shot scores cannot see. {"order": removal order, "nll": the NLL after each removal, "baseline_nll"}.
    Costs about count x layers forward passes over the batches. Batches carry `labels`."""
    layers = family.layers(model, component)
    batches = list(batches)
    if not 1 <= count < len(layers):
        raise ValueError(f"iterative_nll_drop: count must be 1..{len(layers) - 1}, got {count}")
    like: dict[int, object] = {}

    def record(i):
        def fn(_m, _args, output):
            like.setdefault(i, output if isinstance(output, tuple) else None)   # what a skip must return
        return fn

    def nll(skipped: list[int]) -> float:
        totals = TokenTotals()
        with _stack([(layers[i], _skipped_like(like[i])) for i in skipped]):
            for batch in batches:
                loss_sum, n, _ = causal_lm_loss(model(**_model_inputs(batch), use_cache=False).logits.float(),
                                                batch["labels"])
                totals.add(loss_sum, n)
        return totals.means()["loss"]

    handles = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        baseline = nll([])
    finally:
        for h in handles:
            h.remove()
    order: list[int] = []
    after: list[float] = []
    for _ in range(count):
        scores = {i: nll(order + [i]) for i in range(len(layers)) if i not in order}
        best = min(scores, key=scores.get)
        order.append(best)
        after.append(scores[best])
    return {"order": order, "nll": after, "baseline_nll": baseline}


@contextmanager
def _stack(patches):
    from contextlib import ExitStack
    with ExitStack() as stack:
        for module, fn in patches:
            stack.enter_context(_patched_forward(module, fn))
        yield


def layer_scores(model, family: ModelFamily, batches, component: str = "text", angular_n: tuple[int, ...] = (1,),
                 nll: bool = True) -> dict:
    """All training-free scores of one component: {metric: [per layer / block start]} (+ token counts)."""
    batches = list(batches)
    scores = hidden_state_scores(model, family, batches, component, angular_n)
    if scores and nll:
        scores.update(nll_drop(model, family, batches, component))
    return scores


@torch.no_grad()
def block_influence(model, family: ModelFamily, batches) -> list[float]:
    """Per text layer: 1 - cosine(hidden state entering the layer, hidden state leaving it), averaged over the
    real (non-padding) tokens of the calibration batches. Low = the layer barely changes its input (ShortGPT)."""
    scores = hidden_state_scores(model, family, batches, "text", angular_n=())
    return scores.get("block_influence", [0.0] * len(family.layers(model, "text")))


def compute_importance(model, family, samples: list[dict], pad_id: int, batch_size: int = 4,
                       angular_n: tuple[int, ...] = (1, 2), nll: bool = True, device=None) -> dict:
    """{"text": {metric: [...]}, "vision": {...}} (vision only for VLMs with image rows), plus per-metric orders
    from least to most important."""
    import torch
    from prunekit.core.samples import collate
    device = device or torch.device("cpu")
    batches = [{k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
               for i in range(0, len(samples), batch_size)]
    out: dict = {}
    for component in ["text"] + (["vision"] if family.is_vlm else []):
        scores = layer_scores(model, family, batches, component, angular_n, nll=nll)
        if not scores:
            continue
        scores["least_important_first"] = {m: sorted(range(len(v)), key=lambda i, v=v: v[i])
                                           for m, v in scores.items() if isinstance(v, list)}
        out[component] = scores
    return out
