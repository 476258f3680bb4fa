"""Recipe: remove text decoder layers and/or vision blocks, and save a plain Hugging Face checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from prunekit import PrunekitError
from prunekit.core.surgery import LayerDrop, parse_index_list
from prunekit.stages.common import SurgeryInput, SurgeryResult, write_surgery_output


def read_plan(path: str | Path) -> tuple[list[int], list[int]]:
    """plan.json -> (text layers, vision blocks) to drop. Keys: drop_text, drop_vision (lists of ints)."""
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrunekitError(f"--plan {path}: cannot read ({e})") from None
    if not isinstance(plan, dict) or not ({"drop_text", "drop_vision"} & plan.keys()):
        raise PrunekitError(f"--plan {path}: expected a JSON object with drop_text and/or drop_vision")
    return (parse_index_list(plan.get("drop_text") or [], f"--plan {path}: drop_text"),
            parse_index_list(plan.get("drop_vision") or [], f"--plan {path}: drop_vision"))


def prune(model: str, out: str | Path, drop_text=None, drop_vision=None, plan: str | Path | None = None, *,
          overwrite: bool = False, streaming: bool | None = None, allow_pickle: bool = False,
          trust_remote_code: bool = False) -> SurgeryResult:
    text = parse_index_list(drop_text, "--drop-text")
    vision = parse_index_list(drop_vision, "--drop-vision")
    if plan is not None:
        if text or vision:
            raise PrunekitError("--plan: give either a plan or --drop-text/--drop-vision, not both")
        text, vision = read_plan(plan)
    src = SurgeryInput.open(model, allow_pickle=allow_pickle)
    surgery = LayerDrop(src.family, src.config, text, vision)
    return write_surgery_output(src, surgery, out, overwrite=overwrite, streaming=streaming,
                                trust_remote_code=trust_remote_code, stage="prune")
