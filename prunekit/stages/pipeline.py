"""Recipe: `prunekit pipeline recipe.yaml` — the whole workflow, repeated until the model is small enough.

Reads top to bottom: check the recipe (stage names, every stage's settings, the order) -> join Ray -> measure the
original (parameters, KV-cache bytes/token, token_acc on the chat val set and on the held-out general text
`eval_text`) -> rounds of the `rounds` stages (default knockout -> prune -> sft -> distill) until the target size,
each round removing at most `max_params_fraction` of its input's parameters and `max_layers` layers, stopping before
another round when recovery ended below `min_token_acc_ratio` of the original's token_acc (general text when
measured: the chat val is what recovery trains on; on the final model it is a note in the status) -> the `finish`
stages (kv_cut, sft, lora -> merge_lora, rl) ->
a summary table, summary.json and summary.png across stages.

Every stage is the stage's own function (`prunekit.stages.*`); this module only decides what runs on which model.
Each stage's output goes to `output_dir/<stage id>/` (ids: `r1-2-prune`, `f-1-kv_cut`, ...); `pipeline_state.json`
records every finished stage with its output and measurements, so re-running the same recipe skips them and an
interrupted training stage resumes from its own checkpoints (stable run names under `storage_path`).
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import time
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
)
from prunekit.core import report
from prunekit.core.data import load_messages
from prunekit.core.loading import resolve_model

STATE_FILE = "pipeline_state.json"
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


# ---- the recipe ------------------------------------------------------------------------------------------------

def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _stage_config(stage: str, settings: dict, cfg, *, model: str, out: Path, name: str, storage: Path):
    """The validated config object a stage function takes: the pipeline's fields (model, data, output, run name,
    Ray, wandb) under the recipe's settings for this stage."""
    settings = {k: v for k, v in settings.items() if k not in PIPELINE_KEYS.get(stage, ())}
    if stage in SIMPLE_CONFIGS:
        return SIMPLE_CONFIGS[stage](**settings)
    base: dict = {"model": model, "output_dir": str(out), "name": name, "storage_path": str(storage),
                  "overwrite": True, "trust_remote_code": cfg.trust_remote_code,
                  "wandb": cfg.wandb.model_dump(), "ray": {"address": cfg.ray.address}}
    if stage in ("sft", "distill", "lora", "knockout"):
        base.update(train=str(cfg.train), val=str(cfg.val))
    if stage in ("sft", "distill", "lora", "rl"):
        base["ray"] = cfg.ray.model_dump()
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
    from prunekit.core.adapters import adapter_for
    from prunekit.core.loading import read_config
    cfg = read_config(path)
    adapter = adapter_for(cfg)
    counts = [0] * adapter.num_text_layers(cfg)
    for key, shape in report.checkpoint_shapes(path).items():
        m = adapter.match_text_layer(key)
        if m:
            n = 1
            for d in shape:
                n *= int(d)
            counts[int(m.group("idx"))] += n
    return counts


# ---- the state file --------------------------------------------------------------------------------------------

class State:
    """output_dir/pipeline_state.json: the original's measurements and every finished stage, in order."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, out: Path, model: str) -> State:
        path = out / STATE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PrunekitError(f"{path}: cannot read the pipeline state ({e})") from None
            if data.get("model") != model:
                raise PrunekitError(f"output_dir {out}: holds a pipeline of {data.get('model')}, not {model}; use "
                                    f"another output_dir")
            return cls(path, data)
        if out.exists() and any(out.iterdir()):
            raise PrunekitError(f"output_dir {out}: not empty and not a pipeline's (no {STATE_FILE}); use another "
                                f"output_dir")
        return cls(path, {"model": model, "original": None, "stages": [], "status": "running"})

    @property
    def finished(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.data["stages"]}

    def save(self) -> None:
        self.data["updated"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)  # a crash mid-write never leaves a half state file

    def add(self, record: dict) -> None:
        self.data["stages"].append(record)
        self.save()

    def redo(self, stage_id: str) -> list[str]:
        """Forget `stage_id` and every stage finished after it (they run again)."""
        ids = [r["id"] for r in self.data["stages"]]
        if stage_id not in ids:
            raise PrunekitError(f"--redo {stage_id}: not a finished stage (finished: {', '.join(ids) or 'none'})")
        dropped = ids[ids.index(stage_id):]
        self.data["stages"] = self.data["stages"][:ids.index(stage_id)]
        self.save()
        return dropped


# ---- the run ---------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, cfg, state: State, out: Path, storage: Path, name: str):
        self.cfg, self.state, self.out, self.storage, self.name = cfg, state, out, storage, name
        self.round_input: dict[int, int] = {}   # parameters of each round's input (the guardrail's base)

    @property
    def local_device(self) -> str:
        """Where model-sized work runs in this process: the GPU of a local GPU pipeline, else the CPU (a Ray
        pipeline's driver may sit on a CPU-only head node)."""
        return "cuda" if self.cfg.ray.use_gpu and self.cfg.launcher == "local" else "cpu"

    def on_worker(self, fn, *args, **kwargs):
        """Model-sized work (eval, importance): in-process on CPU pipelines; on a GPU worker for GPU pipelines (the
        driver may sit on a CPU-only head node)."""
        if self.cfg.launcher == "local":
            return fn(*args, device=self.local_device, **kwargs)
        if not self.cfg.ray.use_gpu:
            return fn(*args, **kwargs)
        import ray
        return ray.get(ray.remote(num_gpus=1, num_cpus=1)(fn).remote(*args, device="cuda", **kwargs))

    def measure(self, path: Path) -> dict:
        """Facts, the chat val ("eval") and, with eval_text, the held-out general text ("eval_text")."""
        c = self.cfg
        ev = self.on_worker(evaluate_model, str(path), str(c.val), c.eval_samples, c.eval_max_length,
                            c.trust_remote_code)
        record = {"facts": model_facts(path), "eval": ev}
        if c.eval_text is not None:
            record["eval_text"] = self.on_worker(evaluate_model, str(path), str(c.eval_text), c.eval_text_samples,
                                                 c.eval_max_length, c.trust_remote_code)
        return record

    def original(self) -> dict:
        if self.state.data["original"] is None:
            print(f"\n== original: {self.cfg.model}", flush=True)
            self.state.data["original"] = {"id": "original", "stage": "original", "output": self.cfg.model,
                                           **self.measure(Path(self.cfg.model))}
            self.state.save()
        rec = self.state.data["original"]
        if self.cfg.eval_text is not None and "eval_text" not in rec:  # a state from before eval_text
            rec.update(self.measure(Path(self.cfg.model)))
            self.state.save()
        print(_describe(rec), flush=True)
        return rec

    def round_record(self, rnd: int, stage: str) -> dict | None:
        found = [r for r in self.state.data["stages"] if r.get("round") == rnd and r["stage"] == stage]
        return found[-1] if found else None

    def run(self, stage_id: str, stage: str, settings: dict, rnd: int | None, current: dict, target: int) -> dict:
        """Run one stage on the current model (or take it from the state file); returns the new current model."""
        if rnd is not None:
            self.round_input.setdefault(rnd, current["facts"]["params"])
        done = self.state.finished.get(stage_id)
        if done is None:
            print(f"\n== [{stage_id}] {stage} on {Path(current['output']).name}"
                  f"{f' (round {rnd})' if rnd else ''}", flush=True)
            t0 = time.time()
            out = self.out / stage_id
            try:
                record = getattr(self, f"_{stage}")(stage_id, settings, rnd, current, target, out)
            except PipelineStopped:
                raise
            except PrunekitError as e:
                raise PrunekitError(f"stage {stage_id} ({stage}) failed: {e} — finished stages are kept in "
                                    f"{self.state.path}; fix it and re-run the same command to continue") from None
            record = {"id": stage_id, "stage": stage, "round": rnd, "input": current["output"], **record}
            if stage in MODEL_STAGES:
                record.update(self.measure(Path(record["output"])))
            record["time_s"] = round(time.time() - t0, 1)
            self.state.add(record)
            print(f"[{stage_id}] finished in {record['time_s']:.0f}s -> {record['output']}", flush=True)
            done = record
        else:
            print(f"\n== [{stage_id}] {stage}: finished earlier -> {done['output']}", flush=True)
        if stage in MODEL_STAGES:
            print(_describe(done), flush=True)
            return done
        return current

    # -- one method per stage: call the stage's own function, return what the state should remember --------------

    def _config(self, stage, settings, stage_id, current, out):
        return _stage_config(stage, settings, self.cfg, model=current["output"], out=out,
                             name=f"{self.name}-{stage_id}", storage=self.storage)

    def _importance(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.importance import importance
        s = self._config("importance", settings, stage_id, current, out)
        result = self.on_worker(importance, current["output"], str(self.cfg.train), str(out), samples=s.samples,
                                max_length=s.max_length, nll=s.nll, overwrite=True,
                                trust_remote_code=self.cfg.trust_remote_code)
        orders = result.scores["text"]["least_important_first"]
        if s.metric not in orders:
            raise PrunekitError(f"importance.metric {s.metric!r}: not computed (metrics: {', '.join(orders)})")
        order = orders[s.metric]
        n = len(order)
        if s.keep_first_last:
            order = [i for i in order if 0 < i < n - 1]
        return {"output": str(result.output), "metric": s.metric, "least_important_first": order}

    def _knockout(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.knockout import knockout
        if settings.get("importance_candidates"):
            ranked = self.round_record(rnd, "importance")["least_important_first"]
            settings = _merge(settings, {"candidates": {"text": sorted(ranked[:settings["importance_candidates"]])}})
        result = knockout(self._config("knockout", settings, stage_id, current, out))
        if result.errors:
            first = next(iter(result.errors.items()))
            raise PrunekitError(f"{len(result.errors)} knockout trial(s) failed (e.g. {first[0]}: {first[1]}); "
                                f"re-running retries only those")
        verdicts = {r["id"]: r.get("verdict") for r in result.rows}
        return {"output": str(result.output), "plan": result.plan, "verdicts": verdicts}

    def _plan(self, rnd: int, current: dict, target: int,
              plan_file: Path | None = None) -> tuple[list[int], list[int], list[str]]:
        """The layers this round removes: the round's knockout plan (best first), else the importance order (least
        important first), taken while the guardrails allow and only until the target is reached."""
        from prunekit.core.plan import Candidate
        params = current["facts"]["params"]
        ko = self.round_record(rnd, "knockout")
        plan = ko["plan"] if ko is not None else None
        if plan is None and plan_file is not None:
            plan = read_plan(plan_file, current["output"])
        if plan is not None:
            order = [(Candidate.parse(e["id"], "plan"), e["params_removed"]) for e in plan["order"]]
            order = [(c.text, c.vision, p, c.id) for c, p in order]
        else:
            per_layer = text_layer_params(Path(current["output"]))
            imp = self.round_record(rnd, "importance")
            order = [((i,), (), per_layer[i], f"text:{i}") for i in imp["least_important_first"]]
        budget = self._round_allowance(rnd, current)
        text, vision, chosen, removed = set(), set(), [], 0
        for t, v, p, cid in order:
            if params - removed <= target:
                break
            size = len(text) + len(vision) + len(t) + len(v)
            if removed + p > budget or size > self.cfg.max_layers or set(t) & text or set(v) & vision:
                continue
            text |= set(t)
            vision |= set(v)
            removed += p
            chosen.append(cid)
        return sorted(text), sorted(vision), chosen

    def _round_allowance(self, rnd: int, current: dict) -> float:
        """Parameters this round may still remove: max_params_fraction of the round's input, less what earlier
        stages of the round (prune and width alike, counted by model_facts) removed already."""
        start = self.round_input.get(rnd, current["facts"]["params"])
        return self.cfg.max_params_fraction * start - (start - current["facts"]["params"])

    def _width(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.width import width, width_params
        s = self._config("width", settings, stage_id, current, out)
        params = current["facts"]["params"]
        floor = params - self._round_allowance(rnd, current)   # the fewest parameters this round may leave
        sizes = {"ffn": s.ffn, "heads": s.heads, "hidden": s.hidden}
        if any(v is not None for v in sizes.values()):
            after = width_params(current["output"], **sizes)
            if after < floor:
                raise PipelineStopped(f"round {rnd}: width {', '.join(f'{k} {v}' for k, v in sizes.items() if v)} "
                                      f"leaves {after:,} of {params:,} parameters, below the {int(floor):,} the "
                                      f"round's max_params_fraction {self.cfg.max_params_fraction} allows")
            budget = {k: v for k, v in sizes.items() if v is not None}
        else:
            wanted = max(int(s.params_fraction * params) if s.params_fraction is not None else 0, target)
            least = math.ceil(floor)
            if least >= params:
                raise PipelineStopped(f"round {rnd}: width has nothing left to remove within max_params_fraction "
                                      f"{self.cfg.max_params_fraction} of the round's input")
            # reach the wanted size when the guardrail allows it, else remove what the guardrail allows
            budget = ({"params": wanted, "min_params": least} if wanted >= least else
                      {"params": least, "params_at_least": True})
        result = self.on_worker(width, current["output"], out, str(self.cfg.train), samples=s.samples,
                                max_length=s.max_length, batch_size=s.batch_size, overwrite=True,
                                trust_remote_code=self.cfg.trust_remote_code, **budget)
        prov = result.provenance
        return {"output": str(result.output), "sizes": {k: v["after"] for k, v in prov["sizes"].items()},
                **({"mix": prov["budget"]["chosen"], "budget": prov["budget"]["params"]} if "budget" in prov else {})}

    def _prune(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.prune import prune
        s = self._config("prune", settings, stage_id, current, out)
        if s.plan is not None and rnd > 1 and not (self.round_record(rnd, "knockout")
                                                   or self.round_record(rnd, "importance")):
            raise PipelineStopped(f"round {rnd}: prune.plan {s.plan} was made for the original model and applies "
                                  f"to round 1 only; add `importance` or `knockout` to the rounds to go further")
        text, vision, chosen = self._plan(rnd, current, target, s.plan if rnd == 1 else None)
        if not text and not vision:
            src = "knockout" if self.round_record(rnd, "knockout") else "importance" if s.plan is None else str(s.plan)
            raise PipelineStopped(f"round {rnd}: the {src} plan removes nothing within max_params_fraction "
                                  f"{self.cfg.max_params_fraction} / max_layers {self.cfg.max_layers} (no free or "
                                  f"recoverable candidate); the target is not reachable with these settings")
        result = prune(current["output"], out, drop_text=text, drop_vision=vision, overwrite=True,
                       streaming=s.streaming, trust_remote_code=self.cfg.trust_remote_code)
        return {"output": str(result.output), "drop_text": text, "drop_vision": vision, "plan": chosen}

    def _train(self, stage, stage_id, settings, current, out):
        from prunekit.stages import training
        result = getattr(training, stage)(self._config(stage, settings, stage_id, current, out))
        return {"output": str(result.output), "run": str(result.run_dir),
                "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}

    def _sft(self, stage_id, settings, rnd, current, target, out):
        return self._train("sft", stage_id, settings, current, out)

    def _distill(self, stage_id, settings, rnd, current, target, out):
        return self._train("distill", stage_id, settings, current, out)

    def _lora(self, stage_id, settings, rnd, current, target, out):
        return self._train("lora", stage_id, settings, current, out)

    def _merge_lora(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.merge_lora import merge_lora
        adapter = self.state.data["stages"][-1]
        if adapter["stage"] != "lora":
            raise PrunekitError("merge_lora: the previous stage is not lora")
        result = merge_lora(adapter["output"], out, base=current["output"], overwrite=True,
                            trust_remote_code=self.cfg.trust_remote_code)
        return {"output": str(result.output), "adapter": adapter["output"]}

    def _kv_cut(self, stage_id, settings, rnd, current, target, out):
        from prunekit.stages.kv_cut import kv_cut
        s = self._config("kv_cut", settings, stage_id, current, out)
        from prunekit.core.kv_calibration import CalibrationSettings
        data = str(self.cfg.train) if s.grouping == "similarity" or s.calibrate else None
        result = kv_cut(current["output"], out, s.kv_heads, s.grouping, data, overwrite=True, streaming=s.streaming,
                        trust_remote_code=self.cfg.trust_remote_code, max_samples=s.samples, calibrate=s.calibrate,
                        calibration=CalibrationSettings(steps=s.calibration_steps),
                        device=self.local_device)
        return {"output": str(result.output), "kv_heads": s.kv_heads, "grouping": s.grouping,
                "calibrate": s.calibrate}

    def _rl(self, stage_id, settings, rnd, current, target, out):
        try:
            from prunekit.stages.rl import rl
        except ImportError as e:
            raise PrunekitError(f"rl: this checkout has no RL stage ({e})") from None
        result = rl(self._config("rl", settings, stage_id, current, out))
        return {"output": str(result.output), "run": str(result.run_dir),
                "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}


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


def _describe(rec: dict) -> str:
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


# ---- summary ---------------------------------------------------------------------------------------------------

def summary_rows(state: State) -> list[dict]:
    """The original and every stage that produced a model, in order."""
    recs = [state.data["original"]] + [r for r in state.data["stages"] if r["stage"] in MODEL_STAGES]
    return [r for r in recs if r]


def in_domain_ids(state: State) -> set[str]:
    """Models trained (sft, distill, lora) on the recipe's data at or before their stage: their chat val is the
    training distribution, so its ratio to the original is in-domain fit, not recovery."""
    ids, trained = set(), False
    for r in state.data["stages"]:
        trained = trained or r["stage"] in TRAIN_STAGES
        if trained and r["stage"] in MODEL_STAGES:
            ids.add(r["id"])
    return ids


def _ratio(value: float, base: float) -> str:
    return f"{value / base * 100:.0f}%" if base else "-"


def summary_table(state: State, out: Path) -> str:
    rows = summary_rows(state)
    if not rows:
        return ""
    o = rows[0]
    in_domain = in_domain_ids(state)
    lines = []
    for r in rows:
        f, e, t, ot = r["facts"], r["eval"], r.get("eval_text"), o.get("eval_text")
        out_path = Path(r["output"])
        shown = out_path.relative_to(out) if out_path.is_relative_to(out) else out_path.name
        chat_ratio = _ratio(e["token_acc"], o["eval"]["token_acc"]) + (" in-domain" if r["id"] in in_domain else "")
        general = ([f"{t['loss']:.3f}", f"{t['ppl']:.1f}", f"{t['token_acc']:.3f}",
                    _ratio(t["token_acc"], ot["token_acc"]) if ot else "-"] if t else ["-"] * 4)
        lines.append([r["id"], f"{f['params'] / 1e6:.2f}M", f"{f['params'] / o['facts']['params'] * 100:.0f}%",
                      f["text_layers"], f["kv_heads"], f"{f['kv_bytes_per_token']:,}", f"{e['loss']:.3f}",
                      f"{e['token_acc']:.3f}", chat_ratio, *general, str(shown)])
    return report.table(lines, ["stage", "params", "size", "layers", "KV heads", "KV B/token", "chat loss",
                                "chat acc", "chat vs orig", "text loss", "text ppl", "text acc", "text vs orig",
                                "output"])


SUMMARY_NOTE = ("chat: the val set (`val`); \"in-domain\" marks models trained on that distribution, where a ratio "
                "near or over 100% is fit to the training data, not recovery. text: the held-out general text "
                "(`eval_text`), never trained on; the round guardrail uses its token_acc ratio when it is set.")


def plot_summary(state: State, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary_rows(state)
    labels = [r["id"] for r in rows]
    x = list(range(len(rows)))
    # a panel is (title, [(label, values, color), ...]); token_acc shows the chat val and the general text together
    panels = [("parameters (M)", [(None, [r["facts"]["params"] / 1e6 for r in rows], "tab:blue")]),
              ("KV cache bytes / token (bf16)", [(None, [r["facts"]["kv_bytes_per_token"] for r in rows],
                                                  "tab:orange")]),
              ("token_acc", [("chat val (in-domain once trained)", [r["eval"]["token_acc"] for r in rows],
                              "tab:green")])]
    if any("eval_text" in r for r in rows):
        panels[2][1].append(("general text (held out)",
                             [r["eval_text"]["token_acc"] if "eval_text" in r else float("nan") for r in rows],
                             "tab:purple"))
    fig, axes = plt.subplots(1, 3, figsize=(min(18, max(12, 1.4 * len(rows))), 4))
    for ax, (title, lines) in zip(axes, panels):
        for label, values, color in lines:
            ax.plot(x, values, marker="o", color=color, label=label)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(state: State, out: Path, final: str | None) -> Path:
    table = summary_table(state, out)
    stages = state.data["stages"]
    reports = [f"- {r['id']}: {r['stage']} report in {r['output']}" for r in stages if r["stage"] not in MODEL_STAGES]
    md = [f"# prunekit pipeline: {state.data['model']}", "", f"status: {state.data['status']}", "",
          "```", table, "```", "", SUMMARY_NOTE, ""]
    if reports:
        md += ["reports:", *reports, ""]
    if final:
        md += [f"final model: {final}", ""]
    md += ["![summary](summary.png)", ""]
    (out / "summary.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps({"status": state.data["status"], "final_model": final,
                                                  "eval_text": state.data.get("eval_text"),
                                                  "in_domain": sorted(in_domain_ids(state)),
                                                  "rows": summary_rows(state), "stages": stages}, indent=2) + "\n")
    if summary_rows(state):
        plot_summary(state, out / "summary.png")
    return out / "summary.md"


# ---- the recipe function ---------------------------------------------------------------------------------------

def pipeline(cfg, where: str = "recipe", redo: str | None = None) -> PipelineResult:
    rounds, finish = check_recipe(cfg, where)
    cfg.model = str(resolve_model(cfg.model).resolve())
    cfg.train, cfg.val, cfg.output_dir = (Path(p).resolve() for p in (cfg.train, cfg.val, cfg.output_dir))
    load_messages(cfg.train)
    if not load_messages(cfg.val):
        raise PrunekitError(f"val {cfg.val}: no rows")
    if cfg.eval_text == "general":
        from prunekit.core.text import general_eval_file
        cfg.eval_text = str(general_eval_file())
    elif cfg.eval_text is not None:
        cfg.eval_text = str(Path(cfg.eval_text).resolve())
        load_messages(cfg.eval_text)
    out = cfg.output_dir
    if out == Path(cfg.model) or Path(cfg.model).is_relative_to(out):
        raise PrunekitError(f"output_dir {out}: would hold the input model; pick another directory")
    storage = Path(cfg.storage_path).resolve() if cfg.storage_path else out / "runs"
    from prunekit.core.loading import check_writable
    check_writable(out, "output_dir", inside=True)
    check_writable(storage, "storage_path", inside=True)
    o_params = model_facts(Path(cfg.model))["params"]
    target = cfg.target.params if cfg.target.params is not None else int(cfg.target.params_fraction * o_params)
    if o_params <= target:
        raise PrunekitError(f"{where}: target already met: {cfg.model} has {o_params:,} parameters <= target "
                            f"{target:,}; nothing to prune")
    from prunekit.core import locks
    with locks.hold((out, "output_dir")):  # one pipeline per directory (its stages lock their own outputs)
        return _run_pipeline(cfg, redo, rounds, finish, out, storage, target, o_params)


def _run_pipeline(cfg, redo, rounds, finish, out: Path, storage: Path, target: int, o_params: int) -> PipelineResult:
    from prunekit.distributed.cluster import connect
    state = State.open(out, cfg.model)
    if cfg.launcher == "ray":
        connect(cfg.ray.address)  # an address that does not answer fails here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if redo:
        print(f"redo: forgetting {', '.join(state.redo(redo))}", flush=True)
    state.data["eval_text"] = cfg.eval_text
    runner = Runner(cfg, state, out, storage, cfg.name or out.name)
    original = runner.original()
    print(f"target: at most {target:,} parameters ({target / o_params:.0%} of the original); per round at most "
          f"{cfg.max_params_fraction:.0%} of the parameters and {cfg.max_layers} layers", flush=True)
    state.data["status"] = "running"
    current, final = original, None
    try:
        rnd = 1
        while current["facts"]["params"] > target:
            if rnd > cfg.max_rounds:
                raise PipelineStopped(f"stopped after max_rounds {cfg.max_rounds}: {current['facts']['params']:,} "
                                      f"parameters, target {target:,}")
            for i, (stage, settings) in enumerate(rounds, 1):
                current = runner.run(f"r{rnd}-{i}-{stage}", stage, settings, rnd, current, target)
            if current["facts"]["params"] > target:  # the guardrail guards the next round's pruning
                check_recovery(cfg, original, current, f"after round {rnd}")
            rnd += 1
        for i, (stage, settings) in enumerate(finish, 1):
            current = runner.run(f"f-{i}-{stage}", stage, settings, None, current, target)
        state.data["status"] = "done"
        short = recovery_shortfall(cfg, original, current)
        if short:  # nothing is left to prune: the guardrail becomes a note on the final model
            state.data["status"] = f"done; note: the final model's {short}"
        final = current["output"]
    except PipelineStopped as e:
        state.data["status"] = f"stopped: {e}"
        raise
    except BaseException as e:
        state.data["status"] = f"failed: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        raise
    finally:
        state.save()
        summary = write_summary(state, out, final)
        table = summary_table(state, out)
        if table:
            status = state.data["status"]
            print(f"\n== summary ({status.split(':')[0].split(';')[0]})\n{table}\n", flush=True)
            if status.startswith("done;"):
                print(status, flush=True)
            print(f"summary: {summary} (+ summary.png, summary.json); state: {state.path}", flush=True)
    return PipelineResult(out, Path(final), state.data["status"], original, state.data["stages"], summary)
