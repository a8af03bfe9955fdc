"""Reading Deferreds that have fired, in tests of parts that answer at once
(the SQLite stores, the local Scheduler over one)."""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


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
