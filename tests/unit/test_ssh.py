"""Unit tests for txvmbot.ssh's failures with no sshd: a refused port and a
listener on 127.0.0.1 that never speaks, for ``run_commands`` and
``wait_for_ssh`` (its bound and its cancel).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support.deferreds import failed
from tests.support.servers import free_port
from txvmbot.ssh import (
    SSHConnectError,
    SSHWaitTimeout,
    generate_key,
    run_commands,
    wait_for_ssh,
)

reactor: Any = _reactor


class Silent(Protocol):
    """Accepts a connection and never says a word."""


class FailureTests(TestCase):
    timeout = 30

    async def test_refused(self) -> None:
        endpoint = f"tcp:host=127.0.0.1:port={free_port()}"
        d = run_commands(
            reactor,
            endpoint,
            "root",
            generate_key(),
            ["true"],
            command_timeout=1,
            connect_timeout=2,
        )
        e = await failed(d, SSHConnectError)
        self.assertEqual(str(e), f"ssh to {endpoint} as root: connection refused")

    async def test_server_never_speaks(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = f"tcp:host=127.0.0.1:port={port.getHost().port}"
        d = run_commands(
            reactor,
            endpoint,
            "root",
            generate_key(),
            ["true"],
            command_timeout=1,
            connect_timeout=0.5,
        )
        e = await failed(d, SSHConnectError)
        self.assertEqual(e.reason, "timed out after 0.5s while exchanging keys")

    async def test_wait_for_ssh_refused_ends_at_bound(self) -> None:
        seen: list[tuple[int, str]] = []
        endpoint = f"tcp:host=127.0.0.1:port={free_port()}"
        start = reactor.seconds()
        d = wait_for_ssh(
            reactor,
            endpoint,
            "root",
            generate_key(),
            connect_timeout=1,
            bound=1.5,
            initial_delay=0.1,
            max_delay=0.4,
            on_attempt=lambda n, err: seen.append((n, err)),
        )
        e = await failed(d, SSHWaitTimeout)
        elapsed = reactor.seconds() - start
        self.assertTrue(1.4 <= elapsed < 3.0, elapsed)
        self.assertGreaterEqual(e.attempts, 4)
        self.assertEqual(e.last_error, "connection refused")
        self.assertIn(f"not ready after {e.attempts} attempts over", str(e))
        self.assertIn("last error: connection refused", str(e))
        self.assertEqual(seen[0], (1, "connection refused"))
        self.assertEqual([n for n, _ in seen], list(range(1, len(seen) + 1)))

    async def test_wait_for_ssh_cancel(self) -> None:
        endpoint = f"tcp:host=127.0.0.1:port={free_port()}"
        d = wait_for_ssh(
            reactor,
            endpoint,
            "root",
            generate_key(),
            connect_timeout=1,
            bound=30,
            initial_delay=0.1,
        )
        reactor.callLater(0.35, d.cancel)
        await failed(d, CancelledError)
