"""Group commit, the policy written once: items that arrive together are
written together, one write for the group, and an item is answered only
once its write is done.

A commit costs several times the rows it writes, so the daemon stores
many submits to a commit. Two places group them with this class:

- the AMP server (txvmbot.daemon.api.server) holds the submits of one read
  of a connection and hands them to the scheduler with one ``submit_many``
  when the read ends (:meth:`GroupCommit.hold`, :meth:`GroupCommit.release`);
- the shared store's front end (txvmbot.daemon.scheduling.sharedqueue) allows
  at most two insert transactions in flight; the submits of every
  connection that arrive meanwhile go together in the next one
  (``in_flight=2``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Items written a group at a time by ``write``.

    :param write: writes a group of items (in the order they came) and
        fires with one result per item, in that order; a failure fails
        every item of the group (none was written).
    :param in_flight: the most writes under way at once; items that come
        while that many are under way wait, and all of them go in the next
        write when one ends. None: no bound (each group is written at once).

    Items also wait while the group is held (:meth:`hold`) and go when it
    is released, or when :meth:`flush` says so.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Deferred[Sequence[R]]],
        *,
        in_flight: int | None = 1,
    ) -> None:
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be at least 1 or None, not {in_flight!r}")
        self._write = write
        self._in_flight = in_flight
        self._waiting: list[tuple[T, Deferred[R]]] = []
        self._writing = 0
        self._held = 0

    @property
    def waiting(self) -> int:
        """Items not yet handed to ``write``."""
        return len(self._waiting)

    @property
    def writing(self) -> int:
        """Writes under way."""
        return self._writing

    def add(self, item: T) -> Deferred[R]:
        """Write ``item`` with its group; fires with its result once the
        group's write is done."""
        d: Deferred[R] = Deferred()
        self._waiting.append((item, d))
        if not self._held:
            self.flush()
        return d

    def hold(self) -> None:
        """Let items gather until :meth:`release` (calls nest)."""
        self._held += 1

    def release(self) -> None:
        """End a :meth:`hold`; the items that gathered go (room permitting)."""
        self._held -= 1
        if not self._held:
            self.flush()

    def flush(self) -> None:
        """Hand the waiting items to ``write`` now, held or not, if fewer
        than ``in_flight`` writes are under way (else they go when one
        ends)."""
        if not self._waiting:
            return
        if self._in_flight is not None and self._writing >= self._in_flight:
            return
        group, self._waiting = self._waiting, []
        self._writing += 1
        try:
            written = self._write([item for item, _ in group])
        except Exception:
            self._done(Failure(), group)
            return
        written.addBoth(self._done, group)

    def _done(self, outcome: Sequence[R] | Failure, group: list[tuple[T, Deferred[R]]]) -> None:
        self._writing -= 1
        if not isinstance(outcome, Failure) and len(outcome) != len(group):
            outcome = Failure(
                ValueError(f"a write of {len(group)} items answered {len(outcome)} results")
            )
        if isinstance(outcome, Failure):
            for _, d in group:
                d.errback(outcome)
        else:
            for (_, d), result in zip(group, outcome, strict=True):
                d.callback(result)
        if not self._held:
            self.flush()
