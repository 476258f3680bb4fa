"""Real sizes (issue 14): Qwen2.5-1.5B- and Qwen2.5-7B-shaped models (random init) through prunekit's own training
code on one GPU, each run's peak memory beside what `prunekit plan` predicts for the same settings.

    python bench/real_sizes.py [--only a,b] [--trials 1] [--out bench/results/real_sizes.json]
    python bench/real_sizes.py --smoke [--only a,b]   # CPU, tiny shapes: the same code paths, numbers meaningless
    python bench/real_sizes.py --replan [--out ...]   # today's plan for the recorded rows; runs nothing

Sections (`--only` takes their names; every row of a section runs in a fresh process, so GPU memory starts clean):
  knockout_lora_1.5b  knockout_full_1.5b  knockout_lora_7b   one knockout trial each (the middle layer removed):
                         100 steps of 8 x 2048 tokens (the 7B LoRA trial: 4 x 2048)
  sft_fsdp2_1.5b  sft_fsdp2_7b                                SFT with FSDP2 (a world of one) + gradient checkpointing
  distill_7b_to_5b       the 7B teacher (bf16, frozen, same GPU) into a ~5B student (18 of the 7B's 28 layers): the
                         student's SFT step, the full-vocabulary distillation step and the top-k logit one
  knockout_full_7b       not in the default run (~2-3 minutes more): a full 7B trial, batch 4 like the LoRA one

A knockout trial is what one Ray Tune trial of `prunekit knockout` runs, without Ray: `engine.trial.run_trial` builds
the trial model from the shared base (float32 numpy weights, as `load_shared_base` holds them; the driver's part,
made here from a random model built on the GPU, is not timed) and trains it through the engine with evals at step 0,
every 20 steps and at the end (16 val rows); its wall time is the trial's, build included. SFT and distillation run
`engine.loop.train` with the objective `prunekit sft` / `distill` build, the model made in its training dtype on
the GPU (a 7B init on the CPU takes minutes); checkpoints are not written (the rows time steps, not disk I/O).
Every row trains bf16 weights (`param_dtype: bfloat16`, fused AdamW); SFT and distillation compile each decoder layer.
Data: random tokens, every token supervised, no padding.

Figures: wall seconds, the median step time and tokens/s of the steady steps (after the warm-up steps and not
the step after an eval), MFU against 989 TFLOP/s (`setup.mfu_formula`), peak `torch.cuda.max_memory_allocated`
and `max_memory_reserved` from the row's start, the plan's peak for the row's config (`prunekit plan`'s numbers:
`memory_plan.plan` of `settings_for` the same validated config; for a knockout row that is the plan of the base
model, as `prunekit plan MODEL --stage knockout` gives it) and predicted / measured. Rows the plan says cannot
fit are recorded with its verdict and not run, as a training stage would refuse them (`--ignore-plan` runs them);
a row that crashes or runs out of memory records its one-line reason. Results merge into --out after every row
(with `--only`, rows of an earlier run of the same mode stay; `measured_now` names the fresh ones). `--smoke` runs
in float32 without compile (to stay within ~1 minute on 2 cores) and its peak is host RSS growth.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from prunekit.core import memory_plan as mp
from prunekit.engine.reporting import METRICS_FILE, RunLogger
from prunekit.stages.plan import gpu_budget, load_stage_config, settings_for

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "
PEAK_BF16_FLOPS = 989e12   # H100/H200 dense bf16, as train_throughput.py
GiB = 1024 ** 3
HISTORY = ("notes", "earlier_runs")  # hand-kept keys of --out that a new write keeps

QWEN = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, hidden_act="silu")
SHAPES = {  # the real Qwen2.5 config values
    "1.5b": dict(QWEN, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(QWEN, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SHAPES["5b"] = {**SHAPES["7b"], "num_hidden_layers": 18}  # the distillation student: the 7B with 10 layers removed
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=256)
SMOKE_SHAPES = {"1.5b": SMOKE, "7b": {**SMOKE, "tie_word_embeddings": False},
                "5b": {**SMOKE, "tie_word_embeddings": False, "num_hidden_layers": 1}}
SHAPE_NAMES = {"1.5b": "Qwen2.5-1.5B-shaped", "7b": "Qwen2.5-7B-shaped", "5b": "~5B student (Qwen2.5-7B, 18 layers)"}


@dataclass(frozen=True)
class Sizes:
    steps: int
    batch: int
    seq: int = 2048
    warmup: int = 2           # steps left out of the medians (the first compiles, the allocator settles)
    eval_interval: int = 20   # knockout trials (the recipe's); SFT / distillation rows never evaluate
    val_rows: int = 16        # knockout trials' eval set


SMOKE_SIZES = Sizes(steps=3, batch=2, seq=64, warmup=1, eval_interval=2, val_rows=2)


@dataclass(frozen=True)
class Row:
    name: str
    stage: str                # knockout | sft | distill (as `prunekit plan --stage` takes it)
    model: str                # a SHAPES key
    sizes: Sizes
    trial_mode: str = "full"  # knockout: full | lora
    teacher: str | None = None
    top_k: int | None = None


KNOCKOUT = Sizes(steps=100, batch=8)
TRAINING = Sizes(steps=12, batch=8, warmup=4)
TOP_K = 64
SECTIONS = {
    "knockout_lora_1.5b": [Row("knockout_lora_1.5b", "knockout", "1.5b", KNOCKOUT, trial_mode="lora")],
    "knockout_full_1.5b": [Row("knockout_full_1.5b", "knockout", "1.5b", KNOCKOUT)],
    # batch 4: chosen when trials had LoRA dropout 0.05, whose per-adapter inputs and masks put batch 8 past one H200
    "knockout_lora_7b": [Row("knockout_lora_7b", "knockout", "7b", Sizes(steps=100, batch=4), trial_mode="lora")],
    "sft_fsdp2_1.5b": [Row("sft_fsdp2_1.5b", "sft", "1.5b", TRAINING)],
    "sft_fsdp2_7b": [Row("sft_fsdp2_7b", "sft", "7b", TRAINING)],
    "distill_7b_to_5b": [Row("distill_7b_to_5b/sft_student", "sft", "5b", TRAINING),
                         Row("distill_7b_to_5b/distill", "distill", "5b", TRAINING, teacher="7b"),
                         Row(f"distill_7b_to_5b/distill_top{TOP_K}", "distill", "5b", TRAINING, teacher="7b",
                             top_k=TOP_K)],
    # the plan fits it at batch 4 (~100 GiB); left out of the default run to keep that under 10 minutes
    "knockout_full_7b": [Row("knockout_full_7b", "knockout", "7b", Sizes(steps=100, batch=4))],
}
DEFAULT_SECTIONS = [s for s in SECTIONS if s != "knockout_full_7b"]
ROWS = {row.name: row for rows in SECTIONS.values() for row in rows}
GOALS = {"knockout_lora_7b": ("trial_wall_s", "<=", 180.0), "sft_fsdp2_7b": ("mfu", ">=", 0.40)}
PLAN_TOLERANCE = 0.15


def sizes_of(row: Row, smoke: bool) -> Sizes:
    return SMOKE_SIZES if smoke else row.sizes


# ---- configs: the same validated stage config for the plan and the run --------------------------------------------

def write_model_configs(workdir: Path, smoke: bool) -> None:
    """config.json of every shape under workdir/models/<key>: what `prunekit plan` and the runs read."""
    from transformers import Qwen2Config
    for key, values in (SMOKE_SHAPES if smoke else SHAPES).items():
        Qwen2Config(**values).save_pretrained(workdir / "models" / key)


def stage_overrides(row: Row, smoke: bool, workdir: Path) -> dict:
    """The row's settings as `--set` overrides of the stage config (the plan and the run read the same ones)."""
    sizes, gpu = sizes_of(row, smoke), not smoke
    out = {"train": "(bench: random tokens)", "output_dir": str(workdir / "out"), "max_steps": sizes.steps,
           "batch_size": sizes.batch, "max_length": sizes.seq, "bf16": gpu, "param_dtype": "bfloat16" if gpu else
           "float32", "scheduler": "constant", "warmup_ratio": 0.0, "save_interval": 10 ** 9, "wandb.mode": "disabled"}
    if row.stage == "knockout":
        out.update({"val": "(bench: random tokens)", "trial_mode": row.trial_mode, "importance": False,
                    "eval_interval": sizes.eval_interval, "tune.gpus_per_trial": 1 if gpu else 0,
                    "lr": 2e-4 if row.trial_mode == "lora" else 5e-5})
    else:  # CPU: no compile (inductor would add ~10 s a row on a 2-core box), everything else as on the GPU
        out.update({"launcher": "local", "ray.use_gpu": gpu, "parallel.strategy": "fsdp", "compile": gpu,
                    "gradient_checkpointing": True, "eval_interval": 10 ** 9, "lr": 1e-5})
    if row.top_k is not None:
        out["top_k"] = row.top_k
    return out


def stage_config(row: Row, smoke: bool, workdir: Path):
    teacher = str(workdir / "models" / row.teacher) if row.teacher else None
    return load_stage_config(row.stage, str(workdir / "models" / row.model), None, teacher,
                             stage_overrides(row, smoke, workdir))


def planned(row: Row, smoke: bool, workdir: Path, budget: float | None) -> dict:
    """`prunekit plan`'s figures for the row's config, and its verdict against one GPU's memory (when known)."""
    shape, settings, _ = settings_for(row.stage, stage_config(row, smoke, workdir), gpus=1)
    p = mp.plan(shape, settings)
    out = {"plan_settings": mp.describe(settings), "plan_peak_gib": p.peak / GiB, "plan_required_gib": p.required / GiB,
           "shape": shape, "teacher_shape": settings.teacher}
    if budget is not None:
        out["plan_fits"], out["plan_verdict"] = mp.verdict_line(shape, settings, budget, mp.gpus_used(settings),
                                                                what=f"{row.stage} of {SHAPE_NAMES[row.model]}")
    return out


# ---- one row, in its own process --------------------------------------------------------------------------------

class MemoryMeter:
    """Peak memory from `start()`: the CUDA caching allocator's peaks on a GPU; on the CPU (smoke) the host RSS
    high-water mark above the RSS at start (a check that the path reports a number, not what the plan predicts)."""

    def __init__(self, device):
        self.device = device
        self.base = 0

    def start(self) -> None:
        gc.collect()  # what the row before this point dropped (the base model) must not count
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status_kib("VmRSS")

    def read(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                    "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB, "peak_what": "cuda allocated"}
        return {"peak_allocated_gib": (_status_kib("VmHWM") - self.base) * 1024 / GiB, "peak_reserved_gib": None,
                "peak_what": "host RSS growth (CPU smoke)"}


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def random_samples(n: int, seq: int, vocab: int, seed: int) -> list[dict]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed)).tolist()
    return [{"input_ids": x, "labels": x} for x in ids]


def build_model(model_dir: Path, device, dtype):
    """A random-init model of model_dir's config, made directly on `device` in `dtype`."""
    from transformers import AutoConfig
    from prunekit.core.loading import model_from_config, quiet_transformers
    torch.manual_seed(0)
    with quiet_transformers(), torch.device(device):
        return model_from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)


class BenchReporter(RunLogger):
    """The engine's reporter as a knockout trial has it (metrics.jsonl, no progress bar, no checkpoints, nothing to
    resume) without Ray's tune.report; the SFT and distillation rows use it too, to time steps and not disk I/O."""
    progress_bar = False
    keeps_checkpoints = False

    def restore(self):
        return None


def step_figures(run_dir: Path, sizes: Sizes, eval_interval: int) -> dict:
    """The median step time of the steady steps and the tokens/s it gives, from the loop's own metrics.jsonl (each
    step's time there is the wall time since the previous step was read: on a GPU the loop reads a step back while
    the next one runs, so it is the step's own time; on the CPU the times shift by one step)."""
    lines = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    steps = [m for m in lines if "train/tokens_per_s" in m]
    steady = [m for m in steps if m["step"] > sizes.warmup and (m["step"] - 1) % eval_interval] or steps
    step_s = statistics.median(m["train/tokens"] / m["train/tokens_per_s"] for m in steady)
    return {"step_s": step_s, "tokens_per_s": statistics.median(m["train/tokens"] for m in steady) / step_s,
            "steady_steps": len(steady), "first_step_s": steps[0]["train/tokens"] / steps[0]["train/tokens_per_s"],
            "final_train_loss": steps[-1]["train/loss"]}


def run_knockout(row: Row, cfg, device, workdir: Path, meter: MemoryMeter, trials: int) -> dict:
    """`trials` knockout trials in this process (as a reused Tune trial process runs them), each removing one
    middle layer. The shared base (float32, as the sweep's driver loads it) is made first and not measured."""
    from prunekit.core.plan import Candidate
    from prunekit.engine.trial import run_trial, shared_weights
    sizes = sizes_of(row, device.type == "cpu")
    model = build_model(Path(cfg.model), device, torch.float32)
    vocab, layers = model.config.vocab_size, model.config.num_hidden_layers
    base = {**shared_weights(model), "train": random_samples(sizes.steps * sizes.batch, sizes.seq, vocab, 0),
            "val": random_samples(sizes.val_rows, sizes.seq, vocab, 1), "pad_id": 0}
    del model
    meter.start()
    out = []
    for i in range(trials):
        candidate = Candidate.parse(f"text:{(layers // 2 + i) % layers}")
        run_dir = workdir / "runs" / row.name / candidate.dirname
        t0 = time.perf_counter()
        metrics = run_trial(cfg, base, candidate, BenchReporter(run_dir, candidate.dirname, cfg), device)
        wall = time.perf_counter() - t0
        out.append({"candidate": candidate.id, "trial_wall_s": wall, "trial_setup_s": metrics["time/setup_s"],
                    "trial_train_s": metrics["time/train_s"], "params_trainable": metrics["params/trainable"],
                    "eval_token_acc": metrics.get("eval/token_acc"),
                    **step_figures(run_dir, sizes, cfg.eval_interval)})
        gc.collect()  # the trial's model goes before the next one is built, as in a reused trial process
    return {**out[0], "trials": out if trials > 1 else None, "layers_trained": layers - 1, **meter.read()}


def objective_for(stage: str, cfg, device):
    """The stage's objective as `stages.training.build_worker` makes it, with the teacher built here (random weights
    of its shape) instead of loaded."""
    from prunekit.stages.training import make_objective
    teacher = None
    if stage == "distill":
        teacher = build_model(Path(cfg.teacher), device, torch.bfloat16 if cfg.bf16 else torch.float32)
    return make_objective(stage, cfg, teacher)


def run_training(row: Row, cfg, device, workdir: Path, meter: MemoryMeter) -> dict:
    from prunekit.engine.loop import train
    from prunekit.engine.strategy import process_group_of_one
    sizes = sizes_of(row, device.type == "cpu")
    meter.start()
    with process_group_of_one(device):
        dtype = torch.bfloat16 if cfg.param_dtype == "bfloat16" else torch.float32
        model = build_model(Path(cfg.model), device, dtype)
        objective = objective_for(row.stage, cfg, device)
        data = random_samples(sizes.steps * sizes.batch, sizes.seq, model.config.vocab_size, 0)
        run_dir = workdir / "runs" / row.name.replace("/", "_")
        t0 = time.perf_counter()
        train(model, objective, cfg, data, [], 0, BenchReporter(run_dir, row.name, cfg), device=device)
        wall = time.perf_counter() - t0
        return {"train_wall_s": wall, **step_figures(run_dir, sizes, cfg.eval_interval), **meter.read()}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def child(args) -> None:
    """--row NAME: run one row here and print its figures as one RESULT line (errors too: the peak up to them)."""
    row = ROWS[args.row]
    device = torch.device("cpu") if args.smoke else torch.device("cuda", 0)
    workdir = Path(args.workdir)
    cfg = stage_config(row, args.smoke, workdir)
    meter = MemoryMeter(device)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    try:
        if row.stage == "knockout":
            out.update(run_knockout(row, cfg, device, workdir, meter, args.trials))
        else:
            out.update(run_training(row, cfg, device, workdir, meter))
    except Exception as e:  # out of memory and the like: recorded, with the peak it reached
        traceback.print_exc()  # the driver keeps the end of stderr beside the error line
        out.update({"error": one_line(e), **meter.read()})
    print(RESULT + json.dumps(out), flush=True)


# ---- the driver ---------------------------------------------------------------------------------------------------

def flops_per_token(shape, layers: int, seq: int, lora: bool) -> float:
    """6 N + 12 L H S per trained token (N: the weights a token's matmuls use, every decoder layer and the LM head,
    not the embedding lookup; 12 L H S: attention scores and values, forward and backward, over the full sequence
    as PaLM counts them). LoRA trials: 4 N (frozen weights get no weight gradient). Recomputed forwards under
    gradient checkpointing are not counted."""
    n = layers * shape.layer_params + shape.embedding_params
    return (4 if lora else 6) * n + 12 * layers * shape.q_dim * seq


def row_flops_per_token(row: Row, plan: dict, layers: int, seq: int) -> float:
    flops = flops_per_token(plan["shape"], layers, seq, row.trial_mode == "lora")
    if row.stage == "distill":  # + the teacher's forward
        t = plan["teacher_shape"]
        flops += 2 * (t.layers * t.layer_params + t.embedding_params) + 4 * t.layers * t.q_dim * seq
    return flops


def run_child(row: Row, args, workdir: Path) -> dict:
    """The row in a fresh process; a crash or a timeout is one line (the child's process group is ended on a
    timeout: inductor's compile workers are its children)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", row.name, "--workdir", str(workdir),
           "--trials", str(args.trials)] + (["--smoke"] if args.smoke else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        timed_out = True
    wall = time.perf_counter() - t0
    lines = [x for x in stdout.splitlines() if x.startswith(RESULT)]
    if timed_out:
        out = {"error": f"timed out after {args.row_timeout} s (--row-timeout)"}
    elif lines:
        out = json.loads(lines[-1][len(RESULT):])
    else:
        out = {"error": crash_line(proc.returncode, stderr)}
    if "error" in out:
        out["stderr_tail"] = stderr.strip().splitlines()[-15:]
    return {**out, "row_wall_s": wall}


def crash_line(returncode: int, stderr: str) -> str:
    """The last line of stderr that names an error, and the exit status."""
    lines = [x.strip() for x in stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x.split(":")[0] or "Exception" in x.split(":")[0]]
    return f"exit {returncode}: {(errors or lines or ['no output'])[-1][:400]}"


def assemble(row: Row, plan: dict, run: dict | None, smoke: bool) -> dict:
    sizes = sizes_of(row, smoke)
    out = {"section": row.name.split("/")[0], "stage": row.stage, "model": SHAPE_NAMES[row.model],
           "params": plan["shape"].params, "teacher": SHAPE_NAMES[row.teacher] if row.teacher else None,
           "teacher_params": plan["teacher_shape"].params if row.teacher else None, "trial_mode": row.trial_mode
           if row.stage == "knockout" else None, "top_k": row.top_k, "steps": sizes.steps, "batch": sizes.batch,
           "seq": sizes.seq, **{k: v for k, v in plan.items() if k not in ("shape", "teacher_shape")}}
    if run is None:
        return {**out, "skipped": f"memory plan: {plan['plan_verdict']} (--ignore-plan runs it)"}
    out.update(run)
    if "tokens_per_s" in run:
        layers = run.get("layers_trained", plan["shape"].layers)
        flops = row_flops_per_token(row, plan, layers, sizes.seq)
        out["flops_per_token"] = flops
        out["mfu"] = run["tokens_per_s"] * flops / PEAK_BF16_FLOPS if run["device"] != "cpu" else None
    judge_plan(out)
    return out


def judge_plan(row: dict) -> None:
    """The plan's peak over the measured one, and whether it is within the tolerance, for a row that ran."""
    if row.get("peak_allocated_gib") and "error" not in row:  # a failed row's peak is where it stopped
        ratio = row["plan_peak_gib"] / row["peak_allocated_gib"]
        row["plan_over_measured"] = ratio
        # judged on a GPU only: the smoke run's host RSS is not what the plan predicts
        row["plan_within_15pct"] = abs(ratio - 1) <= PLAN_TOLERANCE if row["device"] != "cpu" else None


def replan(args) -> None:
    """--replan: the plan's figures of every row in --out recomputed by today's plan, beside the peak measured then
    (nothing runs; the verdict against the GPU's memory stays the run's). The rows' settings are rebuilt from this
    file's ROWS and today's config defaults: use it after a change to the plan's formulas alone, not after a change
    to what the rows run (such as a default)."""
    path = Path(args.out)
    if not path.is_file():
        raise SystemExit(f"--replan: {path} does not exist")
    data = json.loads(path.read_text())
    today = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory(prefix="real-sizes-") as tmp:
        write_model_configs(Path(tmp), data["setup"]["smoke"])
        for name, row in data["results"].items():
            plan = planned(ROWS[name], data["setup"]["smoke"], Path(tmp), None)
            row.update({k: plan[k] for k in ("plan_settings", "plan_peak_gib", "plan_required_gib")},
                       plan_recomputed=today)
            judge_plan(row)
            print(f"{name}: plan {row['plan_peak_gib']:.2f} GiB" + (f", measured {row['peak_allocated_gib']:.2f} GiB "
                  f"(x{row['plan_over_measured']:.2f})" if "plan_over_measured" in row else ""))
    data["goals"] = goal_checks(data["results"])
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"written: {path}")


def goal_checks(rows: dict) -> dict:
    """Pass / fail of the issue's goals over the rows there are (None: not measured, or measured on the CPU)."""
    out = {}
    for name, (key, op, target) in GOALS.items():
        row = rows.get(name, {})
        value = row.get(key)
        judged = value is not None and row.get("device") not in (None, "cpu")
        passed = (value <= target if op == "<=" else value >= target) if judged else None
        out[f"{name} {key} {op} {target:g}"] = {"value": value, "pass": passed}
    checked = [r["plan_within_15pct"] for r in rows.values() if r.get("plan_within_15pct") is not None]
    out[f"plan peak within {PLAN_TOLERANCE:.0%} of the measured peak"] = {
        "rows_within": sum(checked), "rows_measured": len(checked), "pass": all(checked) if checked else None}
    return out


def step_ratios(rows: dict) -> dict:
    """Distillation step time over the SFT step of the same student and settings."""
    sft = rows.get("distill_7b_to_5b/sft_student", {}).get("step_s")
    return {name: r["step_s"] / sft for name, r in rows.items()
            if r["stage"] == "distill" and sft and r.get("step_s")}


def write_results(args, rows: dict, fresh: list[str]) -> None:
    import transformers
    path = Path(args.out)
    before = json.loads(path.read_text()) if path.is_file() else {}
    if args.only and before.get("setup", {}).get("smoke") == args.smoke:
        rows = {**before.get("results", {}), **rows}
    devices = sorted({r["device"] for r in rows.values() if r.get("device")})
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = " ".join(["python", "bench/real_sizes.py", *sys.argv[1:]])
    for name in fresh:  # with --only, the rows kept from earlier runs keep the command that measured them
        rows[name]["measured_by"] = {"date": now, "command": command}
    out = {"benchmark": "real_sizes", "date": now, "command": command,
           "machine": {"devices": devices, "torch": torch.__version__, "transformers": transformers.__version__},
           "setup": {"smoke": args.smoke, "peak_flops": PEAK_BF16_FLOPS,
                     "mfu_formula": "tokens/s x (6 N + 12 L H S) / peak_flops; N = decoder layers + LM head "
                                    "(not the embedding lookup), L layers trained, H = heads x head_dim, S the "
                                    "sequence; LoRA trials 4 N; distillation adds the teacher's forward, 2 N_t + "
                                    "4 L_t H S; recomputation under gradient checkpointing is not counted",
                     "plan_tolerance": PLAN_TOLERANCE,
                     "precision": "bf16 weights (param_dtype: bfloat16) + fused AdamW; SFT / distillation: each "
                                  "decoder layer torch.compile'd" if not args.smoke else "float32, CPU, no compile"},
           "results": rows, "measured_now": fresh, "goals": goal_checks(rows),
           "distill_step_over_sft_step": step_ratios(rows), **{k: before[k] for k in HISTORY if k in before}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def summary(name: str, r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"{name}: {r.get('skipped') or r['error']}"
    parts = [f"wall {r.get('trial_wall_s', r.get('train_wall_s')):.1f} s", f"step {r['step_s']:.3g} s",
             f"{r['tokens_per_s']:,.0f} tokens/s"]
    if r.get("mfu") is not None:
        parts.append(f"MFU {r['mfu']:.1%}")
    parts.append(f"peak {r['peak_allocated_gib']:.2f} GiB, plan {r['plan_peak_gib']:.2f} GiB "
                 f"(x{r.get('plan_over_measured', float('nan')):.2f})")
    return f"{name}: " + ", ".join(parts)


def drive(args) -> None:
    sections = [s for s in args.only.split(",") if s] or DEFAULT_SECTIONS
    budget = gpu_budget(args.gpu_memory, "--gpu-memory")[0]  # free memory of one GPU (None on the CPU)
    with tempfile.TemporaryDirectory(prefix="real-sizes-") as tmp:
        workdir = Path(args.workdir or tmp)
        write_model_configs(workdir, args.smoke)
        rows, fresh = {}, []
        for row in (row for s in sections for row in SECTIONS[s]):
            plan = planned(row, args.smoke, workdir, budget)
            runs = plan.get("plan_fits", True) or args.ignore_plan
            rows[row.name] = assemble(row, plan, run_child(row, args, workdir) if runs else None, args.smoke)
            fresh.append(row.name)
            print(summary(row.name, rows[row.name]), flush=True)
            write_results(args, rows, fresh)
    print(f"written: {args.out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help=f"comma-separated sections (default: {','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--trials", type=int, default=1, help="knockout trials per row, one after the other in one "
                                                          "process (the first is the row's headline)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes and sizes: the same code paths")
    p.add_argument("--gpu-memory", default=None, help="one GPU's memory for the plan's verdict (default: what the "
                                                      "GPU has free; none on the CPU)")
    p.add_argument("--ignore-plan", action="store_true", help="run rows the plan says cannot fit")
    p.add_argument("--replan", action="store_true", help="recompute the plan's figures of the rows in --out from their "
                                                         "settings (runs nothing; marks them plan_recomputed)")
    p.add_argument("--row-timeout", type=int, default=600, help="seconds one row may take")
    p.add_argument("--workdir", default=None, help="configs, metrics.jsonl of every run (default: a temp dir)")
    p.add_argument("--out", default=None, help="default bench/results/real_sizes.json (--smoke: real_sizes_smoke.json)")
    p.add_argument("--row", default=None, choices=sorted(ROWS), help=argparse.SUPPRESS)  # one row, in a child
    args = p.parse_args(argv)
    unknown = [s for s in args.only.split(",") if s and s not in SECTIONS]
    if unknown:
        p.error(f"--only: unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    if args.trials < 1:
        p.error("--trials: must be >= 1")
    args.out = args.out or str(ROOT / "bench" / "results" / f"real_sizes{'_smoke' if args.smoke else ''}.json")
    if args.row:
        return child(args)
    if args.replan:
        return replan(args)
    drive(args)


if __name__ == "__main__":
    main()
