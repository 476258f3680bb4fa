"""output_dir/pipeline_state.json: the original's measurements and every finished stage, written atomically."""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import threading
import time
from pathlib import Path

from prunekit import PrunekitError

STATE_FILE = "pipeline_state.json"
RUNNING_FILE = "pipeline_running.json"   # the stage attempt in progress and how long it has run (see State.attempt)
HEARTBEAT_S = 15.0

# ---- the state file --------------------------------------------------------------------------------------------

class State:
    """output_dir/pipeline_state.json: the original's measurements and every finished stage, in order."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def open(cls, out: Path, model: str) -> State:
        path = out / STATE_FILE
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PrunekitError(f"{path}: cannot read the pipeline state ({e})") from None
            if data.get("model") != model:
                raise PrunekitError(f"output_dir {out}: holds a pipeline of {data.get('model')}, not {model}; use "
                                    f"another output_dir")
            state = cls(path, data)
            state.count_lost_attempt()
            return state
        if out.exists() and any(out.iterdir()):
            raise PrunekitError(f"output_dir {out}: not empty and not a pipeline's (no {STATE_FILE}); use another "
                                f"output_dir")
        return cls(path, {"model": model, "original": None, "stages": [], "status": "running"})

    @property
    def finished(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.data["stages"]}

    def save(self) -> None:
        self.data["updated"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)  # a crash mid-write never leaves a half state file

    def add(self, record: dict) -> None:
        """A finished stage; its `time_s` (this attempt's) grows by what earlier attempts of it spent."""
        earlier = self.data.get("unfinished", {}).pop(record["id"], None)
        if earlier:
            record["time_s"] = round(record["time_s"] + earlier["time_s"], 1)
            record["attempts"] = earlier["attempts"] + 1
        self.data["stages"].append(record)
        self.save()

    def count_attempt(self, stage_id: str, seconds: float) -> None:
        """An attempt at a stage that did not finish (an error, Ctrl-C, `kill`): its time counts when the stage
        finishes on a later run. (One killed outright is counted from its heartbeat: `attempt`.)"""
        spent = self.data.setdefault("unfinished", {}).setdefault(stage_id, {"time_s": 0.0, "attempts": 0})
        spent["time_s"] = round(spent["time_s"] + seconds, 1)
        spent["attempts"] += 1
        self.save()

    @contextlib.contextmanager
    def attempt(self, stage_id: str):
        """An attempt at `stage_id`: while it runs, RUNNING_FILE says every HEARTBEAT_S how long it has run, so an
        attempt that ends without a word (SIGKILL, a lost node, a crash in native code) still counts up to its last
        sign of life when the pipeline next opens this state (`count_lost_attempt`). The caller records how the
        attempt ended (add / count_attempt) inside the block; leaving it removes the file."""
        running, t0, stop = self.path.parent / RUNNING_FILE, time.time(), threading.Event()

        def beat():
            tmp = running.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"id": stage_id, "time_s": round(time.time() - t0, 1)}) + "\n")
            os.replace(tmp, running)

        def beats():
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):   # a full disk costs the heartbeat, not the stage
                    beat()
        beat()
        thread = threading.Thread(target=beats, name=f"pipeline-heartbeat-{stage_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            running.unlink(missing_ok=True)

    def count_lost_attempt(self) -> tuple[str, float] | None:
        """An attempt that RUNNING_FILE outlived (its process died without a word): counted as unfinished with the
        time of its last heartbeat, and said in one line. Returns (stage id, seconds) or None."""
        running = self.path.parent / RUNNING_FILE
        try:
            lost = json.loads(running.read_text())
            stage_id, seconds = str(lost["id"]), float(lost["time_s"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):   # cut short while written: nothing to count
            running.unlink(missing_ok=True)
            return None
        if stage_id not in self.finished:
            self.count_attempt(stage_id, seconds)
            print(f"[{stage_id}] an earlier attempt ended without a word (killed, or crashed) after at least "
                  f"{seconds:.0f}s: counted in the stage's time", flush=True)
        running.unlink(missing_ok=True)
        return stage_id, seconds

    def redo(self, stage_id: str) -> list[str]:
        """Forget `stage_id` and every stage finished after it (they run again)."""
        ids = [r["id"] for r in self.data["stages"]]
        if stage_id not in ids:
            raise PrunekitError(f"--redo {stage_id}: not a finished stage (finished: {', '.join(ids) or 'none'})")
        dropped = ids[ids.index(stage_id):]
        self.data["stages"] = self.data["stages"][:ids.index(stage_id)]
        self.data.pop("unfinished", None)   # stages after the redone one never finished on the old path
        self.save()
        return dropped


