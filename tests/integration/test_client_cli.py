"""Integration test for the daemon's client commands: the real command line
(``python -m txvmbot``) in a subprocess against an in-process AMP server
with a fake scheduler (tests/support/client_cli.py) on a unix socket."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue

from tests.support import paths
from tests.support.client_cli import ClientCommandCase

reactor: Any = _reactor
ROOT = paths.ROOT


class ClientCommandTests(ClientCommandCase):
    async def test_real_command_line(self) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "txvmbot", "status", "--connect", self.where], env=env, path=ROOT
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"workers: 2", out)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "txvmbot", "jobs", "--connect", f"unix:path={self.dir}/none.sock"],
            env=env,
            path=ROOT,
        )
        self.assertEqual(code, 3)
        self.assertIn(b"is the daemon running?", err)
