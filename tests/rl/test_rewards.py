"""Rewards load by path / module / name, score (sync and async) and fail loudly; the built-ins."""
from __future__ import annotations

import pytest

from prunekit import PrunekitError
from prunekit.rl.rewards import RewardError, load_rewards, score


def test_reward_loading_and_validation(tmp_path):
    plugin = tmp_path / "plug.py"
    plugin.write_text("import asyncio\nasync def slow(completions, prompts, **kw):\n"
                      "    await asyncio.sleep(0)\n    return [len(c) / 10 for c in completions]\n"
                      "def nan(completions, prompts, **kw):\n    return [0.0, float('nan')]\n"
                      "def short(completions, prompts, **kw):\n    return [1.0]\n")
    rewards = load_rewards([{"fn": f"{plugin}:slow"}, {"fn": "prunekit.rl.rewards:numeric_match", "weight": 2.0},
                            {"fn": "format", "kwargs": {"pattern": r"\d+"}, "name": "digits"}])
    totals, per = score(rewards, ["41", "x 42"], ["p1", "p2"], {"answer": ["41", None]})
    assert per == {"slow": [0.2, 0.4], "numeric_match": [1.0, None], "digits": [1.0, 0.0]}
    assert totals == pytest.approx([0.2 + 2.0 + 1.0, 0.4])
    with pytest.raises(RewardError, match=r"reward nan returned nan for sample 1 \(prompt 'p2', completion 'x 42'\)"):
        score(load_rewards([{"fn": f"{plugin}:nan"}]), ["41", "x 42"], ["p1", "p2"], {})
    with pytest.raises(RewardError, match="reward short returned 1 values for 2 completions"):
        score(load_rewards([{"fn": f"{plugin}:short"}]), ["41", "x 42"], ["p1", "p2"], {})
    with pytest.raises(PrunekitError, match="reward nope: not a built-in"):
        load_rewards([{"fn": "nope"}])
    with pytest.raises(PrunekitError, match="has no function missing"):
        load_rewards([{"fn": f"{plugin}:missing"}])
    # built-ins
    from prunekit.rl import rewards as R
    assert R.exact_match(["#### 12.", "12 apples"], None, answer=["12", "12"]) == [1.0, 0.0]
    assert R.valid_json(['{"a": 1}', "```json\n[1, 2]\n```", "{nope"], None) == [1.0, 1.0, 0.0]
    assert R.length_penalty(["", ""], None, max_tokens=4, completion_ids=[[1] * 4, [1] * 6]) == [0.0, -0.5]
