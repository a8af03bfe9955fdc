"""Tests for the QMP client: a fake QMP server over iosim and StringTransport,
then one session against a real QEMU (TCG, no guest) on a unix socket in a
temp dir, stopped by its pid."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.protocols.basic import LineReceiver
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import TestCase

from txvmbot.qemu.qmp import (
    QMPError,
    QMPProtocol,
    connect_qmp,
)

reactor: Any = _reactor

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, "capabilities": []}}


class FakeQMPServer(LineReceiver):
    """A tiny line-JSON QMP server: greets, answers from ``handlers``
    (command -> callable(arguments) -> dict to send, without the id)."""

    delimiter = b"\n"

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
            "qmp_capabilities": lambda a: {"return": {}},
            "query-status": lambda a: {"return": {"status": "running", "running": True}},
            "boom": lambda a: {"error": {"class": "GenericError", "desc": "it went boom"}},
        }
        self.held: list[dict[str, Any]] = []

    def connectionMade(self) -> None:
        self.send(GREETING)

    def send(self, msg: dict[str, Any]) -> None:
        # QEMU ends its lines with CRLF.
        assert self.transport is not None
        self.transport.write(json.dumps(msg).encode() + b"\r\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        msg: dict[str, Any] = {"event": name, "timestamp": {"seconds": 10, "microseconds": 500000}}
        if data is not None:
            msg["data"] = data
        self.send(msg)

    def lineReceived(self, line: bytes) -> None:
        msg = json.loads(line)
        self.received.append(msg)
        handler = self.handlers.get(msg["execute"])
        if handler is None:
            answer: dict[str, Any] | None = {
                "error": {"class": "CommandNotFound", "desc": f"no {msg['execute']}"}
            }
        else:
            answer = handler(msg.get("arguments", {}))
        if answer is None:  # held back for the test to send
            self.held.append(msg)
            return
        if "id" in msg:
            answer["id"] = msg["id"]
        self.send(answer)


def session() -> tuple[FakeQMPServer, QMPProtocol, Any]:
    client, server, pump = connectedServerAndClient(FakeQMPServer, QMPProtocol)
    pump.flush()
    return server, client, pump


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
