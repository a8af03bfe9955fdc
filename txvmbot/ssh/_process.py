"""A long-lived remote command, talked to over its stdin and stdout.

``Session.start`` opens an exec channel, like ``Session.run``, but leaves
the command's stdin open: a test runner that stays up on a machine is fed
test ids batch after batch (``RemoteProcess.write``) and its stdout is handed
over as it arrives, not gathered until it exits. The channel is an
``_ExecChannel`` (exit status, signal, close and loss handling are the same
as ``run``'s) that writes to stdin and passes stdout on.

Killing a command is not left to the server alone: sshd honours the ssh
"signal" request only for non-root logins (OpenSSH >= 8.1; a root session
says "session signalling requires privilege separation"), dropbear not at
all, and neither kills a command when its channel or the connection closes.
So the command is run after ``echo txvmbot-pid=$$``: the first line of its
stdout (not passed on) names the shell sshd started, which leads its own
process group, and a kill is ``kill -9 -PID`` in a second exec channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR, SSHConnection
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.model import CommandResult
from txvmbot.ssh._channel import (
    CLOSE_GRACE,
    KILL_GRACE,
    _bounded,
    _ChannelError,
    _ExecChannel,
)
from txvmbot.ssh._values import SSHCommandFailed

log = Logger(namespace="txvmbot.ssh")

#: How long ``RemoteProcess.stop`` lets a command exit after its stdin was
#: closed, by default, before it kills it.
STOP_GRACE = 5.0

#: The first line of a started command's stdout: the pid of its shell.
PID_PREFIX = b"txvmbot-pid="

#: If the first line is not the pid line within this many bytes, it was not
#: (an odd login shell): stdout is passed on whole, and kills are signals.
_MAX_PID_LINE = 64


class _Session(Protocol):
    """What a started command needs of the ``Session`` (``_protocol``) it
    runs on; typed here so that this module does not import that one, which
    imports this one to start commands."""

    conn: SSHConnection
    clock: IReactorTime
    #: the channels of started commands that are still open
    processes: list[_ProcessChannel]

    @property
    def lost(self) -> bool: ...

    def lost_reason(self) -> str: ...

    def settled(self) -> Deferred[None]: ...

    def closing(self, gone: Deferred[None]) -> None: ...

    def execute(
        self, command: str, timeout: float, max_output: int = ..., *, kill_grace: float = ...
    ) -> Deferred[CommandResult]: ...

    def command_error(self, command: str, e: _ChannelError) -> SSHCommandFailed: ...

    def command_failed(
        self, command: str, reason: str, partial: CommandResult
    ) -> SSHCommandFailed: ...


class _ProcessChannel(_ExecChannel):
    """An exec channel whose command keeps its stdin open: stdout goes to
    ``on_stdout`` chunk by chunk, the last ``max_stderr`` bytes of stderr
    are kept. ``accepted`` fires once the server ran the command; ``done``
    as for ``_ExecChannel`` (stdout b"")."""

    def __init__(
        self,
        session: _Session,
        command: str,
        on_stdout: Callable[[bytes], None],
        max_stderr: int,
    ) -> None:
        _ExecChannel.__init__(self, command, session.conn, max_stderr)
        self._session = session
        self._on_stdout = on_stdout
        #: the remote shell's pid (and process group), from the first line
        self.pid: int | None = None
        self._head: bytes | None = b""  # None once the pid line was read
        self._killing: Deferred[None] | None = None
        self.accepted: Deferred[None] = Deferred()
        #: ``close_stdin`` was called (the EOF may wait for buffered input)
        self.stdin_closed = False
        self._eof_pending = False

    @property
    def exited(self) -> bool:
        """The command is over: it exited, died of a signal, or its channel
        is closed or closing."""
        return (
            self.exit_status is not None
            or self.signal is not None
            or bool(self.localClosed or self.remoteClosed)
            or self.gone.called
        )

    def exec_line(self) -> bytes:
        return b"echo " + PID_PREFIX + b"$$\n" + _ExecChannel.exec_line(self)

    # -- what the command is sent

    def _exec_accepted(self, ignored: object) -> None:
        # unlike run's, stdin stays open for ``write``
        if not self.accepted.called:
            self.accepted.callback(None)

    def write_stdin(self, data: bytes) -> None:
        # SSHChannel.write buffers what the server's window has no room for
        # and sends it as the window grows.
        self.write(data)

    def close_stdin(self) -> None:
        if self.stdin_closed:
            return
        self.stdin_closed = True
        if self.buf:
            self._eof_pending = True  # after the input still waiting for window
        else:
            self._conn.sendEOF(self)

    def addWindowBytes(self, data: int) -> None:
        SSHChannel.addWindowBytes(self, data)
        if self._eof_pending and not self.buf:
            self._eof_pending = False
            self._conn.sendEOF(self)

    # -- what it sends back

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            data = self._pid_line(self._head + data)
            if not data:
                return
        try:
            self._on_stdout(data)
        except Exception:
            log.failure(
                "ssh command {command!r}: on_stdout failed on {length} bytes of stdout",
                command=self.command,
                length=len(data),
            )

    def _pid_line(self, head: bytes) -> bytes:
        """Read the pid line off the start of stdout; return what follows
        it (or everything, if it is not there)."""
        line, newline, rest = head.partition(b"\n")
        if not PID_PREFIX.startswith(line[: len(PID_PREFIX)]) or (
            not newline and len(line) > _MAX_PID_LINE
        ):
            log.warn(
                "ssh command {command!r}: stdout did not start with its pid; "
                "it can only be killed by a signal",
                command=self.command,
            )
            self._head = None
            return head
        if not newline:
            self._head = head
            return b""
        self._head = None
        try:
            self.pid = int(line[len(PID_PREFIX) :])
        except ValueError:
            self.pid = None
        if self.pid is None or self.pid <= 1:
            self.pid = None
            log.warn(
                "ssh command {command!r}: not a pid line: {line!r}",
                command=self.command,
                line=line,
            )
        return rest

    def extReceived(self, dataType: int, data: bytes) -> None:
        if dataType != EXTENDED_DATA_STDERR:
            return
        self._stderr.extend(data)
        excess = len(self._stderr) - self._max_output
        if excess > 0:
            del self._stderr[:excess]
            if "stderr" not in self._truncated:
                self._truncated.add("stderr")
                log.info(
                    "ssh command {command!r}: stderr passed {limit} bytes; only the last "
                    "{limit} are kept",
                    command=self.command,
                    limit=self._max_output,
                )

    def closeReceived(self) -> None:
        # The command is gone: input still waiting for window will never be
        # read, and would hold our close back for good.
        self.buf = b""
        self.extBuf = []
        self._eof_pending = False
        SSHChannel.closeReceived(self)

    def kill(self) -> Deferred[None]:
        """Send the command SIGKILL: the "signal" request, and ``kill -9``
        on its process group in a second exec channel; the server closes the
        channel once it died, or it is closed ``KILL_GRACE`` later. Fires
        once the kill command ran (within ``KILL_GRACE``; it never fails)."""
        if self._killing is not None:
            return _chained(self._killing)
        self.abandon(KILL_GRACE, self._session.clock)
        if self.pid is None or self.exited or self._session.lost:
            self._killing = succeed(None)
            return succeed(None)
        line = f"kill -9 -{self.pid} 2>/dev/null || kill -9 {self.pid}"

        def done(outcome: CommandResult | Failure) -> None:
            if isinstance(outcome, Failure):
                log.info(
                    "ssh command {command!r}: could not run {kill!r}: {why}",
                    command=self.command,
                    kill=line,
                    why=outcome.getErrorMessage(),
                )
            elif not outcome.ok:
                log.info(
                    "ssh command {command!r}: {kill!r} exited {status}: {stderr}",
                    command=self.command,
                    kill=line,
                    status=outcome.exit_status,
                    stderr=outcome.stderr.decode("utf-8", "replace").strip(),
                )

        self._killing = self._session.execute(line, KILL_GRACE).addBoth(done)
        return _chained(self._killing)

    def closed(self) -> None:
        if self.abandoned and self._error is None:
            # stopped (``stop``, ``Session.close``): what it produced is its
            # result, even if the connection went before the server confirmed
            self._finish(self.partial())
        else:
            _ExecChannel.closed(self)


class RemoteProcess:
    """A command started with ``Session.start``, running in its own exec
    channel.

    ``write`` feeds its stdin, ``close_stdin`` ends it; its stdout goes to
    the ``on_stdout`` given to ``start``. ``ended`` fires with a
    CommandResult once the channel closed: the exit status or signal as
    ``run`` reports them, stdout b"", the kept stderr (exit_status None if
    ``stop`` or ``Session.close`` had to kill it); it fails with
    SSHCommandFailed (``partial`` keeps the stderr) if the connection was
    lost first. Give it an errback: nothing else reports that failure.
    ``running`` is False from the moment the command exited.
    """

    def __init__(self, session: _Session, channel: _ProcessChannel) -> None:
        self._session = session
        self._channel = channel
        self.command = channel.command
        self.ended: Deferred[CommandResult] = Deferred()
        self._stopping = False
        self._kill_timer: IDelayedCall | None = None
        self._stopped_waiters: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        """True until the command exits (or is killed, or cut off)."""
        return not self._channel.exited

    def write(self, data: bytes) -> None:
        """Send ``data`` to the command's stdin (buffered while the server's
        window is full). Raises SSHCommandFailed if the command has ended or
        its stdin was closed."""
        if self._channel.exited:
            partial = self._channel.partial()
            raise self._session.command_failed(
                self.command, f"{_how_it_ended(partial)}: cannot write to its stdin", partial
            )
        if self._channel.stdin_closed:
            raise self._session.command_failed(
                self.command,
                "cannot take more input: its stdin was closed",
                self._channel.partial(),
            )
        self._channel.write_stdin(data)

    def close_stdin(self) -> None:
        """Send end of file on the command's stdin, after the input still
        buffered. Does nothing if it was closed or the command has ended."""
        self._channel.close_stdin()

    def stop(self, grace: float = STOP_GRACE) -> Deferred[None]:
        """Close stdin and let the command exit; if it has not exited
        within ``grace`` seconds, send it SIGKILL and close its channel.
        Fires once the channel is closed (or ``KILL_GRACE`` +
        ``CLOSE_GRACE`` after the kill, if the server never confirms).
        Calling it again changes nothing and fires at the same time."""
        if self._channel.gone.called:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped_waiters.append(waiter)
        if self._stopping:
            return waiter
        self._stopping = True
        self._channel.close_stdin()
        self._kill_timer = self._session.clock.callLater(grace, self._kill, grace)
        self._channel.gone.addBoth(self._stopped)
        return waiter

    def _kill(self, grace: float) -> None:
        self._kill_timer = None
        log.info(
            "ssh command {command!r} still running {grace}s after its stdin was closed: killing it",
            command=self.command,
            grace=grace,
        )
        channel = self._channel
        # The server closes the channel once the command died; the next
        # command waits for that (dropbear garbles it otherwise).
        self._session.closing(channel.gone)
        channel.kill()
        _bounded(channel.gone, self._session.clock, KILL_GRACE + CLOSE_GRACE).addCallback(
            self._stopped
        )

    def _stopped(self, passthrough: object) -> object:
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for d in waiters:
            d.callback(None)
        return passthrough

    def _finished(self, outcome: CommandResult | Failure) -> None:
        if isinstance(outcome, Failure):
            e = outcome.value
            if isinstance(e, _ChannelError):
                outcome = Failure(self._session.command_error(self.command, e))
            self.ended.errback(outcome)
        else:
            self.ended.callback(outcome)


def start(
    session: _Session, command: str, on_stdout: Callable[[bytes], None], *, max_stderr: int
) -> Deferred[RemoteProcess]:
    """``Session.start``."""
    settled = session.settled()
    if not settled.called:
        return Deferred.fromCoroutine(
            _start_later(session, settled, command, on_stdout, max_stderr)
        )
    if session.lost:
        return fail(
            session.command_failed(
                command, f"could not start: {session.lost_reason()}", CommandResult(command, None)
            )
        )
    channel = _ProcessChannel(session, command, on_stdout, max_stderr)
    process: RemoteProcess | None = None

    def cancel(d: Deferred[RemoteProcess]) -> None:
        channel.abandon()

    result: Deferred[RemoteProcess] = Deferred(cancel)

    def accepted(ignored: None) -> None:
        nonlocal process
        if result.called:
            return  # cancelled: the channel is closing
        process = RemoteProcess(session, channel)
        log.debug("ssh started {command!r}", command=command)
        result.callback(process)

    def finished(outcome: CommandResult | Failure) -> None:
        if channel in session.processes:
            session.processes.remove(channel)
        if process is not None:
            process._finished(outcome)
        elif result.called:
            return  # cancelled before it started
        elif isinstance(outcome, Failure):
            e = outcome.value
            result.errback(
                session.command_error(command, e) if isinstance(e, _ChannelError) else outcome
            )
        else:
            reason = "was closed by the server before it started"
            result.errback(session.command_failed(command, reason, outcome))

    channel.accepted.addCallback(accepted)
    channel.done.addBoth(finished)
    session.processes.append(channel)
    log.debug("ssh starting {command!r}", command=command)
    session.conn.openChannel(channel)
    return result


async def _start_later(
    session: _Session,
    settled: Deferred[None],
    command: str,
    on_stdout: Callable[[bytes], None],
    max_stderr: int,
) -> RemoteProcess:
    await settled
    return await start(session, command, on_stdout, max_stderr=max_stderr)


def _how_it_ended(result: CommandResult) -> str:
    if result.exit_status is not None:
        return f"has ended (exit status {result.exit_status})"
    if result.signal is not None:
        return f"has ended (killed by signal {result.signal})"
    return "has ended"


def _chained(d: Deferred[None]) -> Deferred[None]:
    """A new Deferred that fires (None) when ``d`` does."""
    if d.called:
        return succeed(None)
    chained: Deferred[None] = Deferred()

    def fire(passthrough: object) -> object:
        chained.callback(None)
        return passthrough

    d.addBoth(fire)
    return chained
