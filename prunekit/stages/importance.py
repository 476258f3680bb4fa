"""Recipe: `prunekit importance MODEL --data FILE -o DIR` — training-free scores for every text layer and vision
block, as importance.json plus one PNG per metric.

Reads: validate -> load the model and tokenize the calibration conversations once -> block influence and angular
distance (one pass), NLL-drop (one pass per layer, same model) -> write DIR atomically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks
from prunekit.core.importance import compute_importance
from prunekit.core.samples import pad_id
from prunekit.core.loading import (check_output_dir, load_model, load_tokenizer, quiet_transformers, resolve_model,
                                   write_atomically)

METRIC_TITLES = {"block_influence": "block influence (1 - cos(h_in, h_out))",
                 "angular_distance": "angular distance of {n} consecutive layers (arccos(cos)/pi)",
                 "nll_drop": "NLL-drop: calibration NLL with the layer skipped - full model's"}


@dataclass
class ImportanceResult:
    output: Path
    scores: dict


def calibration_samples(tokenizer, data: str | Path, model_dir: Path, is_vlm: bool, limit: int, max_length: int,
                        trust_remote_code: bool = False) -> list[dict]:
    """Tokenized conversations with assistant labels (image rows through the processor for VLMs)."""
    from prunekit.core.samples import load_samples
    samples = load_samples(tokenizer, Path(data), model=model_dir, max_length=max_length, is_vlm=is_vlm,
                           trust_remote_code=trust_remote_code, limit=limit)
    if not samples:
        raise PrunekitError(f"--data {data}: no conversation with assistant tokens")
    return samples


def plot_scores(scores: dict, out_dir: Path) -> list[Path]:
    """One bar chart per component and metric: <component>_<metric>.png."""
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    paths = []
    for component, metrics in scores.items():
        for metric, values in metrics.items():
            if not isinstance(values, list) or not values:
                continue
            base = "angular_distance" if metric.startswith("angular_distance") else metric
            title = METRIC_TITLES.get(base, metric).format(n=metric.rsplit("_n", 1)[-1])
            lowest = set(sorted(range(len(values)), key=lambda i: values[i])[:max(1, len(values) // 5)])
            fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(values) + 2), 3.5))
            ax.bar(range(len(values)), values, color=["tab:green" if i in lowest else "tab:blue"
                                                      for i in range(len(values))])
            ax.set_xlabel(("first " if base == "angular_distance" else "") +
                          ("text layer" if component == "text" else "vision block"))
            ax.set_ylabel(metric)
            ax.set_title(f"{component}: {title}\n(green: least important fifth)", fontsize=9)
            ax.set_xticks(range(len(values)))
            ax.tick_params(axis="x", labelsize=7)
            paths.append(save_figure(fig, Path(out_dir) / f"{component}_{metric}.png"))
    return paths


def importance(model: str, data: str | Path, out: str | Path, *, samples: int = 32, max_length: int = 256,
               batch_size: int = 4, angular_n: tuple[int, ...] = (1, 2), nll: bool = True, device: str = "cpu",
               overwrite: bool = False, trust_remote_code: bool = False) -> ImportanceResult:
    import torch
    path = resolve_model(model)
    out = check_output_dir(Path(out), [path], overwrite)
    with locks.hold((out, "-o")):  # one writer per OUT
        if samples < 1 or batch_size < 1 or any(n < 1 for n in angular_n):
            raise PrunekitError("--samples, --batch-size and --angular-n must be >= 1")
        with quiet_transformers():
            model_obj, family = load_model(path, dtype="float32", trust_remote_code=trust_remote_code, device=device)
            tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        calib = calibration_samples(tokenizer, data, path, family.is_vlm, samples, max_length, trust_remote_code)
        scores = compute_importance(model_obj, family, calib, pad_id(tokenizer), batch_size, tuple(angular_n), nll,
                                    torch.device(device))
        record = {"model": str(path), "data": str(Path(data).resolve()), "samples": len(calib),
                  "higher_is_more_important": True, **scores}

        def write(tmp: Path):
            (tmp / "importance.json").write_text(json.dumps(record, indent=2) + "\n")
            plot_scores(scores, tmp)

        write_atomically(out, write, overwrite=overwrite)
        return ImportanceResult(out, record)
