"""A model directory's config.json checked against its weights (safetensors headers, no weights loaded), before
any surgery, inspection or training believes it: a hand-edited layer count, hidden size, vocabulary or KV-head count
that disagrees with the tensors is one line naming the mismatch, never a model with random layers added or real
ones silently dropped."""
from __future__ import annotations

from pathlib import Path

from prunekit import PrunekitError


def _int_field(d: dict, key: str, where: str):
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise PrunekitError(f"{where} {key}: {v!r} is not a positive integer")
    return v


def check_model_dir(model_dir: Path) -> None:
    """Raise a one-line PrunekitError when config.json cannot describe the weights beside it."""
    from prunekit.core.families import family_for
    from prunekit.core.checkpoint import checkpoint_shapes, read_config
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    where = f"{model_dir / 'config.json'}:"
    family = family_for(cfg)
    if family.is_vlm and not isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        raise PrunekitError(f"{where} a {family.name} config needs a text_config section")
    tc = family.text_config(cfg)
    text_where = f"{where} text_config" if tc is not cfg else where
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if _int_field(tc, key, text_where) is None:
            raise PrunekitError(f"{text_where} no {key}")
    for key in ("num_key_value_heads", "vocab_size", family.head_dim_field or "head_dim"):
        _int_field(tc, key, text_where)
    if family.is_vlm:
        vc = family.vision_config(cfg)
        if not isinstance(vc, dict) or _int_field(vc, family.vision_depth_field, f"{where} vision_config") is None:
            raise PrunekitError(f"{where} no vision_config.{family.vision_depth_field}")
    try:
        shapes = checkpoint_shapes(model_dir)
    except PrunekitError:   # already one line naming the file
        raise
    except Exception as e:  # a damaged header or pickle
        raise PrunekitError(f"{model_dir}: cannot read the weights' tensor list ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not shapes:
        return
    problems = _mismatches(family, cfg, shapes)
    if problems:
        raise PrunekitError(f"MODEL {model_dir}: {'; '.join(problems)} (config.json and the weights disagree; "
                            f"nothing done)")


def _indexes(match, keys) -> set[int]:
    out = set()
    for k in keys:
        m = match(k)
        if m:
            out.add(int(m.group("idx")))
    return out


def _mismatches(family, cfg: dict, shapes: dict[str, list[int]]) -> list[str]:
    problems = []
    n_text = family.num_text_layers(cfg)
    text = _indexes(family.match_text_layer, shapes)
    if text and n_text != len(text):
        problems.append(f"config.json says {n_text} text layers, the weights hold {len(text)}")
    elif text and text != set(range(n_text)):
        missing = sorted(set(range(n_text)) - text)
        problems.append(f"config.json says {n_text} text layers, the weights have none numbered {missing[0]}")
    if family.is_vlm:
        n_vision = family.num_vision_blocks(cfg)
        vision = _indexes(family.match_vision_block, shapes)
        if vision and n_vision != len(vision):
            problems.append(f"config.json says {n_vision} vision blocks, the weights hold {len(vision)}")
    tc = family.text_config(cfg)
    hidden = tc["hidden_size"]
    vocab = tc.get("vocab_size") or cfg.get("vocab_size")
    embed = next((k for k in shapes if family.component(k) == "embeddings"), None)
    if embed is not None and len(shapes[embed]) == 2:
        rows, cols = shapes[embed]
        if cols != hidden:
            problems.append(f"config.json says hidden_size {hidden}, the weights' {embed} has {cols} columns")
        if vocab and rows != vocab:
            problems.append(f"config.json says vocab_size {vocab}, the weights' {embed} has {rows} rows")
    if not family.fused_qkv and not problems:
        heads, kv, head_dim = family.attention_shape(cfg)
        for proj, n_heads, field in ((family.q_proj, heads, "num_attention_heads"),
                                     (family.k_proj, kv, "num_key_value_heads")):
            key = next((k for k in shapes if (m := family.match_text_layer(k)) and m.group("idx") == "0"
                        and m.group("rest") == f".{family.attn_module}.{proj}.weight"), None)
            if key is None or len(shapes[key]) != 2:
                continue
            out_features = shapes[key][0]
            if out_features != n_heads * head_dim:
                got = f"{out_features / head_dim:.2f}".removesuffix(".00")
                problems.append(f"config.json says {field} {n_heads} x head_dim {head_dim} = {n_heads * head_dim}, "
                                f"the weights' {key} has {out_features} rows ({got} heads)")
    return problems


__all__ = ["check_model_dir"]
