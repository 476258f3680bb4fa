"""What the pipeline measures of every model: facts from the checkpoint headers (parameters, layers, KV heads,
KV-cache bytes/token), loss / token_acc on the chat val and the general text, and the recovery guardrail."""
from __future__ import annotations

from pathlib import Path

from prunekit.core import report
from prunekit.pipeline.recipe import PipelineStopped

# ---- measurements ----------------------------------------------------------------------------------------------

def evaluate_model(path: str, val: str, samples: int | None, max_length: int, trust_remote_code: bool = False,
                   device: str = "cpu") -> dict:
    """Eval loss, perplexity and token_acc of a model directory on the first `samples` rows of `val` (the same rows
    and the same definition for every stage, so the summary compares like with like)."""
    from prunekit.stages.evaluate import evaluate_file
    m = evaluate_file(path, val, samples, max_length, trust_remote_code, device)
    return {k: m[k] for k in ("loss", "ppl", "token_acc", "tokens")}


def model_facts(path: Path) -> dict:
    info = report.describe(path)
    return {"params": info["params"]["total"], "text_layers": info["text_layers"], "kv_heads": info["kv_heads"],
            "kv_bytes_per_token": info["kv_cache_bytes_per_token_bf16"],
            **({"vision_blocks": info["vision_blocks"]} if "vision_blocks" in info else {})}


def text_layer_params(path: Path) -> list[int]:
    """Parameters of each text decoder layer, from the checkpoint headers."""
    from prunekit.core.families import family_for
    from prunekit.core.loading import read_config
    cfg = read_config(path)
    return family_for(cfg).text_layer_params(report.checkpoint_shapes(path), cfg)


def describe(rec: dict) -> str:
    f, e = rec["facts"], rec["eval"]
    text = rec.get("eval_text")
    general = (f"; general text loss {text['loss']:.3f} (ppl {text['ppl']:.1f}), token_acc {text['token_acc']:.3f}"
               if text else "")
    return (f"{rec['id']}: {f['params']:,} params, {f['text_layers']} layers, {f['kv_heads']} KV heads, "
            f"{f['kv_bytes_per_token']:,} KV B/token; chat val loss {e['loss']:.3f}, token_acc {e['token_acc']:.3f}"
            f"{general}")


def recovery_shortfall(cfg, original: dict, current: dict) -> str | None:
    """None when the current model's token_acc is at least min_token_acc_ratio x the original's: on the general
    text when both were measured on it (the chat val may be the training distribution), else on the chat val."""
    key, name = ("eval_text", "general-text") if "eval_text" in original and "eval_text" in current else \
        ("eval", "chat val")
    base = original[key]["token_acc"]
    acc = current[key]["token_acc"]
    ratio = acc / base if base else 1.0
    if ratio >= cfg.min_token_acc_ratio:
        return None
    return (f"{name} token_acc {acc:.4f} is {ratio:.3f} of the original's {base:.4f}, below min_token_acc_ratio "
            f"{cfg.min_token_acc_ratio}")


def check_recovery(cfg, original: dict, current: dict, when: str) -> None:
    """The round guardrail: no further pruning on a model that did not recover."""
    short = recovery_shortfall(cfg, original, current)
    if short:
        raise PipelineStopped(f"stopped {when}: {short} (more recovery steps, a smaller max_params_fraction, or "
                              f"`--redo STAGE` after changing the recipe)")


