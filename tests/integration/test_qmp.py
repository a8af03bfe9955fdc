"""Integration test for the QMP client: one session against a real QEMU
(TCG, no guest) on a unix socket in a temp dir, stopped by its pid."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from txvmbot.qemu.qmp import (
    QMPError,
    connect_qmp,
)

reactor: Any = _reactor


class RealQEMUTests(TestCase):
    """One QMP session against a real QEMU (no guest: it idles in firmware)."""

    timeout = 60

    def setUp(self) -> None:
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            self.skipTest("qemu-system-x86_64 not installed")
        self.dir = tempfile.mkdtemp(prefix="txvmbot-qmp-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock = os.path.join(self.dir, "qmp.sock")
        self.proc = subprocess.Popen(
            [
                binary,
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-machine",
                "q35,accel=tcg",
                "-m",
                "64",
                "-qmp",
                f"unix:{self.sock},server=on,wait=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    async def test_session(self) -> None:
        qmp = await connect_qmp(reactor, self.sock, bound=20)
        assert qmp.greeting is not None
        self.assertEqual(qmp.greeting["version"]["qemu"]["major"], 7)
        status = await qmp.execute("query-status")
        self.assertEqual(status["status"], "running")
        stopped = qmp.wait_event("STOP")
        await qmp.execute("stop")
        self.assertEqual((await stopped).name, "STOP")
        try:
            await qmp.execute("no-such-command")
        except QMPError as e:
            self.assertEqual(e.error_class, "CommandNotFound")
        else:
            self.fail("no error for an unknown command")
        try:
            await qmp.execute("migrate", {"uri": "file:/nonexistent"})
        except QMPError as e:
            self.assertEqual(e.error_class, "GenericError")
        else:
            self.fail("QEMU 7.2 has no file: migration")
        shutdown = qmp.wait_event("SHUTDOWN")
        closed = qmp.when_closed()
        await qmp.execute("quit")
        self.assertEqual((await shutdown).data.get("reason"), "host-qmp-quit")
        await closed
        self.assertEqual(self.proc.wait(10), 0)
