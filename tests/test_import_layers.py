"""The import layers stay as the README's layout section draws them.

Reads (never imports) every module under megatron_anyflow/ and tools/, collects its `megatron_anyflow.*`
imports -- module level and function-local alike, since a lazy import is still a dependency, and relative
ones resolved against the module's package -- and checks
three rules:

1. Rooms are ranked; a module may import its own room or a lower one, never a higher one:

       data, parallel  <  models  <  checkpoint  <  anyflow  <  measure  <  training  <  harness  <  tools

   `checkpoint` (format, resume policy, locks, checksums, safe unpickling, load for inference) sits below
   `anyflow` because generation loads checkpoints; `measure` (FLOPs, the memory model, device ceilings, the
   report writer) sits below `training` so the trainer can ask "does this fit"; `measure.harness` (the
   throughput runners, which drive the trainer and the stages) is the one part of measurement above it.
   `megatron_anyflow/cli.py` and the package `__init__` are glue every room may use (rank 0).
2. No circle between modules (a strongly connected component of size > 1, or a self-import).
3. Runtime code imports nothing from `megatron_anyflow.testing`: "runtime" is every module of the library
   outside testing/ and every tool (a tool is something a user runs; what tests need lives in tests/ or
   testing/). testing/ may import any room; only tests/ import it.
"""
import ast
import os
import sys
from typing import Dict, List, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "megatron_anyflow"

# Longest prefix wins, so `megatron_anyflow.measure.harness` outranks `megatron_anyflow.measure`.
RANKS = {
    f"{PKG}": 0,  # the package __init__
    f"{PKG}.cli": 0,  # the one-line-error wrapper every entry point uses
    f"{PKG}.data": 0,
    f"{PKG}.parallel": 0,
    f"{PKG}.models": 1,
    f"{PKG}.checkpoint": 2,
    f"{PKG}.anyflow": 3,
    f"{PKG}.measure": 4,
    f"{PKG}.training": 5,
    f"{PKG}.measure.harness": 6,
    "tools": 7,
}
TESTING = f"{PKG}.testing"


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _sources() -> Dict[str, str]:
    out = {}
    for top in (PKG, "tools"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    out[_module_name(os.path.join(root, f))] = os.path.join(root, f)
    return out


def _resolve(name: str, modules: Set[str]) -> str:
    """The module a dotted name refers to: itself, or the longest module prefix (a name imported from it)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Dict[str, Dict[str, int]]:
    """module -> {imported module: first line number}, for imports of this repository's modules."""
    sources = _sources()
    modules = set(sources)
    graph: Dict[str, Dict[str, int]] = {}
    for mod, path in sources.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        edges: Dict[str, int] = {}
        for node in ast.walk(tree):
            names: List[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from .x import y` in package P means P.x
                    package = mod if path.endswith("__init__.py") else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                # `from pkg import sub` imports the submodule when `sub` is one.
                names = [f"{base}.{a.name}" for a in node.names]
            for n in names:
                if not n.startswith(PKG + ".") and n != PKG:
                    continue
                target = _resolve(n, modules)
                if target and target != mod:
                    edges.setdefault(target, node.lineno)
                elif target == mod:
                    edges.setdefault(mod, node.lineno)
        graph[mod] = edges
    return graph


def room(mod: str) -> Tuple[str, int]:
    best = max((p for p in RANKS if mod == p or mod.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"module {mod} is in no room of RANKS; add its room to the layer table")
    return best, RANKS[best]


def upward_imports(graph) -> List[str]:
    bad = []
    for mod, edges in sorted(graph.items()):
        if mod == TESTING or mod.startswith(TESTING + "."):
            continue
        src_room, src_rank = room(mod)
        for target, line in sorted(edges.items()):
            if target == TESTING or target.startswith(TESTING + "."):
                bad.append(f"{mod}:{line} imports test support {target} (runtime code must not)")
                continue
            dst_room, dst_rank = room(target)
            if dst_rank > src_rank:
                bad.append(f"{mod}:{line} ({src_room}, rank {src_rank}) imports {target} "
                           f"({dst_room}, rank {dst_rank}): upward")
    return bad


def cycles(graph) -> List[List[str]]:
    """Strongly connected components with a circle in them (Tarjan, iterative: no recursion limit)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    out: List[List[str]] = []
    counter = [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in graph[v]:
                    out.append(sorted(comp))
    return out


def test_the_checker_finds_a_circle_and_an_upward_import():
    # The rules above must be able to fail: a hand-made graph with one of each.
    graph = {
        f"{PKG}.models.a": {f"{PKG}.training.t": 1},
        f"{PKG}.training.t": {f"{PKG}.training.u": 2},
        f"{PKG}.training.u": {f"{PKG}.training.t": 3},
        "tools.x": {f"{PKG}.testing.toy": 4},
    }
    assert cycles(graph) == [[f"{PKG}.training.t", f"{PKG}.training.u"]]
    bad = upward_imports(graph)
    assert any("models.a:1" in b and "upward" in b for b in bad), bad
    assert any("tools.x:4" in b and "test support" in b for b in bad), bad


def test_relative_imports_are_resolved():
    # anyflow/causal.py says `from .distill import ...`: the edge must be there, or the check is blind to it.
    assert f"{PKG}.anyflow.distill" in import_graph()[f"{PKG}.anyflow.causal"]


def test_no_upward_import_between_rooms():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layer order (README, Layout):\n" + "\n".join(bad)


def test_no_import_circle():
    circles = cycles(import_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


if __name__ == "__main__":
    g = import_graph()
    for line in upward_imports(g):
        print(line)
    for c in cycles(g):
        print("circle:", " <-> ".join(c))
    sys.exit(0)
