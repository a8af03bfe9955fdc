"""Integration tests for suite specs on the real command line (``txvmbot``
in a subprocess): its bad-usage errors."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from tests.support import checkrun


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        checkrun.txvmbot_cmd(*args), capture_output=True, text=True, timeout=60,
        env=checkrun.env(), cwd=cwd,
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["--tests", "T"], "--run: required"),
        (["--run", "x {test}"], "--list: give the test ids"),
        (["--run", "x {tests}", "--tests", "T"], "--run: {tests} and {tests_file} (a batch) need --format subunit or junit"),
        (["--run", "x {test}", "--tests", "T", "--upload", "nocolon"], "--upload: 'nocolon' is not SRC:DEST"),
        (["--run", "x {test}", "--tests", "T", "--upload", "/no/such:/d"], "--upload: /no/such does not exist"),
        (["--run", "x {test}", "--tests", "missing.txt"], "--tests: cannot read missing.txt"),
        (["--run", "x {test}", "--tests", "T", "--command", "ls"], "--command: not used by a suite"),
        (["--run", "x {test}", "--tests", "T", "--machines", "0"], "--machines: must be at least 1"),
    ],
)
def test_suite_bad_usage_exits_2_naming_the_flag(tmp_path: Any, args: list[str], says: str) -> None:
    with open(os.path.join(tmp_path, "T"), "w") as f:
        f.write("a\nb\n")
    p = run_cli("suite", "--local", "--state-dir", str(tmp_path / "state"), *args, cwd=str(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert says in p.stderr


def test_submit_refuses_suite_flags_without_suite(tmp_path: Any) -> None:
    p = run_cli("submit", "--pool", "local", "--junit", "x.xml", "--connect", f"unix:path={tmp_path}/no.sock")
    assert p.returncode == 2 and "--junit: only used with --suite" in p.stderr
