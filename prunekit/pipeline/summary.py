"""The summary across stages: table (printed and summary.md), summary.json and summary.png."""
from __future__ import annotations

import json
from pathlib import Path

from prunekit.core import report
from prunekit.pipeline.recipe import MODEL_STAGES, TRAIN_STAGES
from prunekit.pipeline.state import State

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
    from prunekit.core.plots import pyplot, save_figure
    plt = pyplot()
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
    return save_figure(fig, path)


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


