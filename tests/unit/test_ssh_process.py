"""Unit tests for ``Session.start`` and ``RemoteProcess`` (a long-lived remote
command fed on stdin, its stdout read as it comes), with no server: the
channel is driven on the SSH doubles of tests/support/ssh_doubles.py and a
Clock. The commands of the integration half run on a real sshd
(tests/integration/test_ssh_process.py).
"""

from __future__ import annotations

import struct
from typing import Any

from twisted.conch.ssh.common import NS
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.remote_output import Stdout
from tests.support.ssh_doubles import FakeConnection, FakeTransport
from txvmbot.model import CommandResult
from txvmbot.ssh import (
    RemoteProcess,
    Session,
    SSHCommandFailed,
)
from txvmbot.ssh._process import STOP_GRACE
from txvmbot.ssh._protocol import CLOSE_GRACE, KILL_GRACE

# -- on doubles --------------------------------------------------------------------


class _Transport(FakeTransport):
    """FakeTransport with what ``Session.close`` uses."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self._lost: list[Deferred[None]] = []

    def when_lost(self) -> Deferred[None]:
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    def close(self) -> None:
        self.closed = True

    def drop(self) -> None:
        self.lost = True
        for d in self._lost:
            d.callback(None)


class _Connection(FakeConnection):
    """FakeConnection that records the data sent on channels."""

    transport: _Transport

    def __init__(self) -> None:
        super().__init__()
        self.transport = _Transport()
        self.sent: list[bytes] = []
        #: what was sent, in order: data, "EOF", "CLOSE"
        self.events: list[object] = []

    def sendData(self, channel: object, data: bytes) -> None:
        self.sent.append(data)
        self.events.append(data)

    def sendEOF(self, channel: object) -> None:
        super().sendEOF(channel)
        self.events.append("EOF")

    def sendClose(self, channel: object) -> None:
        super().sendClose(channel)
        self.events.append("CLOSE")


class ProcessUnitTests(SynchronousTestCase):
    endpoint = "tcp:host=127.0.0.1:port=2222"

    def setUp(self) -> None:
        self.clock = Clock()
        self.conn = _Connection()
        self.session = Session(
            self.conn.transport,  # type: ignore[arg-type]
            self.conn,  # type: ignore[arg-type]
            self.clock,
            endpoint=self.endpoint,
            user="root",
        )
        self.out = Stdout()

    def start(
        self,
        command: str = "runner",
        window: int = 1 << 20,
        pid: int | None = None,
        **kw: Any,
    ) -> tuple[RemoteProcess, Any]:
        d = self.session.start(command, self.out, **kw)
        channel: Any = self.conn.opened[0]
        self.conn.channelsToRemoteChannel[channel] = 3
        channel.remoteWindowLeft = window
        channel.remoteMaxPacket = 32768
        channel.channelOpen(b"")
        exec_line = b"echo txvmbot-pid=$$\n" + command.encode()
        self.assertEqual(self.conn.requests[0], (b"exec", NS(exec_line), True))
        self.assertNoResult(d)
        self.conn.replies[0].callback(None)
        process = self.successResultOf(d)
        self.assertIsInstance(process, RemoteProcess)
        self.assertEqual(self.conn.eofs, [])  # stdin stays open
        if pid is not None:
            channel.dataReceived(b"txvmbot-pid=%d\n" % pid)
            self.assertEqual(self.out.chunks, [])
        return process, channel

    def killer(self) -> Any:
        """The channel opened to kill the command: open it, and check what
        it runs."""
        killer: Any = self.conn.opened[1]
        self.conn.channelsToRemoteChannel[killer] = 4
        killer.channelOpen(b"")
        self.assertEqual(
            self.conn.requests[-1],
            (b"exec", NS(b"kill -9 -4321 2>/dev/null || kill -9 4321"), True),
        )
        self.conn.replies[-1].callback(None)
        return killer

    def test_stdout_passed_on_stdin_written_exit_reported(self) -> None:
        process, channel = self.start()
        self.assertTrue(process.running)
        process.write(b"test_a\n")
        channel.dataReceived(b"ok a\n")
        process.write(b"test_b\n")
        channel.dataReceived(b"ok ")
        channel.dataReceived(b"b\n")
        channel.extReceived(1, b"warning\n")
        self.assertEqual(self.conn.sent, [b"test_a\n", b"test_b\n"])
        self.assertEqual(self.out.chunks, [b"ok a\n", b"ok ", b"b\n"])
        process.close_stdin()
        process.close_stdin()
        self.assertEqual(self.conn.events[-1], "EOF")
        self.assertEqual(self.conn.events.count("EOF"), 1)
        channel.request_exit_status(struct.pack(">L", 0))
        self.assertFalse(process.running)
        self.assertNoResult(process.ended)
        channel.closed()
        self.assertEqual(
            self.successResultOf(process.ended), CommandResult("runner", 0, b"", b"warning\n")
        )
        self.assertEqual(self.session.processes, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_write_after_end_or_after_eof_raises(self) -> None:
        process, channel = self.start()
        process.close_stdin()
        e = self.assertRaises(SSHCommandFailed, process.write, b"more\n")
        self.assertIn("its stdin was closed", str(e))
        channel.request_exit_status(struct.pack(">L", 3))
        e = self.assertRaises(SSHCommandFailed, process.write, b"more\n")
        self.assertEqual(
            str(e),
            f"ssh to {self.endpoint} as root: command 'runner' has ended (exit status 3): "
            "cannot write to its stdin",
        )
        self.assertEqual(e.partial.exit_status, 3)
        channel.closed()
        self.assertEqual(self.successResultOf(process.ended).exit_status, 3)

    def test_eof_waits_for_input_buffered_past_the_window(self) -> None:
        process, channel = self.start(window=10)
        process.write(b"0123456789abcdef")
        self.assertEqual(self.conn.sent, [b"0123456789"])
        process.close_stdin()
        self.assertEqual(self.conn.events, [b"0123456789"])  # no EOF before "abcdef"
        channel.addWindowBytes(4)
        self.assertEqual(self.conn.events, [b"0123456789", b"abcd"])
        channel.addWindowBytes(100)
        self.assertEqual(self.conn.events, [b"0123456789", b"abcd", b"ef", "EOF"])

    def test_server_close_drops_unsent_input(self) -> None:
        process, channel = self.start(window=4)
        process.write(b"0123456789")
        channel.request_exit_status(struct.pack(">L", 1))
        channel.closeReceived()  # conch would wait for window forever otherwise
        self.assertEqual(self.conn.closes, [channel])
        channel.closed()
        self.assertEqual(self.successResultOf(process.ended).exit_status, 1)

    def test_pid_line_is_read_off_stdout(self) -> None:
        process, channel = self.start()
        channel.dataReceived(b"txvmbot")
        channel.dataReceived(b"-pid=4321")
        self.assertEqual(self.out.chunks, [])
        channel.dataReceived(b"\nready\n")
        self.assertEqual(self.out.chunks, [b"ready\n"])
        self.assertEqual(channel.pid, 4321)

    def test_without_a_pid_line_stdout_is_passed_whole(self) -> None:
        process, channel = self.start()
        channel.dataReceived(b"txv")
        channel.dataReceived(b"ot a pid line\n")
        self.assertEqual(self.out.chunks, [b"txvot a pid line\n"])
        self.assertIsNone(channel.pid)

    def test_a_dangerous_pid_is_not_used(self) -> None:
        process, channel = self.start(pid=1)
        self.assertIsNone(channel.pid)
        process.stop(grace=1.0)
        self.clock.advance(1.0)
        self.assertIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        self.assertEqual(len(self.conn.opened), 1)  # no kill channel

    def test_stderr_keeps_the_end(self) -> None:
        process, channel = self.start(max_stderr=8)
        channel.extReceived(1, b"0123456")
        channel.extReceived(1, b"789abc")
        channel.extReceived(2, b"not stderr")
        channel.request_exit_status(struct.pack(">L", 0))
        channel.closed()
        self.assertEqual(self.successResultOf(process.ended).stderr, b"56789abc")

    def test_on_stdout_raising_is_logged_and_the_channel_carries_on(self) -> None:
        seen: list[bytes] = []

        def on_stdout(data: bytes) -> None:
            seen.append(data)
            if len(seen) == 1:
                raise ZeroDivisionError("bug in the caller")

        d = self.session.start("runner", on_stdout)
        channel: Any = self.conn.opened[0]
        self.conn.channelsToRemoteChannel[channel] = 1
        channel.channelOpen(b"")
        self.conn.replies[0].callback(None)
        process = self.successResultOf(d)
        channel.dataReceived(b"one")
        channel.dataReceived(b"two")
        self.assertEqual(seen, [b"one", b"two"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue(process.running)

    def test_exec_refused(self) -> None:
        d = self.session.start("runner", self.out)
        channel: Any = self.conn.opened[0]
        self.conn.channelsToRemoteChannel[channel] = 1
        channel.channelOpen(b"")
        self.conn.replies[0].errback(Exception("channel request failed"))
        self.assertEqual(self.conn.closes, [channel])
        channel.closed()
        e = self.failureResultOf(d, SSHCommandFailed).value
        self.assertEqual(e.command, "runner")
        self.assertIn("command 'runner' was refused by the server", str(e))
        self.assertIn(self.endpoint, str(e))
        self.assertEqual(self.session.processes, [])

    def test_channel_refused(self) -> None:
        d = self.session.start("runner", self.out)
        channel: Any = self.conn.opened[0]
        channel.openFailed(Exception("open failed"))
        e = self.failureResultOf(d, SSHCommandFailed).value
        self.assertIn("could not get a session channel: open failed", e.reason)

    def test_connection_already_lost(self) -> None:
        self.conn.transport.lost = True
        self.conn.transport.ended_because = "server disconnected: bye (code 11)"
        e = self.failureResultOf(self.session.start("runner", self.out), SSHCommandFailed).value
        self.assertIn("'runner' could not start: server disconnected: bye", str(e))
        self.assertEqual(self.conn.opened, [])

    def test_connection_lost_mid_way(self) -> None:
        process, channel = self.start()
        channel.extReceived(1, b"last words\n")
        self.conn.transport.lost = True
        self.conn.transport.ended_because = "server disconnected: bye (code 11)"
        channel.closed()
        e = self.failureResultOf(process.ended, SSHCommandFailed).value
        self.assertIn("'runner' was cut off: server disconnected: bye", str(e))
        self.assertEqual(e.partial, CommandResult("runner", None, b"", b"last words\n"))
        self.assertFalse(process.running)
        self.assertRaises(SSHCommandFailed, process.write, b"x")

    def test_cancel_before_the_channel_opened(self) -> None:
        d = self.session.start("runner", self.out)
        channel: Any = self.conn.opened[0]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.conn.channelsToRemoteChannel[channel] = 1
        channel.channelOpen(b"")
        self.assertEqual(self.conn.requests, [])  # nothing run
        self.assertEqual(self.conn.closes, [channel])
        channel.closed()
        self.assertEqual(self.session.processes, [])

    def test_stop_when_it_exits_on_eof(self) -> None:
        process, channel = self.start()
        stopped = process.stop(grace=3.0)
        self.assertEqual(self.conn.events, ["EOF"])
        self.clock.advance(1.0)
        channel.request_exit_status(struct.pack(">L", 0))
        channel.closeReceived()
        self.assertNoResult(stopped)
        channel.closed()
        self.successResultOf(stopped)
        self.successResultOf(process.stop())
        self.assertEqual(self.successResultOf(process.ended).exit_status, 0)
        self.assertNotIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_kills_after_grace(self) -> None:
        process, channel = self.start(pid=4321)
        stopped = process.stop(grace=3.0)
        again = process.stop(grace=100.0)  # changes nothing
        self.clock.advance(2.9)
        self.assertNotIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        self.assertEqual(len(self.conn.opened), 1)
        self.clock.advance(0.1)
        self.assertIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        # its process group is killed from a second channel
        killer = self.killer()
        self.assertEqual(self.conn.closes, [])  # the server closes it once it died
        self.assertEqual(len(self.session._closing), 1)  # the next command waits
        channel.request_exit_signal(NS(b"KILL") + b"\x00" + NS(b"") + NS(b""))
        channel.closeReceived()
        channel.closed()
        self.successResultOf(stopped)
        self.successResultOf(again)
        result = self.successResultOf(process.ended)
        self.assertEqual((result.exit_status, result.signal), (None, "KILL"))
        self.assertEqual(self.session._closing, [])
        killer.request_exit_status(struct.pack(">L", 0))
        killer.closed()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_closes_when_the_kill_is_ignored(self) -> None:
        process, channel = self.start()
        stopped = process.stop(grace=1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.conn.closes, [])
        self.clock.advance(KILL_GRACE)
        self.assertEqual(self.conn.closes, [channel])
        self.assertNoResult(stopped)
        self.clock.advance(CLOSE_GRACE)  # the server never confirms: fire anyway
        self.successResultOf(stopped)
        channel.closed()
        result = self.successResultOf(process.ended)
        self.assertEqual((result.exit_status, result.signal), (None, None))

    def test_stop_default_grace(self) -> None:
        process, channel = self.start()
        process.stop()
        self.clock.advance(STOP_GRACE - 0.1)
        self.assertNotIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        self.clock.advance(0.1)
        self.assertIn((b"signal", NS(b"KILL"), False), self.conn.requests)

    def test_session_close_kills_started_commands(self) -> None:
        process, channel = self.start(pid=4321)
        closing = self.session.close()
        self.assertIn((b"signal", NS(b"KILL"), False), self.conn.requests)
        self.assertFalse(self.conn.transport.closed)  # not before the kill ran
        killer = self.killer()
        killer.request_exit_status(struct.pack(">L", 0))
        killer.closed()
        self.assertEqual(self.conn.closes, [channel])
        self.assertTrue(self.conn.transport.closed)
        # the connection goes before the server confirmed the close
        self.conn.transport.drop()
        channel.closed()
        self.successResultOf(closing)
        self.assertEqual(self.successResultOf(process.ended).exit_status, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_session_close_does_not_wait_long_for_the_kill(self) -> None:
        process, channel = self.start(pid=4321)
        closing = self.session.close()
        self.assertEqual(len(self.conn.opened), 2)  # the kill: never answered
        self.clock.advance(KILL_GRACE)
        self.assertEqual(self.conn.closes, [channel])
        self.assertTrue(self.conn.transport.closed)
        self.conn.transport.drop()
        self.successResultOf(closing)

    def test_session_close_without_started_commands(self) -> None:
        closing = self.session.close()
        self.assertTrue(self.conn.transport.closed)
        self.conn.transport.drop()
        self.successResultOf(closing)
        self.assertEqual(self.clock.getDelayedCalls(), [])
