"""Reading and awaiting Deferreds in tests: ``result_of`` for parts that
answer at once (the SQLite stores, the local Scheduler over one), ``failed``
for the error a Deferred must end in, ``within`` for a bounded wait on the
real reactor."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

reactor: Any = _reactor

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def result_of(d: Deferred[T]) -> T:
    """The result of ``d``, which must have fired; its failure is raised."""
    out: list[T | Failure] = []
    d.addBoth(out.append)
    if not out:
        raise AssertionError(f"{d!r} has not fired")
    r = out[0]
    if isinstance(r, Failure):
        r.raiseException()
    return r  # type: ignore[return-value]


async def failed(d: Deferred[Any], kind: type[E]) -> E:
    """Wait for ``d`` and return its error, which must be a ``kind``."""
    try:
        result = await d
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__}, got result {result!r}")


async def within(d: Deferred[T], seconds: float, what: str) -> T:
    """Wait for ``d``, failing the test if it did not fire within ``seconds``."""
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except CancelledError:
        if not timer.active():
            raise AssertionError(f"{what} did not happen within {seconds}s") from None
        raise
    finally:
        if timer.active():
            timer.cancel()


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after ``seconds`` on the real reactor."""
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds)
