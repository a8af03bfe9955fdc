"""A fake QMP server for the QMP client's tests: ``FakeQMPServer`` greets
with ``GREETING`` and answers line-JSON commands from its handlers;
``session`` connects a QMPProtocol to one over iosim."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.protocols.basic import LineReceiver
from twisted.test.iosim import connectedServerAndClient

from txvmbot.qemu.qmp import QMPProtocol

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
