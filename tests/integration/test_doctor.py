"""Integration tests for ``txvmbot doctor`` as a real process: the installed
checkout passes it in a subprocess, and the command checks the data dir it
is given."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from tests.support import damage
from txvmbot.cli import run


def test_installed_checkout_passes_doctor_in_a_subprocess() -> None:
    p = subprocess.run([sys.executable, "-m", "txvmbot", "doctor", "--fix"], capture_output=True,
                       text=True, timeout=120, cwd="/")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "twistd knows the txvmbot plugin" in p.stdout


def test_doctor_command_checks_the_data_dir_it_is_given(tmp_path: object) -> None:
    """As an operator runs it: a truncated job store fails doctor (exit 1),
    --fix leaves it where it is."""
    d = str(tmp_path)
    path = os.path.join(d, "jobs.sqlite")
    damage.make_store(path)
    damage.truncate_half(path)
    before = damage.read(path)
    p = subprocess.run([sys.executable, "-m", "txvmbot", "doctor", "--fix", "--data-dir", d],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"FAIL job store {path} is damaged (SQLite: database disk image is malformed)" in p.stdout
    assert f"fix: stop the daemon, then: mv {path} " in p.stdout
    assert damage.read(path) == before
    config = os.path.join(d, "txvmbot.toml")
    with open(config, "w") as f:
        f.write(f'[daemon]\ndata_dir = "{os.path.join(d, "elsewhere")}"\n')
    out = io.StringIO()
    run(["doctor", "--config", config], stdout=out, stderr=io.StringIO())
    elsewhere = os.path.join(d, "elsewhere", "jobs.sqlite")
    assert f"ok   no job store at {elsewhere}" in out.getvalue(), out.getvalue()
