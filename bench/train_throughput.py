"""Training throughput: the prunekit engine (the loop `prunekit sft` runs on every Ray Train worker) vs Hugging Face
Trainer on the same model and batch, 1 vs 2 GPUs, and distillation step time with a 3x teacher.

One mode per process (GPU memory starts clean). `--all` runs every mode in subprocesses (the 2-GPU one through
torchrun) and writes bench/results/train_throughput.json. Model: Qwen2.5-0.5B-shaped, random init; teacher:
Qwen2.5-1.5B-shaped; bf16 autocast; sequence 2048; micro-batch 8; random tokens, every token supervised.

    python bench/train_throughput.py --all [--steps 20] [--out bench/results/train_throughput.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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


def build(shape: dict, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(**shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def flops_per_token(model, seq: int) -> float:
    """6 N (forward + backward of every weight) + 12 L d S (attention scores and values), per trained token."""
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    return 6 * n + 12 * c.num_hidden_layers * c.hidden_size * seq


def samples(n: int, seq: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, seq), generator=g).tolist()
    return [{"input_ids": x, "labels": x} for x in ids]


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
    device = torch.device("cuda", torch.cuda.current_device())
    model = build(STUDENT, device)
    objective = SFTObjective(chunk_size=args.chunk)
    if distill:
        teacher_device = torch.device("cuda", args.teacher_gpu) if args.teacher_gpu is not None else device
        teacher = build(TEACHER, teacher_device).to(torch.bfloat16)
        if args.compile:
            from prunekit.engine.loop import compile_layers
            compile_layers(teacher)
        objective = DistillObjective(teacher, beta=0.5, chunk_size=args.chunk)
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    stage = "distill" if distill else "sft"
    cfg = load_config(stage, None, {
        "model": "bench", "train": "bench", "output_dir": tmp, "max_steps": args.steps, "batch_size": args.batch,
        "max_length": args.seq, "bf16": True, "param_dtype": args.param_dtype, "compile": args.compile, "lr": 1e-5, "save_interval": 10 ** 9, "eval_interval": 10 ** 9,
        "wandb.mode": "disabled", "parallel.workers": world_size, "ray.use_gpu": True, "parallel.strategy": args.strategy,
        **({"teacher": "bench"} if distill else {})})
    reporter = LocalReporter(Path(tmp), "bench", cfg)
    reporter.checkpoint = lambda *a, **k: None  # measure training steps, not checkpoint I/O
    data = samples(args.batch * world_size * args.steps, args.seq, STUDENT["vocab_size"])
    torch.cuda.synchronize()
    if args.profile:  # a kernel table of the steady state: where the step time goes
        from torch.profiler import ProfilerActivity, profile, schedule
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                       schedule=schedule(wait=args.warmup, warmup=1, active=3))
        log = reporter.log
        reporter.log = lambda step, metrics: (log(step, metrics), prof.step())
        with prof:
            train(model, objective, cfg, data, [], 0, reporter, device=device)
        if rank == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60),
                  file=sys.stderr)
    else:
        train(model, objective, cfg, data, [], 0, reporter, device=device)
    lines = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()] if rank == 0 else []
    if rank != 0:
        return {}
    steady = [m for m in lines if m["step"] > args.warmup]
    # train/tokens_per_s is global tokens / step wall time (the loop all-reduces before timing ends)
    tps = statistics.median(m["train/tokens_per_s"] for m in steady)
    step_s = statistics.median(m["train/tokens"] / m["train/tokens_per_s"] for m in steady)
    return {"tokens_per_s": tps, "step_seconds": step_s, "gpus": world_size, "first_step_loss": lines[0]["train/loss"],
            "mfu": tps * flops_per_token(model, args.seq) / (PEAK_BF16_FLOPS * world_size),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def run_hf(args) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    device = torch.device("cuda")
    model = build(STUDENT, device)
    data = samples(args.batch * args.steps, args.seq, STUDENT["vocab_size"])
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    out = tempfile.mkdtemp(prefix="bench-hf-")
    targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                              bf16=True, learning_rate=1e-5, logging_steps=10 ** 9, save_strategy="no",
                              report_to=[], dataloader_num_workers=0, disable_tqdm=True)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return {k: torch.tensor(v) for k, v in data[i].items()}
    Trainer(model=model, args=targs, train_dataset=DS(), callbacks=[Timer()]).train()
    step_s = statistics.median(times[args.warmup:])
    tps = args.batch * args.seq / step_s
    return {"tokens_per_s": tps, "step_seconds": step_s, "gpus": 1,
            "mfu": tps * flops_per_token(model, args.seq) / PEAK_BF16_FLOPS,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}


def run_all(args) -> None:
    n_gpus = torch.cuda.device_count()
    here = Path(__file__).resolve()
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
              "--chunk", str(args.chunk), "--warmup", str(args.warmup)]
    results = {}
    one = {"CUDA_VISIBLE_DEVICES": "0"}
    me = [sys.executable, str(here), "--mode"]
    fast = ["--param-dtype", "bfloat16", "--compile"]
    plan = [("hf_trainer_1gpu", me + ["hf"], one),
            ("prunekit_1gpu", me + ["prunekit"], one),
            ("prunekit_1gpu_bf16_compiled", me + ["prunekit"] + fast, one),
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
        results[name] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-1500:]}
        print(name, results[name], flush=True)
        write_results(args, n_gpus, results)


def write_results(args, n_gpus: int, results: dict) -> None:
    r = results
    def ratio(a, b, key="tokens_per_s"):
        return r[a][key] / r[b][key] if key in r.get(a, {}) and key in r.get(b, {}) else None
    ratios = {"prunekit_same_precision_vs_hf_trainer": ratio("prunekit_1gpu", "hf_trainer_1gpu"),
              "prunekit_vs_hf_trainer": ratio("prunekit_1gpu_bf16_compiled", "hf_trainer_1gpu"),
              "two_vs_one_gpu": ratio("prunekit_2gpu_bf16_compiled", "prunekit_1gpu_bf16_compiled"),
              "distill_vs_sft_step_time": ratio("prunekit_distill_1gpu_bf16_compiled", "prunekit_1gpu_bf16_compiled",
                                                "step_seconds"),
              "distill_teacher_own_gpu_vs_sft_step_time": ratio("prunekit_distill_teacher_own_gpu_bf16_compiled",
                                                                "prunekit_1gpu_bf16_compiled", "step_seconds")}
    for n in (2, 4, 8):  # parallel efficiency: n-GPU tokens/s over n x the 1-GPU (DDP) tokens/s
        for strategy, name in (("ddp", f"prunekit_{n}gpu_bf16_compiled"), ("fsdp", f"prunekit_{n}gpu_fsdp_bf16_compiled")):
            speedup = ratio(name, "prunekit_1gpu_bf16_compiled")
            if speedup is not None:
                ratios[f"{strategy}_{n}gpu_efficiency"] = speedup / n
    goals = {"prunekit_vs_hf_trainer": ">= 1.8", "two_vs_one_gpu": ">= 1.9", "distill_vs_sft_step_time": "<= 1.6",
             "distill_teacher_own_gpu_vs_sft_step_time": "<= 1.6"}
    out = {"benchmark": "train_throughput", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": {"gpu": torch.cuda.get_device_name(0) if n_gpus else None, "gpus": n_gpus,
                       "torch": torch.__version__, "transformers": __import__("transformers").__version__},
           "setup": {"model": "Qwen2.5-0.5B-shaped (random init)", "teacher": "Qwen2.5-1.5B-shaped (bf16, frozen)",
                     "seq": args.seq, "micro_batch": args.batch, "steps": args.steps, "warmup_steps": args.warmup,
                     "precision": "hf_trainer and prunekit_1gpu: bf16 autocast over fp32 weights; *_bf16_compiled: "
                                  "bf16 weights + fused AdamW, each decoder layer torch.compile'd", "peak_flops": PEAK_BF16_FLOPS},
           "results": results, "ratios": ratios, "goals": goals}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["hf", "prunekit", "distill"])
    p.add_argument("--all", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--teacher-gpu", type=int, default=None, help="distill: put the teacher on this GPU index")
    p.add_argument("--only", default="", help="--all: comma-separated subset of the runs")
    p.add_argument("--profile", action="store_true", help="print a kernel-time table of 3 steady-state steps")
    p.add_argument("--out", default="bench/results/train_throughput.json")
    args = p.parse_args()
    if args.all:
        return run_all(args)
    result = {"hf": run_hf, "prunekit": run_prunekit, "distill": lambda a: run_prunekit(a, distill=True)}[args.mode](args)
    if result:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
