"""Knockout candidates: expanding a spec into candidates, and their ids."""
from __future__ import annotations

from prunekit.core.plan import Candidate, expand_candidates


def test_candidates_expand_and_parse():
    assert [c.id for c in expand_candidates("all", None, [1, 2], ["text:0+vision:1"], 3, 2)] == [
        "text:0", "text:1", "text:2", "text:0-1", "text:1-2", "text:0+vision:1"]
    assert [c.id for c in expand_candidates("1,3-4", "0-1", [2], [], 6, 2)] == ["text:3-4", "vision:0-1"]
    assert Candidate.parse("text:4-5").dirname == "text_4-5" and Candidate().id == "baseline"
