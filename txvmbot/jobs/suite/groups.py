"""Which tests of a suite share their set-up and so run in the same batch.

A fresh process per batch pays the runner's start and the imports of every
test module it touches (seed 002: Launchpad's layers took minutes to set
up). Tests that share a class (or a zope.testrunner layer, or whatever the
user's ``--group-regex`` says) therefore travel together, as stestr's
``--group-regex`` and pytest-xdist's ``--dist loadscope`` keep them.

Pure: a grouping is a function from a test id to its group key, or ``None``
for a test that is a group of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from txvmbot.errors import ConfigError

__all__ = ["GroupKey", "by_class", "by_regex", "family_of", "grouping"]

#: A test id's group key, or ``None``: the test is a group of its own.
GroupKey = Callable[[str], "str | None"]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _dotted_prefix(test_id: str) -> str | None:
    """``pkg.mod.Class`` of ``pkg.mod.Class.test_x`` (a parameter suffix such
    as ``test_x[1.5]`` or ``test_x(scenario.a)`` stays with the name), or
    ``None`` when ``test_id`` is not a dotted Python name of at least three
    parts (``t11.sh`` has two: as likely a file as a module)."""
    cut = len(test_id)
    for opener in "([":
        at = test_id.find(opener)
        if at != -1:
            cut = min(cut, at)
    parts = test_id[:cut].split(".")
    if len(parts) < 3 or not all(_IDENTIFIER.match(part) for part in parts):
        return None
    return test_id[:cut].rpartition(".")[0]


def by_class(test_id: str) -> str | None:
    """The default grouping: a test's class (or module, for a function).

    ``pkg.mod.Class.test_x`` -> ``pkg.mod.Class``; pytest's
    ``tests/test_x.py::TestX::test_y[1]`` -> ``tests/test_x.py::TestX``. A
    pytest function outside a class (``tests/test_x.py::test_f``) and any
    other id (``t11.sh``, ``tests/net/t11.sh``) is a group of its own.
    """
    if "::" in test_id:
        head = test_id.split("[", 1)[0].rpartition("::")[0]
        # A module's functions share no class: each is a group of its own,
        # as pytest-xdist's default --dist load spreads them.
        return test_id[: len(head)] if "::" in head else None
    return _dotted_prefix(test_id)


def by_regex(pattern: str) -> GroupKey:
    """stestr's ``--group-regex``: tests whose ids match ``pattern`` (from
    their start) to the same string are one group; a test it does not match
    is a group of its own."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError("--group-regex", f"{pattern!r} is not a regular expression: {e}") from None

    def key(test_id: str) -> str | None:
        found = regex.match(test_id)
        return found.group(0) if found else None

    return key


def _alone(test_id: str) -> str | None:
    return None


def grouping(group_regex: str | None, enabled: bool = True) -> GroupKey:
    """The grouping a suite asks for: none, a regex, else :func:`by_class`."""
    if not enabled:
        return _alone
    if group_regex is not None:
        return by_regex(group_regex)
    return by_class


def family_of(test_id: str) -> str:
    """The module a test id names, whose tests' times say something of each
    other's (``pkg.mod`` of ``pkg.mod.Class.test_x``, ``tests/x.py`` of
    ``tests/x.py::Class::test_y``); ``""`` when the id names none."""
    if "::" in test_id:
        return test_id.partition("::")[0]
    head = _dotted_prefix(test_id)
    if head is None:
        return ""
    module, dot, _ = head.rpartition(".")
    return module if dot else head
