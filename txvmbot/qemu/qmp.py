"""A QMP client on Twisted.

QMP (the QEMU Machine Protocol) is line-delimited JSON on a unix socket:
QEMU greets (``{"QMP": {...}}``), the client sends ``qmp_capabilities``, then
each ``{"execute": ..., "arguments": ..., "id": ...}`` gets one
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` carrying
the same ``id``, in order. Asynchronous events (``SHUTDOWN``, ``STOP``,
``RESUME``, ``MIGRATION``...) may come between answers at any time.

``connect_qmp`` connects, waits for the greeting and negotiates
capabilities; ``QMPProtocol.execute`` sends one command and fires with the
value of its ``return``. Losing the connection fails every pending command
with ``QMPConnectionLost``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from txvmbot.errors import TxvmbotError

__all__ = [
    "QMPConnectionLost",
    "QMPError",
    "QMPEvent",
    "QMPProtocol",
    "QMPProtocolError",
    "QMPTimeout",
    "connect_qmp",
]


class QMPError(TxvmbotError):
    """QEMU answered a command with an error: its ``error_class``
    (``GenericError``, ``CommandNotFound``, ``DeviceNotFound``...) and
    ``desc``."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class QMPConnectionLost(TxvmbotError):
    """The QMP connection closed before the answer came (QEMU exited, or the
    socket was closed)."""

    def __init__(self, command: str, reason: str) -> None:
        super().__init__(f"QMP {command}: connection lost before an answer: {reason}")
        self.command = command
        self.reason = reason


class QMPProtocolError(TxvmbotError):
    """QEMU sent something that is not QMP (not JSON, no greeting, an answer
    nobody asked for)."""


class QMPTimeout(TxvmbotError):
    """No QMP session within the bound: says where and what was seen last."""

    def __init__(self, path: str, bound: float, last_error: str) -> None:
        super().__init__(
            f"QMP at {path}: no session within {bound:g}s; last error: {last_error or 'none'}"
        )
        self.path = path
        self.bound = bound
        self.last_error = last_error


@frozen
class QMPEvent:
    """One asynchronous event: its name, its data, and QEMU's timestamp (in
    seconds since the epoch, or None when QEMU sent none)."""

    name: str
    data: dict[str, Any] = field(factory=dict)
    timestamp: float | None = None


EventListener = Callable[[QMPEvent], None]


class QMPProtocol(LineReceiver):
    """The client side of one QMP session.

    ``greeted`` fires with the greeting's ``QMP`` member once it arrives;
    ``negotiate()`` sends ``qmp_capabilities``. ``execute`` may be called
    before negotiation completes; QEMU answers in order anyway.
    """

    delimiter = b"\n"
    # query-* answers can be large (query-qmp-schema is ~200 KB).
    MAX_LENGTH = 16 * 1024 * 1024
    log = Logger()

    def __init__(self) -> None:
        self.greeting: dict[str, Any] | None = None
        self._greeted: list[Deferred[dict[str, Any]]] = []
        self._closed: list[Deferred[None]] = []
        self._pending: dict[str, tuple[str, Deferred[Any]]] = {}
        self._order: list[str] = []
        self._listeners: list[EventListener] = []
        self._next_id = 0
        self._lost: str | None = None

    # -- public ---------------------------------------------------------

    @property
    def lost(self) -> str | None:
        """Why the connection was lost, or None while it is up."""
        return self._lost

    def when_greeted(self) -> Deferred[dict[str, Any]]:
        """Fire with the greeting (``{"version": ..., "capabilities": ...}``)."""
        if self.greeting is not None:
            return succeed(self.greeting)
        if self._lost is not None:
            return _failed(QMPConnectionLost("greeting", self._lost))
        d: Deferred[dict[str, Any]] = Deferred(lambda d: self._greeted.remove(d))
        self._greeted.append(d)
        return d

    def when_closed(self) -> Deferred[None]:
        """Fire when the connection is lost."""
        if self._lost is not None:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._closed.remove(d))
        self._closed.append(d)
        return d

    def negotiate(self) -> Deferred[Any]:
        """Leave capabilities negotiation mode so commands are accepted."""
        return self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Deferred[Any]:
        """Send ``command``; fire with the value of its ``return`` member (a
        dict for most commands, a list for some ``query-*``), or fail with
        QMPError (QEMU refused it) or QMPConnectionLost.

        Cancelling only stops waiting: the command was sent and QEMU will run
        it; its answer is then dropped.
        """
        if self._lost is not None or self.transport is None:
            return _failed(QMPConnectionLost(command, self._lost or "not connected"))
        self._next_id += 1
        cid = f"txvmbot-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": cid}
        if arguments is not None:
            msg["arguments"] = arguments

        def cancel(d: Deferred[Any]) -> None:
            # Keep the id in _order so the answer, when it comes, is
            # recognised and dropped.
            self._pending.pop(cid, None)

        d: Deferred[Any] = Deferred(cancel)
        self._pending[cid] = (command, d)
        self._order.append(cid)
        self.log.debug("QMP -> {command}", command=command, arguments=arguments)
        self.sendLine(json.dumps(msg).encode("utf-8"))
        return d

    def add_event_listener(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every asynchronous event."""
        self._listeners.append(listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def wait_event(
        self, name: str, predicate: Callable[[QMPEvent], bool] | None = None
    ) -> Deferred[QMPEvent]:
        """Fire with the next event called ``name`` (for which ``predicate``
        holds); fail with QMPConnectionLost if the connection goes first.
        Cancelling stops listening."""
        if self._lost is not None:
            return _failed(QMPConnectionLost(f"wait for {name}", self._lost))

        def listener(event: QMPEvent) -> None:
            if event.name == name and (predicate is None or predicate(event)):
                self.remove_event_listener(listener)
                closed.cancel()
                d.callback(event)

        def on_closed(result: object) -> None:
            self.remove_event_listener(listener)
            if not d.called:
                d.errback(QMPConnectionLost(f"wait for {name}", self._lost or "closed"))

        def cancel(_: Deferred[QMPEvent]) -> None:
            self.remove_event_listener(listener)
            closed.cancel()

        d: Deferred[QMPEvent] = Deferred(cancel)
        closed = self.when_closed()
        closed.addCallbacks(on_closed, lambda f: f.trap(CancelledError))
        self.add_event_listener(listener)
        return d

    def close(self) -> None:
        """Close the connection (pending commands fail with QMPConnectionLost)."""
        if self.transport is not None and self._lost is None:
            self.transport.loseConnection()

    # -- LineReceiver ---------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            self._garbled(f"not JSON: {line[:200]!r}")
            return
        if not isinstance(msg, dict):
            self._garbled(f"not a JSON object: {line[:200]!r}")
            return
        if "QMP" in msg:
            self._on_greeting(msg["QMP"])
        elif "event" in msg:
            self._on_event(msg)
        elif "return" in msg or "error" in msg:
            self._on_answer(msg)
        else:
            self._garbled(f"unknown message: {line[:200]!r}")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._garbled(f"line longer than {self.MAX_LENGTH} bytes")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lost is None:
            self._lost = reason.getErrorMessage() or "closed"
        pending = [self._pending[cid] for cid in self._order if cid in self._pending]
        self._pending.clear()
        self._order.clear()
        for command, d in pending:
            d.errback(QMPConnectionLost(command, self._lost))
        greeted, self._greeted = self._greeted, []
        for g in greeted:
            g.errback(QMPConnectionLost("greeting", self._lost))
        closed, self._closed = self._closed, []
        for c in closed:
            c.callback(None)

    # -- private --------------------------------------------------------

    def _garbled(self, why: str) -> None:
        self.log.error("QMP protocol error: {why}", why=why)
        self._lost = f"protocol error: {why}"
        if self.transport is not None:
            self.transport.loseConnection()

    def _on_greeting(self, greeting: Any) -> None:
        if self.greeting is not None:
            self._garbled("a second greeting")
            return
        self.greeting = greeting if isinstance(greeting, dict) else {"raw": greeting}
        greeted, self._greeted = self._greeted, []
        for g in greeted:
            g.callback(self.greeting)

    def _on_event(self, msg: dict[str, Any]) -> None:
        ts = msg.get("timestamp")
        timestamp: float | None = None
        if isinstance(ts, dict):
            timestamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        data = msg.get("data")
        event = QMPEvent(
            name=str(msg["event"]), data=data if isinstance(data, dict) else {}, timestamp=timestamp
        )
        self.log.debug("QMP event {name}", name=event.name, data=event.data)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self.log.failure("QMP event listener for {name} failed", name=event.name)

    def _on_answer(self, msg: dict[str, Any]) -> None:
        cid = msg.get("id")
        if cid is None:
            # QEMU answers a request it could not parse without an id; it
            # is the oldest outstanding one, since answers come in order.
            if not self._order:
                self._garbled(f"an answer nobody asked for: {json.dumps(msg)[:200]}")
                return
            cid = self._order[0]
        if cid not in self._order:
            self._garbled(f"an answer with unknown id {cid!r}")
            return
        # Everything before it was answered, or will never be.
        self._order.remove(cid)
        entry = self._pending.pop(cid, None)
        if entry is None:
            return  # cancelled
        command, d = entry
        if "error" in msg:
            err = msg["error"] if isinstance(msg["error"], dict) else {}
            d.errback(
                QMPError(command, str(err.get("class", "?")), str(err.get("desc", msg["error"])))
            )
        else:
            d.callback(msg["return"])


def _failed(e: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    call: list[IDelayedCall] = []

    def cancel(d: Deferred[None]) -> None:
        if call and call[0].active():
            call[0].cancel()

    d: Deferred[None] = Deferred(cancel)
    call.append(clock.callLater(seconds, d.callback, None))
    return d


def connect_qmp(
    reactor: Any,
    path: str,
    *,
    bound: float = 10.0,
    clock: IReactorTime | None = None,
    retry_delay: float = 0.05,
    still_worth_trying: Callable[[], str | None] | None = None,
) -> Deferred[QMPProtocol]:
    """Connect to the QMP unix socket at ``path``, wait for the greeting and
    negotiate capabilities; fire with the ready QMPProtocol.

    QEMU creates the socket a moment after it starts, so a refused or
    missing socket is retried every ``retry_delay`` seconds until ``bound``;
    then fail with QMPTimeout naming the last error. ``still_worth_trying()``
    returning a reason (e.g. "QEMU exited") stops the retries at once with a
    QMPConnectionLost carrying that reason. Cancelling stops the attempt and
    closes any connection made.
    """
    the_clock: IReactorTime = reactor if clock is None else clock
    return Deferred.fromCoroutine(
        _connect(reactor, path, bound, the_clock, retry_delay, still_worth_trying)
    )


async def _connect(
    reactor: Any,
    path: str,
    bound: float,
    clock: IReactorTime,
    retry_delay: float,
    still_worth_trying: Callable[[], str | None] | None,
) -> QMPProtocol:
    endpoint = clientFromString(reactor, f"unix:path={quoteStringArgument(path)}:timeout=5")
    start = clock.seconds()
    last_error = ""
    while True:
        if still_worth_trying is not None:
            why_not = still_worth_trying()
            if why_not:
                raise QMPConnectionLost("connect", why_not)
        remaining = bound - (clock.seconds() - start)
        if remaining <= 0:
            raise QMPTimeout(path, bound, last_error)
        proto: QMPProtocol | None = None
        try:
            attempt = endpoint.connect(Factory.forProtocol(QMPProtocol))
            attempt.addTimeout(remaining, clock)
            p = await attempt
            assert isinstance(p, QMPProtocol)
            proto = p
            greeting = proto.when_greeted()
            greeting.addTimeout(max(remaining - (clock.seconds() - start), 0.01), clock)
            await greeting
            negotiated = proto.negotiate()
            negotiated.addTimeout(max(bound - (clock.seconds() - start), 0.01), clock)
            await negotiated
            return proto
        except QMPError:
            if proto is not None:
                proto.close()
            raise
        except CancelledError:
            # The caller cancelled (our own bounds fail with TimeoutError).
            if proto is not None:
                proto.close()
            raise
        except Exception as e:  # any connect error is retried until the bound
            if proto is not None:
                proto.close()
            last_error = _short(e)
        except BaseException:
            if proto is not None:
                proto.close()
            raise
        await _sleep(clock, retry_delay)


def _short(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "no socket yet"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    name = e.__class__.__name__
    msg = str(e)
    if "No such file" in msg:
        return "no socket yet"
    if "refused" in msg.lower():
        return "connection refused"
    return f"{name}: {msg}" if msg else name
