"""The front end clients drive, whatever the store: :class:`Scheduler`, a
thin IScheduler over an IJobQueue (where clients' jobs wait and are read)
and the IDispatcher that runs the jobs this daemon holds
(:mod:`txvmbot.daemon.scheduling.dispatch`).

The job queue has two providers. Over a daemon's own SQLite store
(:class:`~txvmbot.daemon.scheduling.localqueue.LocalQueue`) the daemon is a
cluster of one: a submit is stored and claimed by it at once. Over a shared
PostgreSQL (:class:`~txvmbot.daemon.scheduling.sharedqueue.SharedQueue`) a submit
is stored and the cluster is told; whichever daemon has a free worker
claims it (txvmbot.daemon.cluster.membership), and a watch follows LISTEN.
Either way the jobs this daemon holds are read as they are here now, and
cancelled here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from typing import Any
from uuid import uuid4

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from txvmbot.daemon.interfaces import IDispatcher, IJobQueue, IJobStore, IScheduler
from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent, JobSpec
from txvmbot.daemon.scheduling.dispatch import API_VERSION, Dispatcher, WorkerPool
from txvmbot.daemon.scheduling.failures import FailureReport, scan_failures
from txvmbot.daemon.scheduling.localqueue import LocalQueue
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
    """IScheduler over a job queue and a dispatcher (see the module
    docstring).

    ``Scheduler(clock, store, pool, journal, cleaner=..., ...)`` builds a
    :class:`~txvmbot.daemon.scheduling.dispatch.Dispatcher` from the same
    arguments (``new_id`` and ``wall`` serve both) and a
    :class:`~txvmbot.daemon.scheduling.localqueue.LocalQueue` over
    ``store``; :meth:`over` puts the front end over a queue and a
    dispatcher built elsewhere (the daemon's: txvmbot.daemon.parts).
    """

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
        dispatcher = Dispatcher(clock, store, pool, journal, wall=wall, **engine)
        self._setup(clock, LocalQueue(store, dispatcher), dispatcher, new_id, wall)

    @classmethod
    def over(
        cls,
        clock: IReactorTime,
        queue: IJobQueue,
        dispatcher: IDispatcher,
        *,
        new_id: Callable[[], str] = new_job_id,
        wall: Callable[[], float] = time.time,
    ) -> Scheduler:
        """The front end of ``queue`` and ``dispatcher``."""
        self = cls.__new__(cls)
        self._setup(clock, queue, dispatcher, new_id, wall)
        return self

    def _setup(
        self,
        clock: IReactorTime,
        queue: IJobQueue,
        dispatcher: IDispatcher,
        new_id: Callable[[], str],
        wall: Callable[[], float],
    ) -> None:
        self._clock = clock
        self.queue = queue
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
        return self.queue.enqueue(new).addCallback(_answer, results)

    # --- reads ------------------------------------------------------------------------

    def get(self, job_id: str) -> Deferred[Job]:
        held = self.dispatcher.holding(job_id)
        if held is not None:
            return succeed(held)

        def found(job: Job | None) -> Job:
            if job is None:
                raise UnknownJob(job_id)
            return job

        return self.queue.get(job_id).addCallback(found)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        """Jobs, newest first; ``before`` (the id of the last job of the
        previous page) pages on. Fails with UnknownJob if there is no such
        job (any more: pruned). The jobs this daemon holds are listed as
        they are here now (their newest writes may still be on the way)."""
        if before is None:
            d = self.queue.list(states=states, backend=backend, limit=limit)
        else:
            d = self.get(before).addCallback(
                lambda _: self.queue.list(
                    states=states, backend=backend, limit=limit, before=before
                )
            )
        return d.addCallback(self._as_held)

    def _as_held(self, jobs: Sequence[Job]) -> Sequence[Job]:
        holding = self.dispatcher.holding
        return [holding(j.id) or j for j in jobs]

    def watch(
        self, job_id: str, after_seq: int, listener: Listener
    ) -> Deferred[Callable[[], None]]:
        """Tell ``listener`` the job's events after ``after_seq``: the stored
        ones first, then new ones as they happen, up to and including the
        one that makes the job final. Fires, once the stored ones were
        told, with a callable that stops it; fails with UnknownJob. A
        listener that raises is logged and dropped."""
        return self.queue.watch(job_id, after_seq, listener)

    def notice(self, noticer: Callable[[str], object]) -> Callable[[], None]:
        """Call ``noticer(job_id)`` whenever another daemon stores events of
        a job (the web page's live view of a shared store's jobs)."""
        return self.queue.notice(noticer)

    def status(self) -> Deferred[DaemonStatus]:
        """Workers, queue and backends: the queue's, with this daemon's
        workers and quarantines."""
        return self.queue.status(self.dispatcher.status_now())

    def failures(
        self, by: Sequence[str], since: float, limit: int = 10_000
    ) -> Deferred[FailureReport]:
        """The newest ``limit`` finished jobs grouped by the facts named in
        ``by`` (:func:`txvmbot.daemon.scheduling.failures.scan_failures`, which says
        which jobs it reads). Fails with ConfigError for an unknown name."""
        return scan_failures(self._clock, self.queue.list, self.queue.get, by, since, limit)

    # --- cancel, drain, resume --------------------------------------------------------

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job: one held here through the dispatcher (a queued one
        at once; a running one through the pool, final once its worker has
        cleaned up); any other through the queue (with a shared store: in
        the database, or by asking the daemon that holds it). Fires with
        the final Job (at once for a job already final); fails with
        UnknownJob."""
        if self.dispatcher.holds(job_id):
            return self.dispatcher.cancel(job_id, reason)
        return self.queue.cancel(job_id, reason)

    def drain(self, backend: str) -> Deferred[BackendStatus]:
        """Stop starting jobs on ``backend`` (here at once, then in the
        queue); running ones finish, queued ones wait for :meth:`resume`."""
        self.dispatcher.drain(backend)  # at once, here: answers with a fired Deferred
        d = self.queue.set_draining(backend, True)
        return d.addCallback(lambda _: self._backend_status(backend))

    def resume(self, backend: str) -> Deferred[BackendStatus]:
        """Undo :meth:`drain` (and a quarantine, after a passing health
        check: the dispatcher's ``resume``)."""
        d = self.queue.set_draining(backend, False)
        return d.addCallback(lambda _: self.dispatcher.resume(backend)).addCallback(
            lambda _: self._backend_status(backend)
        )

    def _backend_status(self, backend: str) -> Deferred[BackendStatus]:
        def pick(s: DaemonStatus) -> BackendStatus:
            for b in s.backends:
                if b.name == backend:
                    return b
            return BackendStatus(name=backend, capacity=self.dispatcher.cap(backend),
                                 running=0, queued=0, state="active")

        return self.status().addCallback(pick)

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


def _answer(_: object, results: Sequence[Job | TxvmbotError]) -> Sequence[Job | TxvmbotError]:
    return results
