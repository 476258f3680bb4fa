"""output_dir/pipeline_state.json: the original's measurements and every finished stage, written atomically."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from prunekit import PrunekitError

STATE_FILE = "pipeline_state.json"

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
            return cls(path, data)
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
        finishes on a later run. (A process killed outright, SIGKILL or a lost node, cannot say what it spent.)"""
        spent = self.data.setdefault("unfinished", {}).setdefault(stage_id, {"time_s": 0.0, "attempts": 0})
        spent["time_s"] = round(spent["time_s"] + seconds, 1)
        spent["attempts"] += 1
        self.save()

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


