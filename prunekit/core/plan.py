"""Knockout analysis as plain Python: candidates, verdicts, the early-spike flag, Spearman correlation and the prune
plan under a budget. No torch, no Ray: the knockout stage feeds it rows and writes what it returns.

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


def make_plan(rows: list[dict], params_total: int, n_text: int, n_vision: int, max_params_fraction: float = 0.25,
              max_layers: int = 10, allowed: tuple[str, ...] = ("free", "recoverable")) -> dict:
    """Best first (highest token_acc ratio; ties: more parameters removed) among candidates whose verdict is in
    `allowed`; a candidate joins if it shares no layer with those already in, keeps at least one text layer (and
    vision block), and the total stays within `max_params_fraction` of the parameters and `max_layers` layers.
    Rows: {id, text, vision, ratio, verdict, params_removed}. The result is what `prunekit prune --plan` reads
    (drop_text, drop_vision) plus the reasoning."""
    eligible = [r for r in rows if r.get("verdict") in allowed and r.get("ratio") is not None]
    eligible.sort(key=lambda r: (-r["ratio"], -r["params_removed"], r["id"]))
    text, vision, order, skipped = set(), set(), [], []
    removed = 0
    for r in eligible:
        t, v = set(r["text"]), set(r["vision"])
        size = len(text) + len(vision) + len(t) + len(v)
        if (t & text) or (v & vision):
            skipped.append({"id": r["id"], "reason": "overlaps a better candidate"})
        elif len(text | t) >= n_text or (n_vision and len(vision | v) >= n_vision):
            skipped.append({"id": r["id"], "reason": "would remove every layer"})
        elif not fits_budget(removed + r["params_removed"], size, params_total, max_params_fraction, max_layers):
            skipped.append({"id": r["id"], "reason": "over budget"})
        else:
            text |= t
            vision |= v
            removed += r["params_removed"]
            order.append({"id": r["id"], "ratio": r["ratio"], "verdict": r["verdict"],
                          "params_removed": r["params_removed"]})
    return {"drop_text": sorted(text), "drop_vision": sorted(vision), "order": order,
            "params_removed": removed, "params_total": params_total,
            "params_fraction": removed / params_total if params_total else 0.0,
            "budget": {"max_params_fraction": max_params_fraction, "max_layers": max_layers,
                       "verdicts": list(allowed)},
            "skipped": skipped}


def trial_dir(run_dir, candidate: "Candidate | str"):
    """A sweep trial's directory under its run directory (`candidate`: a Candidate or its id)."""
    if isinstance(candidate, str):
        candidate = Candidate.parse(candidate)
    return run_dir / "trials" / candidate.dirname
