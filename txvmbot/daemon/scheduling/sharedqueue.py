"""The job queue of daemons that share one PostgreSQL: :class:`SharedQueue`
provides IJobQueue over the shared database, so the
:class:`~txvmbot.daemon.scheduling.scheduler.Scheduler` of any daemon (its
``submit``, ``jobs``, ``show``, ``watch``, ``cancel``, ``drain`` and
``status``) sees every job.

A submit is stored in the shared queue and the cluster is told: any daemon
with a free worker claims it (txvmbot.daemon.cluster.membership). Reads go
to the database (each call a Deferred); the jobs this daemon holds run in
its :class:`~txvmbot.daemon.interfaces.IDispatcher` (``local``), whose
writes reach the database through the
:class:`~txvmbot.daemon.stores.postgres.writer.JobWriter`. A watch reads stored
events and follows ``txvmbot_events`` notifications, whichever daemon runs
the job; a cancel of a job another daemon holds is asked of it through
``txvmbot_cancel``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon.groupcommit import GroupCommit
from txvmbot.daemon.interfaces import IDispatcher, IJobQueue
from txvmbot.daemon.jobs import (
    FINAL_STATES,
    BackendStatus,
    DaemonStatus,
    Job,
    JobEvent,
)
from txvmbot.daemon.scheduling.dispatch import API_VERSION
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import Database
from txvmbot.daemon.stores.postgres.writer import JobWriter
from txvmbot.errors import UnknownJob

__all__ = ["SharedQueue"]

#: Insert transactions of submits in flight at once.
STORING = 2

Listener = Callable[[JobEvent], object]


class _Watch:
    """One listener following one job's stored events."""

    def __init__(self, job_id: str, after_seq: int, listener: Listener) -> None:
        self.job_id = job_id
        self.last = after_seq
        self.listener = listener
        #: A read is under way (one at a time); it reads once more before it
        #: ends if ``again`` was set meanwhile, then fires ``waiters``.
        self.reading = False
        self.again = False
        self.waiters: list[Deferred[None]] = []
        self.done = False


@implementer(IJobQueue)
class SharedQueue:
    """IJobQueue over the shared database (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        db: Database,
        local: IDispatcher,
        writer: JobWriter,
        *,
        host: str = "",
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._db = db
        self.local = local
        self._writer = writer
        self._wall = wall
        self._watches: dict[str, list[_Watch]] = {}
        self._noticers: dict[object, Callable[[str], object]] = {}
        # Submits stored a group to a transaction, STORING at a time.
        self._inserts: GroupCommit[list[tuple[Job, JobEvent]], None] = GroupCommit(
            self._insert, in_flight=STORING
        )
        #: Called after jobs were queued here (the cluster claims).
        self.on_queued: Callable[[], object] = lambda: None
        self._known_backends: set[str] = set()

    # --- submits ----------------------------------------------------------------------

    def enqueue(self, new: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        """Store ``new`` (queued jobs, each with its first event) in the
        shared queue, in one transaction; any daemon with a free worker
        claims them. This daemon's observers are told, and its cluster
        claims at once, without waiting for its own notification to come
        back."""

        def stored(_: object) -> None:
            for job, event in new:
                self.local.tell_observers(job, event)
            self.on_queued()

        return self._store(list(new)).addCallback(stored)

    def _store(self, new: list[tuple[Job, JobEvent]]) -> Deferred[None]:
        """Store ``new`` with the next commit: at most :data:`STORING` insert
        transactions at a time, and the submits that arrive (from any
        connection) meanwhile go together in the next one (group commit: a
        commit costs more than its rows; two in flight keep the daemon busy
        while one commits: bench/scaleout_bench.py). A failed commit fails
        all the submits it held, none of which is stored."""
        return self._inserts.add(new)

    def _insert(self, group: list[list[tuple[Job, JobEvent]]]) -> Deferred[Sequence[None]]:
        """One insert transaction of a group of submits."""
        rows = [pair for new in group for pair in new]
        caps = {job.spec.backend: self.local.cap(job.spec.backend) for job, _ in rows}
        stored: Deferred[None] = self._db.run(store.add_many, rows, caps, self._host)
        return stored.addCallback(lambda _: [None] * len(group))

    # --- reads ------------------------------------------------------------------------

    def get(self, job_id: str) -> Deferred[Job | None]:
        result: Deferred[Job | None] = self._db.run(store.get, job_id)
        return result

    def _known(self, job_id: str) -> Deferred[Job]:
        """The job as held here or stored; fails with UnknownJob."""
        held = self.local.holding(job_id)
        if held is not None:
            return succeed(held)

        def found(job: Job | None) -> Job:
            if job is None:
                raise UnknownJob(job_id)
            return job

        return self.get(job_id).addCallback(found)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        result: Deferred[Sequence[Job]] = self._db.run(
            store.list_jobs, states, backend, limit, before
        )
        return result

    def status(self, mine_status: DaemonStatus) -> Deferred[DaemonStatus]:
        """The shared queue's backends, with this daemon's workers and its
        quarantines (``mine_status``)."""

        def build(c: store.Counts) -> DaemonStatus:
            local = {b.name: b for b in mine_status.backends}
            backends = []
            for name, cap, draining, queued, running, instances in c.backends:
                mine = local.get(name)
                state: Any = "draining" if draining else "active"
                reason = ""
                failures = 0
                if mine is not None:
                    failures = mine.consecutive_failures
                    if mine.state == "quarantined":
                        state, reason = "quarantined", mine.reason
                backends.append(
                    BackendStatus(
                        name=name,
                        capacity=cap,
                        running=running,
                        queued=queued,
                        state=state,
                        consecutive_failures=failures,
                        reason=reason,
                        instances=instances,
                    )
                )
            return DaemonStatus(
                api_version=API_VERSION,
                workers=mine_status.workers,
                busy_workers=mine_status.busy_workers,
                queue_depth=sum(b.queued for b in backends),
                running=sum(b.running for b in backends),
                backends=tuple(backends),
            )

        return self._db.run(store.counts).addCallback(build)

    # --- watch ------------------------------------------------------------------------

    def watch(self, job_id: str, after_seq: int, listener: Listener) -> Deferred[Callable[[], None]]:
        """Tell ``listener`` the job's stored events after ``after_seq``, then
        new ones as any daemon stores them, up to the one that makes the job
        final. Fires with a callable that stops it; fails with UnknownJob."""
        w = _Watch(job_id, after_seq, listener)

        def stop() -> None:
            w.done = True
            watches = self._watches.get(job_id)
            if watches is not None and w in watches:
                watches.remove(w)
                if not watches:
                    del self._watches[job_id]

        async def go() -> Callable[[], None]:
            # Follow first, then read: nothing falls between.
            self._watches.setdefault(job_id, []).append(w)
            try:
                await self._known(job_id)
                await self._writer.flushed()
                # Everything stored so far reaches the listener before this
                # fires (a read a notification started reads once more).
                await self._kick(w)
            except BaseException:
                stop()
                raise
            return stop

        return ensureDeferred(go())

    def job_events(self, job_id: str) -> None:
        """A ``txvmbot_events`` notification: read the new events."""
        for w in list(self._watches.get(job_id, ())):
            self._kick(w).addErrback(_logged)
        for key, noticer in list(self._noticers.items()):
            try:
                noticer(job_id)
            except Exception:
                self.log.failure("Noticer of job events failed; it is dropped")
                self._noticers.pop(key, None)

    def notice(self, noticer: Callable[[str], object]) -> Callable[[], None]:
        """Call ``noticer(job_id)`` whenever any daemon stores new events of
        a job (the web page's live view of every daemon's jobs). Returns a
        callable that stops it."""
        key = object()
        self._noticers[key] = noticer
        return lambda: self._noticers.pop(key, None) and None

    def catch_up(self) -> None:
        """The LISTEN connection came back: notifications may have been
        missed, so read every watched job again."""
        for watches in list(self._watches.values()):
            for w in list(watches):
                self._kick(w).addErrback(_logged)

    def _kick(self, w: _Watch) -> Deferred[None]:
        """Read ``w``'s new events: start a read, or have the one under way
        read once more. Fires when that read has ended."""
        if w.done:
            return succeed(None)
        d: Deferred[None] = Deferred()
        w.waiters.append(d)
        if w.reading:
            w.again = True
        else:
            w.reading = True
            ensureDeferred(self._read(w))
        return d

    async def _read(self, w: _Watch) -> None:
        failure: Failure | None = None
        try:
            while not w.done:
                w.again = False
                events: list[JobEvent] = await self._db.run(store.events, w.job_id, w.last)
                for event in events:
                    if w.done or event.seq <= w.last:
                        continue
                    w.last = event.seq
                    try:
                        w.listener(event)
                    except Exception:
                        self.log.failure("Watcher of job {job_id} failed; dropped", job_id=w.job_id)
                        w.done = True
                    if event.kind == "state" and event.state in FINAL_STATES:
                        w.done = True
                if w.done:
                    self._drop(w)
                if not w.again:
                    break
        except Exception:
            failure = Failure()
            self.log.warn("Watch of {job_id}: {why}", job_id=w.job_id, why=failure.value)
        finally:
            w.reading = False
            waiters, w.waiters = w.waiters, []
            for d in waiters:
                if failure is not None:
                    d.errback(failure)
                else:
                    d.callback(None)

    def _drop(self, w: _Watch) -> None:
        watches = self._watches.get(w.job_id)
        if watches is not None and w in watches:
            watches.remove(w)
            if not watches:
                del self._watches[w.job_id]

    # --- cancel, drain --------------------------------------------------------------

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job not held here: waiting in the shared queue, in the
        database; held by another daemon, by asking it. Fires with the
        final Job."""

        async def go() -> Job:
            job = await self._db.run(store.cancel_queued, job_id, reason, float(self._wall()))
            if job is not None:
                return job
            current = await self._known(job_id)
            if current.final:
                return current
            ended: Deferred[Job] = Deferred()

            def event(e: JobEvent) -> None:
                if e.kind == "state" and e.state in FINAL_STATES and not ended.called:
                    self._known(job_id).chainDeferred(ended)

            stop = await self.watch(job_id, 0, event)
            state = await self._db.run(store.request_cancel, job_id, reason)
            if state is None:
                stop()
                raise UnknownJob(job_id)
            current = await self._known(job_id)
            if current.final:
                stop()
                return current
            try:
                return await ended
            finally:
                stop()

        return ensureDeferred(go())

    def set_draining(self, backend: str, draining: bool) -> Deferred[None]:
        """Drain or resume ``backend`` for every daemon."""
        d: Deferred[None] = self._db.run(
            store.set_draining, backend, self.local.cap(backend), draining
        )
        return d


def _logged(_: Failure) -> None:
    """A failed read of a watch, already logged where it failed."""
