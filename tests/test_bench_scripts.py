"""Every bench script imports: a name it takes from prunekit that moved or went away fails here, not on a GPU box."""
from __future__ import annotations

import importlib

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_bench_script_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None)), f"bench/{name}.py has no main()"
