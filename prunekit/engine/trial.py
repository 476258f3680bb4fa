"""A knockout-style trial without Ray: the base weights and data loaded once by the driver (`load_shared_base`), the
trial's model built from them in the trial's process (`build_trial_model`: the same layer surgery `prunekit prune`
applies), and the short training run through the one engine (`run_trial`). `knockout_trial` is what a knockout
sweep's Ray Tune trial runs (`prunekit.distributed.tune.run_trials` is handed it); width-search builds on the same
pieces.

A trial trains every weight (`trial_mode: full`) or LoRA adapters on the frozen pruned model (`trial_mode: lora`).
It runs in one process, or in every process of a torch.distributed group (a trial spanning several GPUs): then the
engine shards it with FSDP2 and each process takes its share of the trial's batch (`trial_engine_config`), so the
trial measures the same thing on any number of processes.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.families import family_for
from prunekit.core.loading import load_model, load_tokenizer, quiet_transformers
from prunekit.core.plan import BASELINE, Candidate
from prunekit.core.samples import config_samples, pad_id
from prunekit.core.surgery import LayerDrop


def load_shared_base(cfg) -> dict:
    """Everything a trial needs that is the same for all of them: the base weights (numpy arrays, so trials on one
    node read them from the Ray object store without copies), the model class and config, and the tokenized data."""
    model_dir = Path(cfg.model)
    with quiet_transformers():
        model, family = load_model(model_dir, dtype="float32", trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    train_samples, val_samples = config_samples(cfg, tokenizer, family.is_vlm)
    if not train_samples:
        raise PrunekitError(f"train {cfg.train}: no row with supervised tokens (assistant turns or text)")
    if not val_samples:
        raise PrunekitError(f"val {cfg.val}: no row with supervised tokens (assistant turns or text)")
    return {**shared_weights(model), "train": train_samples, "val": val_samples, "pad_id": pad_id(tokenizer)}


def shared_weights(model) -> dict:
    """The part of the shared base that is the model (`build_trial_model` rebuilds it): its weights on the host as
    numpy arrays (tied weights once, bf16 viewed as int16), their dtypes, the model class and config."""
    import torch
    weights, dtypes = {}, {}
    seen = {}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:  # tied weights travel once
            dtypes[key] = ("tied", seen[t.data_ptr()])
            continue
        seen[t.data_ptr()] = key
        t = t.detach().cpu().contiguous()
        dtypes[key] = str(t.dtype).removeprefix("torch.")
        weights[key] = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    return {"model_cls": type(model), "config_cls": type(model.config), "config": model.config.to_dict(),
            "weights": weights, "dtypes": dtypes}


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation of models whose weights are loaded right after."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def build_trial_model(base: dict, candidate: Candidate, device, frozen: bool = False):
    """The base model without the candidate's layers, on `device`, from the shared weights (never from disk).
    Layer removal is the same surgery `prunekit prune` applies (LayerDrop + apply_to_model). `frozen`: nothing will
    write to the weights (LoRA trials), so on CPU they stay the object store's read-only memory, shared by every
    trial on the node, instead of a copy per trial."""
    import torch
    from prunekit.core.surgery import apply_to_model
    # object-store memory is read-only: CPU training of the weights needs a copy
    writable = torch.device(device).type == "cpu" and not frozen
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": nothing writes to it
        for key, kind in base["dtypes"].items():
            if isinstance(kind, (tuple, list)):
                continue
            t = torch.from_numpy(base["weights"][key])
            t = t.view(torch.bfloat16) if kind == "bfloat16" else t
            tensors[key] = t.clone() if writable else t
    for key, kind in base["dtypes"].items():
        if isinstance(kind, (tuple, list)):
            tensors[key] = tensors[kind[1]]
    config = base["config_cls"].from_dict(base["config"])
    with _no_init():
        model = base["model_cls"](config)
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
        family = family_for(base["config"])
        if family.missing_weights(missing) or unexpected:
            raise RuntimeError(f"shared weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if family.ties_embeddings(base["config"]):
            model.tie_weights()
        if candidate.size:
            model = apply_to_model(model, LayerDrop(family, base["config"], list(candidate.text),
                                                    list(candidate.vision)))
    return model.to(device)


def trial_engine_config(cfg):
    """The settings the engine runs a trial with in this process: the trial's own in one process; across the N
    processes of a torch.distributed group, FSDP2 over them and batch_size / N rows each (the trial's batch, and so
    its data order and every step's update, stay what one process would run)."""
    from prunekit.engine.strategy import world
    n = world()[1]
    if n == 1:
        return cfg
    if cfg.batch_size % n:
        raise PrunekitError(f"batch_size {cfg.batch_size} must split evenly over the trial's {n} workers")
    return cfg.model_copy(update={"batch_size": cfg.batch_size // n,
                                  "parallel": cfg.parallel.model_copy(update={"strategy": "fsdp", "workers": n})})


def run_trial(cfg, base: dict, candidate: Candidate, reporter, device, before_training=None) -> dict:
    """One knockout trial in this process: build the candidate's model, short SFT with the one training engine
    (every weight, or LoRA adapters on the frozen model with `trial_mode: lora`), eval at step 0, every
    eval_interval steps and at the end. Returns the last metrics plus timings and the trained parameter count.
    `before_training(model)` sees the built model first (the baseline trial computes importance there)."""
    from prunekit.engine.loop import train
    from prunekit.engine.objectives import SFTObjective
    from prunekit.engine.reporting import fail_if_injected
    fail_if_injected(candidate.id)
    lora = cfg.trial_mode == "lora"
    t0 = time.time()
    model = build_trial_model(base, candidate, device, frozen=lora)
    t1 = time.time()
    if before_training is not None:
        before_training(model)
    t2 = time.time()
    if lora:  # the adapters' random init from the trial's seed: every trial, process and rank starts alike
        import torch
        from prunekit.core.lora import apply_lora
        torch.manual_seed(cfg.seed)
        model = apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    metrics = train(model, SFTObjective(chunk_size=cfg.loss_chunk_size), trial_engine_config(cfg), base["train"],
                    base["val"], base["pad_id"], reporter, device=device)
    return {**metrics, "time/setup_s": t1 - t0, "time/train_s": time.time() - t2, "params/trainable": trainable}


def rank_records(record: dict) -> list[dict]:
    """`record` (plus rank and pid) from every process of the trial, in rank order: one entry in one process."""
    from prunekit.engine.strategy import world
    rank, n = world()
    record = {"rank": rank, "pid": os.getpid(), **record}
    if n == 1:
        return [record]
    import torch.distributed as dist
    out: list = [None] * n
    dist.all_gather_object(out, record)
    return out


def knockout_trial(cfg, base: dict, payload: dict, cid: str, reporter, device) -> dict:
    """One knockout sweep trial (run_trials' trial function): the candidate's trial; the baseline trial (nothing
    removed) also scores training-free layer importance on the model it built (on the first process), when the
    sweep asks for it. Returns what the report records: timings, the trial mode, trained parameters, and per
    process how it trained (its share of the trial's batch, the strategy)."""
    from prunekit.engine.strategy import world
    candidate = Candidate.parse(cid)
    extra = {}

    def importance(model):
        model.eval()
        extra["importance"] = importance_scores(model, base, payload["importance"], device)
    want = candidate.id == BASELINE and payload.get("importance") and world()[0] == 0
    metrics = run_trial(cfg, base, candidate, reporter, device, before_training=importance if want else None)
    engine = trial_engine_config(cfg)
    return {**extra, "setup_s": metrics["time/setup_s"], "train_s": metrics["time/train_s"],
            "trial_mode": cfg.trial_mode, "params_trainable": metrics["params/trainable"],
            "workers": rank_records({"batch_size": engine.batch_size, "strategy": engine.parallel.strategy})}


def importance_scores(model, base: dict, spec: dict, device) -> dict:
    """Training-free layer importance of `model` on the first spec["samples"] val samples."""
    from prunekit.core.importance import compute_importance
    return compute_importance(model, family_for(base["config"]), base["val"][:spec["samples"]], base["pad_id"],
                              batch_size=4, angular_n=tuple(spec["angular_n"]), device=device)


def baseline_importance(payload: dict, base: dict, device) -> dict:
    """Importance when the baseline trial does not run (it finished in an earlier run): run_trials' side task."""
    return importance_scores(build_trial_model(base, Candidate(), device).eval(), base, payload["importance"], device)
