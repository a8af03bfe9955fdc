"""The README's demo scripts run from a checkout: ``bin/demo-check`` (the
cloud check against the moto and sshd it starts on loopback) must keep
finding its helpers in tests/support/."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import paths


def test_demo_check_passes_and_leaves_nothing() -> None:
    p = subprocess.run(
        [sys.executable, os.path.join(paths.ROOT, "bin", "demo-check")],
        capture_output=True, text=True, timeout=180, cwd=paths.ROOT,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "left on the cloud afterwards: nothing" in out, out
