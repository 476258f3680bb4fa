"""Recipe: `prunekit knockout --config knockout.yaml` — which layers can go, measured.

Reads top to bottom: validate everything before any trial (model, data, candidates, budget, output) -> load the
base weights and tokenize the data once -> run the trials that are not finished yet on Ray Tune (each: remove the
candidate -> short SFT through the training engine -> eval loss / token_acc, curve reported every few steps), with
training-free importance as one more Ray task -> read every finished trial back from the run directory -> verdicts,
Spearman correlations, the plan under the budget -> the report directory, written atomically.

Run state lives in `storage_path/<name>/`: `sweep.json` (the settings a trial result depends on),
`trials/<candidate>/result.json` for every finished trial (`error.json` for a failed one), `importance.json`, and
Ray Tune's own experiment directories under `tune/`. Re-running the same name (or `--resume`) runs only the trials
without a result.json.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import locks, report
from prunekit.core.families import family_for
from prunekit.core.data import load_messages
from prunekit.core.loading import (check_output_dir, check_writable, read_config, resolve_model, write_atomically,
                                   write_provenance)
from prunekit.core.plan import (BASELINE, Candidate, analyse, check_budget, correlations, expand_candidates,
                                make_plan, trial_dir)
from prunekit.core.surgery import LayerDrop
from prunekit.engine.reporting import run_name_for, settings_dump
from prunekit.engine.trial import load_shared_base
from prunekit.stages.knockout_report import CSV_COLUMNS, plot_report, summary_markdown, trial_description

SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
# settings that do not change what a trial measures: they may differ between the runs of one sweep
NOT_TRIAL_SETTINGS = {"name", "overwrite", "output_dir", "storage_path", "candidates", "tune", "free_ratio",
                      "recoverable_ratio", "spike_window", "spike_margin", "max_params_fraction", "max_layers",
                      "importance", "importance_samples", "wandb"}


@dataclass
class Sweep:
    cfg: object
    name: str
    run_dir: Path
    candidates: list[Candidate]              # baseline first
    params_total: int
    params_removed: dict[str, int]
    n_text: int
    n_vision: int


@dataclass
class KnockoutResult:
    output: Path
    run_dir: Path
    name: str
    rows: list[dict]
    plan: dict
    ran: list[str] = field(default_factory=list)       # candidates whose trials ran in this call
    errors: dict[str, str] = field(default_factory=dict)


# ---- validation (before any trial) -----------------------------------------------------------------------------

def trial_settings(cfg) -> dict:
    return settings_dump(cfg, NOT_TRIAL_SETTINGS)


def sweep_name(cfg) -> str:
    return run_name_for("knockout", cfg, NOT_TRIAL_SETTINGS)


def _check_report_dir(out: Path, model: Path, name: str, overwrite: bool) -> None:
    """The report directory may be replaced when it is this sweep's own earlier report."""
    previous = out / "results.json"
    if previous.is_file():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(previous.read_text()).get("run") == name:
                overwrite = True
    check_output_dir(out, [model], overwrite)


def validate(cfg, resume: bool = False) -> Sweep:
    cfg.model = str(resolve_model(cfg.model).resolve())
    cfg.train, cfg.output_dir, cfg.storage_path = (Path(p).resolve() for p in (cfg.train, cfg.output_dir,
                                                                               cfg.storage_path))
    if cfg.val is None:
        raise PrunekitError("val: a knockout needs a validation set (token_acc is measured on it)")
    cfg.val = Path(cfg.val).resolve()
    load_messages(cfg.train)
    if not load_messages(cfg.val):
        raise PrunekitError(f"val {cfg.val}: no rows")
    model_dir = Path(cfg.model)
    config = read_config(model_dir)
    family = family_for(config)
    if cfg.trial_mode == "lora":  # the pruned models have the base's layer types: check the targets on the base
        from prunekit.core.lora import config_target_regex
        try:
            config_target_regex(model_dir, cfg.lora.target_modules, cfg.trust_remote_code)
        except PrunekitError as e:
            raise PrunekitError(f"trial_mode: lora: {str(e).replace('--target-modules', 'lora.target_modules')}") \
                from None
    from prunekit.stages.plan import check_before_training
    check_before_training("knockout", cfg)  # GPU trials: fail now, in one line, rather than out of memory later
    n_text, n_vision = family.num_text_layers(config), family.num_vision_blocks(config)
    c = cfg.candidates
    candidates = expand_candidates(c.text, c.vision, c.group_size, c.groups, n_text, n_vision)
    from prunekit.engine.reporting import injected_faults
    for fail in set(injected_faults()[1]) - {"*"}:
        Candidate.parse(fail, "PRUNEKIT_TEST_FAIL_CANDIDATES")
    # every candidate must be a legal surgery (protected layers, not every layer): check the config edit now
    shapes = report.checkpoint_shapes(model_dir)
    params_total = report.describe(model_dir)["params"]["total"]
    params_removed = {BASELINE: 0}
    for cand in candidates:
        try:
            surgery = LayerDrop(family, config, list(cand.text), list(cand.vision))
        except PrunekitError as e:
            msg = str(e).replace("--drop-text: ", "").replace("--drop-vision: ", "")
            raise PrunekitError(f"candidates: {cand.id}: {msg}") from None
        params_removed[cand.id] = sum(_numel(s) for k, s in shapes.items() if surgery(k, None) is None)
    check_budget(candidates, params_removed, params_total, cfg.max_params_fraction, cfg.max_layers)
    name = sweep_name(cfg)
    run_dir = cfg.storage_path / name
    settings = trial_settings(cfg)
    state = run_dir / SWEEP_FILE
    if resume and not state.is_file():
        raise PrunekitError(f"--resume: no sweep named {name} in {cfg.storage_path}")
    ran_before = any(p.name in (RESULT_FILE, ERROR_FILE) for p in (run_dir / "trials").glob("*/*"))
    if state.is_file() and ran_before:  # a claimed name whose trials never ran binds nothing
        before = json.loads(state.read_text())["trial_settings"]
        diff = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise PrunekitError(f"name {name}: that sweep in {cfg.storage_path} ran with {k}: {before.get(k)!r}, "
                                f"this config has {settings.get(k)!r}; its trials cannot be reused (pick another "
                                f"name)")
    _check_report_dir(cfg.output_dir, model_dir, name, cfg.overwrite)
    check_writable(cfg.storage_path, "storage_path", inside=True)
    return Sweep(cfg, name, run_dir, [Candidate()] + candidates, params_total, params_removed, n_text, n_vision)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---- the recipe ------------------------------------------------------------------------------------------------

def finished(run_dir: Path, candidate: Candidate) -> bool:
    return (trial_dir(run_dir, candidate) / RESULT_FILE).is_file()


def knockout(cfg, resume: bool = False) -> KnockoutResult:
    sweep = validate(cfg, resume)
    with locks.hold((cfg.output_dir, "-o"), (sweep.run_dir, "run directory")):  # one sweep of a name at a time
        return _knockout(cfg, sweep)


def _knockout(cfg, sweep: Sweep) -> KnockoutResult:
    from prunekit.config import KnockoutConfig
    from prunekit.distributed.tune import run_trials
    from prunekit.engine.trial import baseline_importance, knockout_trial
    run_dir = sweep.run_dir

    def claim():  # only once everything that can fail before a trial has passed (data tokenized, model loaded)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SWEEP_FILE).write_text(json.dumps({"name": sweep.name, "trial_settings": trial_settings(cfg)},
                                                     indent=2) + "\n")
    pending = [c for c in sweep.candidates if not finished(run_dir, c)]
    if cfg.tune.max_trials is not None:
        pending = pending[:cfg.tune.max_trials]
    want_importance = cfg.importance and not (run_dir / "importance.json").is_file()
    ran, errors = [], {}
    if pending or want_importance:
        done = sum(finished(run_dir, c) for c in sweep.candidates)
        print(f"knockout {sweep.name}: {done} of {len(sweep.candidates)} trials already finished; running "
              f"{len(pending)}", flush=True)
        t0 = time.time()
        base = load_shared_base(cfg)
        print(f"base weights and data loaded once in {time.time() - t0:.1f}s (trials read them from the Ray object "
              f"store)", flush=True)
        claim()
        sizes = sorted({len(c.text) for c in sweep.candidates if c.text} |
                       {len(c.vision) for c in sweep.candidates if c.vision} | {1})
        spec = {"samples": cfg.importance_samples, "angular_n": sizes} if want_importance else None

        def interrupted() -> str:
            done = sum(finished(run_dir, c) for c in sweep.candidates)
            return (f"{done} of {len(sweep.candidates)} trials finished, kept in {run_dir}; no report or plan "
                    f"written from a partial sweep (re-run the same command to run the rest)")
        result = run_trials(cfg, run_dir, sweep.name, [c.id for c in pending], base, {"importance": spec},
                            trial_fn=knockout_trial, dir_fn=trial_dir, load_cfg=KnockoutConfig.model_validate,
                            keep_running=BASELINE, interrupted_message=interrupted,
                            side_fn=baseline_importance if want_importance and BASELINE not in
                            [c.id for c in pending] else None)
        ran, errors = result.ran, dict(result.errors)
        if "side" in errors:
            errors["importance"] = errors.pop("side")
        scores = result.side
        if scores is None and want_importance and finished(run_dir, Candidate()):   # the baseline trial scored it
            scores = json.loads((trial_dir(run_dir, Candidate()) / RESULT_FILE).read_text()).get(
                "extra", {}).get("importance")
        if scores is not None:
            (run_dir / "importance.json").write_text(json.dumps(scores, indent=2) + "\n")
    else:
        claim()
    return write_report(sweep, ran, errors)


def read_trials(sweep: Sweep) -> tuple[dict[str, dict], dict[str, str]]:
    results, errors = {}, {}
    for c in sweep.candidates:
        d = trial_dir(sweep.run_dir, c)
        if (d / RESULT_FILE).is_file():
            results[c.id] = json.loads((d / RESULT_FILE).read_text())
        elif (d / ERROR_FILE).is_file():
            errors[c.id] = json.loads((d / ERROR_FILE).read_text()).get("error", "failed")
    return results, errors


def write_report(sweep: Sweep, ran: list[str], errors_now: dict[str, str]) -> KnockoutResult:
    cfg = sweep.cfg
    results, errors = read_trials(sweep)
    errors = {**errors, **errors_now}
    imp_path = sweep.run_dir / "importance.json"
    importance = json.loads(imp_path.read_text()) if imp_path.is_file() else {}
    rows = analyse(sweep.candidates, sweep.params_removed, sweep.params_total, results, errors, importance, sweep.cfg)
    plan = make_plan([r for r in rows if r["size"]], sweep.params_total, sweep.n_text, sweep.n_vision,
                     cfg.max_params_fraction, cfg.max_layers)
    plan = {**plan, "model": cfg.model, "run": sweep.name, "trial_mode": cfg.trial_mode}
    corr = correlations(rows)
    curves = {cid: {"train_loss": r["train_loss"], "eval": r.get("eval", {})} for cid, r in results.items()}
    record = {"run": sweep.name, "model": cfg.model, "run_dir": str(sweep.run_dir), "trial_mode": cfg.trial_mode,
              "trial": trial_description(cfg), "baseline": results.get(BASELINE, {}).get("final"),
              "trials": len(sweep.candidates), "finished": len(results), "errors": errors, "rows": rows,
              "correlations": corr, "plan": plan, "curves": curves}

    def write(tmp: Path):
        (tmp / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "results.csv").write_text(report.csv_text(rows, CSV_COLUMNS))
        (tmp / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(sweep, rows, corr, plan, errors, results))
        plot_report(tmp, rows, curves, cfg)
        if importance:
            from prunekit.stages.importance import plot_scores
            (tmp / "importance.json").write_text(json.dumps(importance, indent=2) + "\n")
            plot_scores({k: v for k, v in importance.items() if k in ("text", "vision")}, tmp)
        write_provenance(tmp, {"stage": "knockout", "parent": cfg.model, "run": str(sweep.run_dir),
                               "config": cfg.model_dump(mode="json")})

    out = write_atomically(Path(cfg.output_dir), write, overwrite=True)
    return KnockoutResult(out, sweep.run_dir, sweep.name, rows, plan, ran, errors)
