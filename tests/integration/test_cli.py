"""Integration tests for the command line as a real process: ``--help``
without importing the reactor, the bin/ script, and a run stopped by
SIGINT or SIGTERM that waits for its cleanup (a second signal stops the
wait)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support import paths

ROOT = paths.ROOT


NO_REACTOR = """
import sys
import txvmbot.cli
txvmbot.cli.build_parser().format_help()
for name in ("twisted.internet.reactor", "txvmbot.jobs.smoke", "botocore"):
    assert name not in sys.modules, name
print("ok")
"""


def test_help_does_not_import_the_reactor() -> None:
    p = subprocess.run(
        [sys.executable, "-c", NO_REACTOR], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert p.stdout.strip() == "ok", p.stderr
    p = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "txvmbot", "check", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and "--timeout-running" in p.stdout
    assert "twisted.internet.reactor" not in p.stderr
    assert "twisted" not in p.stderr  # not even Twisted itself


def test_bin_script_runs() -> None:
    p = subprocess.run(
        [os.path.join(ROOT, "bin", "txvmbot"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout.startswith("txvmbot ")


SIGNAL_SCRIPT = """
import os, sys, types
sys.path.insert(0, {root!r})
from twisted.internet.defer import Deferred
from txvmbot.model import CheckResult, Facts, StepResult

MARK = {mark!r}
CLEANUP = float(sys.argv[1])

class Check:
    def __init__(self, reactor, spec, *, journal, observer=None, evidence_root=None, check_id=None):
        self.reactor, self.check_id, self.d = reactor, "sig", Deferred()
    def run(self):
        sys.stdout.write("RUNNING\\n"); sys.stdout.flush()
        return self.d
    def cancel(self, reason):
        def cleaned():
            open(MARK, "w").write(reason)
            self.d.callback(CheckResult("sig", False, (StepResult("x", 0.0, 1.0, "cancelled", reason),), Facts(), error=reason))
        if CLEANUP >= 0:
            self.reactor.callLater(CLEANUP, cleaned)

class Journal:
    def __init__(self, path): pass
    def close(self): pass

for name, attrs in (("txvmbot.jobs.smoke", {{"Check": Check, "LocalCheck": Check}}), ("txvmbot.journal", {{"SQLiteJournal": Journal}})):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m

from txvmbot.cli import main

main(["check", "--endpoint", "http://127.0.0.1:1/", "--region", "r", "--image", "a",
      "--state-dir", {state!r}])
"""


def start_signal_script(tmp_path: Any, cleanup: float) -> tuple[subprocess.Popen[str], str]:
    mark = str(tmp_path / "cleaned")
    script = tmp_path / "sig.py"
    script.write_text(SIGNAL_SCRIPT.format(root=ROOT, mark=mark, state=str(tmp_path / "state")))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cleanup)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded by the script: it prints at once
    while line and "RUNNING" not in line:
        line = proc.stdout.readline()
    assert "RUNNING" in line
    return proc, mark


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_waits_for_cleanup(tmp_path: Any, sig: signal.Signals) -> None:
    proc, mark = start_signal_script(tmp_path, cleanup=1.0)
    try:
        started = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err
    assert time.monotonic() - started >= 0.9  # it waited for the cleanup
    assert open(mark).read() == "SIGINT/SIGTERM received"
    assert "cancelling" in err
    assert "FAILED check sig" in out


def test_second_signal_stops_waiting(tmp_path: Any) -> None:
    proc, mark = start_signal_script(tmp_path, cleanup=-1)  # cleanup never ends
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for cleanup
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err
    assert "second signal" in err and "txvmbot reap" in err
    assert not os.path.exists(mark)
