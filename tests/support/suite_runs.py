"""Test suites run by ``txvmbot suite``: ``RUN``, the busybox shell command
of the local 12-test suite (one failing, one hanging, one writing bytes
that are not text), and ``subunit_stats``, what python-subunit's own
``subunit-stats`` reads in a merged stream."""

from __future__ import annotations

import os
import subprocess
import sys

RUN = (
    "case {test} in "
    "t01) sleep 600;; "
    "t03) echo about to fail; exit 3;; "
    "t09) printf 'garbage \\263\\000 on stdout\\n';; "
    "*) sleep 2; echo {test} ok;; "
    "esac"
)


def subunit_stats(path: str) -> dict[str, str]:
    """What python-subunit's own ``subunit-stats`` reads in a stream file:
    ``{"Total tests": "6", "Failed tests": "1", "Seen tags": ...}``."""
    stats_bin = os.path.join(os.path.dirname(sys.executable), "subunit-stats")
    with open(path, "rb") as f:
        out = subprocess.run([stats_bin], stdin=f, capture_output=True, text=True, timeout=60).stdout
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
