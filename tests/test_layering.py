"""The package's layering, read from the source (no imports run): every `import` statement of
every module under sts_kernels/, those inside functions included, with relative imports
resolved.

- Imports point down: nothing under sts_kernels/nn or sts_kernels/ops imports
  sts_kernels.integrations.
- No import cycle among the package's modules. An import is an edge to the module it names:
  `from .pkg import name` is an edge to pkg (its __init__) unless pkg.name is a module, then to
  that module; `import a.b` is an edge to a.b.
- Module sizes: no module over 450 lines but the op files holding several kernels; each module
  of the HF patch (sts_kernels/integrations/hf/, its adapters apart) under 300.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "sts_kernels"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 450
SEVERAL_KERNELS = {"ops/bipartite_merge.py", "ops/routing.py", "ops/skip_residual.py"}
SEVERAL_KERNELS |= {"ops/token_pool.py"}
MAX_HF_LINES = 300


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module (a package's is its __init__.py)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()
# compiled extensions are modules too (`from . import _C` names a submodule, not the package);
# _C is what setup.py builds, absent from a clean clone
EXTENSIONS = {f"{PACKAGE}._C"} | {
    ".".join((PACKAGE, *path.relative_to(ROOT).parent.parts, path.name.split(".")[0]))
    for suffix in ("*.so", "*.pyd")
    for path in ROOT.rglob(suffix)
}


def _imports(name: str, source: str | None = None) -> set[str]:
    """The package modules `name` imports anywhere in its source (its file's unless given;
    function bodies included)."""
    path = MODULES.get(name)
    tree = ast.parse(path.read_text() if source is None else source)
    here = name if path is not None and path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: up level - 1 packages from this module's package
                parent = here.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in MODULES or sub in EXTENSIONS else base)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_walk_sees_lazy_and_relative_imports():
    """The graph is what the test claims to read: imports inside a function give edges, a
    relative `from . import x` of a submodule one to it, `from .pkg import name` one to pkg."""
    source = "def f():\n    from .ops import routing\n    import sts_kernels.nn\n"
    source += "from . import _backend, _C\nfrom .ops import route\n"
    edges = _imports(f"{PACKAGE}._probe", source)
    names = ("ops.routing", "nn", "_backend", "ops")  # route: a name in ops/__init__
    assert edges == {f"{PACKAGE}.{name}" for name in names}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nn_and_ops_never_import_integrations():
    upward = {
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name.startswith((f"{PACKAGE}.nn", f"{PACKAGE}.ops"))
        for target in targets
        if target.startswith(f"{PACKAGE}.integrations")
    }
    assert not upward, sorted(upward)


def test_no_import_cycle():
    cycles = _cycles(GRAPH)
    detail = [
        [f"{a} -> {b}" for a in cycle for b in sorted(GRAPH[a]) if b in cycle] for cycle in cycles
    ]
    assert not cycles, detail


def test_module_sizes():
    over = []
    for path in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        in_hf = rel.startswith("integrations/hf/") and not rel.startswith(
            "integrations/hf/adapters/"
        )
        if in_hf and lines >= MAX_HF_LINES:
            over.append(f"{rel}: {lines} lines (the HF patch's modules: under {MAX_HF_LINES})")
        elif lines > MAX_LINES and rel not in SEVERAL_KERNELS:
            over.append(f"{rel}: {lines} lines (at most {MAX_LINES})")
    assert not over, over
