"""Ray Train's side of a run: what an interrupted fit leaves in the run directory."""
from __future__ import annotations

import shutil


def test_an_interrupted_fit_removes_only_the_partial_checkpoints_it_made(tiny_chat_model_dir, tmp_path):
    """What a worker stopped mid-upload leaves in the run directory (no manifest yet, or a short file) goes; an
    older checkpoint, whole or not, and this fit's whole ones stay."""
    import os
    import time
    from prunekit.distributed.train import remove_partial_checkpoints
    from prunekit.engine.manifest import write_manifest
    run_dir = tmp_path / "run"

    def checkpoint(name, manifest=True, truncate=False):
        d = run_dir / name
        shutil.copytree(tiny_chat_model_dir, d / "hf")
        if manifest:
            write_manifest(d)
        if truncate:
            with open(d / "hf" / "model.safetensors", "r+b") as f:
                f.truncate(1000)
        return d
    old = [checkpoint("checkpoint_old_whole"), checkpoint("checkpoint_old_unlisted", manifest=False)]
    for d in old:
        os.utime(d, (time.time() - 3600, time.time() - 3600))
    started = time.time() - 1
    whole = checkpoint("checkpoint_new_whole")
    partial = [checkpoint("checkpoint_new_no_manifest", manifest=False),
               checkpoint("checkpoint_new_short", truncate=True)]
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{}")
    remove_partial_checkpoints(run_dir, started)
    assert all(d.is_dir() for d in old + [whole]) and not any(d.exists() for d in partial)
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()
