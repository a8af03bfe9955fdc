"""Run commands over one ssh session; wait until a fresh machine takes ssh."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.conch.ssh.keys import Key
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.errors import SSHError
from txvmbot.model import CommandResult
from txvmbot.ssh._protocol import (
    DEFAULT_MAX_OUTPUT,
    _ChannelError,
    _CommandTimedOut,
    connect,
)
from txvmbot.ssh._values import (
    SSHCommandFailed,
    SSHCommandTimeout,
    SSHConnectError,
    SSHOutcome,
    SSHWaitTimeout,
)

log = Logger(namespace="txvmbot.ssh")


def run_commands(
    reactor: Any,
    endpoint: str,
    user: str,
    key: Key,
    commands: Sequence[str],
    *,
    command_timeout: float,
    connect_timeout: float,
    clock: IReactorTime | None = None,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> Deferred[SSHOutcome]:
    """Open one ssh session to the client endpoint string ``endpoint`` and run
    each command, in order, in its own exec channel.

    Fires with an SSHOutcome: the host key seen and one CommandResult per
    command (a non-zero exit or a signal is a result, not an error). Fails
    with SSHConnectError (or its subclasses SSHAuthenticationError,
    SSHHostKeyError) if no session could be had within ``connect_timeout``;
    with SSHCommandTimeout if a command runs past ``command_timeout`` (its
    output so far and the earlier results are on the error); with
    SSHCommandFailed if a command was cut off. Later commands are not run
    after a failure. Cancelling aborts the connection. The connection is
    closed before the Deferred fires.
    """
    commands = tuple(commands)
    the_clock: IReactorTime = reactor if clock is None else clock
    return Deferred.fromCoroutine(
        _run(
            reactor,
            endpoint,
            user,
            key,
            commands,
            command_timeout,
            connect_timeout,
            the_clock,
            max_output,
        )
    )


async def _run(
    reactor: Any,
    endpoint: str,
    user: str,
    key: Key,
    commands: tuple[str, ...],
    command_timeout: float,
    connect_timeout: float,
    clock: IReactorTime,
    max_output: int,
) -> SSHOutcome:
    session = await connect(
        reactor, endpoint, user, key, connect_timeout=connect_timeout, clock=clock
    )
    results: list[CommandResult] = []
    try:
        for command in commands:
            try:
                result = await session.execute(command, command_timeout, max_output)
            except _CommandTimedOut as e:
                raise SSHCommandTimeout(
                    endpoint,
                    user,
                    command,
                    e.bound,
                    e.partial,
                    tuple(results),
                    session.host_key_fingerprint,
                    session.host_key_type,
                ) from None
            except _ChannelError as e:
                raise SSHCommandFailed(
                    endpoint,
                    user,
                    command,
                    e.reason,
                    e.partial,
                    tuple(results),
                    session.host_key_fingerprint,
                    session.host_key_type,
                ) from None
            log.info(
                "ssh {command!r} on {endpoint}: {status}",
                command=command,
                endpoint=endpoint,
                status=_status(result),
            )
            results.append(result)
    except SSHCommandFailed:
        # Close gracefully so that the kill request sent for a timed-out
        # command reaches the server before the connection goes (an abort
        # resets the connection, and the server drops what it had not read).
        await session.close()
        raise
    except BaseException:
        await session.abort()
        raise
    await session.close()
    return SSHOutcome(
        host_key_fingerprint=session.host_key_fingerprint,
        host_key_type=session.host_key_type,
        results=tuple(results),
    )


def _status(result: CommandResult) -> str:
    if result.signal is not None:
        return f"killed by signal {result.signal}"
    if result.exit_status is None:
        return "no exit status"
    return f"exit status {result.exit_status}"


def wait_for_ssh(
    reactor: Any,
    endpoint: str,
    user: str,
    key: Key,
    *,
    connect_timeout: float,
    bound: float,
    clock: IReactorTime | None = None,
    initial_delay: float = 0.5,
    max_delay: float = 5.0,
    on_attempt: Callable[[int, str], None] | None = None,
) -> Deferred[str]:
    """Try to connect and authenticate until it works or ``bound`` seconds
    have passed; fire with the host key fingerprint (``SHA256:...``).

    Each attempt has ``connect_timeout``; after a failed attempt the wait is
    ``initial_delay`` doubling up to ``max_delay``. ``on_attempt(n, error)``
    is called after each failed attempt ``n`` with its error in short words
    ("connection refused"). At the bound, an attempt in progress is aborted
    and the Deferred fails with SSHWaitTimeout (attempts, elapsed, last
    error). An invalid endpoint string fails at once. Cancelling stops the
    loop and aborts any connection in progress.
    """
    the_clock: IReactorTime = reactor if clock is None else clock

    def attempt() -> Deferred[str]:
        return Deferred.fromCoroutine(
            _probe(reactor, endpoint, user, key, connect_timeout, the_clock)
        )

    return _Waiter(
        attempt,
        the_clock,
        endpoint=endpoint,
        user=user,
        bound=bound,
        initial_delay=initial_delay,
        max_delay=max_delay,
        on_attempt=on_attempt,
    ).start()


async def _probe(
    reactor: Any, endpoint: str, user: str, key: Key, connect_timeout: float, clock: IReactorTime
) -> str:
    session = await connect(
        reactor, endpoint, user, key, connect_timeout=connect_timeout, clock=clock
    )
    try:
        await session.close()
    except BaseException:
        await session.abort()
        raise
    return session.host_key_fingerprint


def _short(f: Failure) -> str:
    """An attempt's error in short words."""
    if isinstance(f.value, SSHConnectError):
        return f.value.reason
    return str(f.value) or type(f.value).__name__


class _Waiter:
    """The retry loop of wait_for_ssh: attempt, back off, attempt, until an
    attempt succeeds, the bound passes, or somebody cancels.

    ``attempt`` returns a cancellable Deferred firing with the fingerprint.
    States: attempting (``_current``), sleeping (``_sleep``), finished
    (``_result.called`` or ``_stopping``).
    """

    def __init__(
        self,
        attempt: Callable[[], Deferred[str]],
        clock: IReactorTime,
        *,
        endpoint: str,
        user: str,
        bound: float,
        initial_delay: float,
        max_delay: float,
        on_attempt: Callable[[int, str], None] | None,
    ) -> None:
        self._attempt = attempt
        self._clock = clock
        self._endpoint = endpoint
        self._user = user
        self._bound = bound
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self._on_attempt = on_attempt
        self._attempts = 0
        self._last_error = ""
        self._started = 0.0
        self._current: Deferred[str] | None = None
        self._sleep: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._stopping = False
        self._result: Deferred[str] = Deferred(self._cancel)

    def start(self) -> Deferred[str]:
        self._started = self._clock.seconds()
        self._deadline = self._clock.callLater(self._bound, self._time_up)
        self._try()
        return self._result

    def delay(self, attempt: int) -> float:
        """How long to wait after failed attempt number ``attempt``."""
        return float(min(self._max_delay, self._initial_delay * 2 ** (attempt - 1)))

    def _try(self) -> None:
        self._sleep = None
        self._attempts += 1
        log.debug(
            "ssh to {endpoint}: attempt {attempt}", endpoint=self._endpoint, attempt=self._attempts
        )
        d = self._current = self._attempt()
        d.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, fingerprint: str) -> None:
        self._current = None
        if self._stopping:
            return
        log.info(
            "ssh to {endpoint} ready after {attempts} attempt(s), {elapsed:.1f}s",
            endpoint=self._endpoint,
            attempts=self._attempts,
            elapsed=self._clock.seconds() - self._started,
        )
        self._finish(fingerprint)

    def _failed(self, f: Failure) -> None:
        self._current = None
        if self._stopping:
            return
        if not f.check(SSHError) or (
            isinstance(f.value, SSHConnectError) and not f.value.transient
        ):
            self._finish(f)
            return
        self._last_error = _short(f)
        log.info(
            "waiting for ssh to {endpoint} (attempt {attempt}: {error})",
            endpoint=self._endpoint,
            attempt=self._attempts,
            error=self._last_error,
        )
        if self._on_attempt is not None:
            try:
                self._on_attempt(self._attempts, self._last_error)
            except Exception:
                log.failure("on_attempt callback failed")
        self._sleep = self._clock.callLater(self.delay(self._attempts), self._try)

    def _time_up(self) -> None:
        self._deadline = None
        self._stopping = True
        if self._sleep is not None and self._sleep.active():
            self._sleep.cancel()
        self._sleep = None
        current, self._current = self._current, None
        if current is not None:
            # wait for the aborted attempt to let go of its connection
            if not self._last_error:
                self._last_error = f"attempt {self._attempts} did not finish"
            current.cancel()
            current.addBoth(lambda ignored: self._finish(self._timeout()))
        else:
            self._finish(self._timeout())

    def _timeout(self) -> Failure:
        return Failure(
            SSHWaitTimeout(
                self._endpoint,
                self._user,
                self._bound,
                self._attempts,
                self._clock.seconds() - self._started,
                self._last_error,
            )
        )

    def _cancel(self, d: Deferred[str]) -> None:
        self._stopping = True
        self._stop_timers()
        current, self._current = self._current, None
        if current is not None:
            current.cancel()

    def _stop_timers(self) -> None:
        for call in (self._sleep, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._sleep = self._deadline = None

    def _finish(self, outcome: str | Failure) -> None:
        self._stopping = True
        self._stop_timers()
        if self._result.called:
            return
        if isinstance(outcome, Failure):
            self._result.errback(outcome)
        else:
            self._result.callback(outcome)
