"""Recipe: `prunekit eval MODEL --data FILE` — loss, perplexity and token_acc of a model on messages or text rows.

The same measurement the pipeline takes of every model (its chat val and its general-text eval): assistant tokens
of conversations, every token of text rows, token-weighted (`prunekit.core.evaluate.evaluate`).
"""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.loading import quiet_transformers, resolve_model


def evaluate_file(model: str | Path, data: str | Path, max_samples: int | None = None, max_length: int = 512,
                  trust_remote_code: bool = False, device: str = "cpu") -> dict:
    """{'loss', 'ppl', 'token_acc', 'tokens', 'rows'} on the first `max_samples` rows of `data` (all when None)."""
    from prunekit.core.evaluate import evaluate, perplexity
    from prunekit.core.loading import load_model, load_tokenizer
    from prunekit.core.samples import load_samples, pad_id
    if max_samples is not None and max_samples < 1:
        raise PrunekitError(f"--max-samples must be >= 1, got {max_samples}")
    if max_length < 2:
        raise PrunekitError(f"--max-length must be >= 2, got {max_length}")
    path = resolve_model(str(model))
    with quiet_transformers():
        loaded, family = load_model(path, trust_remote_code=trust_remote_code, device=device)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    samples = load_samples(tokenizer, Path(data), model=path, max_length=max_length, is_vlm=family.is_vlm,
                           trust_remote_code=trust_remote_code, limit=max_samples)
    if not samples:
        raise PrunekitError(f"{data}: no row with tokens to evaluate on")
    m = evaluate(loaded, samples, pad_id(tokenizer))
    return {"loss": m["loss"], "ppl": perplexity(m["loss"]), "token_acc": m["token_acc"],
            "tokens": m["tokens"], "rows": len(samples)}
