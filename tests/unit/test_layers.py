"""The layout shows the flow: values -> machines (ec2, qemu, ssh) -> jobs
(smoke, suite) -> daemon -> cli. No module imports from a layer above its
own, even inside a function (an import there is still a dependency), and no
modules import each other in a circle, not even for type hints only (under
``TYPE_CHECKING``): a circle means two modules are one in two files."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from tests.support import paths

ROOT = os.path.join(paths.ROOT, "txvmbot")

#: Package or module (dotted, under txvmbot) -> its layer; the longest
#: matching prefix wins; everything else is a value module (layer 0).
LAYERS = {
    "txvmbot.ec2": 1,
    "txvmbot.qemu": 1,
    "txvmbot.ssh": 1,
    "txvmbot.jobs": 2,
    "txvmbot.daemon": 3,
    "txvmbot.tap": 3,
    "txvmbot.cli": 4,
    # The checks behind ``txvmbot doctor`` look at every layer's install
    # (the plugin cache, the daemon's files); only the CLI uses them.
    "txvmbot.doctor": 4,
    "txvmbot.__main__": 4,
    "txvmbot.testing": 5,
}
NAMES = ("values", "machines", "jobs", "daemon", "cli", "testing")


def layer(module: str) -> int:
    best = ""
    for prefix in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    return LAYERS[best] if best else 0


def modules() -> list[tuple[str, str]]:
    found = []
    for top, _dirs, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(top, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                found.append((rel.removesuffix(".__init__"), path))
    return sorted(found)


def imports(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("txvmbot.") or m == "txvmbot"}


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    wrong = []
    for module, path in modules():
        mine = layer(module)
        for imported in imports(path):
            if layer(imported) > mine:
                wrong.append(
                    f"{module} ({NAMES[mine]}) imports {imported} ({NAMES[layer(imported)]})"
                )
    assert wrong == []


def test_the_daemon_settings_do_not_import_the_cli() -> None:
    settings = os.path.join(ROOT, "daemon", "settings.py")
    assert not [m for m in imports(settings) if m.startswith("txvmbot.cli")]


def imported_modules(path: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports: ``from a import b``
    is module ``a.b`` if that is a module, else ``a``; ``if TYPE_CHECKING:``
    and function bodies count."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return out & known


def import_cycles() -> set[frozenset[str]]:
    """Each set of two or more txvmbot modules that import one another,
    directly or round a longer circle (Tarjan's strongly connected
    components of the import graph)."""
    paths = dict(modules())
    known = set(paths)
    graph = {m: sorted(imported_modules(p, known) - {m}) for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_circle() -> None:
    assert sorted(sorted(c) for c in import_cycles()) == []


def test_the_cycle_check_sees_type_checking_imports(tmp_path: Path) -> None:
    a = tmp_path / "a.py"
    a.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from txvmbot.x.b import B\n"
        "def f():\n"
        "    from txvmbot.x import c\n"
    )
    known = {"txvmbot.x", "txvmbot.x.b", "txvmbot.x.c"}
    assert imported_modules(str(a), known) == {"txvmbot.x.b", "txvmbot.x.c"}
