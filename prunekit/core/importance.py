"""Training-free layer importance (no Ray, no training)."""
from __future__ import annotations

import torch

from prunekit.core.adapters import Adapter, get_module


@torch.no_grad()
def block_influence(model, adapter: Adapter, batches) -> list[float]:
    """Per text layer: 1 - cosine(hidden state entering the layer, hidden state leaving it), averaged over the
    real (non-padding) tokens of the calibration batches. Low = the layer barely changes its input (ShortGPT)."""
    layers = get_module(model, adapter.text_layers)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(index):
        def fn(_module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            sums[index] += float((1 - cos)[mask_holder["mask"]].sum())
        return fn
    hooks = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            mask_holder["mask"] = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
            count += int(mask_holder["mask"].sum())
            model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return (sums / max(count, 1)).tolist()
