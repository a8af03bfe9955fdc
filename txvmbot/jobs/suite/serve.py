"""Batches fed to a long-lived runner on a machine (``txvmbot suite --runner``).

A fresh process per batch pays the interpreter's start and the test
modules' imports again and again; a runner started once per machine pays
them once, as ``trial -j`` and pytest-xdist workers do. :class:`RunnerFeed`
holds one such runner (a :class:`~txvmbot.ssh.RemoteProcess`), writes each
batch's ids to its stdin, one a line, then ``#end TOKEN``, and collects its
stdout until the runner's end-of-batch packet for that token (a subunit v2
status ``exists`` for ``txvmbot:end-of-batch:TOKEN``; the token is random,
so no test's output can end a batch early). ``#list TOKEN`` asks the
runner for its test ids instead (:meth:`RunnerFeed.list`). The protocol is
the one :mod:`txvmbot.jobs.suite.remote_runner` speaks; any runner that
speaks it will do.
"""

from __future__ import annotations

import datetime
import io
import secrets
from typing import Any

from subunit.v2 import ByteStreamToStreamResult
from testtools import StreamResult
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.errors import TxvmbotError
from txvmbot.model import CommandResult

__all__ = [
    "ALONE",
    "END",
    "LIST",
    "MARK",
    "CannotList",
    "RunnerExited",
    "RunnerFeed",
    "listed",
    "runner_script",
]

#: The line that ends a batch on the runner's stdin (then the token).
END = "#end "
#: The line that asks the runner for its test ids (then the token).
LIST = "#list "
#: A line among a batch's ids: run the batch in a child process of the
#: runner, so that nothing its tests change reaches later batches.
ALONE = "#alone"
#: The test id of the runner's end-of-batch packet (then the token).
MARK = "txvmbot:end-of-batch:"
#: The test id of the packet that says why the runner cannot list (then the
#: token); its ``error`` attachment is the reason.
LIST_ERROR = "txvmbot:list-error:"
#: What follows the test id in that packet: its CRC32.
_CRC = 4


def runner_script() -> bytes:
    """The source of txvmbot's own runner, uploaded for ``{runner_py}``."""
    from importlib.resources import files

    return files("txvmbot.jobs.suite").joinpath("remote_runner.py").read_bytes()


class RunnerExited(TxvmbotError):
    """The runner ended in the middle of a batch; ``partial`` has what it
    wrote for the batch (stdout) and its stderr, and how it ended."""

    def __init__(self, command: str, partial: CommandResult) -> None:
        how = (
            f"signal {partial.signal}" if partial.signal else f"exit status {partial.exit_status}"
        )
        said = " ".join(partial.stderr.decode("utf-8", "replace").split())[-300:]
        super().__init__(
            f"the runner {command!r} ended ({how}) in the middle of a batch"
            + (f"; its stderr ends: {said}" if said else "")
        )
        self.command = command
        self.partial = partial


class CannotList(TxvmbotError):
    """The runner answered ``#list`` with why it cannot list its tests."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"the runner {command!r} cannot list its tests: {reason}")
        self.command = command
        self.reason = reason


def listed(stream: bytes) -> tuple[tuple[str, ...], str | None]:
    """The test ids in a runner's answer to ``#list`` (its ``exists``
    packets, in order, once each), and its reason if it could not list.
    Bytes that are not subunit are ignored."""
    ids: dict[str, None] = {}
    errors: list[str] = []

    class Listing(StreamResult):
        def status(
            self,
            test_id: str | None = None,
            test_status: str | None = None,
            test_tags: set[str] | None = None,
            runnable: bool = True,
            file_name: str | None = None,
            file_bytes: bytes | memoryview | None = None,
            eof: bool = False,
            mime_type: str | None = None,
            route_code: str | None = None,
            timestamp: datetime.datetime | None = None,
        ) -> None:
            if test_id is None or test_id.startswith(MARK):
                return
            if test_id.startswith(LIST_ERROR):
                if file_bytes:
                    errors.append(bytes(file_bytes).decode("utf-8", "replace"))
            elif test_status == "exists":
                ids.setdefault(test_id, None)

    ByteStreamToStreamResult(io.BytesIO(stream), non_subunit_name="stdout").run(Listing())
    return tuple(ids), ("".join(errors).strip() or "no reason given") if errors else None


class RunnerFeed:
    """One runner on one machine, fed one batch at a time."""

    log = Logger()

    def __init__(self, clock: IReactorTime, session: Any, command: str) -> None:
        self.clock = clock
        self.session = session
        self.command = command
        self.process: Any = None
        self._buffer = bytearray()
        self._mark = b""
        self._waiting: Deferred[CommandResult] | None = None
        self._timer: Any = None
        self._ended: CommandResult | Failure | None = None

    async def start(self) -> RunnerFeed:
        """Start the runner on the session; fires once the server runs it."""
        self.process = await self.session.start(self.command, self._received)
        self.process.ended.addBoth(self._exited)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self._ended is None

    def batch(self, ids: tuple[str, ...], bound: float, *, alone: bool = False) -> Deferred[CommandResult]:
        """Run ``ids`` (``alone``: in a child process of the runner, a
        request only txvmbot's own runner knows); fires with the batch's
        subunit bytes as ``stdout`` of a CommandResult (exit status 0: the
        runner is still up). Fails with SSHCommandTimeout after ``bound``
        seconds, RunnerExited if the runner ends first, SSHCommandFailed if
        the connection is lost."""
        token = secrets.token_hex(8)
        head = f"{ALONE}\n" if alone else ""
        return self._ask(head + "".join(f"{t}\n" for t in ids) + f"{END}{token}\n", token, bound)

    def list(self, bound: float) -> Deferred[tuple[str, ...]]:
        """Ask the runner for its test ids (``#list``); fires with them, in
        its order. Fails with CannotList if the runner says why it cannot,
        and as :meth:`batch` does otherwise."""
        token = secrets.token_hex(8)
        d = self._ask(f"{LIST}{token}\n", token, bound)

        def ids(result: CommandResult) -> tuple[str, ...]:
            found, error = listed(result.stdout)
            if error is not None:
                raise CannotList(self.command, error)
            return found

        return d.addCallback(ids)

    def _ask(self, request: str, token: str, bound: float) -> Deferred[CommandResult]:
        """Write ``request``; fire with what the runner writes up to the end
        packet for ``token``."""
        from txvmbot import ssh

        assert self._waiting is None, "one request at a time"
        self._mark = (MARK + token).encode("ascii")
        self._buffer = bytearray()
        d: Deferred[CommandResult] = Deferred(lambda _: self._cancel())
        if not self.running:
            d.errback(Failure(self._gone()))
            return d
        self._waiting = d
        self._timer = self.clock.callLater(bound, self._time_up, bound)
        try:
            self.process.write(request.encode("utf-8"))
        except ssh.SSHCommandFailed as e:
            self._fire(Failure(e))
        return d

    def stop(self, grace: float = 5.0) -> Deferred[None]:
        """Close the runner's stdin (it exits at end of input); kill it if it
        is still there after ``grace`` seconds."""
        self._stop_waiting()
        d: Deferred[None] = self.process.stop(grace)
        return d

    # -- what the runner says ---------------------------------------------

    def _received(self, data: bytes) -> None:
        if self._waiting is None:
            if data.strip():
                self.log.info("Runner {command!r} wrote between batches: {n} bytes", command=self.command, n=len(data))
            return
        searched = max(0, len(self._buffer) - len(self._mark) - _CRC)
        self._buffer += data
        at = self._buffer.find(self._mark, searched)
        if at < 0 or len(self._buffer) < at + len(self._mark) + _CRC:
            return
        end = at + len(self._mark) + _CRC
        stdout = bytes(self._buffer[:end])
        self._fire(CommandResult(self.command, 0, stdout, b""))

    def _exited(self, outcome: CommandResult | Failure) -> None:
        self._ended = outcome
        if self._waiting is not None:
            self._fire(Failure(self._gone()))

    def _gone(self) -> Exception:
        from txvmbot import ssh

        outcome = self._ended
        if isinstance(outcome, CommandResult):
            partial = CommandResult(
                self.command, outcome.exit_status, bytes(self._buffer), outcome.stderr, signal=outcome.signal
            )
            return RunnerExited(self.command, partial)
        if isinstance(outcome, Failure) and isinstance(outcome.value, ssh.SSHCommandFailed):
            e = outcome.value
            partial = CommandResult(self.command, None, bytes(self._buffer), e.partial.stderr)
            return ssh.SSHCommandFailed(e.endpoint, e.user, self.command, e.reason, partial)
        partial = CommandResult(self.command, None, bytes(self._buffer), b"")
        return ssh.SSHCommandFailed(
            self.session.endpoint, self.session.user, self.command, "the runner is not running", partial
        )

    def _time_up(self, bound: float) -> None:
        from txvmbot import ssh

        self._timer = None
        partial = CommandResult(self.command, None, bytes(self._buffer), b"")
        self._fire(
            Failure(ssh.SSHCommandTimeout(self.session.endpoint, self.session.user, self.command, bound, partial))
        )

    def _fire(self, outcome: CommandResult | Failure) -> None:
        d = self._stop_waiting()
        if d is not None:
            d.callback(outcome) if isinstance(outcome, CommandResult) else d.errback(outcome)

    def _cancel(self) -> None:
        self._stop_waiting()

    def _stop_waiting(self) -> Deferred[CommandResult] | None:
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return d
