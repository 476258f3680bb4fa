"""config.py: the stage configs are composed of field blocks declared once, and their YAML keys, defaults and
run names stay what they were before the composition."""
from __future__ import annotations

import ast
import inspect

import pytest
import yaml

from prunekit import PrunekitError
from prunekit import config as C
from prunekit.distributed.train import run_name

# Every stage config's keys, recorded from config.py before it was composed of blocks (issue 15 part 3).
KEYS = {
    "sft": """batch_size bf16 compile epochs eval_interval eval_max_samples gpu_memory grad_accum grad_clip
        gradient_checkpointing launcher log_interval loss_chunk_size lr max_length max_steps memory_check model name
        output_dir overwrite packing param_dtype ray save_interval scheduler seed storage_path test_crash_at_step
        train trust_remote_code val wandb warmup_ratio weight_decay""",
    "distill": """batch_size beta bf16 compile epochs eval_interval eval_max_samples gpu_memory grad_accum grad_clip
        gradient_checkpointing launcher log_interval loss_chunk_size lr max_length max_steps memory_check model name
        output_dir overwrite packing param_dtype ray save_interval scheduler seed sft_alpha storage_path teacher
        teacher_placement temperature test_crash_at_step top_k train trust_remote_code val wandb warmup_ratio
        weight_decay""",
    "lora": """alpha batch_size bf16 compile dropout epochs eval_interval eval_max_samples gpu_memory grad_accum
        grad_clip gradient_checkpointing launcher log_interval loss_chunk_size lr max_length max_steps memory_check
        model name output_dir overwrite packing param_dtype rank ray save_interval scheduler seed storage_path
        target_modules test_crash_at_step train trust_remote_code val wandb warmup_ratio weight_decay""",
    "rl": """algorithm bf16 compile grad_clip gradient_checkpointing loss_chunk_size lr max_prompt_length max_steps
        model name output_dir overwrite param_dtype prompt_column prompts prompts_per_step ray rewards rollout
        save_interval scheduler seed storage_path system_prompt trust_remote_code wandb warmup_ratio weight_decay""",
    "knockout": """batch_size bf16 candidates compile epochs eval_interval eval_max_samples free_ratio gpu_memory
        grad_accum grad_clip gradient_checkpointing importance importance_samples launcher log_interval
        loss_chunk_size lr max_layers max_length max_params_fraction max_steps memory_check model name output_dir
        overwrite packing param_dtype ray recoverable_ratio save_interval scheduler seed spike_margin spike_window
        storage_path test_crash_at_step test_fail_candidates train trust_remote_code tune val wandb warmup_ratio
        weight_decay trial_mode lora""",
    "width-search": """batch_size beta bf16 candidates compile epochs eval_interval eval_max_samples gpu_memory
        grad_accum grad_clip gradient_checkpointing importance_samples launcher layer_params_removed log_interval
        loss_chunk_size lr max_length max_steps memory_check model name output_dir overwrite packing param_dtype
        params params_fraction ray save_interval scheduler seed sft_alpha storage_path temperature test_crash_at_step
        test_fail_candidates top_k train trust_remote_code tune val wandb warmup_ratio weight_decay""",
    "pipeline": """eval_max_length eval_samples eval_text eval_text_samples finish launcher max_layers
        max_params_fraction max_rounds min_token_acc_ratio model name output_dir ray rounds stages storage_path target
        train trust_remote_code val wandb""",
}

# defaults that differ between stages, as they were
DEFAULTS = {
    "sft": {"lr": 1e-5, "scheduler": "cosine", "warmup_ratio": 0.03, "save_interval": 100, "max_steps": None},
    "lora": {"lr": 1e-4, "scheduler": "cosine", "save_interval": 100},
    "rl": {"lr": 1e-6, "scheduler": "constant", "warmup_ratio": 0.0, "save_interval": 50, "max_steps": 100},
    "knockout": {"lr": 1e-5, "max_steps": 50, "eval_interval": 10, "save_interval": 10 ** 9, "log_interval": 5,
                 "importance_samples": 32, "eval_max_samples": None},
    "width-search": {"lr": 1e-4, "max_steps": 50, "eval_interval": 10, "save_interval": 10 ** 9, "log_interval": 5,
                     "importance_samples": 64, "eval_max_samples": 64, "beta": 0.5},
    "pipeline": {"storage_path": None},
}

MINIMAL = {"model": "m/x", "train": "t.jsonl", "val": "v.jsonl", "output_dir": "o", "prompts": "p.jsonl",
           "rewards": [{"fn": "exact_match"}], "target": {"params_fraction": 0.5}, "teacher": "t/y"}


def minimal(stage: str) -> dict:
    return {k: v for k, v in MINIMAL.items() if k in C.STAGE_CONFIGS[stage].model_fields}


# test-only fault injection left the schema (PRUNEKIT_TEST_* environment variables, engine/reporting.py)
REMOVED = {"test_crash_at_step", "test_fail_candidates"}
# added since: parallel (moved out of ray; run names hash the old layout), merge_kv_*, on_policy, input_noise,
# hidden_weight, hidden_targets (out of dumps at their defaults)
ADDED = {stage: {"parallel"} for stage in KEYS}
ADDED["sft"] |= {"merge_kv_heads", "merge_kv_ramp"}
ADDED["distill"] |= {"merge_kv_heads", "merge_kv_ramp", "on_policy", "input_noise", "hidden_weight", "hidden_targets"}
for stage in KEYS:   # every stage the engine runs: torch.compile's mode and scope for the compiled regions
    if "compile" in KEYS[stage].split():
        ADDED[stage] |= {"compile_mode", "compile_scope"}


@pytest.mark.parametrize("stage", sorted(KEYS))
def test_keys_unchanged(stage):
    assert set(C.STAGE_CONFIGS[stage].model_fields) == set(KEYS[stage].split()) - REMOVED | ADDED.get(stage, set())


@pytest.mark.parametrize("stage, key, value, replacement", [
    ("sft", "test_crash_at_step", 2, "PRUNEKIT_TEST_CRASH_AT_STEP"),
    ("rl", "test_crash_at_step", 2, "PRUNEKIT_TEST_CRASH_AT_STEP"),
    ("knockout", "test_fail_candidates", ["text:1"], "PRUNEKIT_TEST_FAIL_CANDIDATES"),
    ("width-search", "test_fail_candidates", ["depth"], "PRUNEKIT_TEST_FAIL_CANDIDATES"),
])
def test_removed_test_keys_fail_naming_the_replacement(tmp_path, stage, key, value, replacement):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**minimal(stage), key: value}))
    with pytest.raises(PrunekitError) as e:
        C.load_config(stage, p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: no longer a setting; ") and replacement in msg and "\n" not in msg
    with pytest.raises(PrunekitError, match=f"^flags: {key}: .*{replacement}"):  # --set test_crash_at_step=2
        C.load_config(stage, None, {**minimal(stage), key: value})


@pytest.mark.parametrize("stage", sorted(DEFAULTS))
def test_stage_defaults_unchanged(stage):
    cfg = C.STAGE_CONFIGS[stage](**minimal(stage))
    assert {k: getattr(cfg, k) for k in DEFAULTS[stage]} == DEFAULTS[stage]


def _stage_classes() -> set[type]:
    return {k for cls in C.STAGE_CONFIGS.values() for k in cls.__mro__
            if issubclass(k, C.Strict) and k is not C.Strict}


def test_each_field_declared_once():
    """A field of the stage configs is declared in one class; a subclass of it may re-declare it only to change the
    default. Sibling classes declaring the same field would be a copied block."""
    tree = ast.parse(inspect.getsource(C))
    declared: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    declared.setdefault(item.target.id, []).append(node.name)
    classes = {k.__name__: k for k in _stage_classes()}
    assert {"TrainConfig", "RLConfig", "OptimConfig", "EngineConfig", "OutputConfig"} <= set(classes)
    # the same key, different settings: knockout's candidate spec vs width-search's list of mixes
    different = {"candidates"}
    copied = []
    for field, owners in declared.items():
        if field in different:
            assert {"KnockoutConfig", "WidthSearchConfig"} == {o for o in owners if o in classes}
            continue
        owners = [classes[o] for o in owners if o in classes]
        if len(owners) > 1 and not any(all(issubclass(o, root) for o in owners) for root in owners):
            copied.append(f"{field}: {', '.join(o.__name__ for o in owners)}")
    assert not copied, copied
    # the blocks the issue names hold the settings TrainConfig and RLConfig share
    shared = set(C.TrainConfig.model_fields) & set(C.RLConfig.model_fields)
    assert len(shared) >= 21
    for field in shared:
        roots = [o for o in declared[field]
                 if o in classes and issubclass(C.TrainConfig, classes[o]) and issubclass(C.RLConfig, classes[o])]
        assert len(roots) == 1, (field, declared[field])
    assert {"lr", "scheduler", "warmup_ratio", "weight_decay", "grad_clip", "max_steps"} <= set(C.OptimConfig.model_fields)
    assert set(C.EngineConfig.model_fields) == {"bf16", "param_dtype", "compile", "compile_mode", "compile_scope",
                                                "gradient_checkpointing", "loss_chunk_size", "seed"}
    assert {"output_dir", "name", "storage_path", "overwrite", "save_interval"} <= set(C.OutputConfig.model_fields)


def test_flat_keys_and_attributes(tmp_path):
    p = tmp_path / "rl.yaml"
    p.write_text("model: m/x\nprompts: p.jsonl\noutput_dir: o\nrewards: [{fn: exact_match}]\nlr: 2.0e-6\n"
                 "bf16: true\nseed: 7\nsave_interval: 5\nparallel: {workers: 2}\n")
    cfg = C.load_config("rl", p)
    assert (cfg.lr, cfg.bf16, cfg.seed, cfg.save_interval, cfg.parallel.workers) == (2e-6, True, 7, 5, 2)
    assert isinstance(cfg, (C.OptimConfig, C.EngineConfig, C.OutputConfig))
    cfg = C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "lr": 3e-4,
                                      "gradient_checkpointing": True})
    assert (cfg.lr, cfg.gradient_checkpointing, cfg.scheduler) == (3e-4, True, "cosine")


@pytest.mark.parametrize("stage, raw, error", [
    ("sft", {}, "model: Field required"),
    ("rl", {}, "model: Field required"),
    ("pipeline", {}, "model: Field required"),
    ("rl", {"launcher": "local"}, "launcher: unknown key"),
    ("sft", {"lr": -1}, "config: lr must be a finite number > 0, got -1.0"),
    ("rl", {"lr": -1}, "config: lr must be a finite number > 0, got -1.0"),
    ("sft", {"lr": -1, "batch_size": 0}, "config: batch_size must be >= 1"),
    ("distill", {"beta": 2}, "beta: must be in [0, 1]"),
    ("width-search", {"beta": 2}, "config: beta must be in [0, 1] and temperature a finite number > 0"),
])
def test_errors_unchanged(tmp_path, stage, raw, error):
    if raw:
        raw = {**minimal(stage), **raw}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(PrunekitError) as e:
        C.load_config(stage, p)
    assert str(e.value) == f"{p}: {error}"


def test_run_names_unchanged():
    """Run names hash the config: the same settings must keep resuming the runs made before the composition."""
    from prunekit.stages.knockout import sweep_name
    from prunekit.stages.width_search import search_name
    names = {stage: run_name(stage, C.STAGE_CONFIGS[stage](**minimal(stage))) for stage in ("sft", "distill", "rl")}
    assert names == {"sft": "sft-x-5090343d", "distill": "distill-x-d3d567a8", "rl": "rl-x-0c054f23"}
    assert sweep_name(C.KnockoutConfig(**minimal("knockout"))) == "knockout-x-8b6b01f7"
    assert search_name(C.WidthSearchConfig(**minimal("width-search"))) == "width-search-x-370a659f"


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "sft.yaml"
    bad.write_text("model: smollm2\ntrain: t.jsonl\noutput_dir: out\nlearning_rate: 1e-4\n")
    with pytest.raises(PrunekitError, match=r"sft.yaml: learning_rate: unknown key"):
        C.load_config("sft", bad)
    with pytest.raises(PrunekitError, match=r"parallel.strategy: Input should be 'ddp', 'fsdp' or 'deepspeed'"):
        C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "parallel.strategy": "zero"})


def test_cpu_offload_config():
    cfg = C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "parallel.strategy": "fsdp",
                                      "parallel.cpu_offload": True})
    assert cfg.parallel.cpu_offload and cfg.model_dump(mode="json")["parallel"]["cpu_offload"] is True
    # left out of dumps while off, so earlier runs keep their names
    plain = C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o"})
    assert "cpu_offload" not in plain.model_dump()["parallel"]
    assert "gpu_memory" not in plain.model_dump() and "memory_check" not in plain.model_dump()
    with pytest.raises(PrunekitError, match="^flags: parallel: cpu_offload needs parallel.strategy: fsdp$"):
        C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "parallel.cpu_offload": True})
    with pytest.raises(PrunekitError, match="^flags: gpu_memory: expected a size such as 80GiB"):
        C.load_config("sft", None, {"model": "m", "train": "t", "output_dir": "o", "gpu_memory": "lots"})


def test_parallel_keys_moved_out_of_ray_keep_working_and_keep_run_names(tmp_path, capsys):
    """ray.num_workers / strategy / zero_stage / cpu_offload are parallel.* now: an old config is read the same way
    with one note line, gets the same run name as the new layout (and as before the move), and giving both is an
    error naming the key to keep."""
    old = {**minimal("sft"), "ray": {"num_workers": 2, "strategy": "fsdp", "cpu_offload": True, "use_gpu": True}}
    new = {**minimal("sft"), "parallel": {"workers": 2, "strategy": "fsdp", "cpu_offload": True},
           "ray": {"use_gpu": True}}
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(old))
    C._noted.clear()
    from_old, from_new = C.load_config("sft", p), C.STAGE_CONFIGS["sft"](**new)
    note = capsys.readouterr().err.strip().splitlines()
    assert note == ["prunekit: note: ray.num_workers is parallel.workers; ray.strategy is parallel.strategy; "
                    "ray.cpu_offload is parallel.cpu_offload now (read as such)"]
    assert from_old == from_new and from_old.parallel.workers == 2 and from_old.ray.use_gpu
    assert run_name("sft", from_old) == run_name("sft", from_new)
    # the name hashes the pre-move layout: a default config keeps the name recorded in test_run_names_unchanged
    assert run_name("sft", C.STAGE_CONFIGS["sft"](**minimal("sft"))) == "sft-x-5090343d"
    p.write_text(yaml.safe_dump({**old, "parallel": {"strategy": "ddp"}}))
    with pytest.raises(PrunekitError, match="ray.strategy and parallel.strategy both given; keep parallel.strategy"):
        C.load_config("sft", p)
