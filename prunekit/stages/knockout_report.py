"""The knockout report's rendering: the CSV columns, summary.md and the figures (the stage, `knockout.py`, runs the
trials and decides; this module only writes down what it decided). `sweep` is the stage's `Sweep`."""
from __future__ import annotations

from pathlib import Path

from prunekit.core import report
from prunekit.core.plan import BASELINE

CSV_COLUMNS = ["id", "kind", "status", "verdict", "ratio", "eval_token_acc", "eval_loss", "ratio_step0",
               "early_excess", "early_spike", "params_removed", "params_fraction", "block_influence",
               "angular_distance", "nll_drop", "steps", "trial_mode", "params_trainable", "workers", "error"]


def trial_description(cfg) -> dict:
    """What a trial trains, for the report: every weight, or LoRA adapters on the frozen pruned model."""
    if cfg.trial_mode == "full":
        return {"mode": "full", "trains": "every weight of the pruned model"}
    lora = cfg.lora
    return {"mode": "lora", "trains": f"LoRA adapters (rank {lora.rank}, alpha {lora.alpha}) on the frozen pruned "
                                      f"model", "lora": lora.model_dump(mode="json")}



def summary_markdown(sweep, rows: list[dict], corr: dict, plan: dict, errors: dict, results: dict) -> str:
    cfg = sweep.cfg
    base = results.get(BASELINE, {}).get("final", {})
    lines = [f"# Knockout: {Path(cfg.model).name} ({sweep.name})", "",
             f"Trial mode: **{cfg.trial_mode}** (the verdicts below come from trials that train "
             f"{trial_description(cfg)['trains']}).", "",
             f"{len(results)} of {len(sweep.candidates)} trials finished; each: remove the candidate, "
             f"{cfg.max_steps} SFT steps (lr {cfg.lr}, batch {cfg.batch_size}), eval on {cfg.val.name}.",
             f"Baseline (nothing removed): eval token_acc {report.cell(base.get('eval/token_acc'))}, "
             f"eval loss {report.cell(base.get('eval/loss'))}.", "",
             f"Verdicts: **free** token_acc >= {cfg.free_ratio:.0%} of the baseline's, **recoverable** >= "
             f"{cfg.recoverable_ratio:.0%}, **key** below that or with an early loss spike (train loss over the "
             f"first {cfg.spike_window:.0%} of the steps on average more than {cfg.spike_margin:.0%} above the "
             f"baseline's at the same steps).", "",
             "| candidate | verdict | acc ratio | ratio at step 0 | eval loss | early excess | params removed "
             "| block infl. | angular | NLL-drop |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["size"]:
            continue
        v = r["verdict"] or r["status"]
        lines.append(f"| {r['id']} | {v}{' (spike)' if r.get('early_spike') else ''} | {report.cell(r.get('ratio'), 3)} "
                     f"| {report.cell(r.get('ratio_step0'), 3)} | {report.cell(r.get('eval_loss'), 3)} "
                     f"| {report.cell(r.get('early_excess'), 3)} | {r['params_fraction']:.2%} "
                     f"| {report.cell(r.get('block_influence'), 4)} | {report.cell(r.get('angular_distance'), 4)} "
                     f"| {report.cell(r.get('nll_drop'), 4)} |")
    lines += ["", "## Training-free scores vs knockout", "",
              "Spearman correlation between each score and the token_acc ratio (a useful score is strongly "
              "negative: layers that look important lose more accuracy when removed).", ""]
    if corr:
        lines += ["| score | candidates | Spearman rho | n |", "|---|---|---|---|"]
        lines += [f"| {k.split('/')[0]} | {k.split('/')[1]} | {v['rho']:+.3f} | {v['n']} |" for k, v in corr.items()]
    else:
        lines.append("(not enough finished trials with scores)")
    lines += ["", "## Suggested plan", "",
              f"Budget: at most {cfg.max_params_fraction:.0%} of the parameters and {cfg.max_layers} layers; "
              f"candidates with verdict free or recoverable, best ratio first, no overlaps. Layers that are free "
              f"one at a time need not be free together: run recovery SFT on the pruned model.", ""]
    if plan["order"]:
        lines += [f"{i + 1}. {p['id']} ({p['verdict']}, ratio {p['ratio']:.3f}, {p['params_removed']:,} params)"
                  for i, p in enumerate(plan["order"])]
    else:
        lines.append("Nothing qualifies.")
    lines += ["", f"Removes text layers {plan['drop_text']} and vision blocks {plan['drop_vision']}: "
                  f"{plan['params_removed']:,} of {plan['params_total']:,} parameters ({plan['params_fraction']:.1%}).",
              "", f"Apply: `prunekit prune {cfg.model} --plan plan.json -o OUT`"]
    if errors:
        lines += ["", "## Errored trials (re-run the same command to retry them)", ""]
        lines += [f"- {cid}: {msg.splitlines()[0][:300] if msg else 'failed'}" for cid, msg in errors.items()]
    pending = [r["id"] for r in rows if r["status"] == "pending"]
    if pending:
        lines += ["", f"Not run yet: {', '.join(pending)} (re-run the same command to run them)."]
    return "\n".join(lines) + "\n"


def plot_report(out_dir: Path, rows: list[dict], curves: dict, cfg) -> None:
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
    colors = {"free": "tab:green", "recoverable": "tab:orange", "key": "tab:red", None: "lightgrey"}
    groups = {"text": [r for r in rows if r["kind"] == "text" and r["size"] == 1],
              "vision": [r for r in rows if r["kind"] == "vision" and r["size"] == 1],
              "groups": [r for r in rows if r["size"] > 1 or r["kind"] == "mixed"]}
    for kind, sel in groups.items():
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(sel) + 2), 3.8))
        labels = [str((r["text"] or r["vision"])[0]) if kind != "groups" else r["id"] for r in sel]
        ax.bar(range(len(sel)), [r.get("ratio") or 0 for r in sel], color=[colors[r.get("verdict")] for r in sel])
        ax.axhline(cfg.free_ratio, color="tab:green", ls="--", lw=0.8)
        ax.axhline(cfg.recoverable_ratio, color="tab:orange", ls="--", lw=0.8)
        ax.set_xticks(range(len(sel)), labels, rotation=90 if kind == "groups" else 0, fontsize=7)
        ax.set_xlabel({"text": "text layer removed", "vision": "vision block removed", "groups": "candidate"}[kind])
        ax.set_ylabel("eval token_acc / baseline")
        ratios = [r.get("ratio") or 1 for r in sel]
        ax.set_ylim(max(0, min(ratios + [cfg.recoverable_ratio]) - 0.05), max(ratios + [1.0]) + 0.05)
        ax.set_title(f"knockout after {cfg.max_steps} SFT steps (green free, orange recoverable, red key)", fontsize=9)
        save_figure(fig, out_dir / f"ratio_{kind}.png")
    verdicts = {r["id"]: r.get("verdict") for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for cid, curve in curves.items():
        key = verdicts.get(cid) == "key"
        style = (dict(color="black", lw=2, zorder=3, label="baseline") if cid == BASELINE else
                 dict(color="tab:red", lw=1.2, alpha=0.9, zorder=2, label=cid) if key else
                 dict(color="grey", lw=0.7, alpha=0.5, zorder=1))
        train = sorted((int(s), v) for s, v in curve["train_loss"].items())
        ev = sorted((int(s), v["eval/loss"]) for s, v in curve["eval"].items() if "eval/loss" in v)
        if train:
            axes[0].plot(*zip(*train), **style)
        if ev:
            axes[1].plot(*zip(*ev), marker="o", ms=2, **style)
    for ax, title in zip(axes, ("train loss", "eval loss")):
        ax.set_xlabel("step")
        ax.set_title(f"{title} (black baseline, red key candidates)", fontsize=9)
        handles, labels = ax.get_legend_handles_labels()
        if handles and len(handles) <= 12:
            ax.legend(fontsize=6)
    save_figure(fig, out_dir / "loss_curves.png")
