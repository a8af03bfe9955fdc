"""Integration tests for ``Session.start`` and ``RemoteProcess`` (a
long-lived remote command fed on stdin, its stdout read as it comes)
against a real OpenSSH sshd on 127.0.0.1 (tests/support/sshd_case.py, one
per test, stopped by its pid). The commands it runs are this machine's, so
whether a killed one is gone is checked in /proc. Every wait is bounded.
"""

from __future__ import annotations

import shlex
import sys
import uuid
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred

from tests.support.deferreds import failed, within
from tests.support.processes import child_pids, kill_pids, seen
from tests.support.remote_output import Stdout
from tests.support.sshd_case import SSHDTestCase
from txvmbot.model import CommandResult
from txvmbot.ssh import (
    Session,
    SSHCommandFailed,
    open_session,
)

reactor: Any = _reactor


#: A line-by-line echo: each line read on stdin is written back uppercased
#: at once; it exits 0 at end of input.
UPPER = (
    "import sys\n"
    "while True:\n"
    "    line = sys.stdin.readline()\n"
    "    if not line:\n"
    "        break\n"
    "    sys.stdout.write(line.upper())\n"
    "    sys.stdout.flush()\n"
)


def python(code: str) -> str:
    """A shell command running ``code`` with this interpreter (the sshd's
    commands run on this machine)."""
    return f"{shlex.quote(sys.executable)} -u -c {shlex.quote(code)}"


# -- against a real sshd -------------------------------------------------------------


class ProcessTests(SSHDTestCase):
    """A real sshd a test (SSHDTestCase's)."""

    async def session(self) -> Session:
        session = await within(
            open_session(reactor, self.sshd.endpoint, self.sshd.user, self.key, connect_timeout=10),
            15,
            "connecting",
        )
        self.addCleanup(session.abort)
        return session

    async def test_interactive_echo(self) -> None:
        session = await self.session()
        out = Stdout()
        process = await within(session.start(python(UPPER), out), 10, "start")
        self.assertTrue(process.running)
        for word in (b"one", b"two", b"three"):
            process.write(word + b"\n")
            # each echo comes back while the command still runs
            await out.until(word.upper() + b"\n")
            self.assertFalse(process.ended.called)
        self.assertEqual(out.data, b"ONE\nTWO\nTHREE\n")
        self.assertGreaterEqual(len(out.chunks), 3)
        process.close_stdin()
        result = await within(process.ended, 10, "the command ending")
        self.assertEqual(result, CommandResult(python(UPPER), 0, b"", b""))
        self.assertFalse(process.running)
        e = self.assertRaises(SSHCommandFailed, process.write, b"late\n")
        self.assertIn("has ended (exit status 0): cannot write to its stdin", str(e))
        # the session is still good for more
        self.assertEqual((await session.run("echo next", 10)).stdout, b"next\n")

    async def test_many_batches_past_the_window(self) -> None:
        # 3 MB in one write, past OpenSSH's 2 MB channel window: the EOF
        # goes after the last of it
        session = await self.session()
        out = Stdout()
        process = await within(session.start("wc -c", out), 10, "start")
        for _ in range(3):
            process.write(b"x" * 1_000_000)
        process.close_stdin()
        result = await within(process.ended, 20, "the command ending")
        self.assertEqual(result.exit_status, 0)
        self.assertEqual(out.data.strip(), b"3000000")

    async def test_exits_by_itself(self) -> None:
        session = await self.session()
        out = Stdout()
        process = await within(session.start("echo out; echo err >&2; exit 3", out), 10, "start")
        result = await within(process.ended, 10, "the command ending")
        self.assertEqual(
            (result.exit_status, result.stdout, result.stderr, result.signal),
            (3, b"", b"err\n", None),
        )
        self.assertEqual(out.data, b"out\n")
        self.assertFalse(process.running)
        self.assertRaises(SSHCommandFailed, process.write, b"x")

    async def test_stderr_keeps_the_end(self) -> None:
        session = await self.session()
        code = "import sys; sys.stderr.write('x' * 100000 + 'END'); sys.stderr.flush()"
        process = await within(session.start(python(code), Stdout(), max_stderr=100), 10, "start")
        result = await within(process.ended, 10, "the command ending")
        self.assertEqual(result.stderr, b"x" * 97 + b"END")

    async def test_stop_kills_a_command_that_ignores_eof(self) -> None:
        session = await self.session()
        marker = f"sleep 30.{uuid.uuid4().int % 10**6}"
        process = await within(session.start(marker, Stdout()), 10, "start")
        await seen(marker)
        begun = reactor.seconds()
        await within(process.stop(grace=0.5), 10, "stop")
        elapsed = reactor.seconds() - begun
        self.assertTrue(0.5 <= elapsed < 5, elapsed)
        result = await within(process.ended, 1, "ended after stop")
        self.assertEqual((result.exit_status, result.signal), (None, "KILL"))
        self.assertFalse(process.running)
        await seen(marker, present=False)
        await within(process.stop(), 1, "stop again")
        self.assertEqual((await session.run("echo next", 10)).stdout, b"next\n")

    async def test_stop_does_not_wait_for_a_command_that_exits_on_eof(self) -> None:
        session = await self.session()
        process = await within(session.start("cat", Stdout()), 10, "start")
        begun = reactor.seconds()
        await within(process.stop(grace=20), 10, "stop")
        self.assertLess(reactor.seconds() - begun, 5)
        result = await within(process.ended, 1, "ended after stop")
        self.assertEqual(result.exit_status, 0)

    async def test_connection_dies_mid_way(self) -> None:
        session = await self.session()
        out = Stdout()
        command = "echo warming up >&2; sleep 0.2; echo ready; exec cat"
        process = await within(session.start(command, out), 10, "start")
        await out.until(b"ready\n")
        process.write(b"ping\n")
        await out.until(b"ping\n")
        # the sshd listener and the processes serving our connection
        kill_pids([self.sshd.pid, *child_pids(self.sshd.pid)])
        e = await within(
            Deferred.fromCoroutine(failed(process.ended, SSHCommandFailed)), 10, "ended failing"
        )
        self.assertIn("command 'echo warming up", str(e))
        self.assertIn("was cut off", e.reason)
        self.assertEqual(e.partial, CommandResult(command, None, b"", b"warming up\n"))
        self.assertFalse(process.running)
        self.assertRaises(SSHCommandFailed, process.write, b"x")
        self.assertTrue(session.lost)
        e2 = await failed(session.start("cat", out), SSHCommandFailed)
        self.assertIn("could not start", e2.reason)

    async def test_session_abort_fails_ended(self) -> None:
        session = await self.session()
        process = await within(session.start("cat", Stdout()), 10, "start")
        await within(session.abort(), 10, "abort")
        e = await within(
            Deferred.fromCoroutine(failed(process.ended, SSHCommandFailed)), 10, "ended failing"
        )
        self.assertIn("was cut off: the connection was lost", str(e))

    async def test_session_close_kills_started_commands(self) -> None:
        session = await self.session()
        marker = f"sleep 30.{uuid.uuid4().int % 10**6}"
        process = await within(session.start(marker, Stdout()), 10, "start")
        await seen(marker)
        await within(session.close(), 10, "close")
        result = await within(process.ended, 5, "ended after close")
        self.assertIsNone(result.exit_status)
        await seen(marker, present=False)

    async def test_on_stdout_raising_does_not_break_the_channel(self) -> None:
        session = await self.session()
        out = Stdout()

        def on_stdout(data: bytes) -> None:
            out(data)
            if len(out.chunks) == 1:
                raise ZeroDivisionError("bug in the caller")

        process = await within(session.start(python(UPPER), on_stdout), 10, "start")
        process.write(b"a\n")
        await out.until(b"A\n")
        process.write(b"b\n")
        await out.until(b"B\n")
        process.close_stdin()
        self.assertEqual((await within(process.ended, 10, "ending")).exit_status, 0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
