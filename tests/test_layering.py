"""Import layering of every package under src/strata (issue 19): no package imports a package above it, no import
cycles between packages, none between files. Every import counts: module level, inside functions, under
TYPE_CHECKING. Parsed with `ast`, nothing is imported.

LAYERS lists the packages (and top-level modules) from the bottom up; a package may import the packages of lower
tiers only, and packages of one tier do not import each other. `cli` is the dispatcher: it reaches the
subcommand modules by name (importlib), so those edges do not show here.

The violations left after the issue-19 refactor (`strata.engine.cli` and `strata.router.cli` importing the
dispatcher `strata.cli` for its argparse helpers, now in `strata.core.cliutil`; the file cycles
batch.cli <-> batch.dp and batch.jobs <-> batch.rows) are gone. KNOWN lists the ones that came later and are
still to be removed. A violation not in KNOWN fails the test, and so does an entry of KNOWN that no longer
occurs: delete it (the list only shrinks).
"""
from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "strata"

LAYERS: list[tuple[str, ...]] = [
    ("settings",),              # typed STRATA_* environment toggles: stdlib only
    ("core",),                  # request, sampling params, step plan, outputs, errors
    ("config",),                # EngineArgs: the engine's flags
    ("parallel",),              # process-group state, the shared-memory channel
    ("ops",),                   # Triton kernels and their torch twins
    ("attention", "layers"),
    ("models",),
    ("kvcache",),               # pure Python
    ("sched",),                 # pure Python
    ("structured",),            # structured outputs: grammar compilation and per-request grammar state
    ("runner",),                # inputs, CUDA graphs, sampler: one model runner for every rank
    ("engine",),                # LLMEngine, executors, launchers, LLM, AsyncLLM
    ("plan", "router"),         # torch-free tools
    ("batch", "serve", "bench"),
    ("bench_cli",),             # `strata bench`
    ("cli", "strata"),          # the `strata` dispatcher and the package root (`from strata import LLM`)
]

# Forms:
#   "upward: IMPORTER -> IMPORTED"   a module importing a module of its own tier or a higher one
#   "file cycle: A <-> B <-> ..."    modules that import each other (members sorted)
#   "package cycle: P <-> Q <-> ..." packages that import each other (members sorted)
KNOWN: set[str] = set()


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "strata"


def _is_module(name: str) -> bool:
    p = SRC.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import of a strata module in this file. `from strata.x import y`
    counts as an import of strata.x.y when y is a module, else of strata.x."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "strata"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "strata":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


def _sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def violations() -> dict[str, list[str]]:
    """Every violation -> where it happens ('file:line imports module')."""
    tier = {p: i for i, names in enumerate(LAYERS) for p in names}
    mods = _modules()
    found: dict[str, list[str]] = defaultdict(list)
    file_graph: dict[str, set[str]] = defaultdict(set)
    pkg_graph: dict[str, set[str]] = defaultdict(set)
    pkg_where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for mod, path in mods.items():
        src_pkg = _package(mod)
        if src_pkg not in tier:
            found[f"unplaced package: {src_pkg}"].append(f"{path.relative_to(SRC.parent)} is in no tier of LAYERS")
            continue
        for line, target in _imports(mod, path):
            where = f"{path.relative_to(SRC.parent)}:{line} imports {target}"
            if target not in mods:
                found[f"missing module: {mod} -> {target}"].append(where)
                continue
            if target != mod:
                file_graph[mod].add(target)
            dst_pkg = _package(target)
            if dst_pkg == src_pkg:
                continue
            pkg_graph[src_pkg].add(dst_pkg)
            pkg_where[(src_pkg, dst_pkg)].append(where)
            if dst_pkg not in tier:
                continue  # reported as unplaced where its own files are walked
            if tier[dst_pkg] >= tier[src_pkg]:
                found[f"upward: {mod} -> {target}"].append(where)
    for comp in _sccs(file_graph):
        found["file cycle: " + " <-> ".join(comp)] = [
            f"{a} imports {b}" for a in comp for b in sorted(file_graph[a]) if b in comp]
    for comp in _sccs(pkg_graph):
        found["package cycle: " + " <-> ".join(comp)] = [
            w for a in comp for b in sorted(pkg_graph[a]) if b in comp for w in pkg_where[(a, b)][:3]]
    return dict(found)


# Packages that run without torch (a laptop, the router's host, `strata plan` in a second): no module in them
# imports these at any level, and importing any strata module they import does not import them either (that
# module's import-time closure: imports outside functions and TYPE_CHECKING blocks, parent packages included).
# This folds in the router's and the planner's own checks (test_router_unit.py, test_plan.py).
TORCH_FREE = ("settings", "core", "config", "kvcache", "sched", "plan", "router", "cli")
HEAVY = {"torch", "numpy", "transformers", "triton"}


def _import_nodes(tree: ast.AST, import_time: bool):
    """Import nodes of a module; with import_time, only those that run when it is imported."""
    todo = [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if import_time and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if import_time and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo += child.orelse
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            todo.append(child)


def _heavy_names(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] in HEAVY]
    if not node.level and (node.module or "").split(".")[0] in HEAVY:
        return [node.module]
    return []


def _heavy_at_import(mods: dict[str, pathlib.Path]) -> dict[str, list[str]]:
    """module -> the chain by which importing it imports a heavy package (absent when it does not)."""
    direct: dict[str, list[str]] = {}
    deps: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = list(_import_nodes(tree, import_time=True))
        heavy = [n for node in nodes for n in _heavy_names(node)]
        if heavy:
            direct[mod] = [f"{mod} imports {heavy[0]}"]
        lines = {node.lineno for node in nodes}
        targets = {t for line, t in _imports(mod, path) if line in lines}
        # importing a.b.c runs a and a.b first
        deps[mod] = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 2)} - {mod}
    chain: dict[str, list[str]] = dict(direct)
    changed = True
    while changed:
        changed = False
        for mod, ds in deps.items():
            if mod in chain:
                continue
            for d in sorted(ds):
                if d in chain:
                    chain[mod] = [f"{mod} imports {d}"] + chain[d]
                    changed = True
                    break
    return chain


def test_torch_free_packages_stay_torch_free():
    mods = _modules()
    heavy = _heavy_at_import(mods)
    bad = []
    for mod, path in mods.items():
        if _package(mod) not in TORCH_FREE:
            continue
        rel = path.relative_to(SRC.parent)
        for node in _import_nodes(ast.parse(path.read_text(), str(path)), import_time=False):
            bad += [f"{rel}:{node.lineno} imports {n}" for n in _heavy_names(node)]
        for line, target in _imports(mod, path):
            parents = [".".join(target.split(".")[:i]) for i in range(2, target.count(".") + 2)]
            for t in parents:
                if t in heavy:
                    bad.append(f"{rel}:{line} imports {target}: " + ", ".join(heavy[t]))
                    break
    assert not bad, f"torch-free packages ({', '.join(TORCH_FREE)}):\n  " + "\n  ".join(sorted(set(bad)))


def test_layers_name_every_package_once():
    names = [p for t in LAYERS for p in t]
    assert len(names) == len(set(names)), names
    present = {_package(m) for m in _modules()}
    assert not present - set(names), f"packages in no tier of LAYERS: {sorted(present - set(names))}"
    assert not set(names) - present, f"LAYERS names packages that do not exist: {sorted(set(names) - present)}"


def test_no_new_layering_violation():
    found = violations()
    new = {k: v for k, v in found.items() if k not in KNOWN}
    assert not new, "import layering violations (LAYERS in tests/test_layering.py):\n" + "\n".join(
        f"  {k}\n" + "\n".join(f"      {w}" for w in v) for k, v in sorted(new.items()))


def test_known_violations_still_occur():
    found = violations()
    gone = sorted(KNOWN - set(found))
    assert not gone, ("these KNOWN violations no longer occur: delete them from KNOWN in tests/test_layering.py "
                      "(the list only shrinks):\n" + "\n".join(f"  {k!r}," for k in gone))


def test_the_check_sees_function_level_imports_and_cycles(tmp_path, monkeypatch):
    """The checker itself, on a made-up package: an upward import inside a function, a two-file cycle, and the
    package cycle the upward import closes."""
    src = tmp_path / "src"
    pkg = src / "strata"
    for d, files in {"core": {"a.py": "def f():\n    from strata.engine import b\n"},
                     "engine": {"b.py": "from strata.engine.c import x\n", "c.py": "import strata.engine.b\nx = 1\n",
                                "d.py": "from strata.core import errors\n", "e.py": "import torch\n",
                                "f.py": "def g():\n    import torch\n", "g.py": "from strata.engine import e\n"}}.items():
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
        for name, text in files.items():
            (pkg / d / name).write_text(text)
    (pkg / "__init__.py").write_text("")
    import sys
    me = sys.modules[__name__]
    monkeypatch.setattr(me, "SRC", src)
    monkeypatch.setattr(me, "PKG", pkg)
    monkeypatch.setattr(me, "LAYERS", [("core",), ("engine",), ("strata",)])
    found = me.violations()
    assert found["upward: strata.core.a -> strata.engine.b"] == ["src/strata/core/a.py:2 imports strata.engine.b"]
    assert "file cycle: strata.engine.b <-> strata.engine.c" in found
    assert "package cycle: core <-> engine" in found
    heavy = me._heavy_at_import(me._modules())
    assert heavy["strata.engine.g"] == ["strata.engine.g imports strata.engine.e", "strata.engine.e imports torch"]
    assert "strata.engine.f" not in heavy and "strata.engine" not in heavy
