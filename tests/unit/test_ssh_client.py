"""Unit tests for txvmbot.ssh: keys, the wait loop, timeouts and the exec
channel, with Clock, MemoryReactorClock and StringTransport (no network)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile

from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.ssh_doubles import FakeConnection
from tests.support.sshd import keygen_fingerprint
from txvmbot.errors import SSHError
from txvmbot.model import CommandResult
from txvmbot.ssh import (
    SSHCommandTimeout,
    SSHConnectError,
    SSHWaitTimeout,
    fingerprint_sha256,
    generate_key,
    key_type,
    load_private_key,
    public_openssh,
    wait_for_ssh,
)
from txvmbot.ssh._protocol import Session, _ChannelError, _CommandTimedOut, connect
from txvmbot.ssh._run import _Waiter

REFUSED = SSHConnectError("tcp:host=127.0.0.1:port=2", "root", "connection refused")


class TempDirMixin:
    def mktempdir(self) -> str:
        d = tempfile.mkdtemp(prefix="txvmbot-ssh-unit-")
        self.addCleanup(shutil.rmtree, d, True)  # type: ignore[attr-defined]
        return d


class KeyTests(TempDirMixin, SynchronousTestCase):
    def write(self, name: str, data: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.mktempdir(), name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_generate_ed25519(self) -> None:
        key = generate_key()
        self.assertEqual(key.type(), "Ed25519")
        self.assertFalse(key.isPublic())
        self.assertEqual(key_type(key), "ssh-ed25519")

    def test_generate_rsa_3072(self) -> None:
        key = generate_key("rsa")
        self.assertEqual(key.type(), "RSA")
        self.assertEqual(key.size(), 3072)

    def test_generate_unknown(self) -> None:
        self.assertRaises(ValueError, generate_key, "dsa")

    def test_public_openssh_line(self) -> None:
        key = generate_key()
        line = public_openssh(key)
        self.assertTrue(line.startswith("ssh-ed25519 AAAA"), line)
        self.assertNotIn("\n", line)
        self.assertEqual(Key.fromString(line.encode()), key.public())

    def assertFingerprintMatchesKeygen(self, key: Key) -> None:
        path = self.write("id.pub", public_openssh(key).encode() + b" test\n", 0o644)
        expected, _ = keygen_fingerprint(path)
        self.assertEqual(fingerprint_sha256(key), expected)
        self.assertEqual(fingerprint_sha256(key.public()), expected)

    def test_fingerprint_ed25519_matches_ssh_keygen(self) -> None:
        for _ in range(3):
            self.assertFingerprintMatchesKeygen(generate_key())

    def test_fingerprint_rsa_matches_ssh_keygen(self) -> None:
        self.assertFingerprintMatchesKeygen(generate_key("rsa"))

    def test_fingerprint_format(self) -> None:
        fp = fingerprint_sha256(generate_key())
        self.assertTrue(fp.startswith("SHA256:"))
        self.assertEqual(len(fp), len("SHA256:") + 43)  # 32 bytes, unpadded base64
        self.assertNotIn("=", fp)

    def test_load_round_trip(self) -> None:
        key = generate_key()
        path = self.write("id_ed25519", key.toString("openssh"))
        self.assertEqual(load_private_key(path), key)

    def test_load_missing_names_path(self) -> None:
        path = os.path.join(self.mktempdir(), "nope")
        e = self.assertRaises(SSHError, load_private_key, path)
        self.assertIn(path, str(e))
        self.assertIn("cannot read", str(e))

    def test_load_directory(self) -> None:
        path = self.mktempdir()
        e = self.assertRaises(SSHError, load_private_key, path)
        self.assertIn(path, str(e))

    def test_load_not_a_key(self) -> None:
        path = self.write("junk", b"hello\n")
        e = self.assertRaises(SSHError, load_private_key, path)
        self.assertIn(path, str(e))
        self.assertIn("not a usable private key", str(e))

    def test_load_public_key(self) -> None:
        path = self.write("id.pub", public_openssh(generate_key()).encode())
        e = self.assertRaises(SSHError, load_private_key, path)
        self.assertIn("public key", str(e))

    def keygen_encrypted(self) -> str:
        path = os.path.join(self.mktempdir(), "id_enc")
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-f", path],
            check=True,
            capture_output=True,
            timeout=30,
        )
        return path

    def test_load_encrypted_without_passphrase(self) -> None:
        path = self.keygen_encrypted()
        e = self.assertRaises(SSHError, load_private_key, path)
        self.assertIn(path, str(e))
        self.assertIn("encrypted", str(e))

    def test_load_encrypted_with_passphrase(self) -> None:
        path = self.keygen_encrypted()
        key = load_private_key(path, b"s3cret")
        expected, _ = keygen_fingerprint(path + ".pub")
        self.assertEqual(fingerprint_sha256(key), expected)

    def test_load_encrypted_wrong_passphrase(self) -> None:
        path = self.keygen_encrypted()
        e = self.assertRaises(SSHError, load_private_key, path, b"wrong")
        self.assertIn(path, str(e))


class FakeAttempts:
    """Stands in for one connect+auth attempt: each call returns a Deferred
    the test fires (or that fires at once from a script)."""

    def __init__(self, clock: Clock, script: list[object] | None = None) -> None:
        self.clock = clock
        self.script = list(script or [])
        self.times: list[float] = []
        self.pending: list[Deferred[str]] = []
        self.cancelled = 0

    def __call__(self) -> Deferred[str]:
        self.times.append(self.clock.seconds())
        if self.script:
            outcome = self.script.pop(0)
            if isinstance(outcome, Exception):
                return fail(outcome)
            assert isinstance(outcome, str)
            return succeed(outcome)

        def cancel(d: Deferred[str]) -> None:
            self.cancelled += 1

        d: Deferred[str] = Deferred(cancel)
        self.pending.append(d)
        return d


class WaiterTests(SynchronousTestCase):
    def waiter(
        self, attempts: FakeAttempts, clock: Clock, **kw: object
    ) -> tuple[Deferred[str], list[tuple[int, str]]]:
        seen: list[tuple[int, str]] = []
        args: dict[str, object] = dict(
            endpoint="tcp:host=127.0.0.1:port=2",
            user="root",
            bound=20.0,
            initial_delay=0.5,
            max_delay=5.0,
            on_attempt=lambda n, err: seen.append((n, err)),
        )
        args.update(kw)
        return _Waiter(attempts, clock, **args).start(), seen  # type: ignore[arg-type]

    def test_backoff_schedule_until_bound(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [REFUSED] * 100)
        d, seen = self.waiter(attempts, clock)
        clock.pump([0.25] * 100)  # 25 s, well past the bound
        self.assertEqual(attempts.times, [0, 0.5, 1.5, 3.5, 7.5, 12.5, 17.5])
        e = self.failureResultOf(d, SSHWaitTimeout).value
        self.assertEqual(e.attempts, 7)
        self.assertEqual(e.elapsed, 20.0)
        self.assertEqual(e.last_error, "connection refused")
        self.assertIn("7 attempts over 20.0s", str(e))
        self.assertIn("bound 20s", str(e))
        self.assertIn("last error: connection refused", str(e))
        self.assertIn("tcp:host=127.0.0.1:port=2", str(e))
        self.assertEqual(seen, [(n, "connection refused") for n in range(1, 8)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_success_after_failures(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [REFUSED, REFUSED, "SHA256:abc"])
        d, seen = self.waiter(attempts, clock)
        clock.advance(0.5)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), "SHA256:abc")
        self.assertEqual(len(seen), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_attempt_in_progress_at_bound_is_cancelled(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [REFUSED])
        d, seen = self.waiter(attempts, clock, bound=3.0)
        clock.advance(0.5)  # second attempt starts and hangs
        self.assertEqual(len(attempts.pending), 1)
        self.assertNoResult(d)
        clock.advance(2.5)
        self.assertEqual(attempts.cancelled, 1)
        e = self.failureResultOf(d, SSHWaitTimeout).value
        self.assertEqual(e.attempts, 2)
        self.assertEqual(e.last_error, "connection refused")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_first_attempt_hangs(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock)
        d, seen = self.waiter(attempts, clock, bound=3.0)
        clock.advance(3.0)
        e = self.failureResultOf(d, SSHWaitTimeout).value
        self.assertEqual(e.attempts, 1)
        self.assertIn("attempt 1 did not finish", str(e))

    def test_cancel_while_sleeping(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [REFUSED] * 10)
        d, seen = self.waiter(attempts, clock)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(100)
        self.assertEqual(len(attempts.times), 1)

    def test_cancel_while_attempting(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock)
        d, seen = self.waiter(attempts, clock)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(attempts.cancelled, 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(seen, [])

    def test_invalid_endpoint_not_retried(self) -> None:
        clock = Clock()
        bad = SSHConnectError(
            "nonsense:", "root", "invalid client endpoint string", transient=False
        )
        attempts = FakeAttempts(clock, [bad])
        d, seen = self.waiter(attempts, clock)
        self.assertIs(self.failureResultOf(d, SSHConnectError).value, bad)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unexpected_error_not_retried(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [ZeroDivisionError("bug")])
        d, seen = self.waiter(attempts, clock)
        self.failureResultOf(d, ZeroDivisionError)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_on_attempt_error_does_not_stop_the_loop(self) -> None:
        clock = Clock()
        attempts = FakeAttempts(clock, [REFUSED, "SHA256:x"])

        def boom(n: int, err: str) -> None:
            raise RuntimeError("callback bug")

        d, seen = self.waiter(attempts, clock, on_attempt=boom)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), "SHA256:x")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_wait_for_ssh_invalid_endpoint(self) -> None:
        reactor = MemoryReactorClock()
        d = wait_for_ssh(
            reactor, "nonsense:foo", "root", generate_key(), connect_timeout=1, bound=10
        )
        e = self.failureResultOf(d, SSHConnectError).value
        self.assertIn("invalid client endpoint string", str(e))
        self.assertEqual(reactor.getDelayedCalls(), [])


class ConnectTests(SynchronousTestCase):
    """``connect`` over a MemoryReactorClock: refusals and timeouts."""

    endpoint = "tcp:host=127.0.0.1:port=2222"

    def connect(self, reactor: MemoryReactorClock, timeout: float = 5.0) -> Deferred[Session]:
        return connect(
            reactor, self.endpoint, "root", generate_key(), connect_timeout=timeout, clock=reactor
        )

    def test_connection_refused(self) -> None:
        reactor = MemoryReactorClock()
        d = self.connect(reactor)
        host, port, factory, _, _ = reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 2222))
        factory.clientConnectionFailed(reactor.connectors[0], Failure(ConnectionRefusedError()))
        e = self.failureResultOf(d, SSHConnectError).value
        self.assertEqual(e.reason, "connection refused")
        self.assertEqual(str(e), f"ssh to {self.endpoint} as root: connection refused")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_timeout_while_connecting(self) -> None:
        reactor = MemoryReactorClock()
        d = self.connect(reactor)
        reactor.advance(4.9)
        self.assertNoResult(d)
        reactor.advance(0.1)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)
        e = self.failureResultOf(d, SSHConnectError).value
        self.assertEqual(e.reason, "timed out after 5s while connecting")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def connected(
        self, reactor: MemoryReactorClock
    ) -> tuple[Deferred[Session], StringTransport, IProtocol]:
        d = self.connect(reactor)
        factory = reactor.tcpClients[0][2]
        proto = factory.buildProtocol(None)
        assert proto is not None
        transport = StringTransport()
        proto.makeConnection(transport)
        return d, transport, proto

    def test_timeout_while_exchanging_keys(self) -> None:
        reactor = MemoryReactorClock()
        d, transport, proto = self.connected(reactor)
        self.assertTrue(transport.value().startswith(b"SSH-2.0-"))
        reactor.advance(5)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionAborted()))
        e = self.failureResultOf(d, SSHConnectError).value
        self.assertEqual(e.reason, "timed out after 5s while exchanging keys")

    def test_not_an_ssh_server(self) -> None:
        reactor = MemoryReactorClock()
        d, transport, proto = self.connected(reactor)
        proto.dataReceived(b"SSH-1.5-ancient\r\n")
        proto.connectionLost(Failure(ConnectionAborted()))
        e = self.failureResultOf(d, SSHConnectError).value
        self.assertIn("while exchanging keys", e.reason)
        self.assertIn("bad version 1.5", e.reason)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_cancel_aborts(self) -> None:
        reactor = MemoryReactorClock()
        d, transport, proto = self.connected(reactor)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])


class ExecuteTests(SynchronousTestCase):
    def start(
        self, command: str = "echo hi", timeout: float = 10.0, **kw: int
    ) -> tuple[Deferred[CommandResult], object, FakeConnection, Clock]:
        clock = Clock()
        conn = FakeConnection()
        session = Session(conn.transport, conn, clock)  # type: ignore[arg-type]
        d = session.execute(command, timeout, **kw)
        [channel] = conn.opened
        conn.channelsToRemoteChannel[channel] = 7
        channel.channelOpen(b"")  # type: ignore[attr-defined]
        kind, data, want = conn.requests[0]
        self.assertEqual((kind, data, want), (b"exec", NS(command.encode()), True))
        conn.replies[0].callback(None)
        self.assertEqual(conn.eofs, [channel])
        return d, channel, conn, clock

    def test_output_and_status(self) -> None:
        d, channel, conn, clock = self.start("echo hi; echo err >&2; exit 3")
        channel.dataReceived(b"h")  # type: ignore[attr-defined]
        channel.dataReceived(b"i\n")  # type: ignore[attr-defined]
        channel.extReceived(1, b"err\n")  # type: ignore[attr-defined]
        channel.request_exit_status(struct.pack(">L", 3))  # type: ignore[attr-defined]
        self.assertNoResult(d)
        channel.closed()  # type: ignore[attr-defined]
        self.assertEqual(
            self.successResultOf(d),
            CommandResult("echo hi; echo err >&2; exit 3", 3, b"hi\n", b"err\n", None),
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_signal(self) -> None:
        d, channel, conn, clock = self.start("kill -9 $$")
        channel.request_exit_signal(NS(b"KILL") + b"\x00" + NS(b"") + NS(b""))  # type: ignore[attr-defined]
        channel.closed()  # type: ignore[attr-defined]
        result = self.successResultOf(d)
        self.assertEqual((result.exit_status, result.signal), (None, "KILL"))
        self.assertFalse(result.ok)

    def test_timeout_keeps_output_and_kills(self) -> None:
        d, channel, conn, clock = self.start("echo started; sleep 60", timeout=2.0)
        channel.dataReceived(b"started\n")  # type: ignore[attr-defined]
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        e = self.failureResultOf(d, _CommandTimedOut).value
        self.assertEqual(e.bound, 2.0)
        self.assertEqual(e.partial, CommandResult("echo started; sleep 60", None, b"started\n"))
        self.assertIn((b"signal", NS(b"KILL"), False), conn.requests)
        self.assertEqual(conn.closes, [channel])
        # the channel closing later changes nothing
        channel.closed()  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_error_message(self) -> None:
        partial = CommandResult("sleep 60", None, b"one\ntwo\n")
        e = SSHCommandTimeout("tcp:host=127.0.0.1:port=22", "root", "sleep 60", 2.0, partial)
        self.assertEqual(
            str(e),
            "ssh to tcp:host=127.0.0.1:port=22 as root: command 'sleep 60' "
            "did not finish within 2s; last output: 'two'",
        )
        self.assertIsInstance(e, SSHError)

    def test_connection_lost_mid_command(self) -> None:
        d, channel, conn, clock = self.start("sleep 60")
        channel.dataReceived(b"partial")  # type: ignore[attr-defined]
        conn.transport.lost = True
        conn.transport.ended_because = "server disconnected: bye (code 11)"
        channel.closed()  # type: ignore[attr-defined]
        e = self.failureResultOf(d, _ChannelError).value
        self.assertIn("cut off: server disconnected: bye", e.reason)
        self.assertEqual(e.partial.stdout, b"partial")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_exec_refused(self) -> None:
        clock = Clock()
        conn = FakeConnection()
        session = Session(conn.transport, conn, clock)  # type: ignore[arg-type]
        d = session.execute("x", 10)
        [channel] = conn.opened
        conn.channelsToRemoteChannel[channel] = 1
        channel.channelOpen(b"")  # type: ignore[attr-defined]
        conn.replies[0].errback(Exception("channel request failed"))
        self.assertEqual(conn.closes, [channel])
        channel.closed()  # type: ignore[attr-defined]
        e = self.failureResultOf(d, _ChannelError).value
        self.assertIn("refused by the server", e.reason)

    def test_open_failed(self) -> None:
        clock = Clock()
        conn = FakeConnection()
        session = Session(conn.transport, conn, clock)  # type: ignore[arg-type]
        d = session.execute("x", 10)
        [channel] = conn.opened
        channel.openFailed(Exception("administratively prohibited"))  # type: ignore[attr-defined]
        e = self.failureResultOf(d, _ChannelError).value
        self.assertIn("could not get a session channel: administratively prohibited", e.reason)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_output_capped(self) -> None:
        d, channel, conn, clock = self.start("yes", max_output=4)
        channel.dataReceived(b"123")  # type: ignore[attr-defined]
        channel.dataReceived(b"456")  # type: ignore[attr-defined]
        channel.dataReceived(b"789")  # type: ignore[attr-defined]
        channel.request_exit_status(struct.pack(">L", 0))  # type: ignore[attr-defined]
        channel.closed()  # type: ignore[attr-defined]
        self.assertEqual(self.successResultOf(d).stdout, b"1234")

    def test_cancel_abandons(self) -> None:
        d, channel, conn, clock = self.start("sleep 60")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(conn.closes, [channel])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connection_already_lost(self) -> None:
        clock = Clock()
        conn = FakeConnection()
        session = Session(conn.transport, conn, clock)  # type: ignore[arg-type]
        conn.transport.lost = True
        e = self.failureResultOf(session.execute("true", 5), _ChannelError).value
        self.assertIn("could not start", e.reason)
        self.assertEqual(conn.opened, [])
