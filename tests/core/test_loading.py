"""Writing an output (issue 16, cases 5-7, 10): an unwritable location fails before any work, a signal mid-write
leaves no temp dir, the next run sweeps what a dead writer left, and provenance records real paths."""
from __future__ import annotations

import json

import pytest

from tests.conftest import error_lines, run_cli, sft_args
from tests.processes import finish, pause_at, start_cli, wait_for


@pytest.fixture
def immutable_dir(tmp_path):
    """A directory nobody (root included) may create entries in. The project's machines and CI run as root on a
    filesystem with the immutable flag, so this is a hard requirement, not a skip: a root that cannot write into a
    directory is the case a permission bit cannot make."""
    import subprocess
    d = tmp_path / "immutable"
    d.mkdir()
    done = subprocess.run(["chattr", "+i", str(d)], capture_output=True, text=True)
    assert done.returncode == 0, f"chattr +i {d} failed ({done.stderr.strip()}): needs root and an ext4/xfs /tmp"
    yield d
    subprocess.run(["chattr", "-i", str(d)], capture_output=True)


def test_unwritable_output_fails_before_any_work(llama_copy, tiny_chat_model_dir, chat_data, immutable_dir, tmp_path,
                                                 capsys):
    (tmp_path / "a-file").write_text("x")
    cases = [(immutable_dir / "out", f"cannot write there (Operation not permitted: {immutable_dir})"),
             (tmp_path / "a-file" / "out", f"cannot write there ({tmp_path / 'a-file'} is not a directory)"),
             ("/proc/prunekit-out", "cannot write there (No such file or directory: /proc)")]
    for out, message in cases:
        code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", out)
        assert code == 2 and err == f"prunekit prune: error: -o {out}: {message}\n", err
    for flag, value, message in [("--output-dir", immutable_dir / "out", f"-o {immutable_dir / 'out'}: cannot write"),
                                 ("--set", f"storage_path={immutable_dir}", f"storage_path {immutable_dir}: cannot")]:
        argv = sft_args(tiny_chat_model_dir, chat_data, tmp_path, "out")
        at = argv.index(flag) + 1 if flag == "--output-dir" else argv.index(f"storage_path={tmp_path / 'runs'}")
        argv[at] = value
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(error_lines(err)) == 1, err
        assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    assert not list(immutable_dir.iterdir())


def test_provenance_records_a_symlinked_parent_as_an_absolute_path(llama_copy, tmp_path, capsys, monkeypatch):
    (tmp_path / "link").symlink_to("model")  # a relative symlink
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "prune", "link", "--drop-text", "1", "-o", "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "prunekit.json").read_text())["parent"] == str(llama_copy.resolve())


@pytest.mark.parametrize("command", [["prune", "--drop-text", "1"], ["kv-cut", "--kv-heads", "1"]])
def test_sigterm_during_surgery_leaves_no_temp_dir(command, llama_copy, tmp_path):
    """SIGTERM while OUT's temp dir holds half the output: the temp dir goes, OUT is not written, 143."""
    import os
    ready = tmp_path / "ready"
    proc = start_cli([command[0], llama_copy, *command[1:], "-o", tmp_path / "out", "--streaming"], tmp_path,
                     patch=pause_at("prunekit.core.streaming", "apply_streaming", ready))
    wait_for(ready.exists, proc)
    (partial,) = tmp_path.glob(".out.tmp-*")
    assert any(partial.iterdir())
    os.kill(proc.pid, 15)
    rc, err = finish(proc)
    assert rc == 143 and err == f"prunekit {command[0]}: terminated\n", err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), list(tmp_path.iterdir())


def test_the_next_run_sweeps_stale_temp_dirs_of_a_dead_writer(llama_copy, tmp_path, capsys):
    """What a `kill -9` leaves (.out.tmp-PID@HOST-*) is removed by the next run of the same OUT when PID is dead on
    this host; a live writer's, another host's and another OUT's temp dirs stay."""
    import os
    import socket
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = [tmp_path / f".out.tmp-{dead.pid}@{host}-abc123", tmp_path / f".out.probe-{dead.pid}@{host}-x"]
    kept = [tmp_path / f".out.tmp-{os.getpid()}@{host}-live", tmp_path / f".out.tmp-{dead.pid}@other-host-q",
            tmp_path / f".outer.tmp-{dead.pid}@{host}-z"]
    for d in stale + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    code, _, err = run_cli(capsys, "prune", llama_copy, "--drop-text", "1", "-o", tmp_path / "out")
    assert code == 0, err
    assert not any(d.exists() for d in stale) and all(d.exists() for d in kept)


def test_layer_origins_composes_the_prune_steps_since_the_ancestor(tmp_path):
    """Each layer's index in the ancestor, through every prune step after the one made from it (indexes of a step
    are its parent's); other steps keep the layers; a lineage that does not lead back to the ancestor is None."""
    from prunekit.core.loading import PROVENANCE, layer_origins
    original, other = tmp_path / "original", tmp_path / "other"
    original.mkdir(), other.mkdir()
    steps = [{"stage": "convert_gguf", "parent": "/somewhere/model.gguf"},
             {"stage": "prune", "parent": str(original.resolve()), "operation": "prune",
              "removed": {"text_layers": [1, 4], "vision_blocks": []}},     # 0 2 3 5 6
             {"stage": "kv_cut", "parent": "r1-prune", "operation": "kv_cut"},
             {"stage": "prune", "parent": "r1-kv", "operation": "prune", "removed": {"text_layers": [0, 3]}}]
    student = tmp_path / "student"
    student.mkdir()
    (student / PROVENANCE).write_text(json.dumps({**steps[-1], "history": steps[:-1]}))
    assert layer_origins(student, original, 7) == [2, 3, 6]
    assert layer_origins(student, other, 7) is None
    assert layer_origins(other, original, 7) is None   # no prunekit.json at all


def test_a_gguf_copied_or_touched_finds_its_converted_cache_and_another_file_does_not(tmp_path, monkeypatch):
    # a corpus names its teacher by this cache directory, so a re-installed GGUF (new path, new mtime) must resume it
    import os
    from prunekit import PrunekitError
    from prunekit.core.loading import content_fingerprint, convert_gguf
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    original = tmp_path / "a" / "model.gguf"
    original.parent.mkdir()
    original.write_bytes(bytes(range(256)) * 12_000)   # 3 MB: the fingerprint reads both ends
    converted = tmp_path / "cache" / "gguf" / f"model-{content_fingerprint(original)}"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")   # as if converted before: the fake bytes cannot be converted
    copy = tmp_path / "b" / "model.gguf"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    os.utime(copy, ns=(1, 1))
    assert convert_gguf(original) == converted and convert_gguf(copy) == converted
    changed = bytearray(original.read_bytes())
    changed[-1] ^= 1   # the same name and size, other bytes at the end
    other = tmp_path / "c" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(bytes(changed))
    with pytest.raises(PrunekitError, match="cannot read GGUF"):   # not the cached model: it converts (and fails)
        convert_gguf(other)
