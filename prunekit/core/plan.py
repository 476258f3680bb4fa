"""Knockout analysis and pruning plans as plain Python: candidates, verdicts, the early-spike flag, the per-candidate
analysis and Spearman correlations, and the one greedy planner (`select_greedy`) behind both knockout's plan and a
pipeline round's prune. No torch, no Ray: the knockout stage and the pipeline feed it rows and write what it returns.

A candidate is a set of text layers and/or vision blocks removed together; its id reads `text:5`, `text:4-5`,
`vision:0,2` or `text:3+vision:1`. `BASELINE` ("baseline") removes nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from prunekit import PrunekitError
from prunekit.core.surgery import parse_index_list

BASELINE = "baseline"


def _ranges(indexes: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5,7'."""
    parts, i = [], 0
    while i < len(indexes):
        j = i
        while j + 1 < len(indexes) and indexes[j + 1] == indexes[j] + 1:
            j += 1
        parts.append(str(indexes[i]) if i == j else f"{indexes[i]}-{indexes[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class Candidate:
    text: tuple[int, ...] = ()
    vision: tuple[int, ...] = ()

    @property
    def id(self) -> str:
        parts = [f"{kind}:{_ranges(list(idx))}" for kind, idx in (("text", self.text), ("vision", self.vision)) if idx]
        return "+".join(parts) or BASELINE

    @property
    def size(self) -> int:
        return len(self.text) + len(self.vision)

    @property
    def kind(self) -> str:
        return "baseline" if not self.size else "text" if not self.vision else "vision" if not self.text else "mixed"

    @property
    def dirname(self) -> str:
        """A file-system-safe name: text:4-5 -> text_4-5, text:3+vision:1 -> text_3__vision_1."""
        return self.id.replace("+", "__").replace(":", "_").replace(",", "_")

    @classmethod
    def parse(cls, spec: str, where: str = "candidates.groups") -> "Candidate":
        text, vision = [], []
        if spec == BASELINE:
            return cls()
        for part in str(spec).split("+"):
            kind, sep, idx = part.strip().partition(":")
            if not sep or kind not in ("text", "vision"):
                raise PrunekitError(f"{where}: cannot read {spec!r} (use e.g. text:4-5, vision:0,1 or text:3+vision:1)")
            (text if kind == "text" else vision).extend(parse_index_list(idx, f"{where}: {spec}"))
        return cls(tuple(sorted(set(text))), tuple(sorted(set(vision))))


def expand_candidates(text_spec, vision_spec, group_sizes: list[int], groups: list[str], n_text: int,
                      n_vision: int) -> list[Candidate]:
    """The sweep's candidates (baseline excluded): for each group size g, every run of g consecutive layers among the
    selected text layers (then vision blocks), plus the explicit `groups`. `all` selects every layer. One-line errors
    name the config key."""
    out: list[Candidate] = []
    for kind, spec, total in (("text", text_spec, n_text), ("vision", vision_spec, n_vision)):
        if spec is None or spec == "" or spec == []:
            continue
        if total == 0:
            raise PrunekitError(f"candidates.{kind}: the model has no {'vision blocks' if kind == 'vision' else 'text layers'}")
        chosen = list(range(total)) if spec == "all" else parse_index_list(spec, f"candidates.{kind}")
        for i in chosen:
            if not 0 <= i < total:
                raise PrunekitError(f"candidates.{kind}: {i} is out of range (the model has {total}: 0-{total - 1})")
        picked = set(chosen)
        for g in group_sizes:
            for start in chosen:
                run = tuple(range(start, start + g))
                if all(i in picked for i in run):
                    out.append(Candidate(**{kind: run}))
    for spec in groups:
        c = Candidate.parse(spec)
        for kind, idx, total in (("text", c.text, n_text), ("vision", c.vision, n_vision)):
            for i in idx:
                if not 0 <= i < total:
                    raise PrunekitError(f"candidates.groups: {spec}: {kind} {i} is out of range "
                                        f"(the model has {total}: 0-{total - 1})" if total else
                                        f"candidates.groups: {spec}: the model has no {kind} layers")
        out.append(c)
    unique = list(dict.fromkeys(out))
    if not unique:
        raise PrunekitError("candidates: nothing to knock out (set candidates.text and/or candidates.vision, e.g. all)")
    return unique


# ---- verdicts ----------------------------------------------------------------------------------------------------

def early_excess(curve: dict[int, float], baseline: dict[int, float], total_steps: int, window: float) -> float | None:
    """How far a candidate's train loss sits above the baseline's over the first `window` fraction of the steps
    (steps 1..ceil(window * total)): mean over those steps of candidate / baseline - 1. Both trials see the same
    batches in the same order, so step-by-step ratios compare like with like. None without common steps."""
    last = max(1, math.ceil(window * total_steps))
    steps = [s for s in range(1, last + 1) if s in curve and s in baseline and baseline[s] > 0]
    if not steps:
        return None
    return sum(curve[s] / baseline[s] for s in steps) / len(steps) - 1


def verdict(ratio: float, excess: float | None, free: float = 0.95, recoverable: float = 0.90,
            spike_margin: float = 0.25) -> str:
    """free: token_acc >= free x baseline; recoverable: >= recoverable x; key: below, or an early loss spike
    (train loss early in the run more than spike_margin above the baseline's)."""
    if excess is not None and excess > spike_margin:
        return "key"
    return "free" if ratio >= free else "recoverable" if ratio >= recoverable else "key"


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


# ---- the plan ----------------------------------------------------------------------------------------------------

def candidate_scores(cand: Candidate, importance: dict) -> dict:
    """Training-free scores of a candidate: the sum over its layers (block influence, NLL-drop), and the angular
    distance of its run of consecutive layers when it is one (else the sum of single-layer distances)."""
    out = {}
    parts = [("text", cand.text), ("vision", cand.vision)]
    for metric in ("block_influence", "nll_drop", "angular_distance"):
        total, ok = 0.0, True
        for kind, idx in parts:
            if not idx:
                continue
            scores = importance.get(kind, {})
            if metric == "angular_distance":
                consecutive = list(idx) == list(range(idx[0], idx[0] + len(idx)))
                block = scores.get(f"angular_distance_n{len(idx)}") if consecutive else None
                if block is not None:
                    total += block[idx[0]]
                    continue
                values = scores.get("angular_distance_n1")
            else:
                values = scores.get(metric)
            if values is None:
                ok = False
                break
            total += sum(values[i] for i in idx)
        if ok and cand.size:
            out[metric] = total
    return out


def analyse(candidates: list[Candidate], params_removed: dict[str, int], params_total: int, results: dict,
            errors: dict, importance: dict, cfg) -> list[dict]:
    """One row per candidate: its trial's token_acc against the baseline's at the same step (the ratio), the early
    loss excess, the verdict (`cfg`: max_steps, spike_window, spike_margin, free_ratio, recoverable_ratio) and the
    training-free scores, and how its trial trained (mode, workers, trained parameters); a candidate without a result
    is `error` or `pending`."""
    base = results.get(BASELINE)
    base_acc = base["final"].get("eval/token_acc") if base else None
    base_curve = {int(s): v for s, v in base["train_loss"].items()} if base else {}
    rows = []
    for cand in candidates:
        row = {"id": cand.id, "kind": cand.kind, "text": list(cand.text), "vision": list(cand.vision),
               "size": cand.size, "params_removed": params_removed[cand.id],
               "params_fraction": params_removed[cand.id] / params_total}
        res = results.get(cand.id)
        if res is None:
            row.update(status="error" if cand.id in errors else "pending", verdict=None, ratio=None,
                       error=errors.get(cand.id))
            rows.append(row)
            continue
        final = res["final"]
        acc = final.get("eval/token_acc")
        # against the baseline at the same step: a trial ASHA stopped early is compared like with like
        last_eval = max(res.get("eval", {}), key=int, default=None)
        base_same = (base.get("eval", {}).get(last_eval, {}).get("eval/token_acc", base_acc)
                     if base and last_eval is not None else base_acc)
        ratio = acc / base_same if acc is not None and base_same else None
        acc0 = res.get("step0", {}).get("eval/token_acc")
        base0 = base.get("step0", {}).get("eval/token_acc") if base else None
        excess = (early_excess({int(s): v for s, v in res["train_loss"].items()}, base_curve, cfg.max_steps,
                               cfg.spike_window) if cand.size and base else None)
        extra = res.get("extra", {})  # how the trial trained (trials written before trial_mode existed: full)
        row.update(trial_mode=extra.get("trial_mode", "full"), workers=len(extra.get("workers", [None])),
                   params_trainable=extra.get("params_trainable"))
        row.update(status=res["status"], eval_loss=final.get("eval/loss"), eval_token_acc=acc, ratio=ratio,
                   ratio_step0=acc0 / base0 if acc0 is not None and base0 else None, early_excess=excess,
                   early_spike=bool(excess is not None and excess > cfg.spike_margin), steps=res.get("steps"),
                   verdict=(None if not cand.size or ratio is None else
                            verdict(ratio, excess, cfg.free_ratio, cfg.recoverable_ratio, cfg.spike_margin)),
                   **candidate_scores(cand, importance))
        rows.append(row)
    return rows


def correlations(rows: list[dict]) -> dict:
    """Spearman(score, knockout token_acc ratio) per training-free metric, over all candidates and per kind. A
    useful score is strongly negative: the more important a layer looks, the lower its ratio."""
    out = {}
    done = [r for r in rows if r.get("ratio") is not None and r["size"]]
    for metric in ("block_influence", "angular_distance", "nll_drop"):
        for kind in ("all", "text", "vision"):
            sel = [r for r in done if metric in r and (kind == "all" or r["kind"] == kind)]
            rho = spearman([r[metric] for r in sel], [r["ratio"] for r in sel])
            if rho is not None:
                out[f"{metric}/{kind}"] = {"rho": rho, "n": len(sel)}
    return out


def fits_budget(params_removed: int, size: int, params_total: int, max_params_fraction: float, max_layers: int) -> bool:
    return size <= max_layers and params_removed <= max_params_fraction * params_total


def check_budget(candidates: list[Candidate], params: dict[str, int], params_total: int,
                 max_params_fraction: float, max_layers: int) -> None:
    """A one-line error before any trial when no candidate can ever enter the plan."""
    if any(fits_budget(params[c.id], c.size, params_total, max_params_fraction, max_layers) for c in candidates):
        return
    smallest = min(candidates, key=lambda c: params[c.id])
    raise PrunekitError(f"max_params_fraction {max_params_fraction} / max_layers {max_layers}: the budget allows no "
                        f"candidate (the smallest, {smallest.id}, removes {params[smallest.id] / params_total:.1%} "
                        f"of the parameters and {smallest.size} layer(s))")


@dataclass
class Selection:
    """What `select_greedy` took: the layers, the chosen entries (best first) and why the others were left out."""
    text: set
    vision: set
    chosen: list
    skipped: list           # (entry, reason)
    params_removed: int = 0


def select_greedy(order: list[tuple[Candidate, int, object]], max_params: float, max_layers: int, *,
                  n_text: int | None = None, n_vision: int = 0, enough=None) -> Selection:
    """The one planner (knockout's plan, a pipeline round's prune): walk `order` (candidate, parameters it removes,
    the caller's entry; best first) and take each candidate that shares no layer with those already taken, keeps at
    least one text layer (and vision block) when `n_text` is given, and keeps the total within `max_params`
    parameters and `max_layers` layers; stop once `enough(params_removed)` holds."""
    sel = Selection(set(), set(), [], [])
    for cand, params, entry in order:
        if enough is not None and enough(sel.params_removed):
            break
        t, v = set(cand.text), set(cand.vision)
        size = len(sel.text) + len(sel.vision) + len(t) + len(v)
        if (t & sel.text) or (v & sel.vision):
            sel.skipped.append((entry, "overlaps a better candidate"))
        elif n_text is not None and (len(sel.text | t) >= n_text or (n_vision and len(sel.vision | v) >= n_vision)):
            sel.skipped.append((entry, "would remove every layer"))
        elif size > max_layers or sel.params_removed + params > max_params:
            sel.skipped.append((entry, "over budget"))
        else:
            sel.text |= t
            sel.vision |= v
            sel.params_removed += params
            sel.chosen.append(entry)
    return sel


def make_plan(rows: list[dict], params_total: int, n_text: int, n_vision: int, max_params_fraction: float = 0.25,
              max_layers: int = 10, allowed: tuple[str, ...] = ("free", "recoverable")) -> dict:
    """Best first (highest token_acc ratio; ties: more parameters removed) among candidates whose verdict is in
    `allowed`, taken by `select_greedy` within `max_params_fraction` of the parameters and `max_layers` layers.
    Rows: {id, text, vision, ratio, verdict, params_removed}. The result is what `prunekit prune --plan` reads
    (drop_text, drop_vision) plus the reasoning."""
    eligible = [r for r in rows if r.get("verdict") in allowed and r.get("ratio") is not None]
    eligible.sort(key=lambda r: (-r["ratio"], -r["params_removed"], r["id"]))
    sel = select_greedy([(Candidate(tuple(r["text"]), tuple(r["vision"])), r["params_removed"], r) for r in eligible],
                        max_params_fraction * params_total, max_layers, n_text=n_text, n_vision=n_vision)
    return {"drop_text": sorted(sel.text), "drop_vision": sorted(sel.vision),
            "order": [{k: r[k] for k in ("id", "ratio", "verdict", "params_removed")} for r in sel.chosen],
            "params_removed": sel.params_removed, "params_total": params_total,
            "params_fraction": sel.params_removed / params_total if params_total else 0.0,
            "budget": {"max_params_fraction": max_params_fraction, "max_layers": max_layers,
                       "verdicts": list(allowed)},
            "skipped": [{"id": r["id"], "reason": reason} for r, reason in sel.skipped]}


def trial_dir(run_dir, candidate: "Candidate | str"):
    """A sweep trial's directory under its run directory (`candidate`: a Candidate or its id)."""
    if isinstance(candidate, str):
        candidate = Candidate.parse(candidate)
    return run_dir / "trials" / candidate.dirname
