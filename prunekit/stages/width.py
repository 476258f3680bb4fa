"""Recipe: `prunekit width MODEL --data CALIB -o OUT` — Minitron-style width pruning of the text model: FFN
channels (`--ffn`), query heads (`--heads`) and hidden channels (`--hidden`) by activation importance; for VLMs
optionally the vision blocks' MLP channels too (`--vision-ffn`, scored on the image rows of CALIB).

Reads: validate the targets -> scores from one pass over the calibration data (or `--importance FILE` from an
earlier run, which needs no model pass and can stream shard by shard) -> the same sizes in every layer -> OUT
written atomically with importance.json (the scores and what was kept), importance.png and prunekit.json.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.loading import check_output_dir, load_model, load_tokenizer, quiet_transformers
from prunekit.core.width import (BUDGET_RULE, WidthShape, activation_importance, budget_error, budget_mixes,
                                 check_importance, choose_mix, count_params, importance_record, resolve_budget,
                                 resolve_targets, width_cut_from_scores)
from prunekit.stages.common import SurgeryInput, SurgeryResult, write_surgery_output


def read_importance(path: str | Path, shape: WidthShape, need_vision: bool = False) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrunekitError(f"--importance {path}: cannot read ({e})") from None
    return check_importance(record, shape, f"--importance {path}", need_vision)


def plot_importance(record: dict) -> bytes:
    """One PNG: FFN and head scores per layer (each layer's channels sorted, normalised to its maximum) and the
    hidden-channel scores sorted, with the kept/removed boundary of each."""
    import numpy as np
    from prunekit.core.plots import figure_png, pyplot
    plt = pyplot()
    kept = record.get("kept") or {}
    vision = record.get("vision_ffn") is not None
    fig, axes = plt.subplots(1, 3 + vision, figsize=(13 + 4.3 * vision, 3.6))
    panels = [(axes[0], "ffn", "FFN channels", "text layer"), (axes[1], "heads", "query heads", "text layer")]
    if vision:
        panels.append((axes[3], "vision_ffn", "vision MLP channels", "vision block"))
    for ax, name, title, ylabel in panels:
        scores = np.array(record[name], dtype=float)
        rows = -np.sort(-scores, axis=1) / np.maximum(scores.max(axis=1, keepdims=True), 1e-30)
        ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
        if kept.get(name):
            ax.axvline(len(kept[name][0]) - 0.5, color="red", lw=1)
        ax.set_xlabel(f"{title}, most important first (red: kept | removed)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} importance / {ylabel.split()[-1]} max", fontsize=9)
    hidden = np.sort(np.array(record["hidden"], dtype=float))[::-1]
    axes[2].plot(hidden)
    if kept.get("hidden"):
        axes[2].axvline(len(kept["hidden"]) - 0.5, color="red", lw=1)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("hidden channels, most important first")
    axes[2].set_title("hidden channel importance (sum over norms)", fontsize=9)
    return figure_png(fig)


def width_params(model: str | Path, ffn=None, heads: int | None = None, hidden: int | None = None,
                 allow_pickle: bool = False, vision_ffn=None) -> int:
    """Parameters (as `prunekit inspect` counts them) the model would have after `prunekit width` with these sizes,
    from its checkpoint headers; bad sizes are the same one-line errors."""
    from prunekit.core.report import checkpoint_shapes
    from prunekit.core.width import shape_cut
    src = SurgeryInput.open(str(model), allow_pickle=allow_pickle)
    new = resolve_targets(src.family, src.config, ffn, heads, hidden, vision_ffn)
    return count_params(src.family, src.config, checkpoint_shapes(src.path), shape_cut(src.family, src.config, new))


def width(model: str, out: str | Path, data: str | Path | None = None, *, ffn=None, heads: int | None = None,
          hidden: int | None = None, importance: str | Path | None = None, samples: int = 64,
          max_length: int = 256, batch_size: int = 4, device: str = "cpu", overwrite: bool = False,
          streaming: bool | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
          plot: bool = True, params: int | None = None, params_fraction: float | None = None,
          params_at_least: bool = False, min_params: int | None = None, vision_ffn=None) -> SurgeryResult:
    """`params` / `params_fraction` (instead of ffn / heads / hidden): at most this many parameters (or this
    fraction of the input's), counted like `prunekit inspect`; prunekit picks the mix (core.width.BUDGET_RULE).
    For the pipeline's guardrail: `params_at_least` keeps at least `params` (removes at most the allowance), and
    mixes leaving fewer than `min_params` are not candidates. `vision_ffn` (VLMs, alone or with ffn / heads / hidden):
    the vision blocks' MLP size (a fraction or a size), scored on the image rows of `data` (or from `importance`)."""
    src = SurgeryInput.open(model, allow_pickle=allow_pickle)
    old = WidthShape.of(src.family, src.config)
    mixes = None
    if params is None and params_fraction is None:
        # bad targets fail before any work
        new = resolve_targets(src.family, src.config, ffn, heads, hidden, vision_ffn)
    else:
        if vision_ffn is not None:
            raise PrunekitError("--vision-ffn: give it with --ffn / --heads / --hidden (or alone), not with a "
                                "--params / --params-fraction budget, which counts the text model's mixes")
        if ffn is not None or heads is not None or hidden is not None:
            raise PrunekitError("--params / --params-fraction: prunekit chooses the FFN, heads and hidden sizes; "
                                "give either a budget or --ffn / --heads / --hidden")
        from prunekit.core.report import checkpoint_shapes
        shapes = checkpoint_shapes(src.path)
        total = count_params(src.family, src.config, shapes)
        flag, budget = resolve_budget(params, params_fraction, total)
        mixes = (budget_mixes(src.family, src.config, shapes, budget, params_at_least, min_params)
                 if budget < total else [])
        if not any(m["reason"] is None for m in mixes):
            raise PrunekitError(budget_error(flag, src.family, src.config, shapes, budget, mixes, params_at_least))
    if (data is None) == (importance is None):
        raise PrunekitError("give --data CALIB (score the channels on it) or --importance FILE (scores from an "
                            "earlier `prunekit width`), exactly one")
    if data is not None and streaming:
        raise PrunekitError("--streaming: scoring on --data runs the model, so it cannot stream; score once, then "
                            "pass --importance OUT/importance.json with --streaming")
    if min(samples, max_length, batch_size) < 1:
        raise PrunekitError("--samples, --max-length and --batch-size must be >= 1")
    check_output_dir(Path(out), [src.path], overwrite)   # refuse a bad OUT before the calibration pass
    loaded = None
    need_vision = mixes is None and new.vision_changed(old)
    if importance is not None:
        record = read_importance(importance, old, need_vision)
        source = {"file": str(Path(importance).resolve()),
                  "sha256": hashlib.sha256(Path(importance).read_bytes()).hexdigest()}
        for key in ("data", "samples", "tokens", *(("vision_tokens",) if need_vision else ())):
            if key in record:
                source[key] = record[key]
    else:
        from prunekit.core.samples import collate, pad_id
        from prunekit.stages.importance import calibration_samples
        with quiet_transformers():
            tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
        calib = calibration_samples(tokenizer, data, src.path, src.family.is_vlm, samples, max_length,
                                    trust_remote_code)
        if need_vision and not any("pixel_values" in s for s in calib):
            raise PrunekitError(f"--vision-ffn: --data {data} has no image rows (in the {len(calib)} taken) to "
                                f"score the vision MLP channels on")
        with quiet_transformers():
            loaded, _ = load_model(src.path, dtype="auto", trust_remote_code=trust_remote_code)
        batches = [{k: v.to(device) for k, v in collate(calib[i:i + batch_size], pad_id(tokenizer)).items()}
                   for i in range(0, len(calib), batch_size)]
        loaded.to(device)
        try:
            scores = activation_importance(loaded, src.family, batches)
        finally:
            loaded.to("cpu")
        source = {"data": str(Path(data).resolve()), "samples": len(calib), "tokens": scores["tokens"],
                  **({"vision_tokens": scores["vision_tokens"]} if need_vision else {})}
        record = importance_record(scores, old, model=str(src.path), **source)
    budget_record = None
    if mixes is not None:
        chosen, records = choose_mix(src.family, src.config, shapes, mixes, record)
        sizes = chosen["sizes"]
        new = WidthShape(old.layers, sizes["intermediate_size"], sizes["num_attention_heads"], old.kv_heads,
                         old.head_dim, sizes["hidden_size"])
        budget_record = {"flag": flag, "params": budget, "params_before": total, "chosen": chosen["mix"],
                         **({"at_least": True} if params_at_least else {}),
                         **({"min_params": min_params} if min_params is not None else {}),
                         "rule": BUDGET_RULE, "mixes": records}
    surgery = width_cut_from_scores(src.family, src.config, new, record, importance=source, budget=budget_record)
    written = {**{k: v for k, v in record.items() if k != "kept"},
               "kept": {"ffn": surgery.ffn_keep, "heads": surgery.head_keep, "hidden": surgery.hidden_keep,
                        **({"vision_ffn": surgery.vision_ffn_keep} if surgery.vision_ffn_keep else {})}}
    files: dict[str, str | bytes] = {"importance.json": json.dumps(written) + "\n"}
    if plot:
        files["importance.png"] = plot_importance(written)
    return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=streaming, model=loaded,
                                trust_remote_code=trust_remote_code, stage="width", extra_files=files)
