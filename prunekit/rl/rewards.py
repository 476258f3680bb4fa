"""Rewards: `fn(completions, prompts, **columns) -> list[float | None]`, sync or async.

A reward is named in the config as `path/to/file.py:function`, `package.module:function`, or a built-in name
(`exact_match`, `numeric_match`, `format`, `length_penalty`, `valid_json`), with a weight and keyword arguments.
`columns` holds the prompt dataset's other columns (one value per completion) plus `completion_ids`.
None means "not applicable" to that sample: it adds nothing to the total and stays out of the reward's mean/std.
A reward that raises, returns the wrong number of values, or a NaN/inf stops the run with `RewardError`, naming the
reward and the sample.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from prunekit import PrunekitError


class RewardError(PrunekitError):
    pass


BUILTINS: dict[str, Callable] = {}


def builtin(name: str):
    def deco(fn):
        BUILTINS[name] = fn
        return fn
    return deco


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _answer_text(completion: str) -> str:
    """The part of a completion that holds the answer: after a `####` or `Answer:` marker if there is one."""
    for marker in ("####", "Answer:", "answer:"):
        if marker in completion:
            completion = completion.rsplit(marker, 1)[1]
    return completion.strip()


@builtin("exact_match")
def exact_match(completions, prompts, column: str = "answer", **columns) -> list[float | None]:
    """1.0 when the completion's answer (after a `####`/`Answer:` marker, whitespace and a final period stripped)
    equals the `column` value as text; None where the row has no value."""
    refs = _column(columns, column, len(completions), "exact_match")
    return [None if ref is None else float(_answer_text(c).rstrip(".").strip() == str(ref).strip())
            for c, ref in zip(completions, refs)]


@builtin("numeric_match")
def numeric_match(completions, prompts, column: str = "answer", tolerance: float = 1e-6, **columns):
    """1.0 when the last number in the completion's answer equals the `column` value within `tolerance`."""
    refs = _column(columns, column, len(completions), "numeric_match")
    out: list[float | None] = []
    for c, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        numbers = _NUMBER.findall(_answer_text(c).replace(",", ""))
        out.append(float(bool(numbers) and abs(float(numbers[-1]) - float(ref)) <= tolerance))
    return out


@builtin("format")
def format_reward(completions, prompts, pattern: str = r"^.*$", **columns):
    """1.0 when the whole completion matches the regex `pattern` (re.DOTALL), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [float(regex.fullmatch(c.strip()) is not None) for c in completions]


@builtin("length_penalty")
def length_penalty(completions, prompts, max_tokens: int = 256, **columns):
    """-(tokens beyond max_tokens) / max_tokens, 0 up to max_tokens (counted in completion_ids when given)."""
    ids = columns.get("completion_ids")
    lengths = [len(x) for x in ids] if ids is not None else [len(c.split()) for c in completions]
    return [-max(0, n - max_tokens) / max_tokens for n in lengths]


@builtin("valid_json")
def valid_json(completions, prompts, **columns):
    """1.0 when the completion (a ```json fence removed) parses as JSON."""
    out = []
    for c in completions:
        text = re.sub(r"^```(?:json)?\s*|\s*```$", "", c.strip())
        try:
            json.loads(text)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


def _column(columns: dict, name: str, n: int, reward: str) -> list:
    if name not in columns:
        raise RewardError(f"reward {reward}: the prompts have no column {name!r} "
                          f"(columns: {', '.join(sorted(k for k in columns if k != 'completion_ids')) or 'none'})")
    return columns[name]


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def load_reward_fn(spec: str) -> Callable:
    """`file.py:fn`, `pkg.mod:fn` or a built-in name -> the callable; one-line errors otherwise."""
    if ":" not in spec:
        if spec not in BUILTINS:
            raise PrunekitError(f"reward {spec}: not a built-in ({', '.join(sorted(BUILTINS))}); "
                                "give a plugin as path/to/file.py:function or package.module:function")
        return BUILTINS[spec]
    target, fn_name = spec.rsplit(":", 1)
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise PrunekitError(f"reward {spec}: file {path} not found")
        module_name = f"prunekit_reward_{abs(hash(str(path)))}"
        try:
            mod_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[module_name] = module
            mod_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - a user's file: report what broke, in one line
            raise PrunekitError(f"reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:  # noqa: BLE001
            raise PrunekitError(f"reward {spec}: cannot import {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise PrunekitError(f"reward {spec}: {target} has no function {fn_name}")
    return fn


def load_rewards(specs) -> list[Reward]:
    """Config entries (`RewardSpec`s or dicts with fn/weight/kwargs/name) -> Rewards, each loaded and checked."""
    rewards, names = [], set()
    for s in specs:
        s = s if isinstance(s, dict) else s.model_dump()
        fn = load_reward_fn(s["fn"])
        name = s.get("name") or s["fn"].rsplit(":", 1)[-1]
        if name in names:
            raise PrunekitError(f"reward {name}: listed twice; give one of them a `name`")
        names.add(name)
        rewards.append(Reward(name, fn, float(s.get("weight", 1.0)), dict(s.get("kwargs") or {})))
    if not rewards:
        raise PrunekitError("rewards: at least one reward is needed")
    return rewards


def _call(reward: Reward, completions, prompts, columns):
    result = reward.fn(completions, prompts, **columns, **reward.kwargs)
    if inspect.isawaitable(result):
        result = _run_coroutine(result)
    return result


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # called from inside a running loop (e.g. a notebook): run it on a fresh loop in a thread
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _where(i: int, prompts, completions) -> str:
    return f"sample {i} (prompt {_short(prompts[i])!r}, completion {_short(completions[i])!r})"


def _short(x, n: int = 60) -> str:
    text = x if isinstance(x, str) else json.dumps(x)
    return text if len(text) <= n else text[:n] + "..."


def score(rewards: list[Reward], completions: list[str], prompts: list, columns: dict) -> tuple[list[float], dict]:
    """Weighted total per completion and each reward's raw values (None = not applicable), validated."""
    n = len(completions)
    per_reward: dict[str, list[float | None]] = {}
    for r in rewards:
        try:
            values = _call(r, completions, prompts, columns)
        except RewardError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's function: name it and the batch
            raise RewardError(f"reward {r.name} raised {type(e).__name__}: {e} "
                              f"(scoring samples 0..{n - 1}; first: {_where(0, prompts, completions)})") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {r.name} returned {type(values).__name__}, expected a list of {n} "
                              "floats or None") from None
        if len(values) != n:
            raise RewardError(f"reward {r.name} returned {len(values)} values for {n} completions")
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise RewardError(f"reward {r.name} returned {v!r} for {_where(i, prompts, completions)}; "
                                  "expected a float or None") from None
            if not math.isfinite(v):
                raise RewardError(f"reward {r.name} returned {v} for {_where(i, prompts, completions)}")
            values[i] = v
        per_reward[r.name] = values
    totals = [sum(r.weight * per_reward[r.name][i] for r in rewards if per_reward[r.name][i] is not None)
              for i in range(n)]
    return totals, per_reward


def reward_metrics(per_reward: dict) -> dict:
    """reward/<name>/mean|std over the applicable samples."""
    out = {}
    for name, values in per_reward.items():
        vals = [v for v in values if v is not None]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        out[f"reward/{name}/mean"] = mean
        out[f"reward/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return out
