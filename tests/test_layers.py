"""The package's layering, checked: imports point down only and form no cycle.

vdcli -> stage entry points (in data-flow order) -> method / models / quality / io -> common.
A stage may read what an earlier stage wrote (edit imports invert's store), never a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stage entry points in data-flow order; a stage may import only stages with a smaller rank.
STAGE_RANK = {"mask": 1, "invert": 2, "edit": 3, "export": 3.5, "evaluate": 4, "info": 5, "batch": 6, "demo": 6}
# The lower layer's packages and what each may import besides common and itself.
LOWER = {"io": set(), "method": set(), "models": {"io"}, "quality": {"io"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every stages./vdcli. module a file imports, at any depth (function-level imports count)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"stages", "vdcli"}}


def _sources() -> dict[str, Path]:
    files = list((ROOT / "stages").rglob("*.py")) + list((ROOT / "vdcli").rglob("*.py"))
    return {_module_name(p): p for p in files}


def _existing(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported name refers to (a `from pkg import name` may name a function)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def layer(module: str) -> tuple[str, int | None]:
    """(layer, stage rank) of a module: vdcli, stage, lower, common or root."""
    parts = module.split(".")
    if parts[0] == "vdcli":
        return "vdcli", None
    if len(parts) == 1:
        return "root", None
    top = parts[1]
    if top == "common":
        return "common", None
    if top in LOWER:
        return top, None
    if top in STAGE_RANK:
        return "stage", STAGE_RANK[top]
    raise AssertionError(f"{module} is in no layer: add it to a subpackage of stages/")


def allowed(src: str, dst: str) -> bool:
    """May module src import module dst?"""
    (s_layer, s_rank), (d_layer, d_rank) = layer(src), layer(dst)
    if d_layer == "root":  # stages/__init__.py holds only __version__
        return True
    if s_layer == "vdcli":
        return True
    if d_layer == "vdcli":
        return False
    if s_layer == "common":
        return d_layer == "common"
    if s_layer in LOWER:
        return d_layer in {"common", s_layer} | LOWER[s_layer]
    if s_layer == "stage":
        if d_layer != "stage":
            return True
        same_stage = src.split(".")[1] == dst.split(".")[1]
        return same_stage or d_rank < s_rank
    return d_layer == "common"  # the root package


def _graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {_existing(i, modules) for i in _imports(path)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def test_the_layer_rule_itself():
    assert allowed("vdcli.commands.edit", "stages.edit.run")
    assert allowed("stages.edit.run", "stages.invert.run")
    assert not allowed("stages.invert.run", "stages.edit.run")
    assert not allowed("stages.method.ddim", "stages.models.load")
    assert not allowed("stages.io.storage", "stages.batch.manifest")
    assert not allowed("stages.common.errors", "stages.io.workspace")
    assert not allowed("stages.models.load", "vdcli.common")
    assert allowed("stages.method.guidance", "stages.common.errors")
    assert allowed("stages.models.load", "stages.io.weights")
    assert not allowed("stages.io.video", "stages.models.load")


def test_every_import_points_down():
    graph = _graph()
    assert len(graph) > 30, "the scan found too few modules to be meaningful"
    upward = sorted(f"{src} -> {dst}" for src, targets in graph.items() for dst in targets if not allowed(src, dst))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
