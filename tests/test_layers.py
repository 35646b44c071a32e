"""The import layers of jdoptim, checked inside the suite (CI also runs ``lint-imports`` on the
contracts of ``.importlinter``; this test needs no extra package and sees new modules by itself).

The import graph is read from the source with :mod:`ast` (every ``import`` statement, including
those inside functions), relative imports resolved against the importing module's package; the
layers are checked on its transitive closure.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

import jdoptim

_ROOT = Path(jdoptim.__file__).parent

#: The old paths of the update computers, now re-exports of :mod:`jdoptim.updates` kept for user
#: code: the library imports none of them (one exception below), and the walk of the import graph
#: does not go through them (their one import is the new module, a layer up from autogram/).
_SHIMS = frozenset(
    {
        "jdoptim.update",
        "jdoptim.autogram.update",
        "jdoptim.features_step",
        "jdoptim.cross_batch",
        "jdoptim.method_step",
        "jdoptim.scalarized_step",
    }
)
#: ``jdoptim.autogram.GramianUpdate`` (the old public name) goes through the old module, imported
#: inside the package's ``__getattr__`` on first use only.
_LAZY_SHIM_IMPORTS = frozenset({("jdoptim.autogram", "jdoptim.autogram.update")})


def _module_name(path: Path) -> tuple[str, bool]:
    parts = ["jdoptim", *path.relative_to(_ROOT).with_suffix("").parts]
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every dotted name ``source`` (the text of ``module``) imports, relative ones resolved."""
    names: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def _graph() -> dict[str, set[str]]:
    """jdoptim's modules → the jdoptim modules each imports directly."""
    sources = {_module_name(path): path.read_text() for path in _ROOT.rglob("*.py")}
    modules = {name for name, _ in sources}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for (name, is_package), source in sources.items():
        targets = {resolve(n) for n in imported_names(source, name, is_package)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def _reachable(graph: dict[str, set[str]], sources: list[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(sources)
    while stack:
        module = stack.pop()
        for target in graph[module]:
            if target in seen:
                continue
            seen.add(target)
            if target not in _SHIMS:  # a re-export of a module one layer up
                stack.append(target)
    return seen


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(sources: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> set[str]:
    graph = _graph()
    start = [m for m in graph if _inside(m, sources) and m not in _SHIMS]
    assert start, f"no module under {sources}"
    reached = _reachable(graph, start)
    if allowed:
        return {m for m in reached if not any(_inside(m, a) for a in allowed) and m != "jdoptim"}
    return {m for m in reached if any(_inside(m, f) for f in forbidden)}


def test_relative_imports_are_resolved() -> None:
    """The reader itself: a module-level relative import two levels up, a package's own
    relative import, and an import inside a function are all seen."""
    source = "from ..losses import LossBatch\ndef f():\n    import jdoptim.optimizer\n"
    assert imported_names(source, "jdoptim.linalg.simplex", False) == {
        "jdoptim.losses",
        "jdoptim.losses.LossBatch",
        "jdoptim.optimizer",
    }
    assert imported_names("from .lcp import x", "jdoptim.linalg", True) == {
        "jdoptim.linalg.lcp",
        "jdoptim.linalg.lcp.x",
    }


def test_linalg_imports_nothing_else_from_jdoptim() -> None:
    assert _violations("jdoptim.linalg", ("jdoptim.linalg",), ()) == set()


@pytest.mark.parametrize("methods", ["jdoptim.aggregation", "jdoptim.scalarization"])
def test_methods_import_no_engine_update_computer_or_optimizer(methods: str) -> None:
    """A method sees a Gramian (or losses), never the machinery that computes them."""
    allowed = ("jdoptim.aggregation", "jdoptim.scalarization", "jdoptim.linalg")
    assert _violations(methods, allowed, ()) == set()


def test_engine_imports_no_method_update_computer_or_optimizer() -> None:
    forbidden = (
        "jdoptim.aggregation",
        "jdoptim.scalarization",
        "jdoptim.distributed",
        "jdoptim.optimizer",
        "jdoptim.updates",
        *(_SHIMS - {"jdoptim.autogram.update"}),  # its own old path: see _LAZY_SHIM_IMPORTS
    )
    assert _violations("jdoptim.autogram", (), forbidden) == set()


def test_jacobian_engine_imports_no_method_update_computer_or_optimizer() -> None:
    allowed = ("jdoptim.autojac", "jdoptim.linalg")
    assert _violations("jdoptim.autojac", allowed, ()) == set()


def test_update_computers_import_no_optimizer_distributed_or_old_path() -> None:
    """The update computers sit below the optimizer and the distributed computers (which build
    on ``updates.base``), and use the new paths only."""
    forbidden = ("jdoptim.optimizer", "jdoptim.distributed", "jdoptim.demo", *_SHIMS)
    assert _violations("jdoptim.updates", (), forbidden) == set()


def test_the_library_imports_no_old_path() -> None:
    """Every module imports the update computers from :mod:`jdoptim.updates`; the old paths
    exist for user code only."""
    graph = _graph()
    assert set(graph) >= _SHIMS, "a compatibility module is missing"
    found = {
        (module, target)
        for module, targets in graph.items()
        if module not in _SHIMS
        for target in targets & _SHIMS
    }
    assert found == _LAZY_SHIM_IMPORTS


def test_old_paths_re_export_the_same_objects() -> None:
    """Each old module imports only from :mod:`jdoptim.updates`, and every name it exports is
    the very object a module of :mod:`jdoptim.updates` holds (``from old import X`` still works
    and gives the class the library uses)."""
    import importlib

    graph = _graph()
    new_modules = sorted(m for m in graph if _inside(m, "jdoptim.updates"))
    for old in sorted(_SHIMS):
        assert graph[old] and all(_inside(t, "jdoptim.updates") for t in graph[old]), old
        module = importlib.import_module(old)
        assert module.__all__, old
        for name in module.__all__:
            holders = [
                new
                for new in new_modules
                if getattr(importlib.import_module(new), name, None) is getattr(module, name)
            ]
            assert holders, f"{old}.{name} is not an object of jdoptim.updates"
    import jdoptim.amp
    import jdoptim.autogram
    from jdoptim.updates.gramian import GramianUpdate
    from jdoptim.updates.scaled import ScaledUpdate, scaled

    assert jdoptim.autogram.GramianUpdate is GramianUpdate
    assert (jdoptim.amp.ScaledUpdate, jdoptim.amp.scaled) == (ScaledUpdate, scaled)
