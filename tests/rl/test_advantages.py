"""Group advantages against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from prunekit.rl.advantages import group_advantages


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    a = group_advantages(r, 3, "none")
    assert torch.allclose(a, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]))
    g = group_advantages(r, 3, "group")
    std = torch.tensor([1.0, 0.0, 0.0]).std()
    assert torch.allclose(g[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / std, atol=1e-5)
    assert torch.equal(g[3:], torch.zeros(3))  # a group that all got the same reward teaches nothing
    b = group_advantages(r, 3, "batch")
    assert torch.allclose(b, a / r.std(), atol=1e-6)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(r, 4)
