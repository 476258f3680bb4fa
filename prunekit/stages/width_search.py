"""Recipe: `prunekit width-search --config FILE` — which way to cut a model down to one parameter budget, measured.

Candidates (all at the same budget, counted as `prunekit inspect` counts): `ffn`, `heads+ffn`, `hidden+ffn` (the mixes
`prunekit width --params` solves, with standard sizes) and `depth` (the least important text layers by block
influence, as `prunekit importance` ranks them, never the first or last, removed until the budget is met).

Reads top to bottom: validate everything before any work (model, data, budget, which candidates reach it, output)
-> load the base weights and tokenize the data once (shared with the knockout: `load_shared_base`) -> score channels
(`prunekit width`'s activation importance) and layers on `train`, and measure the original on the eval text, once
(cached in the run directory, so a resumed search prunes the same channels) -> one Ray Tune trial per candidate
not finished yet: prune the original's shared weights -> eval -> a short distillation from the original through the
training engine -> the same eval (`prunekit eval`'s measurement: `prunekit.core.evaluate.evaluate`, on held-out
general text by default) -> the report (table, plots, best.json, results.json), written atomically.

Run state lives in `storage_path/<name>/`: `search.json` (the settings trial results depend on), `scores.json`, and
`trials/<candidate>/result.json` per finished trial (`error.json` for a failed one). Re-running the same name runs
only the trials without a result.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core import report
from prunekit.core.families import family_for
from prunekit.core.data import load_messages
from prunekit.core.loading import (check_output_dir, check_writable, quiet_transformers, read_config, resolve_model,
                                   write_atomically, write_provenance)
from prunekit.core.report import checkpoint_shapes
from prunekit.core.width import WidthShape, budget_mixes, count_params
from prunekit.engine.reporting import run_name_for, settings_dump

SEARCH_FILE = "search.json"
SCORES_FILE = "scores.json"
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
# settings that do not change what a trial measures
NOT_TRIAL_SETTINGS = {"name", "overwrite", "output_dir", "storage_path", "candidates", "tune", "wandb"}
KINDS = {"ffn": "width", "heads+ffn": "width", "hidden+ffn": "width", "depth": "depth"}


@dataclass
class Search:
    cfg: object
    name: str
    run_dir: Path
    total: int                      # the original's parameters
    budget: int                     # at most this many after pruning
    budget_text: str
    plans: dict[str, dict]          # candidate -> {"kind", "sizes" | "layers_removed", "params", "reason"}
    candidates: list[str]           # the ones that reach the budget, in config order


@dataclass
class WidthSearchResult:
    output: Path
    run_dir: Path
    name: str
    rows: list[dict]
    best: dict | None
    ran: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def trial_dir(run_dir: Path, cid: str) -> Path:
    return Path(run_dir) / "trials" / cid.replace("+", "_")


def load_trial_config(data: dict):
    from prunekit.config import WidthSearchConfig
    return WidthSearchConfig(**data)


# ---- validation (before any work) ------------------------------------------------------------------------------

def trial_settings(cfg) -> dict:
    return settings_dump(cfg, NOT_TRIAL_SETTINGS)


def search_name(cfg) -> str:
    return run_name_for("width-search", cfg, NOT_TRIAL_SETTINGS)


def _budget(cfg, family, config: dict, shapes: dict, total: int) -> tuple[int, str]:
    if cfg.params is not None:
        return cfg.params, f"at most {cfg.params:,} parameters"
    if cfg.params_fraction is not None:
        return int(cfg.params_fraction * total), f"at most {cfg.params_fraction:.0%} of the original's parameters"
    layers = family.component_params(shapes, config)["text_layers"]
    removed = round(cfg.layer_params_removed * layers)
    return total - removed, (f"{cfg.layer_params_removed:.0%} of the {layers:,} decoder-layer parameters "
                             f"({removed:,}) removed")


def droppable_layers(family, config: dict) -> list[int]:
    """Text layers depth may remove: never the first or the last, nor a layer other modules index."""
    n = family.num_text_layers(config)
    return [i for i in range(1, n - 1) if i not in family.protected_text_layers(config)]


def validate(cfg, resume: bool = False) -> Search:
    from prunekit.core.text import general_eval_file
    cfg.model = str(resolve_model(cfg.model).resolve())
    cfg.train, cfg.output_dir, cfg.storage_path = (Path(p).resolve() for p in (cfg.train, cfg.output_dir,
                                                                               cfg.storage_path))
    cfg.val = Path(cfg.val).resolve() if cfg.val is not None else general_eval_file()
    if not load_messages(cfg.train):
        raise PrunekitError(f"train {cfg.train}: no rows")
    if not load_messages(cfg.val):
        raise PrunekitError(f"val {cfg.val}: no rows")
    model_dir = Path(cfg.model)
    config = read_config(model_dir)
    family = family_for(config)
    shapes = checkpoint_shapes(model_dir)
    total = count_params(family, config, shapes)
    budget, text = _budget(cfg, family, config, shapes, total)
    if budget >= total:
        raise PrunekitError(f"params: {cfg.model} has {total:,} parameters, already within the budget {budget:,}")
    plans: dict[str, dict] = {}
    width_wanted = [c for c in cfg.candidates if KINDS[c] == "width"]
    if width_wanted:
        for m in budget_mixes(family, config, shapes, budget):
            if m["mix"] in width_wanted:
                s = m["shape"]
                plans[m["mix"]] = {"kind": "width", "params": m["params"], "reason": m["reason"], "sizes": s and {
                    "intermediate_size": s.intermediate, "num_attention_heads": s.heads, "hidden_size": s.hidden}}
    if "depth" in cfg.candidates:
        per_layer = family.text_layer_params(shapes, config)
        floor = total - sum(per_layer[i] for i in droppable_layers(family, config))
        plans["depth"] = {"kind": "depth", "params": None, "reason": None if floor <= budget else (
            f"removing every layer but the first and last leaves {floor:,} parameters, over the budget")}
    candidates = [c for c in cfg.candidates if plans[c]["reason"] is None]
    if not candidates:
        raise PrunekitError(f"no candidate reaches the budget ({text}: at most {budget:,} of {total:,} parameters): "
                            + "; ".join(f"{c}: {plans[c]['reason']}" for c in cfg.candidates))
    name = search_name(cfg)
    run_dir = cfg.storage_path / name
    state = run_dir / SEARCH_FILE
    if resume and not state.is_file():
        raise PrunekitError(f"--resume: no width search named {name} in {cfg.storage_path}")
    if state.is_file():
        before = json.loads(state.read_text())["trial_settings"]
        settings = trial_settings(cfg)
        diff = [k for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
        if diff:
            k = diff[0]
            raise PrunekitError(f"name {name}: that search in {cfg.storage_path} ran with {k}: {before.get(k)!r}, "
                                f"this config has {settings.get(k)!r}; its trials cannot be reused (pick another "
                                f"name)")
    previous = cfg.output_dir / "results.json"
    overwrite = cfg.overwrite
    if previous.is_file():    # this search's own earlier report may be replaced
        with contextlib.suppress(OSError, ValueError):
            overwrite = overwrite or json.loads(previous.read_text()).get("run") == name
    check_output_dir(cfg.output_dir, [model_dir], overwrite)
    check_writable(cfg.storage_path, "storage_path", inside=True)
    return Search(cfg, name, run_dir, total, budget, text, plans, candidates)


# ---- scores and surgeries (once per search, cached) ------------------------------------------------------------

def prepare(search: Search, base: dict) -> dict:
    """Channel and layer scores on `train`, the original on the eval text, and each candidate's exact surgery
    (kept channels / removed layers, parameters); cached in the run directory."""
    path = search.run_dir / SCORES_FILE
    if path.is_file():
        return json.loads(path.read_text())
    import torch
    from prunekit.core.importance import compute_importance
    from prunekit.core.samples import collate
    from prunekit.core.evaluate import evaluate
    from prunekit.core.loading import load_model, load_tokenizer
    from prunekit.core.surgery import LayerDrop
    from prunekit.core.width import activation_importance, choose_mix, importance_record, select_kept
    from prunekit.stages.importance import calibration_samples
    cfg = search.cfg
    model_dir = Path(cfg.model)
    with quiet_transformers():
        model, family = load_model(model_dir, dtype="float32", trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    config = model.config.to_dict()
    shapes = checkpoint_shapes(model_dir)
    calib = calibration_samples(tokenizer, cfg.train, model_dir, family.is_vlm, cfg.importance_samples,
                                cfg.max_length, cfg.trust_remote_code)
    pad = base["pad_id"]
    batches = [collate(calib[i:i + 4], pad) for i in range(0, len(calib), 4)]
    t0 = time.time()
    with torch.no_grad():
        scores = activation_importance(model, family, batches)
        influence = compute_importance(model, family, calib, pad, angular_n=(1,), nll=False)["text"]["block_influence"]
        original = evaluate(model, base["val"], base["pad_id"])
    old = WidthShape.of(family, config)
    surgeries, plans = {}, {c: dict(p) for c, p in search.plans.items()}
    mixes = []
    for cid in search.candidates:
        plan = plans[cid]
        if plan["kind"] == "width":
            s = plan["sizes"]
            new = WidthShape(old.layers, s["intermediate_size"], s["num_attention_heads"], old.kv_heads,
                             old.head_dim, s["hidden_size"])
            kept = select_kept(scores, old, new)
            surgeries[cid] = {"kind": "width", "ffn": kept["ffn"], "heads": kept["heads"], "hidden": kept["hidden"]}
            mixes.append({"mix": cid, "shape": new, "params": plan["params"], "reason": None})
        else:
            per_layer = family.text_layer_params(shapes, config)
            drop, params = [], search.total
            for i in sorted(droppable_layers(family, config), key=lambda i: (influence[i], i)):
                if params <= search.budget:
                    break
                drop.append(i)
                params -= per_layer[i]
            drop.sort()
            plan.update(layers_removed=drop, params=count_params(family, config, shapes,
                                                                 LayerDrop(family, config, drop)))
            surgeries[cid] = {"kind": "depth", "drop_text": drop}
    pick = None
    if mixes:   # what `prunekit width --params` would choose among the width candidates, from the scores alone
        chosen, records = choose_mix(family, config, shapes, mixes, scores)
        pick = chosen["mix"]
        for r in records:
            plans[r["mix"]]["importance_removed"] = r["importance_removed"]
    record = {"original": {**original, "params": search.total}, "plans": plans, "surgeries": surgeries,
              "importance_pick": pick, "block_influence": influence, "scoring_s": round(time.time() - t0, 2),
              "width_importance": importance_record(scores, old, data=str(cfg.train), samples=len(calib))}
    path.write_text(json.dumps(record) + "\n")
    return record


# ---- one trial (inside a Ray Tune trial process; run_trials passes it in) --------------------------------------

def run_trial(cfg, base: dict, payload: dict, cid: str, reporter, device) -> dict:
    """Prune the original (shared weights) to the candidate, eval, distil from the original for max_steps through
    the training engine, eval again. Returns what result.json keeps as `extra`."""
    from prunekit.core.evaluate import evaluate, perplexity
    from prunekit.core.plan import Candidate
    from prunekit.core.surgery import LayerDrop, apply_to_model
    from prunekit.core.width import WidthCut
    from prunekit.engine.loop import train
    from prunekit.engine.objectives import DistillObjective
    from prunekit.engine.trial import build_trial_model
    from prunekit.engine.reporting import fail_if_injected
    fail_if_injected(cid)
    t0 = time.time()
    spec = payload["surgeries"][cid]
    family = family_for(base["config"])
    surgery = (WidthCut(family, base["config"], spec["ffn"], spec["heads"], spec["hidden"])
               if spec["kind"] == "width" else LayerDrop(family, base["config"], spec["drop_text"]))
    student = apply_to_model(build_trial_model(base, Candidate(), "cpu"), surgery).to(device)
    teacher = build_trial_model(base, Candidate(), device)
    pad = base["pad_id"]

    def measure():
        m = evaluate(student, base["val"], pad)
        return {"loss": m["loss"], "ppl": perplexity(m["loss"]), "token_acc": m["token_acc"],
                "tokens": m["tokens"]}
    before = measure()
    t1 = time.time()
    objective = DistillObjective(teacher, beta=cfg.beta, temperature=cfg.temperature, top_k=cfg.top_k,
                                 sft_alpha=cfg.sft_alpha, chunk_size=cfg.loss_chunk_size)
    train(student, objective, cfg, base["train"], base["val"], pad, reporter, device=device)
    after = measure()
    return {"setup_s": t1 - t0, "train_s": time.time() - t1, "params": student.num_parameters(),
            "before": before, "after": after}


# ---- the recipe ------------------------------------------------------------------------------------------------

def width_search(cfg, resume: bool = False) -> WidthSearchResult:
    from prunekit.distributed.tune import run_trials
    from prunekit.engine.trial import load_shared_base
    search = validate(cfg, resume)
    run_dir = search.run_dir
    pending = [c for c in search.candidates if not (trial_dir(run_dir, c) / RESULT_FILE).is_file()]
    if cfg.tune.max_trials is not None:
        pending = pending[:cfg.tune.max_trials]
    ran, errors = [], {}
    if pending or not (run_dir / SCORES_FILE).is_file():
        done = len(search.candidates) - len([c for c in search.candidates
                                             if not (trial_dir(run_dir, c) / RESULT_FILE).is_file()])
        print(f"width-search {search.name}: budget {search.budget_text}: at most {search.budget:,} of "
              f"{search.total:,} parameters; {done} of {len(search.candidates)} trials already finished; running "
              f"{len(pending)}", flush=True)
        base = load_shared_base(cfg)   # val = the eval text: the engine's eval curve is on it too
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / SEARCH_FILE).write_text(json.dumps({"name": search.name, "trial_settings": trial_settings(cfg)},
                                                      indent=2) + "\n")
        scores = prepare(search, base)
        if pending:
            result = run_trials(cfg, run_dir, search.name, pending, base, {"surgeries": scores["surgeries"]},
                                trial_fn=run_trial, dir_fn=trial_dir, load_cfg=load_trial_config)
            ran, errors = result.ran, result.errors
    return write_report(search, ran, errors)


def read_trials(search: Search) -> tuple[dict, dict]:
    results, errors = {}, {}
    for c in search.candidates:
        d = trial_dir(search.run_dir, c)
        if (d / RESULT_FILE).is_file():
            results[c] = json.loads((d / RESULT_FILE).read_text())
        elif (d / ERROR_FILE).is_file():
            errors[c] = json.loads((d / ERROR_FILE).read_text()).get("error", "failed")
    return results, errors


def _command(cfg, cid: str, plan: dict) -> str:
    if plan["kind"] == "depth":
        return f"prunekit prune {cfg.model} --drop-text {','.join(map(str, plan['layers_removed']))} -o OUT"
    s = plan["sizes"]
    return (f"prunekit width {cfg.model} --data {cfg.train} --ffn {s['intermediate_size']} --heads "
            f"{s['num_attention_heads']} --hidden {s['hidden_size']} -o OUT")


def analyse(search: Search, scores: dict, results: dict, errors: dict) -> tuple[list[dict], dict | None]:
    cfg = search.cfg
    base_acc = scores["original"]["token_acc"]
    rows = []
    for cid in cfg.candidates:
        plan = scores["plans"].get(cid, search.plans[cid])
        row = {"id": cid, "kind": KINDS[cid], **(plan.get("sizes") or {}),
               "layers_removed": plan.get("layers_removed"), "params": plan.get("params"),
               "params_fraction": plan["params"] / search.total if plan.get("params") else None,
               "importance_removed": plan.get("importance_removed"), "reason": plan.get("reason")}
        res = results.get(cid)
        if plan.get("reason"):
            row["status"] = "not run"
        elif res is None:
            row.update(status="error" if cid in errors else "pending", error=errors.get(cid))
        else:
            extra = res.get("extra", {})
            after, before = extra.get("after", {}), extra.get("before", {})
            row.update(status=res["status"], steps=res.get("steps"), token_acc=after.get("token_acc"),
                       loss=after.get("loss"), ppl=after.get("ppl"), token_acc_step0=before.get("token_acc"),
                       loss_step0=before.get("loss"),
                       ratio=after["token_acc"] / base_acc if base_acc and "token_acc" in after else None,
                       ratio_step0=before["token_acc"] / base_acc if base_acc and "token_acc" in before else None,
                       command=_command(cfg, cid, plan))
        rows.append(row)
    done = [r for r in rows if r.get("token_acc") is not None]
    best = max(done, key=lambda r: (r["token_acc"], -r["loss"])) if done else None
    return rows, best


CSV_COLUMNS = ["id", "kind", "status", "token_acc", "ratio", "loss", "ppl", "token_acc_step0", "ratio_step0",
               "params", "params_fraction", "intermediate_size", "num_attention_heads", "hidden_size",
               "layers_removed", "importance_removed", "steps", "reason", "error"]


def write_report(search: Search, ran: list[str], errors_now: dict[str, str]) -> WidthSearchResult:
    cfg = search.cfg
    scores = json.loads((search.run_dir / SCORES_FILE).read_text())
    results, errors = read_trials(search)
    errors = {**errors, **errors_now}
    rows, best = analyse(search, scores, results, errors)
    curves = {cid: {"train_loss": r["train_loss"], "eval": r.get("eval", {})} for cid, r in results.items()}
    best_record = best and {"candidate": best["id"], "kind": best["kind"], "token_acc": best["token_acc"],
                            "ratio": best["ratio"], "params": best["params"], "command": best["command"],
                            **{k: best[k] for k in ("intermediate_size", "num_attention_heads", "hidden_size",
                                                     "layers_removed") if best.get(k) is not None}}
    record = {"run": search.name, "model": cfg.model, "run_dir": str(search.run_dir), "eval": str(cfg.val),
              "budget": {"params": search.budget, "of": search.total, "text": search.budget_text},
              "original": scores["original"], "importance_pick": scores.get("importance_pick"),
              "best": best_record, "errors": errors, "rows": rows, "curves": curves,
              "settings": {"max_steps": cfg.max_steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                           "beta": cfg.beta, "temperature": cfg.temperature}}

    def write(tmp: Path):
        (tmp / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "best.json").write_text(json.dumps(best_record, indent=2) + "\n")
        (tmp / "results.csv").write_text(report.csv_text(rows, CSV_COLUMNS))
        (tmp / "summary.md").write_text(summary_markdown(search, scores, rows, best_record, errors))
        plot_report(tmp, rows, curves, scores["original"], search)
        write_provenance(tmp, {"stage": "width-search", "parent": cfg.model, "run": str(search.run_dir),
                               "config": cfg.model_dump(mode="json")})

    out = write_atomically(Path(cfg.output_dir), write, overwrite=True)
    return WidthSearchResult(out, search.run_dir, search.name, rows, best_record, ran, errors)


def summary_markdown(search: Search, scores: dict, rows: list[dict], best: dict | None, errors: dict) -> str:
    cfg = search.cfg
    o = scores["original"]
    lines = [f"# Width search: {Path(cfg.model).name} ({search.name})", "",
             f"Budget: {search.budget_text}: at most {search.budget:,} of {search.total:,} parameters. Each candidate "
             f"is pruned from the original, then distilled from it for {cfg.max_steps} steps (lr {cfg.lr}, batch "
             f"{cfg.batch_size}, beta {cfg.beta}) on {Path(cfg.train).name}, and measured on {Path(cfg.val).name} "
             f"(held out; the first {cfg.eval_max_samples or 'all'} rows) before and after.",
             f"Original: token_acc {o['token_acc']:.4f}, loss {o['loss']:.4f}.", "",
             "| candidate | token_acc | vs original | pruned, before distillation | loss | params | FFN | heads "
             "| hidden | layers removed | importance removed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] == "not run":
            lines.append(f"| {r['id']} | not run: {r['reason']} | | | | | | | | | |")
            continue
        acc = report.cell(r.get("token_acc")) if r.get("token_acc") is not None else r["status"]
        params = f"{r['params']:,} ({r['params_fraction']:.1%})" if r.get("params") else "-"
        lines.append(f"| {r['id']} | {acc} | {report.cell(r.get('ratio'), 3)} | {report.cell(r.get('token_acc_step0'))} "
                     f"| {report.cell(r.get('loss'), 3)} | {params} | {report.cell(r.get('intermediate_size'))} "
                     f"| {report.cell(r.get('num_attention_heads'))} | {report.cell(r.get('hidden_size'))} "
                     f"| {report.cell(r.get('layers_removed'))} | {report.cell(r.get('importance_removed'))} |")
    lines += [""]
    if best:
        ratio = f", {best['ratio']:.1%} of the original's" if best["ratio"] is not None else ""
        lines += [f"**Best: {best['candidate']}** (token_acc {best['token_acc']:.4f}{ratio}). Apply: "
                  f"`{best['command']}`, then distil it as the trials did."]
    if scores.get("importance_pick"):
        lines += ["", f"From the importance scores alone (no training), `prunekit width --params {search.budget}` "
                      f"would pick {scores['importance_pick']}."]
    if errors:
        lines += ["", "## Errored trials (re-run the same command to retry them)", ""]
        lines += [f"- {cid}: {msg.splitlines()[0][:300] if msg else 'failed'}" for cid, msg in errors.items()]
    return "\n".join(lines) + "\n"


def plot_report(out_dir: Path, rows: list[dict], curves: dict, original: dict, search: Search) -> None:
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    done = [r for r in rows if r.get("token_acc") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    x = list(range(len(done)))
    ax.bar([i - 0.2 for i in x], [r["token_acc_step0"] for r in done], width=0.4, color="lightgrey",
           label="pruned, before distillation")
    ax.bar([i + 0.2 for i in x], [r["token_acc"] for r in done], width=0.4,
           color=["tab:blue" if r["kind"] == "width" else "tab:orange" for r in done],
           label=f"after {search.cfg.max_steps} distillation steps")
    ax.axhline(original["token_acc"], color="black", ls="--", lw=0.8, label="original")
    ax.set_xticks(x, [f"{r['id']}\n{r['params'] / 1e6:.2f}M" for r in done], fontsize=8)
    ax.set_ylabel("token_acc on the eval text")
    ax.set_title(f"same budget ({search.budget_text})", fontsize=9)
    ax.legend(fontsize=7)
    for cid, curve in curves.items():
        train = sorted((int(s), v) for s, v in curve["train_loss"].items())
        if train:
            axes[1].plot(*zip(*train), label=cid)
    axes[1].set_xlabel("step")
    axes[1].set_title("distillation loss", fontsize=9)
    axes[1].legend(fontsize=7)
    save_figure(fig, out_dir / "width_search.png")
