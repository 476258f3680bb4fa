"""`prunekit pipeline recipe.yaml` — the whole workflow, repeated until the model is small enough.

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

import math
import time
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.data import load_messages
from prunekit.core.loading import resolve_model
from prunekit.pipeline.measure import check_recovery, describe, evaluate_model, model_facts, recovery_shortfall, \
    text_layer_params
from prunekit.pipeline.recipe import (MODEL_STAGES, PipelineResult, PipelineStopped, _merge, _stage_config,
                                      check_recipe, read_plan)
from prunekit.pipeline.state import State
from prunekit.pipeline.summary import summary_table, write_summary

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
        print(describe(rec), flush=True)
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
            with self.state.attempt(stage_id):   # a heartbeat: even a killed attempt's time counts
                try:
                    record = STAGE_RUNNERS[stage](self, stage_id, settings, rnd, current, target, out)
                    record = {"id": stage_id, "stage": stage, "round": rnd, "input": current["output"], **record}
                    if stage in MODEL_STAGES:
                        record.update(self.measure(Path(record["output"])))
                except BaseException as e:   # a stage finished on a later run reports the time of all its attempts
                    self.state.count_attempt(stage_id, time.time() - t0)
                    if isinstance(e, PrunekitError) and not isinstance(e, PipelineStopped):
                        raise PrunekitError(f"stage {stage_id} ({stage}) failed: {e} — finished stages are kept in "
                                            f"{self.state.path}; fix it and re-run the same command to continue"
                                            ) from None
                    raise
                record["time_s"] = round(time.time() - t0, 1)
                self.state.add(record)
            attempts = f" over {record['attempts']} attempts" if record.get("attempts") else ""
            print(f"[{stage_id}] finished in {record['time_s']:.0f}s{attempts} -> {record['output']}", flush=True)
            done = record
        else:
            print(f"\n== [{stage_id}] {stage}: finished earlier -> {done['output']}", flush=True)
        if stage in MODEL_STAGES:
            print(describe(done), flush=True)
            return done
        return current

    # -- one method per stage (STAGE_RUNNERS): call the stage's own function, return what the state should keep --

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
        from prunekit.core.plan import Candidate, select_greedy
        params = current["facts"]["params"]
        ko = self.round_record(rnd, "knockout")
        plan = ko["plan"] if ko is not None else None
        if plan is None and plan_file is not None:
            plan = read_plan(plan_file, current["output"])
        if plan is not None:
            order = [(Candidate.parse(e["id"], "plan"), e["params_removed"], e["id"]) for e in plan["order"]]
        else:
            per_layer = text_layer_params(Path(current["output"]))
            imp = self.round_record(rnd, "importance")
            order = [(Candidate(text=(i,)), per_layer[i], f"text:{i}") for i in imp["least_important_first"]]
        sel = select_greedy(order, self._round_allowance(rnd, current), self.cfg.max_layers,
                            enough=lambda removed: params - removed <= target)
        return sorted(sel.text), sorted(sel.vision), sel.chosen

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
        # the calibration is model-sized work: on a GPU worker, not on the driver's CPU (there a Ray pipeline's
        # cut of SmolLM2's 18 layers ran ~130 s a layer on an H200 box's 16 cores)
        result = self.on_worker(kv_cut, current["output"], out, s.kv_heads, s.grouping, data, overwrite=True,
                                streaming=s.streaming, trust_remote_code=self.cfg.trust_remote_code,
                                max_samples=s.samples, calibrate=s.calibrate,
                                calibration=CalibrationSettings(steps=s.calibration_steps,
                                                                sequential=s.calibration_sequential,
                                                                align=s.calibration_align))
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


# what runs each stage name a recipe may use (check_recipe allows only ROUND_STAGES / FINISH_STAGES)
STAGE_RUNNERS = {"importance": Runner._importance, "knockout": Runner._knockout, "width": Runner._width,
                 "prune": Runner._prune, "sft": Runner._sft, "distill": Runner._distill, "lora": Runner._lora,
                 "merge_lora": Runner._merge_lora, "kv_cut": Runner._kv_cut, "rl": Runner._rl}


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
    except KeyboardInterrupt:   # Ctrl-C, kill, a call's time limit: nothing failed, and the same command resumes
        state.data["status"] = "interrupted: the same command resumes"
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
