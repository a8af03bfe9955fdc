"""The running daemon's writes to the shared database, off the reactor and
in order: the local scheduler's job updates and events
(:class:`~txvmbot.daemon.interfaces.IJobWriter`).

Writes queue here and go to the database a batch per transaction (group
commit): while one batch is in flight the next gathers. When the database
cannot be reached the batch stays queued and is tried again with backoff
(0.5 s doubling to 10 s), so a database restart loses nothing; each change
between reachable and not is logged once. Writes about a job another
daemon took over are dropped by the database (fenced by owner) and
reported to ``on_fenced``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon.interfaces import IJobWriter
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import Database, DatabaseUnavailable

__all__ = ["JobWriter"]

MIN_BACKOFF = 0.5
MAX_BACKOFF = 10.0


@implementer(IJobWriter)
class JobWriter:
    """Write-behind of one daemon's job updates and events.

    :param owner: returns the daemon's current lease owner id (the fence).
    :param on_state: called with True/False when writes start or stop
        reaching the database.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        db: Database,
        owner: Callable[[], str],
        host: str,
        *,
        wall: Callable[[], float],
        on_fenced: Callable[[set[str]], object] = lambda ids: None,
        on_state: Callable[[bool], object] = lambda ok: None,
    ) -> None:
        self._clock = clock
        self._db = db
        self._owner = owner
        self._host = host
        self._wall = wall
        self.on_fenced = on_fenced
        self._on_state = on_state
        self._updates: list[Job] = []
        self._events: list[JobEvent] = []
        self._in_flight = False
        self._retry: IDelayedCall | None = None
        self._backoff = MIN_BACKOFF
        self._reachable = True
        self._queued = 0  # writes handed to us
        self._written = 0  # writes committed (or dropped as fenced)
        self._waiters: list[tuple[int, Deferred[None]]] = []
        self._closed = False

    @property
    def pending(self) -> int:
        return self._queued - self._written

    # --- the scheduler's store ---------------------------------------------------

    def update(self, job: Job) -> None:
        self._updates.append(job)
        self._queued += 1
        self._kick()

    def add_event(self, event: JobEvent) -> None:
        self._events.append(event)
        self._queued += 1
        self._kick()

    def flushed(self) -> Deferred[None]:
        """Fires once every write handed over so far is in the database."""
        if self._written >= self._queued:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._queued, d))
        return d

    def close(self) -> None:
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    # --- batches -------------------------------------------------------------------

    def _kick(self) -> None:
        if self._in_flight or self._retry is not None or self._closed:
            return
        if not self._updates and not self._events:
            return
        updates, self._updates = self._updates, []
        events, self._events = self._events, []
        self._in_flight = True
        d = self._db.run(
            store.write_batch, self._owner(), self._host, updates, events, float(self._wall())
        )
        d.addCallbacks(self._written_ok, self._failed, callbackArgs=(updates, events),
                       errbackArgs=(updates, events))

    def _written_ok(self, fenced: set[str], updates: list[Job], events: list[JobEvent]) -> None:
        self._in_flight = False
        self._written += len(updates) + len(events)
        self._backoff = MIN_BACKOFF
        if not self._reachable:
            self._reachable = True
            self.log.info("Job store writes reach the database again; queued writes sent")
            self._on_state(True)
        if fenced:
            self.log.warn(
                "Writes about jobs {jobs} dropped: another daemon took them over",
                jobs=", ".join(sorted(fenced)),
            )
            try:
                self.on_fenced(fenced)
            except Exception:
                self.log.failure("on_fenced failed")
        waiters = [w for w in self._waiters if w[0] <= self._written]
        self._waiters = [w for w in self._waiters if w[0] > self._written]
        for _, d in waiters:
            d.callback(None)
        self._kick()

    def _failed(self, f: Failure, updates: list[Job], events: list[JobEvent]) -> None:
        self._in_flight = False
        # Put the batch back in front, in order.
        self._updates[:0] = updates
        self._events[:0] = events
        if f.check(DatabaseUnavailable):
            if self._reachable:
                self._reachable = False
                self.log.error(
                    "Job store writes cannot reach the database ({why}); {n} writes wait and "
                    "are tried again with backoff",
                    why=f.getErrorMessage(),
                    n=self.pending,
                )
                self._on_state(False)
        else:
            self.log.failure("Job store write refused; tried again in {s:g}s", f, s=self._backoff)
        if self._closed:
            return
        self._retry = self._clock.callLater(self._backoff, self._retry_now)
        self._backoff = min(MAX_BACKOFF, self._backoff * 2)

    def _retry_now(self) -> None:
        self._retry = None
        self._kick()
