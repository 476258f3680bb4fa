"""The package's shape, checked from the source: imports flow one way (cli / ray_jobs -> pipeline -> stages ->
{distributed, rl} -> engine -> core) and no two modules import each other, directly or around a loop."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "prunekit"
# a layer may import the layers after it in this list, never one before it
LAYERS = ["cli", "pipeline", "stages", "distributed", "rl", "engine", "core"]
PEERS = {("distributed", "rl"), ("rl", "distributed")}   # side by side: the RL stage drives both


def _imports() -> dict[str, set[str]]:
    """module -> the prunekit modules it imports (at the top or inside functions)."""
    modules = {".".join(f.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunekit"):
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("prunekit")]
            deps |= {t for t in targets if t in modules and t != name and t != "prunekit"}
        graph[name] = deps
    return graph


def _layer(module: str) -> str | None:
    part = module.split(".")[1] if "." in module else None
    return part if part in LAYERS else None


def test_imports_flow_one_way():
    upward = []
    for module, deps in _imports().items():
        for dep in deps:
            a, b = _layer(module), _layer(dep)
            if a and b and a != b and (a, b) not in PEERS and LAYERS.index(b) < LAYERS.index(a):
                upward.append(f"{module} -> {dep}")
    assert upward == [], upward


def test_no_import_cycles():
    graph = _imports()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], cycles


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: an engine module importing a stage, and the loop it closes, are reported."""
    import pytest
    fake = tmp_path / "prunekit"
    (fake / "engine").mkdir(parents=True)
    (fake / "stages").mkdir()
    (fake / "engine" / "x.py").write_text("from prunekit.stages.y import f\n")
    (fake / "stages" / "y.py").write_text("from prunekit.engine.x import g\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    graph = _imports()
    assert graph == {"prunekit.engine.x": {"prunekit.stages.y"}, "prunekit.stages.y": {"prunekit.engine.x"}}
    with pytest.raises(AssertionError, match="prunekit.engine.x -> prunekit.stages.y"):
        test_imports_flow_one_way()
    with pytest.raises(AssertionError, match="prunekit.engine.x"):
        test_no_import_cycles()
