"""Training throughput: the prunekit engine (the loop `prunekit sft` runs on every Ray Train worker) vs Hugging Face
Trainer on the same model and batch, 1 vs 2 GPUs, and distillation step time with a 3x teacher.

One mode per process (GPU memory starts clean). `--all` runs every mode in subprocesses (the 2-GPU one through
torchrun) and writes bench/results/train_throughput.json. Model: Qwen2.5-0.5B-shaped, random init; teacher:
Qwen2.5-1.5B-shaped; sequence 2048; micro-batch 8; random tokens, every token supervised.

Hugging Face Trainer runs three ways: its defaults (`hf_trainer_1gpu`: fp32 weights under bf16 autocast, eager,
AdamW), tuned (`hf_trainer_tuned_1gpu`: the model in bf16, `torch_compile=True`, `optim="adamw_torch_fused"`), and
tuned with Liger's kernels (`hf_trainer_liger_1gpu`: `use_liger_kernel=True`; when liger-kernel is not installed or
the run crashes, the row records why). Every 1-GPU SFT row is also reported as a ratio of the tuned row's tokens/s.

    python bench/train_throughput.py --all [--steps 20] [--only name,name] [--out bench/results/train_throughput.json]
    python bench/train_throughput.py --all --smoke    # CPU, a tiny model: checks every 1-GPU row's code path

With `--only`, rows of an earlier run of the same setup in --out stay (its notes and history too).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100/H200 dense bf16, as the issue quotes
STUDENT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
TEACHER = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
# --shape outcome: recipes/outcome.yaml's distillation (SmolLM2-135M teacher; the student without 8 layers, 1 KV head)
OUTCOME_TEACHER = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                       model_type="llama")
OUTCOME_STUDENT = {**OUTCOME_TEACHER, "num_hidden_layers": 22, "num_key_value_heads": 1}
# --smoke: the same code paths on CPU with tiny shapes
SMOKE_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=256)
SMOKE_TEACHER = {**SMOKE_STUDENT, "num_hidden_layers": 3}
SMOKE_SIZES = {"steps": 4, "warmup": 1, "batch": 2, "seq": 64, "chunk": 64}
HISTORY = ("notes", "earlier_runs", "later_runs")  # hand-kept keys of --out that a new write keeps
TUNED = "hf_trainer_tuned_1gpu"


def shapes(args) -> tuple[dict, dict]:
    if args.smoke:
        return SMOKE_STUDENT, SMOKE_TEACHER
    return (OUTCOME_STUDENT, OUTCOME_TEACHER) if args.shape == "outcome" else (STUDENT, TEACHER)


def bench_device(args) -> torch.device:
    return torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None


def mfu(tokens_per_s: float, flops: float, gpus: int, device) -> float | None:
    """Model FLOPs utilisation against the GPU's bf16 peak (none on CPU)."""
    return tokens_per_s * flops / (PEAK_BF16_FLOPS * gpus) if device.type == "cuda" else None


def build(shape: dict, device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    shape = dict(shape)
    config_class, model_class = ((LlamaConfig, LlamaForCausalLM) if shape.pop("model_type", "qwen2") == "llama"
                                 else (Qwen2Config, Qwen2ForCausalLM))
    config = config_class(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return model_class(config)


def flops_per_token(model, seq: int) -> float:
    """6 N (forward + backward of every weight) + 12 L d S (attention scores and values), per trained token."""
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq


def samples(n: int, seq: int, vocab: int, packed: bool = False):
    """n rows of seq random tokens. `packed`: rows packed from documents of 10-60% of seq as the training stages pack
    them (position ids restarting per document, so the objectives build the block-diagonal 4D mask the real
    recovery runs attend with), instead of one causal sequence per row."""
    g = torch.Generator().manual_seed(0)
    if not packed:
        ids = torch.randint(0, vocab, (n, seq), generator=g).tolist()
        return [{"input_ids": x, "labels": x} for x in ids]
    from prunekit.core.data import pack_sequences
    rows: list = []
    while len(rows) < n:
        lengths = torch.randint(max(2, seq // 10), max(3, seq * 3 // 5), (20,), generator=g).tolist()
        docs = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]
        rows += pack_sequences([{"input_ids": d, "labels": d} for d in docs], seq)[:-1]   # the last may be short
    return rows[:n]


def run_prunekit(args, distill: bool = False) -> dict:
    from prunekit.config import load_config
    from prunekit.engine.loop import train
    from prunekit.engine.objectives import DistillObjective, SFTObjective
    from prunekit.engine.reporting import LocalReporter
    from prunekit.engine.strategy import world
    if "LOCAL_RANK" in os.environ:
        torch.distributed.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world_size = world()
    device = bench_device(args)
    student_shape, teacher_shape = shapes(args)
    model = build(student_shape, device)
    objective = SFTObjective(chunk_size=args.chunk, row_loss=args.row_loss)
    if distill:
        teacher_device = torch.device("cuda", args.teacher_gpu) if args.teacher_gpu is not None else device
        teacher = build(teacher_shape, teacher_device).to(torch.bfloat16)
        if args.compile:
            from prunekit.engine.loop import compile_model
            compile_model(teacher, args.compile_mode, args.compile_scope)
        objective = DistillObjective(teacher, beta=args.beta, chunk_size=args.chunk)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    stage = "distill" if distill else "sft"
    cfg = load_config(stage, None, {
        "model": "bench", "train": "bench", "output_dir": tmp, "max_steps": args.steps, "batch_size": args.batch,
        "max_length": args.seq, "bf16": True, "param_dtype": args.param_dtype, "compile": args.compile,
        "compile_mode": args.compile_mode, "compile_scope": args.compile_scope, "lr": 1e-5,
        "save_interval": 10 ** 9, "eval_interval": 10 ** 9,
        "wandb.mode": "disabled", "parallel.workers": world_size, "ray.use_gpu": device.type == "cuda",
        "parallel.strategy": args.strategy,
        **({"teacher": "bench"} if distill else {})})
    reporter = LocalReporter(Path(tmp), "bench", cfg)
    reporter.checkpoint = lambda *a, **k: None  # measure training steps, not checkpoint I/O
    data = samples(args.batch * world_size * args.steps, args.seq, student_shape["vocab_size"], args.packed)
    sync(device)
    if args.profile:  # a kernel table of the steady state: where the step time goes
        from torch.profiler import ProfilerActivity, profile, schedule
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=args.warmup, warmup=1, active=3))
        log = reporter.log
        reporter.log = lambda step, metrics: (log(step, metrics), prof.step())
        with prof:
            train(model, objective, cfg, data, [], 0, reporter, device=device)
        if rank == 0:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.profile_rows,
                                            max_name_column_width=90), file=sys.stderr)
    else:
        train(model, objective, cfg, data, [], 0, reporter, device=device)
    lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    shutil.rmtree(tmp, ignore_errors=True)   # the run's metrics are read: nothing of it stays in /tmp
    if rank != 0:
        return {}
    steady = [m for m in lines if m["step"] > args.warmup]
    # train/tokens_per_s is global tokens / step wall time (the loop all-reduces before timing ends)
    tps = statistics.median(m["train/tokens_per_s"] for m in steady)
    step_s = statistics.median(m["train/tokens"] / m["train/tokens_per_s"] for m in steady)
    return {"tokens_per_s": tps, "step_seconds": step_s, "gpus": world_size, "first_step_loss": lines[0]["train/loss"],
            "mfu": mfu(tps, flops_per_token(model, args.seq), world_size, device),
            "peak_memory_gb": peak_memory_gb(device)}


HF_SETTINGS = {"hf": "defaults: fp32 weights under bf16 autocast, eager, AdamW",
               "hf_tuned": "the model in bf16, torch_compile=True, optim=adamw_torch_fused",
               "hf_liger": "the model in bf16, torch_compile=True, optim=adamw_torch_fused, use_liger_kernel=True"}


def run_hf(args) -> dict:
    """Hugging Face Trainer at its defaults (`--mode hf`), tuned (`hf_tuned`), or tuned with Liger (`hf_liger`)."""
    tuned, liger = args.mode in ("hf_tuned", "hf_liger"), args.mode == "hf_liger"
    if liger and importlib.util.find_spec("liger_kernel") is None:
        return {"skipped": "liger-kernel is not installed (pip install liger-kernel)", "settings": HF_SETTINGS[args.mode]}
    from transformers import Trainer, TrainerCallback, TrainingArguments
    device = bench_device(args)
    student_shape, _ = shapes(args)
    model = build(student_shape, device)
    if tuned:
        model.to(torch.bfloat16)
    data = samples(args.batch * args.steps, args.seq, student_shape["vocab_size"])
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

    out = tempfile.mkdtemp(prefix="bench-hf-")
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              bf16=True, learning_rate=1e-5, logging_steps=10 ** 9, save_strategy="no",
                              report_to=[], dataloader_num_workers=0, disable_tqdm=True, use_cpu=device.type == "cpu",
                              torch_compile=tuned, optim="adamw_torch_fused" if tuned else "adamw_torch",
                              use_liger_kernel=liger)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in data[i].items()}
    Trainer(model=model, args=targs, train_dataset=DS(), callbacks=[Timer()]).train()
    step_s = statistics.median(times[args.warmup:])
    tps = args.batch * args.seq / step_s
    out = {"tokens_per_s": tps, "step_seconds": step_s, "gpus": 1, "mfu": mfu(tps, flops_per_token(model, args.seq),
                                                                              1, device),
           "peak_memory_gb": peak_memory_gb(device), "settings": HF_SETTINGS[args.mode]}
    if liger:
        out["liger_kernel"] = importlib.metadata.version("liger-kernel")
    return out


def failure_reason(proc: subprocess.CompletedProcess) -> str:
    """One line: the exception a crashed run ended with (its last line naming an error), and the exit status."""
    lines = [x.strip() for x in (proc.stderr or "").splitlines() if x.strip()]
    # an exception's own line ("torch.AcceleratorError: ..."), not CUDA's hint that names cudaErrorIllegalAddress
    errors = [x for x in lines if re.match(r"[\w.]*(Error|Exception): ", x)]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {proc.returncode}: {last[:400]}"


def run_all(args) -> None:
    n_gpus = 0 if args.smoke else torch.cuda.device_count()
    here = Path(__file__).resolve()
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
              "--chunk", str(args.chunk), "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
    results = {}
    one = {"CUDA_VISIBLE_DEVICES": "0"}
    me = [sys.executable, str(here), "--mode"]
    fast = ["--param-dtype", "bfloat16", "--compile"]
    plan = [("hf_trainer_1gpu", me + ["hf"], one),
            (TUNED, me + ["hf_tuned"], one),
            ("hf_trainer_liger_1gpu", me + ["hf_liger"], one),
            ("prunekit_1gpu", me + ["prunekit"], one),
            ("prunekit_1gpu_bf16_compiled", me + ["prunekit"] + fast, one),   # on CUDA: the Triton row loss
            ("prunekit_1gpu_bf16_compiled_torch_rows", me + ["prunekit", "--row-loss", "compiled"] + fast, one),
            ("prunekit_distill_1gpu_bf16_compiled", me + ["distill"] + fast, one)]
    def torchrun(n: int, strategy: str):
        return ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), str(here), "--mode",
                 "prunekit", "--strategy", strategy] + fast, {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))})
    if n_gpus >= 2:
        plan.append(("prunekit_distill_teacher_own_gpu_bf16_compiled", me + ["distill", "--teacher-gpu", "1"] + fast,
                     {"CUDA_VISIBLE_DEVICES": "0,1"}))
    for n in (2, 4, 8):  # data-parallel scaling: DDP and FSDP2 on every GPU count the box has
        if n_gpus >= n:
            plan.append((f"prunekit_{n}gpu_bf16_compiled", *torchrun(n, "ddp")))
            plan.append((f"prunekit_{n}gpu_fsdp_bf16_compiled", *torchrun(n, "fsdp")))
    if args.only:
        plan = [x for x in plan if x[0] in args.only.split(",")]
    for name, cmd, env in plan:
        proc = subprocess.run(cmd + common, capture_output=True, text=True, env={**os.environ, **env})
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if line else {"error": failure_reason(proc)}
        if name == "hf_trainer_liger_1gpu" and not line:
            results[name]["settings"] = HF_SETTINGS["hf_liger"]
        print(name, results[name], flush=True)
        write_results(args, n_gpus, results)


def write_results(args, n_gpus: int, results: dict) -> None:
    setup = {"model": "Qwen2.5-0.5B-shaped (random init)" if not args.smoke else "tiny Qwen2 (smoke, CPU)",
             "teacher": "Qwen2.5-1.5B-shaped (bf16, frozen)" if not args.smoke else "tiny Qwen2 (smoke, CPU)",
             "seq": args.seq, "micro_batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup,
             "precision": "hf_trainer_1gpu and prunekit_1gpu: bf16 autocast over fp32 weights; hf_trainer_tuned_1gpu "
                          "and hf_trainer_liger_1gpu: the model in bf16 (under bf16 autocast), torch_compile, fused "
                          "AdamW (+ Liger's kernels); *_bf16_compiled: bf16 weights + fused AdamW, each decoder layer "
                          "torch.compile'd", "peak_flops": PEAK_BF16_FLOPS}
    path = Path(args.out)
    before = json.loads(path.read_text()) if path.is_file() else {}
    same_setup = {k: before.get("setup", {}).get(k) for k in ("model", "seq", "micro_batch", "steps")} == \
        {k: setup[k] for k in ("model", "seq", "micro_batch", "steps")}
    r = {**before.get("results", {}), **results} if args.only and same_setup else results
    # rows kept from earlier runs keep the machine and date they were measured on (row -> {date, machine})
    last_run = {"date": before.get("date"), "machine": before.get("machine")}
    measured_on = {**before.get("rows_from_earlier_run", {}),
                   **{n: last_run for n in before.get("measured_now", before.get("results", {}))}}
    kept = {n: measured_on.get(n) for n in sorted(set(r) - set(results))}

    def ratio(a, b, key="tokens_per_s"):
        return r[a][key] / r[b][key] if key in r.get(a, {}) and key in r.get(b, {}) else None
    ratios = {"prunekit_vs_hf_trainer_tuned": ratio("prunekit_1gpu_bf16_compiled", TUNED),
              "prunekit_vs_hf_trainer_defaults": ratio("prunekit_1gpu_bf16_compiled", "hf_trainer_1gpu"),
              "prunekit_same_precision_vs_hf_trainer_defaults": ratio("prunekit_1gpu", "hf_trainer_1gpu"),
              "two_vs_one_gpu": ratio("prunekit_2gpu_bf16_compiled", "prunekit_1gpu_bf16_compiled"),
              "distill_vs_sft_step_time": ratio("prunekit_distill_1gpu_bf16_compiled", "prunekit_1gpu_bf16_compiled",
                                                "step_seconds"),
              "distill_teacher_own_gpu_vs_sft_step_time": ratio("prunekit_distill_teacher_own_gpu_bf16_compiled",
                                                                "prunekit_1gpu_bf16_compiled", "step_seconds"),
              # tokens/s of every 1-GPU SFT row over the tuned Trainer's: the peer at its best is the reference
              "vs_hf_trainer_tuned": {name: ratio(name, TUNED) for name in
                                      ("hf_trainer_1gpu", "hf_trainer_liger_1gpu", "prunekit_1gpu",
                                       "prunekit_1gpu_bf16_compiled", "prunekit_1gpu_bf16_compiled_torch_rows")
                                      if ratio(name, TUNED) is not None}}
    for n in (2, 4, 8):  # parallel efficiency: n-GPU tokens/s over n x the 1-GPU (DDP) tokens/s
        for strategy, name in (("ddp", f"prunekit_{n}gpu_bf16_compiled"), ("fsdp", f"prunekit_{n}gpu_fsdp_bf16_compiled")):
            speedup = ratio(name, "prunekit_1gpu_bf16_compiled")
            if speedup is not None:
                ratios[f"{strategy}_{n}gpu_efficiency"] = speedup / n
    goals = {"prunekit_vs_hf_trainer_tuned": ">= 1.5", "prunekit_1gpu_bf16_compiled_mfu": ">= 0.55",
             "two_vs_one_gpu": ">= 1.9", "distill_vs_sft_step_time": "<= 1.6",
             "distill_teacher_own_gpu_vs_sft_step_time": "<= 1.6"}
    out = {"benchmark": "train_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"gpu": torch.cuda.get_device_name(0) if n_gpus else None, "gpus": n_gpus,
                       "torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "setup": setup, "results": r, "measured_now": sorted(results),
           **({"rows_from_earlier_run": kept} if kept else {}), "ratios": ratios, "goals": goals,
           **{k: before[k] for k in HISTORY if k in before}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def main():
    from prunekit.core.losses.ce import ROW_LOSSES
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["hf", "hf_tuned", "hf_liger", "prunekit", "distill"])
    p.add_argument("--all", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--shape", default="qwen0.5b", choices=["qwen0.5b", "outcome"],
                   help="outcome: recipes/outcome.yaml's SmolLM2 student and teacher (use with --mode distill "
                        "--batch 32 --seq 512 --beta 0)")
    p.add_argument("--compile-scope", default="layers", choices=["layers", "backbone"],
                   help="with --compile: one compiled region per decoder layer (the default) or per backbone, for "
                        "the student and the teacher alike (the engine's compile_scope)")
    p.add_argument("--beta", type=float, default=0.5, help="distill: the loss's beta (0: forward KL)")
    p.add_argument("--teacher-gpu", type=int, default=None, help="distill: put the teacher on this GPU index")
    p.add_argument("--only", default="", help="--all: comma-separated subset of the runs")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead",
                                                                  "max-autotune-no-cudagraphs"],
                   help="with --compile (prunekit, distill): torch.compile's mode for the layers (compile_mode)")
    p.add_argument("--packed", action="store_true", help="rows packed from documents of 10-60%% of --seq (a 4D "
                                                        "block-diagonal mask), as the recovery runs train")
    p.add_argument("--row-loss", default="auto", choices=ROW_LOSSES,
                   help="prunekit: the cross-entropy row loss (triton: one kernel, prunekit.core.losses.triton_rows)")
    p.add_argument("--profile", action="store_true", help="print a kernel-time table of 3 steady-state steps")
    p.add_argument("--profile-rows", type=int, default=40, help="--profile: the table's rows (by self GPU time)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes and sizes: the 1-GPU rows' code paths")
    p.add_argument("--out", default=None, help="default bench/results/train_throughput.json (--smoke: "
                                                   "train_throughput_smoke.json)")
    args = p.parse_args()
    if args.smoke:
        if args.teacher_gpu is not None or args.strategy != "ddp" or args.profile:
            p.error("--smoke: one CPU process (no --teacher-gpu, --strategy fsdp or --profile)")
        for key, value in SMOKE_SIZES.items():
            setattr(args, key, value)
    args.out = args.out or f"bench/results/train_throughput{'_smoke' if args.smoke else ''}.json"
    if args.packed and (args.all or args.mode not in ("prunekit", "distill")):
        p.error("--packed: with --mode prunekit or distill (the committed rows are unpacked)")
    if args.all:
        if args.shape != "qwen0.5b":
            p.error("--all: the committed rows are the Qwen2.5-0.5B shape; run --shape outcome with --mode")
        return run_all(args)
    if not args.mode:
        p.error("give --mode or --all")
    result = {"hf": run_hf, "hf_tuned": run_hf, "hf_liger": run_hf, "prunekit": run_prunekit,
              "distill": lambda a: run_prunekit(a, distill=True)}[args.mode](args)
    if result:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
