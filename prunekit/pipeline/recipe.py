"""The recipe: stage names, every stage's settings checked with the stage's own config class, the order; a knockout
plan.json given to `prune`. Everything here runs before anything is written."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from prunekit import PrunekitError
from prunekit.config import (
    FINISH_STAGES,
    PIPELINE_OWNED_KEYS,
    ROUND_STAGES,
    STAGE_CONFIGS,
    ImportanceStageConfig,
    KVCutStageConfig,
    MergeStageConfig,
    PruneStageConfig,
    WidthStageConfig,
    move_parallel_keys,
)

MODEL_STAGES = {"prune", "width", "sft", "distill", "kv_cut", "merge_lora", "rl"}   # stages whose output is the next model
TRAIN_STAGES = {"sft", "distill", "lora"}
SIMPLE_CONFIGS = {"importance": ImportanceStageConfig, "prune": PruneStageConfig, "kv_cut": KVCutStageConfig,
                  "merge_lora": MergeStageConfig, "width": WidthStageConfig}
PIPELINE_KEYS = {"knockout": {"importance_candidates"}}   # settings the pipeline reads itself, not the stage


class PipelineStopped(PrunekitError):
    """A guardrail stopped the pipeline (the summary is written; finished stages stay in the state file)."""


@dataclass
class PipelineResult:
    output_dir: Path
    final_model: Path
    status: str
    original: dict
    stages: list[dict]
    summary: Path


# ---- checks ------------------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _stage_config(stage: str, settings: dict, cfg, *, model: str, out: Path, name: str, storage: Path):
    """The validated config object a stage function takes: the pipeline's fields (model, data, output, run name,
    Ray, wandb) under the recipe's settings for this stage."""
    settings = {k: v for k, v in settings.items() if k not in PIPELINE_KEYS.get(stage, ())}
    if stage not in SIMPLE_CONFIGS:
        settings = move_parallel_keys(settings)  # before merging over the recipe's own `parallel:`
    if stage in SIMPLE_CONFIGS:
        return SIMPLE_CONFIGS[stage](**settings)
    base: dict = {"model": model, "output_dir": str(out), "name": name, "storage_path": str(storage),
                  "overwrite": True, "trust_remote_code": cfg.trust_remote_code,
                  "wandb": cfg.wandb.model_dump(), "ray": {"address": cfg.ray.address}}
    if stage in ("sft", "distill", "lora", "knockout"):
        base.update(train=str(cfg.train), val=str(cfg.val))
    if stage in ("sft", "distill", "lora", "rl"):
        base["ray"], base["parallel"] = cfg.ray.model_dump(), cfg.parallel.model_dump()
    if stage in ("sft", "distill", "lora"):
        base["launcher"] = cfg.launcher
    if stage == "distill":
        base["teacher"] = cfg.model           # distil from the original unless the recipe names a teacher
    if stage == "knockout" and cfg.ray.use_gpu and "gpus_per_trial" not in settings.get("tune", {}):
        base["tune"] = {"gpus_per_trial": 1}  # a GPU pipeline's trials get a GPU each unless told otherwise
    if stage == "knockout":                   # the sweep's plan respects the round's guardrails
        base.update(max_params_fraction=cfg.max_params_fraction, max_layers=cfg.max_layers)
    return STAGE_CONFIGS[stage](**_merge(base, settings))


def check_recipe(cfg, where: str = "recipe") -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """(rounds, finish) as [(stage, settings)], every stage's settings validated; one-line errors naming the
    entry, before anything runs."""
    known = set(ROUND_STAGES) | set(FINISH_STAGES)
    for name in cfg.stages:
        if name not in known:
            raise PrunekitError(f"{where}: stages.{name}: unknown stage (stages: {', '.join(sorted(known))})")
    lists = {}
    for key, allowed in (("rounds", ROUND_STAGES), ("finish", FINISH_STAGES)):
        entries = []
        for i, entry in enumerate(getattr(cfg, key)):
            at = f"{where}: {key}[{i}]"
            if isinstance(entry, str):
                stage, over = entry, {}
            elif isinstance(entry, dict) and len(entry) == 1:
                ((stage, over),) = entry.items()
                over = over or {}
            else:
                raise PrunekitError(f"{at}: expected a stage name or {{stage: {{settings}}}}, got {entry!r}")
            if stage not in allowed:
                what = "unknown stage" if stage not in known else f"{stage} cannot run in {key}"
                raise PrunekitError(f"{at}: {what} {stage!r} ({key} stages: {', '.join(allowed)})")
            if not isinstance(over, dict) or not isinstance(cfg.stages.get(stage, {}), dict):
                raise PrunekitError(f"{at}.{stage}: settings must be a mapping")
            settings = _merge(cfg.stages.get(stage, {}), over)
            for k in settings:
                if k in PIPELINE_OWNED_KEYS:
                    raise PrunekitError(f"{at}.{stage}.{k}: set by the pipeline (every stage's {k} is its own)")
            try:
                _stage_config(stage, settings, cfg, model="model", out=Path("out"), name="check",
                              storage=Path("runs"))
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"]) or "settings"
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
                raise PrunekitError(f"{at}.{stage}.{loc}: {msg}") from None
            entries.append((stage, settings))
        lists[key] = entries
    rounds, finish = lists["rounds"], lists["finish"]
    names = [s for s, _ in rounds]
    if not {"prune", "width"} & set(names):
        raise PrunekitError(f"{where}: rounds: a round must prune (add `prune` after `knockout` or `importance`, "
                            f"or `width`)")
    for i, (stage, settings) in enumerate(rounds):
        if stage == "prune" and not {"knockout", "importance"} & set(names[:i]) and not settings.get("plan"):
            raise PrunekitError(f"{where}: rounds[{i}]: prune needs a plan: put `knockout` or `importance` before it, "
                                f"or give prune a knockout report's `plan: plan.json`")
        if stage == "prune" and settings.get("plan") and not Path(settings["plan"]).is_file():
            raise PrunekitError(f"{where}: rounds[{i}].prune.plan: {settings['plan']}: no such file")
        if stage in ("knockout", "rl") and cfg.launcher == "local":
            raise PrunekitError(f"{where}: rounds[{i}]: {stage} runs on Ray; it cannot run with launcher: local")
        if stage == "knockout" and settings.get("importance_candidates") is not None:
            n = settings["importance_candidates"]
            if not isinstance(n, int) or n < 1:
                raise PrunekitError(f"{where}: rounds[{i}].knockout.importance_candidates: must be an integer >= 1")
            if "importance" not in names[:i]:
                raise PrunekitError(f"{where}: rounds[{i}].knockout.importance_candidates: needs an `importance` "
                                    f"stage earlier in the round")
    fnames = [s for s, _ in finish]
    for i, stage in enumerate(fnames):
        if stage == "lora" and (i + 1 >= len(fnames) or fnames[i + 1] != "merge_lora"):
            raise PrunekitError(f"{where}: finish[{i}]: lora must be followed by merge_lora (the next stages need a "
                                f"full model)")
        if stage == "merge_lora" and (i == 0 or fnames[i - 1] != "lora"):
            raise PrunekitError(f"{where}: finish[{i}]: merge_lora must follow lora")
    return rounds, finish



def read_plan(path: Path, model: str) -> dict:
    """A knockout report's plan.json, checked against the model it is applied to (layer count)."""
    from prunekit.core.adapters import adapter_for
    from prunekit.core.loading import read_config
    from prunekit.core.plan import Candidate
    try:
        plan = json.loads(Path(path).read_text())
        order = plan["order"]
        ids = [(e["id"], int(e["params_removed"])) for e in order]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PrunekitError(f"prune.plan {path}: not a knockout plan.json ({type(e).__name__}: {e})") from None
    cfg = read_config(Path(model))
    layers = adapter_for(cfg).num_text_layers(cfg)
    if not ids:
        raise PrunekitError(f"prune.plan {path}: the plan removes nothing")
    for cid, _ in ids:
        beyond = [i for i in Candidate.parse(cid, f"prune.plan {path}").text if i >= layers]
        if beyond:
            raise PrunekitError(f"prune.plan {path}: {cid} is beyond the {layers} text layers of {model}")
    return plan


