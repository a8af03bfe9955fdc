"""One command in its own exec channel of an ssh connection: the channel,
the error of a command that did not run to its end, and the grace periods
of closing a channel. ``Session`` (``_protocol``) runs commands in these
channels; ``_process`` keeps one running."""

from __future__ import annotations

import struct
from typing import Any, Protocol, cast

from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR, SSHConnection
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.model import CommandResult

log = Logger(namespace="txvmbot.ssh")

#: How long a graceful close may take before the connection is aborted.
CLOSE_GRACE = 5.0

#: How long ``Session.run`` lets the server close a killed command's channel
#: (dropbear, closed on while the command still runs, garbles the next one).
KILL_GRACE = 2.0


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class _Link(Protocol):
    """What a channel asks of its connection's transport (``_protocol``'s
    ``_ClientTransport``): whether it was lost, and why."""

    lost: bool
    ended_because: str | None


class _ChannelError(Exception):
    """A command did not run to its end; carries what it produced so far."""

    def __init__(self, reason: str, partial: CommandResult) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial


class _CommandTimedOut(_ChannelError):
    def __init__(self, bound: float, partial: CommandResult) -> None:
        super().__init__(f"did not finish within {bound:g}s", partial)
        self.bound = bound


class _ExecChannel(SSHChannel):
    """A session channel that runs one command and collects its stdout,
    stderr and exit status or signal. ``done`` fires with a CommandResult,
    or fails with _ChannelError."""

    name = b"session"

    def __init__(self, command: str, conn: SSHConnection, max_output: int) -> None:
        SSHChannel.__init__(self, conn=conn)
        self._conn = conn
        self.command = command
        self.done: Deferred[CommandResult] = Deferred()
        self._max_output = max_output
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._truncated: set[str] = set()
        self.exit_status: int | None = None
        self.signal: str | None = None
        self._error: str | None = None
        #: fires once the channel has closed (or could not be opened)
        self.gone: Deferred[None] = Deferred()
        self._close_timer: IDelayedCall | None = None
        #: we stopped caring about the command (``abandon``)
        self.abandoned = False

    def exec_line(self) -> bytes:
        """What the exec request asks the server to run."""
        return self.command.encode("utf-8")

    def partial(self) -> CommandResult:
        return CommandResult(
            command=self.command,
            exit_status=self.exit_status,
            stdout=bytes(self._stdout),
            stderr=bytes(self._stderr),
            signal=self.signal,
        )

    # -- channel events

    def channelOpen(self, specificData: bytes) -> None:
        if self.abandoned:
            # abandoned while the server was opening it: run nothing
            self._conn.sendClose(self)
            return
        d = self._conn.sendRequest(self, b"exec", NS(self.exec_line()), wantReply=True)
        d.addCallbacks(self._exec_accepted, self._exec_refused)

    def _exec_accepted(self, ignored: object) -> None:
        # Nothing is sent on stdin: a command that reads it sees end of file.
        self._conn.sendEOF(self)

    def _exec_refused(self, reason: Failure) -> None:
        if self.localClosed:
            return  # the channel is closing; closed() reports why
        self._error = "was refused by the server (exec request failed)"
        self.loseConnection()

    def openFailed(self, reason: Any) -> None:
        why = getattr(reason, "value", reason)
        desc = getattr(why, "desc", None) or str(why)
        self._finish(
            _ChannelError(f"could not get a session channel: {_text(desc)}", self.partial())
        )

    def dataReceived(self, data: bytes) -> None:
        self._keep(self._stdout, data, "stdout")

    def extReceived(self, dataType: int, data: bytes) -> None:
        if dataType == EXTENDED_DATA_STDERR:
            self._keep(self._stderr, data, "stderr")

    def _keep(self, buf: bytearray, data: bytes, stream: str) -> None:
        room = self._max_output - len(buf)
        if len(data) > room:
            if stream not in self._truncated:
                self._truncated.add(stream)
                log.warn(
                    "ssh command {command!r}: {stream} passed {limit} bytes; the rest is dropped",
                    command=self.command,
                    stream=stream,
                    limit=self._max_output,
                )
            data = data[: max(room, 0)]
        buf.extend(data)

    def request_exit_status(self, data: bytes) -> bool:
        (self.exit_status,) = struct.unpack(">L", data[:4])
        return True

    def request_exit_signal(self, data: bytes) -> bool:
        name, rest = getNS(data)
        # RFC 4254 signal names come without "SIG": b"KILL", b"TERM", ...
        self.signal = name.decode("ascii", "replace")
        core = bool(rest[:1] and rest[0])
        message = getNS(rest[1:])[0] if len(rest) > 1 else b""
        log.info(
            "ssh command {command!r} killed by signal {signal}{core}{message}",
            command=self.command,
            signal=self.signal,
            core=" (core dumped)" if core else "",
            message=f": {_text(message)}" if message else "",
        )
        return True

    def eofReceived(self) -> None:
        pass

    def closed(self) -> None:
        transport = cast(_Link, self._conn.transport)
        if self._error is not None:
            self._finish(_ChannelError(self._error, self.partial()))
        elif self.exit_status is None and self.signal is None and transport.lost:
            why = transport.ended_because or "the connection was lost"
            self._finish(_ChannelError(f"was cut off: {why}", self.partial()))
        else:
            self._finish(self.partial())

    def _finish(self, result: CommandResult | _ChannelError) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if not self.gone.called:
            self.gone.callback(None)
        if self.done.called:
            return
        if isinstance(result, _ChannelError):
            self.done.errback(Failure(result))
        else:
            self.done.callback(result)

    def abandon(self, grace: float = 0.0, clock: IReactorTime | None = None) -> None:
        """Stop caring about the command: ask the server to kill it (best
        effort: OpenSSH >= 8.1 honours it for non-root logins only) and close
        the channel; with a ``grace`` (and a ``clock``), let the server close
        it once the command is dead, and close it only if that takes longer
        than ``grace``."""
        self.abandoned = True
        if self.localClosed or self not in self._conn.channelsToRemoteChannel:
            return  # not open yet (``channelOpen`` closes it), or closing
        self._conn.sendRequest(self, b"signal", NS(b"KILL"), wantReply=False)
        if grace > 0 and clock is not None:
            if self._close_timer is None:
                self._close_timer = clock.callLater(grace, self._close_now)
            return
        self._conn.sendClose(self)

    def _close_now(self) -> None:
        self._close_timer = None
        if self.localClosed or self not in self._conn.channelsToRemoteChannel:
            return
        self._conn.sendClose(self)


def _bounded(d: Deferred[None], clock: IReactorTime, bound: float) -> Deferred[None]:
    """``d``, but firing after ``bound`` seconds at the latest."""
    if d.called:
        return d
    result: Deferred[None] = Deferred()

    def fire(ignored: object = None) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(None)

    timer = clock.callLater(bound, fire)
    d.addBoth(fire)
    return result
