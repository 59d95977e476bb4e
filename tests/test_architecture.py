"""The layer order of docs/architecture.md, checked on the source without importing it.

Three rules, read from the import statements of every module under ``src/cliplab``:

(a) no import cycles: none between modules through module-level imports, and none between
    packages through any import (a function-level import counts: it only delays the cycle);
(b) no private name of another package (``from ..eval.tasks import _quiet_fits``) and no
    private module outside the package that holds it (``cliplab.adapt._base`` is for
    ``cliplab.adapt`` only; ``cliplab._progress`` is for all of ``cliplab``);
(c) a package imports only packages at or below its own layer (:data:`LAYERS`).

Known violations that later commits remove are listed in :data:`KNOWN_VIOLATIONS`; an entry
that no longer occurs fails the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "cliplab"

#: The layer of each package (``cliplab.<name>``) and top-level module, lowest first; the
#: same table as docs/architecture.md.  A package may import packages of its own layer or
#: below.  ``cliplab`` is the root ``__init__`` (the public API).
LAYERS: dict[str, int] = {
    "errors": 0, "registry": 0, "_progress": 0, "validation": 0, "lazy": 0,  # core: no cliplab imports but each other
    "ops": 1,                                      # numeric kernels and box ops
    "data": 2,
    "models": 3, "features": 3,
    "zeroshot": 4, "surgery": 4, "train": 4, "dense": 4,
    "adapt": 5, "resilience": 5,                # resilience trains through the Trainer
    "eval": 6, "generative": 6,                # generative heads use eval's metrics and reports
    "experiments": 6,
    "index": 7, "demo": 7,
    "scale": 7,                                    # Ray Data jobs (optional dependency)
    "serve": 8,
    "cli": 9, "cliplab": 9,
}

#: Names of the root package that any module may import (package metadata).
ROOT_METADATA = {"__version__"}

#: Violations still present, as ``(rule, importing module, imported module or name)``.
#: Each is fixed by a later change of its owner's area; remove the entry with the fix.
KNOWN_VIOLATIONS: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str          # dotted module name
    target: str            # dotted module name that is imported (a module or a package)
    name: str | None       # a name imported from ``target`` that is not a module, or None
    module_level: bool
    line: int


def _module_name(path: Path, src: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _modules(src: Path = SRC) -> dict[str, tuple[Path, bool]]:
    return {name: (p, pkg) for p in sorted(src.rglob("*.py")) for name, pkg in [_module_name(p, src)]}


def _function_scoped(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a function body (run when called, not on import)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _imports(src: Path) -> list[Import]:
    mods = _modules(src)
    out = []
    for name, (path, is_package) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        deferred = _function_scoped(tree)
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(tree):
            top = id(node) not in deferred
            if isinstance(node, ast.Import):
                out += [Import(name, a.name, None, top, node.lineno) for a in node.names
                        if a.name.split(".")[0] == "cliplab"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "cliplab":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        out.append(Import(name, sub, None, top, node.lineno))
                    else:
                        out.append(Import(name, target, a.name, top, node.lineno))
    return out


def _package(module: str) -> str:
    """``cliplab.eval.tasks`` -> ``eval``; ``cliplab.errors`` -> ``errors``; ``cliplab`` -> ``cliplab``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _target_package(imp: Import) -> str:
    if imp.target == "cliplab" and imp.name in ROOT_METADATA:
        return "_progress"  # package metadata sits with the core modules
    return _package(imp.target)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one node or a self-loop."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@functools.lru_cache(maxsize=None)
def _violations(src: Path = SRC) -> frozenset[tuple[str, str, str]]:
    imports = _imports(src)
    found = set()
    # (a) cycles between modules through module-level imports
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.module_level and imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
    for comp in _strongly_connected(graph):
        found.add(("module cycle", comp[0], " -> ".join(comp)))
    # (a) cycles between packages through any import
    graph = {}
    for imp in imports:
        a, b = _package(imp.importer), _target_package(imp)
        if a != b:
            graph.setdefault(a, set()).add(b)
    for comp in _strongly_connected(graph):
        found.add(("package cycle", comp[0], " -> ".join(comp)))
    for imp in imports:
        mine, theirs = _package(imp.importer), _target_package(imp)
        # (b) private modules: private to the package that holds them
        parts = imp.target.split(".")
        for i, part in enumerate(parts):
            if _is_private(part):
                owner = ".".join(parts[:i])
                if not (imp.importer == owner or imp.importer.startswith(owner + ".")):
                    found.add(("private module", imp.importer, imp.target))
                break
        # (b) private names of another package
        if imp.name is not None and _is_private(imp.name) and mine != theirs:
            found.add(("private name", imp.importer, f"{imp.target}.{imp.name}"))
        # (c) layers
        if mine != theirs and LAYERS[mine] < LAYERS[theirs]:
            found.add(("layer", imp.importer, imp.target))
    return frozenset(found)


def test_every_package_has_a_layer():
    packages = {_package(m) for m in _modules()}
    missing = sorted(packages - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS here and to the table of docs/architecture.md"


def test_import_rules():
    found = _violations()
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "import rule violations (see docs/architecture.md):\n" + "\n".join(map(str, new))


def test_known_violations_still_occur():
    stale = sorted(KNOWN_VIOLATIONS - _violations())
    assert not stale, "fixed: remove from KNOWN_VIOLATIONS:\n" + "\n".join(map(str, stale))


def test_docs_table_matches():
    """docs/architecture.md states the same layers as :data:`LAYERS`."""
    doc = SRC.parents[1] / "docs" / "architecture.md"
    if not doc.is_file():
        pytest.fail("docs/architecture.md is missing")
    rows = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0].isdigit():
            for name in cells[1].replace("`", "").split(","):
                if name.strip():
                    rows[name.strip().removesuffix("/").removesuffix(".py")] = int(cells[0])
    assert rows == LAYERS


@pytest.mark.parametrize("files, expected", [
    ({"adapt/x.py": "from ..eval.tasks import _quiet_fits"},
     ("private name", "cliplab.adapt.x", "cliplab.eval.tasks._quiet_fits")),
    ({"data/x.py": "from ..adapt._base import fit"}, ("private module", "cliplab.data.x", "cliplab.adapt._base")),
    ({"data/x.py": "def f():\n    from ..eval import metrics"}, ("layer", "cliplab.data.x", "cliplab.eval.metrics")),
    ({"data/x.py": "from .y import g", "data/y.py": "from .x import f"},
     ("module cycle", "cliplab.data.x", "cliplab.data.x -> cliplab.data.y")),
])
def test_rules_catch_a_violation(tmp_path, files, expected):
    """Each rule fails on a planted import (in a copy of the tree)."""
    import shutil

    root = tmp_path / "src" / "cliplab"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__", "bundled"))
    for rel, text in files.items():
        (root / rel).write_text(text + "\n")
    assert expected in _violations(root)
