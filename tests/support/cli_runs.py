"""The ``txvmbot`` command line run in process, as the tests drive it:
``run`` calls ``cli.main`` on a MemoryReactorClock and keeps its exit code
and output (``Ran``); ``cli`` and ``cli_env`` call ``cli.run`` and return
(code, stdout, stderr), ``cli_env`` in this process's environment unless
given one."""

from __future__ import annotations

import io
import os
from typing import Any

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

import txvmbot.cli


@attrs.define
class Ran:
    code: int
    stdout: str
    stderr: str


def run(argv: list[str], tmp_path: Any, env: dict[str, str] | None = None) -> Ran:
    out, err = io.StringIO(), io.StringIO()
    environ = {"HOME": str(tmp_path / "home")} if env is None else env
    with pytest.raises(SystemExit) as info:
        txvmbot.cli.main(argv, stdout=out, stderr=err, environ=environ, _reactor=MemoryReactorClock())
    code = info.value.code
    assert isinstance(code, int)
    return Ran(code, out.getvalue(), err.getvalue())


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = txvmbot.cli.run(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def cli_env(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = txvmbot.cli.run(list(argv), stdout=out, stderr=err, environ=environ or dict(os.environ))
    return code, out.getvalue(), err.getvalue()
