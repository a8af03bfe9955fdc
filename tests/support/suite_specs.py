"""Suite specs for the tests of ``SuiteSpec``: ``LOCAL``, a local pool
target, and ``suite(**kw)``, a two-test spec on it with ``kw`` changed."""

from __future__ import annotations

from typing import Any

from txvmbot.jobs.suite.spec import SuiteSpec
from txvmbot.qemu.model import LocalPool, LocalSpec

LOCAL = LocalSpec(pool=LocalPool(name="local"))


def suite(**kw: Any) -> SuiteSpec:
    values: dict[str, Any] = {"target": LOCAL, "name": "s", "run": "run {test}", "tests": ("a", "b")}
    values.update(kw)
    return SuiteSpec(**values)
