"""The twistd plugin imports nothing heavy: no reactor, no ampoule, no
botocore, until the daemon is made."""

from __future__ import annotations

import subprocess
import sys

from tests.support import paths


def test_importing_the_plugin_does_not_import_the_reactor() -> None:
    code = (
        "import sys\n"
        "import twisted.plugins.txvmbot_plugin as p\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "assert 'txvmbot' in [m.tapname for m in getPlugins(IServiceMaker)]\n"
        "import txvmbot.tap\n"
        "bad = [m for m in ('twisted.internet.reactor', 'ampoule', 'botocore') if m in sys.modules]\n"
        "print(bad)\n"
        "raise SystemExit(1 if bad else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=paths.ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
