"""The shipped pipeline recipe on real weights: `recipes/pipeline.yaml` run the way its header tells a user to.

Issue 12 opened on what a user got from this recipe on one H200: 19% of the original's general-text token_acc at
the end. This bench runs the data commands written in the recipe's header comment, one process each, as written,
then `prunekit pipeline recipes/pipeline.yaml` (Ray: rounds of importance -> knockout sweep on Ray Tune -> prune ->
SFT -> distillation until the size target, then the calibrated KV cut and the long distillation), all in --out. It
writes the pipeline's summary, with every step's minutes, to bench/results/pipeline_smollm2.json (+ .png).

Every step resumes (`data generate` appends only what is missing, the pipeline skips finished stages and resumes a
stopped one), so the run can be chained as calls of <= 10 minutes. A signal is passed on to the running step once
(the step runs in its own process group), which stops on a checkpoint with its one line; this bench then exits
130 / 143. On a box without gensim, `--data` gives the chatterbot and general-text files made elsewhere
(`outcome_smollm2.py --prepare`): the recipe's `data chatterbot` and `data general` steps copy them instead, and the
pipeline's `eval_text` is the same held-out split, as a file.

    python bench/pipeline_smollm2.py --gpu --data .gpu/data --out /root/pipeline   # on the GPU box; resumes
    python bench/pipeline_smollm2.py --smoke                                      # CPU check of every step, tiny
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "pipeline.yaml"
RESULTS = ROOT / "bench" / "results"
PREPARED = {"data chatterbot": ("chat-train.jsonl", "val.jsonl"),   # steps --data stands in for: their files
            "data general": ("general-train.jsonl", "general-eval.jsonl")}
# --smoke: tiny sizes for the same commands and recipe (a check of the code path on CPU, not a measurement)
SMOKE_FLAGS = {"--rows": "8", "--max-new-tokens": "16", "--limit": "8"}
SMOKE_SETS = ["ray.use_gpu=false", "max_rounds=1", "target.params_fraction=0.96", "min_token_acc_ratio=0",
              "eval_samples=8",
              "eval_text_samples=8", "eval_max_length=64",
              "rounds=[importance, {knockout: {importance_candidates: 2}}, prune, sft, distill]",
              "finish=[kv_cut, {distill: {max_steps: 2}}]",
              "stages.importance={samples: 4, max_length: 64}",
              "stages.knockout.max_steps=2", "stages.knockout.eval_interval=2", "stages.knockout.batch_size=2",
              "stages.knockout.max_length=64", "stages.knockout.eval_max_samples=8",
              "stages.knockout.tune={gpus_per_trial: 0, max_concurrent_trials: 2}",
              "stages.sft={max_steps: 2, max_length: 64, batch_size: 2, eval_interval: 2, save_interval: 2}",
              "stages.distill.max_steps=2", "stages.distill.max_length=64", "stages.distill.batch_size=2",
              "stages.distill.bf16=false", "stages.distill.compile=false", "stages.distill.eval_interval=2",
              "stages.distill.save_interval=2", "stages.kv_cut.samples=4", "stages.kv_cut.calibration_steps=2"]


def recipe_commands(recipe: Path) -> list[str]:
    """The shell commands in the recipe's header comment (lines `#   prunekit ...` or `#   cat ...`, continued with
    a trailing backslash), trailing comments dropped, in order."""
    commands, pending = [], ""
    for raw in recipe.read_text().splitlines():
        if not raw.startswith("#"):
            break
        line = raw[1:].strip()
        if not pending and not line.startswith(("prunekit ", "cat ")):
            continue
        pending = f"{pending} {line}".strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        commands.append(re.sub(r"\s{2,}#.*$", "", pending))
        pending = ""
    return commands


def step_name(command: str) -> str:
    """A step's name: its subcommand and the file it writes ("data generate -> data/teacher.jsonl")."""
    words = command.split()
    target = re.search(r"(?:-o|>)\s+(\S+)", command)
    verb = "mix" if words[0] == "cat" else " ".join(words[1:3])
    return f"{verb} -> {target.group(1)}" if target else verb


def smoke_command(command: str) -> str:
    for flag, value in SMOKE_FLAGS.items():
        command = re.sub(rf"{flag} \d+", f"{flag} {value}", command)
    if " generate " in command and "--max-new-tokens" not in command:
        command += f" --max-new-tokens {SMOKE_FLAGS['--max-new-tokens']}"
    return command


def shims(bin_dir: Path) -> dict:
    """`prunekit` and `python` on PATH for the recipe's commands: this interpreter and this checkout (a box with the
    package on PYTHONPATH has no console script)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in {"prunekit": f'exec "{sys.executable}" -c "from prunekit.cli import entry; entry()" "$@"',
                       "python": f'exec "{sys.executable}" "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_step(name: str, command: str, cwd: Path, env: dict) -> None:
    """`command` under bash in its own process group; a SIGINT/SIGTERM that reaches this process is passed on once
    (a repeat within interrupts.REPEAT_WINDOW_S is the same request: `timeout` signals twice), and the step's own
    exit is awaited before this process stops."""
    from prunekit import PrunekitError
    from prunekit.core import interrupts
    print(f"$ {command}", flush=True)
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, start_new_session=True)
    got = {"signum": None, "at": 0.0}

    def forward(signum, frame):
        if got["signum"] is not None and time.monotonic() - got["at"] < interrupts.REPEAT_WINDOW_S:
            return
        got.update(signum=signum, at=time.monotonic())
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    with interrupts.handled(forward):
        code = proc.wait()
    if got["signum"] is not None:
        raise interrupts.interrupt_for(got["signum"], f"step `{name}` stopped (exit {code}): the same command resumes")
    if code:
        raise PrunekitError(f"step `{name}` failed with exit status {code} (its own message is above)")


def summary_report(summary: dict, minutes: dict, args, commands: list[str], machine: str) -> dict:
    """Per model: parameters, layers, KV heads and bytes/token, chat val and general-text token_acc (and their
    ratio to the original), the stage's minutes; the run's minutes per step."""
    rows = summary["rows"]
    o = rows[0]

    def ratio(rec, key):
        return rec[key]["token_acc"] / o[key]["token_acc"] if rec.get(key) and o.get(key) else None

    stages = {r["id"]: {"stage": r.get("stage", "original"), "params": r["facts"]["params"],
                        "layers": r["facts"]["text_layers"], "kv_heads": r["facts"]["kv_heads"],
                        "kv_bytes_per_token": r["facts"]["kv_bytes_per_token"],
                        "general_text": {"token_acc": r["eval_text"]["token_acc"], "nll": r["eval_text"]["loss"],
                                         "vs_original": ratio(r, "eval_text")} if r.get("eval_text") else None,
                        "chat_val": {"token_acc": r["eval"]["token_acc"], "nll": r["eval"]["loss"],
                                     "vs_original": ratio(r, "eval"),
                                     "in_domain": r["id"] in summary.get("in_domain", [])},
                        "minutes": round(r.get("time_s", 0) / 60, 2)}
              for r in rows}
    last_id, last = list(stages.items())[-1]
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine,
            "command": "python bench/pipeline_smollm2.py " + " ".join(args.argv),
            "recipe": "recipes/pipeline.yaml", "steps": commands, "status": summary["status"],
            "stages": stages,
            "last_model": {"stage": last_id, "params_fraction": last["params"] / stages["original"]["params"],
                           "general_text_vs_original": last["general_text"] and last["general_text"]["vs_original"],
                           "chat_val_vs_original": last["chat_val"]["vs_original"]},
            "minutes": {**minutes, "end_to_end": round(sum(minutes.values()), 2)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="the recipe as written (ray.use_gpu: true)")
    ap.add_argument("--smoke", action="store_true", help="every step on CPU with tiny sizes (writes *_smoke.json)")
    ap.add_argument("--data", type=Path, default=None,
                    help="chatterbot + general-text files made elsewhere (outcome_smollm2.py --prepare)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "pipeline")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to `prunekit pipeline`")
    ap.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                    help="write the report from a run's pipeline_state.json and bench_state.json (e.g. fetched from "
                         "a GPU box; a run that did not finish says in its status where it stopped)")
    ap.add_argument("--machine", default=None, help="with --report-only: the machine the run was on")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        from prunekit.pipeline.state import STATE_FILE, State
        from prunekit.pipeline.summary import in_domain_ids, summary_rows
        state = State(args.report_only / STATE_FILE, json.loads((args.report_only / STATE_FILE).read_text()))
        summary = {"status": state.data["status"], "rows": summary_rows(state),
                   "in_domain": sorted(in_domain_ids(state)), "unfinished": state.data.get("unfinished")}
        clock = json.loads((args.report_only / "bench_state.json").read_text())
        write_report(summary, clock, args, args.machine or "unknown", recipe_commands(RECIPE), None)
        return 0
    if args.gpu == args.smoke:
        ap.error("give --gpu (the recipe as written) or --smoke (a CPU check)")
    out = (args.out.with_name(args.out.name + "-smoke") if args.smoke else args.out).resolve()
    (out / "data").mkdir(parents=True, exist_ok=True)
    from prunekit.core import locks
    with locks.hold((out, "--out")):   # a second copy of the same run stops here, with one line
        return run(args, out)


def run(args, out: Path) -> int:
    from bench.outcome_smollm2 import Clock
    from prunekit import PrunekitError
    commands = recipe_commands(RECIPE)
    if not commands:
        raise PrunekitError(f"{RECIPE}: no `prunekit ...` commands in its header comment")
    sets = list(args.set) + (SMOKE_SETS if args.smoke else [])
    if args.data is not None:
        data = args.data.resolve()
        missing = [f for files in PREPARED.values() for f in files if not (data / f).is_file()]
        if missing:
            raise PrunekitError(f"--data {data}: no {', '.join(missing)} (write them with outcome_smollm2.py "
                                f"--prepare --data {data})")
        sets.append(f"eval_text={data / 'general-eval.jsonl'}")
    pipeline = f"prunekit pipeline {RECIPE}" + "".join(f" --set '{s}'" for s in sets)
    steps = [(step_name(c), smoke_command(c) if args.smoke else c) for c in commands] + [("pipeline", pipeline)]
    clock = Clock(out / "bench_state.json", {"gpu": args.gpu, "data": str(args.data), "set": args.set,
                                             "argv": args.argv})
    env = shims(out / ".bin")
    stopped = None
    for name, command in steps:
        prepared = next((files for verb, files in PREPARED.items() if name.startswith(verb)), None)
        if args.data is not None and prepared:
            clock.run(name, lambda files=prepared: [shutil.copy2(args.data / f, out / "data" / f) for f in files])
            continue
        try:
            clock.run(name, lambda name=name, command=command: run_step(name, command, out, env))
        except PrunekitError as error:
            summary_file = out / "out" / "pipeline" / "summary.json"
            # a pipeline stopped by its own guardrail or max_rounds is an outcome to report, not a crash
            if name != "pipeline" or not summary_file.is_file() or \
                    not json.loads(summary_file.read_text())["status"].startswith("stopped"):
                raise
            stopped, clock.phase = error, None
    summary = json.loads((out / "out" / "pipeline" / "summary.json").read_text())
    import torch
    machine = torch.cuda.get_device_name(0) if args.gpu and torch.cuda.is_available() else "CPU"
    write_report(summary, clock.data, args, machine, [c for _, c in steps], out / "out" / "pipeline" / "summary.png")
    return 2 if stopped else 0


def write_report(summary: dict, clock: dict, args, machine: str, commands: list[str], png: Path | None) -> None:
    minutes = {k: round(v / 60, 2) for k, v in clock["phases"].items()}
    report = summary_report(summary, minutes, args, commands, machine)
    report["calls"] = clock["calls"]
    if args.report_only:   # the run's own command, where its state kept it
        argv = clock.get("settings", {}).get("argv") or ["--gpu", "--data", "DATA", "--out", "DIR"]
        report["command"] = "python bench/pipeline_smollm2.py " + " ".join(argv)
        report["written_with"] = "python bench/pipeline_smollm2.py " + " ".join(args.argv)
    if summary.get("unfinished"):   # the stage attempts a run that did not finish spent
        report["unfinished_stages"] = summary["unfinished"]
    stem = RESULTS / ("pipeline_smollm2_smoke" if args.smoke else "pipeline_smollm2")
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, stem.with_suffix(".json"))
    if png is not None and png.is_file():
        shutil.copy2(png, stem.with_suffix(".png"))
    f = report["last_model"]
    text = f"{f['general_text_vs_original']:.1%}" if f["general_text_vs_original"] is not None else "-"
    print(f"pipeline_smollm2: {report['status'][:120]}; {f['stage']}: {f['params_fraction']:.1%} of the parameters, "
          f"general text {text}, chat val {f['chat_val_vs_original']:.1%} of the original; "
          f"{report['minutes']['end_to_end']:.1f} min; {stem.with_suffix('.json')}")


if __name__ == "__main__":
    from bench.outcome_smollm2 import run_as_script
    run_as_script(main, "pipeline_smollm2")
