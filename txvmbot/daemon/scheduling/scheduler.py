"""The front end clients drive over a daemon's own (SQLite) store:
:class:`Scheduler`, a thin IScheduler over an IJobStore and the
:class:`~txvmbot.daemon.scheduling.dispatch.Dispatcher` that runs the jobs
(the queue, caps, drain, quarantine, recovery: see that module).

A submit is stored, then handed to the dispatcher at once (this daemon is
the only one: a cluster of one). Reads go to the dispatcher for the jobs it
holds (their newest value) and to the store for the others; a watch
follows the dispatcher's live events after the stored ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any
from uuid import uuid4

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon.interfaces import IDispatcher, IJobStore, IScheduler
from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent, JobSpec
from txvmbot.daemon.scheduling.dispatch import API_VERSION, Dispatcher, WorkerPool
from txvmbot.daemon.scheduling.failures import FailureReport, scan_failures
from txvmbot.errors import TxvmbotError, UnknownJob

__all__ = [
    "API_VERSION",
    "Dispatcher",
    "Scheduler",
    "WorkerPool",
    "new_job_id",
    "new_jobs",
]

Listener = Callable[[JobEvent], object]


def new_jobs(
    specs: Sequence[JobSpec],
    refusal: Callable[[JobSpec], TxvmbotError | None],
    new_id: Callable[[], str],
    wall: Callable[[], float],
) -> tuple[list[Job | TxvmbotError], list[tuple[Job, JobEvent]]]:
    """For each spec in order, its new queued Job or the error ``refusal``
    gives it; and the new jobs with their first ("queued") events, to be
    stored together. No log line per submit: at thousands a second it cost
    a tenth of the daemon's time (bench/daemon_bench.py); the event is in
    the store for watchers."""
    results: list[Job | TxvmbotError] = []
    new: list[tuple[Job, JobEvent]] = []
    for spec in specs:
        refused = refusal(spec)
        if refused is not None:
            results.append(refused)
            continue
        now = float(wall())
        job = Job(id=new_id(), spec=spec, state="queued", submitted=now)
        results.append(job)
        new.append((job, JobEvent(job_id=job.id, seq=1, at=now, kind="state", state="queued")))
    return results, new


def new_job_id() -> str:
    """A new job id: 12 hex digits."""
    return uuid4().hex[:12]


@implementer(IScheduler)
class Scheduler:
    """IScheduler over a daemon's own store (see the module docstring).

    ``Scheduler(clock, store, pool, journal, cleaner=..., ...)`` builds its
    :class:`~txvmbot.daemon.scheduling.dispatch.Dispatcher` from the same
    arguments (``new_id`` and ``wall`` serve both); :meth:`over` puts a
    front end over a dispatcher built elsewhere (the daemon's, which the
    metrics follow). ``dispatcher`` is the engine either way.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IJobStore,
        pool: WorkerPool,
        journal: Any,
        *,
        new_id: Callable[[], str] = new_job_id,
        wall: Callable[[], float] = time.time,
        **engine: Any,
    ) -> None:
        self._setup(clock, store, Dispatcher(clock, store, pool, journal, wall=wall, **engine),
                    new_id, wall)

    @classmethod
    def over(
        cls,
        clock: IReactorTime,
        store: IJobStore,
        dispatcher: IDispatcher,
        *,
        new_id: Callable[[], str] = new_job_id,
        wall: Callable[[], float] = time.time,
    ) -> Scheduler:
        """The front end of ``store`` and ``dispatcher``."""
        self = cls.__new__(cls)
        self._setup(clock, store, dispatcher, new_id, wall)
        return self

    def _setup(
        self,
        clock: IReactorTime,
        store: IJobStore,
        dispatcher: IDispatcher,
        new_id: Callable[[], str],
        wall: Callable[[], float],
    ) -> None:
        self._clock = clock
        self._jobs = store
        self.dispatcher = dispatcher
        self._new_id = new_id
        self._wall = wall

    # --- submits ----------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> Deferred[Job]:
        """Queue ``spec``; fire with the Job as stored (state queued). It
        may have started by the time this fires."""

        def one(results: Sequence[Job | TxvmbotError]) -> Job:
            (result,) = results
            if isinstance(result, Job):
                return result
            raise result

        return self.submit_many([spec]).addCallback(one)

    def submit_many(self, specs: Sequence[JobSpec]) -> Deferred[Sequence[Job | TxvmbotError]]:
        """Queue ``specs`` with one commit to the store (the daemon's AMP
        server hands over all the submits of one read at once). Fires, for
        each spec in order, with its Job as stored or the error that
        refused it alone. Fails (StoreError), with nothing queued, when the
        write fails. One Deferred for the batch, none per job."""
        results, new = new_jobs(specs, self.dispatcher.refusal, self._new_id, self._wall)
        if not new:
            return succeed(list(results))
        return self._jobs.add_many(new).addCallback(self._stored, new, results)

    def _stored(
        self,
        _: object,
        new: list[tuple[Job, JobEvent]],
        results: Sequence[Job | TxvmbotError],
    ) -> Sequence[Job | TxvmbotError]:
        """Hand the jobs of a submit to the dispatcher once they are stored."""
        self.dispatcher.queue_new(new)
        return results

    # --- reads ------------------------------------------------------------------------

    def get(self, job_id: str) -> Deferred[Job]:
        held = self.dispatcher.holding(job_id)
        if held is not None:
            return succeed(held)

        def found(job: Job | None) -> Job:
            if job is None:
                raise UnknownJob(job_id)
            return job

        return self._jobs.get(job_id).addCallback(found)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        """Jobs, newest first; ``before`` (the id of the last job of the
        previous page) pages on. Fails with UnknownJob if there is no such
        job (any more: pruned)."""
        if before is None:
            return self._jobs.list(states=states, backend=backend, limit=limit)
        return self.get(before).addCallback(
            lambda _: self._jobs.list(states=states, backend=backend, limit=limit, before=before)
        )

    def watch(
        self, job_id: str, after_seq: int, listener: Listener
    ) -> Deferred[Callable[[], None]]:
        """Tell ``listener`` the job's events after ``after_seq``: the stored
        ones first, then new ones as they happen, up to and including the
        one that makes the job final. Fires, once the stored ones were
        told, with a callable that stops it; fails with UnknownJob. A
        listener that raises is logged and dropped.

        The watcher is subscribed before the stored events are read: an
        event that happens while the read is under way waits until the
        stored ones were told, and none is told twice (by seq)."""
        told = [after_seq]
        early: list[JobEvent] = []
        reading = [True]
        dropped = [False]

        def live(event: JobEvent) -> None:
            if reading[0]:
                early.append(event)
            elif event.seq > told[0]:
                told[0] = event.seq
                listener(event)

        unfollow = self.dispatcher.follow(job_id, live)
        held = unfollow is not None

        def stop() -> None:
            dropped[0] = True
            if unfollow is not None:
                unfollow()

        def exists(job: Job | None) -> Deferred[Sequence[JobEvent]]:
            if job is None and not held:
                raise UnknownJob(job_id)
            return self._jobs.events(job_id, after_seq)

        def replay(stored: Sequence[JobEvent]) -> Callable[[], None]:
            reading[0] = False
            for event in [*stored, *early]:
                if dropped[0]:
                    break
                if event.seq > told[0]:
                    told[0] = event.seq
                    if not self._tell(listener, event):
                        stop()
            return stop

        def failed(f: Failure) -> Failure:
            stop()
            return f

        first: Deferred[Job | None] = succeed(None) if held else self._jobs.get(job_id)
        return first.addCallback(exists).addCallbacks(replay, failed)

    def _tell(self, listener: Listener, event: JobEvent) -> bool:
        try:
            listener(event)
        except Exception:
            self.log.failure("Watcher of job {job_id} failed; it is dropped", job_id=event.job_id)
            return False
        return True

    def status(self) -> Deferred[DaemonStatus]:
        """Workers, queue and backends (the dispatcher's ``status_now``)."""
        return succeed(self.dispatcher.status_now())

    def failures(
        self, by: Sequence[str], since: float, limit: int = 10_000
    ) -> Deferred[FailureReport]:
        """The newest ``limit`` finished jobs grouped by the facts named in
        ``by`` (:func:`txvmbot.daemon.scheduling.failures.scan_failures`, which says
        which jobs it reads). Fails with ConfigError for an unknown name."""
        return scan_failures(self._clock, self._jobs.list, self._jobs.get, by, since, limit)

    # --- cancel, drain, resume --------------------------------------------------------

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job: a queued one at once; a running one through the
        pool, final once its worker has cleaned up. Fires with the final Job
        (at once for a job already final); fails with UnknownJob."""
        if self.dispatcher.holds(job_id):
            return self.dispatcher.cancel(job_id, reason)
        return self.get(job_id)

    def drain(self, backend: str) -> Deferred[BackendStatus]:
        """Stop starting jobs on ``backend``; running ones finish, queued
        ones wait for :meth:`resume`."""
        return self.dispatcher.drain(backend)

    def resume(self, backend: str) -> Deferred[BackendStatus]:
        """Undo :meth:`drain` (and a quarantine, after a passing health
        check: the dispatcher's ``resume``)."""
        return self.dispatcher.resume(backend)

    # --- for in-process readers that cannot wait (the metrics) ---------------------

    def status_now(self) -> DaemonStatus:
        return self.dispatcher.status_now()

    def list_now(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Sequence[Job]:
        return self.dispatcher.list_now(states, backend, limit, before)

    def observe(self, observer: Callable[[Job, JobEvent], None]) -> Callable[[], None]:
        """Every event of every job from now on (the web page, the metrics)."""
        return self.dispatcher.observe(observer)
