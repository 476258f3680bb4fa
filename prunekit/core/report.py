"""Model facts from checkpoint headers (no weights loaded): parameters per component, attention shape,
KV-cache bytes per token; and plain-text tables."""
from __future__ import annotations

from pathlib import Path

from prunekit.core.families import ModelFamily, family_for
from prunekit.core.checkpoint import checkpoint_shapes, read_config  # noqa: F401  (checkpoint_shapes: re-exported)

BF16_BYTES = 2


def kv_cache_bytes_per_token(family: ModelFamily, cfg: dict, bytes_per_value: int = BF16_BYTES) -> int:
    """K and V for every text layer, every KV head: 2 * layers * kv_heads * head_dim * bytes."""
    _, kv, head_dim = family.attention_shape(cfg)
    return 2 * family.num_text_layers(cfg) * kv * head_dim * bytes_per_value


def describe(model_dir: Path) -> dict:
    """Everything `prunekit inspect` shows, as a JSON-able dict."""
    cfg = read_config(model_dir)
    family = family_for(cfg)
    heads, kv, head_dim = family.attention_shape(cfg)
    info = {
        "path": str(model_dir),
        "family": family.name,
        "text_layers": family.num_text_layers(cfg),
        "vision_blocks": family.num_vision_blocks(cfg) if family.is_vlm else None,
        "attention_heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "qkv_bias": family.qkv_bias(cfg),
        "fused_qkv": family.fused_qkv,
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(family, cfg),
        "tied_embeddings": family.ties_embeddings(cfg),
        "params": family.component_params(checkpoint_shapes(model_dir), cfg),
    }
    if not family.is_vlm:
        del info["vision_blocks"]
    return info


def human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000
    return f"{n:.1f}P"


def table(rows: list[list], header: list[str]) -> str:
    """A fixed-width text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_inspect(info: dict) -> str:
    rows = [["family", info["family"]], ["text layers", info["text_layers"]]]
    if "vision_blocks" in info:
        rows.append(["vision blocks", info["vision_blocks"]])
    rows += [["attention heads", info["attention_heads"]], ["KV heads", info["kv_heads"]],
             ["head_dim", info["head_dim"]], ["qkv bias", info["qkv_bias"]],
             ["KV cache / token (bf16)", f"{info['kv_cache_bytes_per_token_bf16']:,} B"]]
    rows += [[f"params: {k}", f"{v:,} ({human(v)})"] for k, v in info["params"].items()]
    return f"{info['path']}\n" + table(rows, ["", "value"])


def compare_table(before: dict, after: dict) -> str:
    """Before/after table of two `describe` results."""
    def pct(a, b):
        return f"{(b - a) / a * 100:+.1f}%" if a else ""
    keys = [("params", lambda d: d["params"]["total"]), ("text layers", lambda d: d["text_layers"]),
            ("KV heads", lambda d: d["kv_heads"]), ("KV cache B/token (bf16)", lambda d: d["kv_cache_bytes_per_token_bf16"])]
    if "vision_blocks" in before:
        keys.insert(2, ("vision blocks", lambda d: d["vision_blocks"]))
    rows = [[name, f"{get(before):,}", f"{get(after):,}", pct(get(before), get(after))] for name, get in keys]
    return table(rows, ["", "before", "after", "change"])


def cell(v, digits: int = 4) -> str:
    """A value as a report cell: floats to `digits` places, lists comma-joined, None empty."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def csv_text(rows: list[dict], columns: list[str], digits: int = 6) -> str:
    """`rows` as CSV with a header of `columns` (other keys ignored), cells as `cell` writes them."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: cell(row.get(k), digits) for k in columns})
    return buf.getvalue()
