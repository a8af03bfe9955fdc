"""Which tests start a real server or process: moto, OpenSSH sshd,
PostgreSQL, QEMU, the daemon (``twistd -n txvmbot``), the ``txvmbot`` CLI
in a subprocess, the fault proxy, the signature-checking EC2 endpoint or
headless Chromium. conftest.py marks them ``integration``, so
``pytest -m "not integration"`` runs the rest.

A test starts one if it uses one of the session fixtures that do, or if its
code reaches one of the helpers that do: the names the test function reads,
and (for a method) every method of its classes that is not itself a test
(setUp, fixtures, helpers), followed through the functions and classes of
``tests/`` they name, to any depth. An argv that runs ``-m txvmbot``,
``bin/txvmbot`` or ``qemu-system-*``, or a script that imports the CLI's
``main``, counts too. It reads the source, so a
test that reaches a server only through a value it is handed (not a name)
is missed: give such a test one of the fixtures, or name the helper."""

from __future__ import annotations

import ast
import inspect
import sys
import types
from typing import Any

import pytest

#: Session fixtures that start a server, or build an image with QEMU.
SERVER_FIXTURES = frozenset({"moto", "pg_server", "pg_dsn", "qemu_image", "debian_image"})

#: Helpers that start one (module.qualname).
STARTERS = frozenset({
    "tests.support.servers.moto_server",
    "tests.support.sshd.sshd_server",
    "tests.support.pgserver.running_server",
    "tests.support.pgserver.PostgresServer",
    "tests.support.faultproxy.fault_proxy",
    "tests.support.sigserver.start",
    "tests.support.checkrun.check",
    "tests.support.checkrun.txvmbot_cmd",
})

#: Modules whose every use starts one.
STARTER_MODULES = frozenset({"tests.support.real_daemon", "tests.support.shared_cluster", "selenium"})

#: Consecutive strings of an argv that runs the CLI.
CLI_ARGV = (("-m", "txvmbot"), ("bin", "txvmbot"))

#: Text of a script, run in a subprocess, that runs the CLI.
CLI_SCRIPT = "from txvmbot.cli import main"


def _is_starter_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in STARTER_MODULES)


class _Module:
    """One module of ``tests/``: per top-level definition, the names it reads
    and whether an argv in it starts a process."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.defs: dict[str, ast.AST] = {}
        try:
            tree = ast.parse(inspect.getsource(module))
        except (OSError, TypeError, SyntaxError):
            return
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        self.defs[t.id] = node

    def parts(self, name: str, method: str | None) -> list[ast.AST]:
        """The code of definition ``name``; for a class and a test
        ``method``, that method, the class's other statements and its
        methods that are not tests."""
        node = self.defs.get(name)
        if node is None:
            return []
        if not isinstance(node, ast.ClassDef) or method is None:
            return [node]
        out: list[ast.AST] = [*node.bases, *node.decorator_list]
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if stmt.name.startswith("test") and stmt.name != method:
                    continue
            out.append(stmt)
        return out


def _starts_process(node: ast.AST) -> bool:
    """An argv or a script in ``node`` runs the CLI or QEMU."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and CLI_SCRIPT in n.value:
            return True
        items: list[ast.expr] = []
        if isinstance(n, (ast.List, ast.Tuple)):
            items = list(n.elts)
        elif isinstance(n, ast.Call):
            items = list(n.args)
        strings = [i.value if isinstance(i, ast.Constant) and isinstance(i.value, str) else None
                   for i in items]
        if any(s is not None and s.startswith("qemu-system") for s in strings):
            return True
        if any(tuple(strings[i:i + 2]) in CLI_ARGV for i in range(len(strings) - 1)):
            return True
    return False


def _names(node: ast.AST) -> set[tuple[str, str | None]]:
    """(name, attribute) pairs read: ``D.start`` is ("D", "start")."""
    out: set[tuple[str, str | None]] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            out.add((n.value.id, n.attr))
        elif isinstance(n, ast.Name):
            out.add((n.id, None))
    return out


class ServerUse:
    """Answers :meth:`starts` for pytest items; remembers what it read."""

    def __init__(self) -> None:
        self._modules: dict[str, _Module] = {}
        self._seen: dict[tuple[str, str, str | None], bool] = {}

    def _module(self, name: str) -> _Module | None:
        module = sys.modules.get(name)
        if module is None:
            return None
        if name not in self._modules:
            self._modules[name] = _Module(module)
        return self._modules[name]

    def _object(self, obj: Any) -> bool:
        if isinstance(obj, types.ModuleType):
            return _is_starter_module(obj.__name__)
        where = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not isinstance(where, str) or not isinstance(qualname, str):
            return False
        if _is_starter_module(where) or f"{where}.{qualname}" in STARTERS:
            return True
        if where.startswith("tests.") and where != __name__ and "." not in qualname:
            return self._definition(where, qualname, None)
        return False

    def _definition(self, module_name: str, name: str, method: str | None) -> bool:
        key = (module_name, name, method)
        if key in self._seen:
            return self._seen[key]
        self._seen[key] = False  # a circle of names starts nothing more
        found = False
        module = self._module(module_name)
        if module is not None:
            space = vars(module.module)
            for part in module.parts(name, method):
                if _starts_process(part):
                    found = True
                    break
                for base, attr in _names(part):
                    obj = space.get(base)
                    if obj is None:
                        continue
                    if isinstance(module.defs.get(base), (ast.Assign, ast.AnnAssign)):
                        # a module constant, say an argv: read its code
                        if base != name and self._definition(module_name, base, None):
                            found = True
                            break
                    if attr is not None and isinstance(obj, types.ModuleType):
                        if _is_starter_module(obj.__name__):
                            found = True
                        elif hasattr(obj, attr):
                            found = self._object(getattr(obj, attr))
                    else:
                        found = self._object(obj)
                    if found:
                        break
                if found:
                    break
        self._seen[key] = found
        return found

    def starts(self, item: pytest.Item) -> bool:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            return True
        if not isinstance(item, pytest.Function):
            return False
        info = getattr(item, "_fixtureinfo", None)
        for defs in getattr(info, "name2fixturedefs", {}).values():
            for fixturedef in defs:
                if self._object(fixturedef.func):
                    return True
        name = item.originalname
        cls = item.cls
        if cls is None:
            return self._definition(item.module.__name__, name, None)
        return any(
            self._definition(k.__module__, k.__name__, name)
            for k in cls.__mro__
            if k.__module__.startswith("tests.")
        )
