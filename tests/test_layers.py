"""The layout shows the flow: values -> machines (ec2, qemu, ssh) -> jobs
(smoke, suite) -> daemon -> cli. No module imports from a layer above its
own, even inside a function (an import there is still a dependency)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "txvmbot")

#: Package or module (dotted, under txvmbot) -> its layer; the longest
#: matching prefix wins; everything else is a value module (layer 0).
LAYERS = {
    "txvmbot.ec2": 1,
    "txvmbot.qemu": 1,
    "txvmbot.ssh": 1,
    "txvmbot.jobs": 2,
    "txvmbot.daemon": 3,
    "txvmbot.codec": 3,
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
                wrong.append(f"{module} ({NAMES[mine]}) imports {imported} ({NAMES[layer(imported)]})")
    assert wrong == []


def test_the_daemon_settings_do_not_import_the_cli() -> None:
    settings = os.path.join(ROOT, "daemon", "settings.py")
    assert not [m for m in imports(settings) if m.startswith("txvmbot.cli")]
