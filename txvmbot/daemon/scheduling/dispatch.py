"""Dispatching: the engine that runs the jobs this daemon holds. A queue of
jobs, pull-based dispatch to a pool of workers, per-backend caps, drain and
quarantine, and recovery after a crash. :class:`Dispatcher` provides
:class:`~txvmbot.daemon.interfaces.IDispatcher`; clients never drive it
themselves: the front end (IScheduler:
:class:`~txvmbot.daemon.scheduling.scheduler.Scheduler`, over its job queue)
and the cluster (:class:`~txvmbot.daemon.cluster.membership.Cluster`) hand
it jobs.

Dispatch is pull-based (seed 002: static partitioning left workers idle for
twelve minutes): whenever a job arrives, a worker frees or a backend changes
state, free workers take the next runnable jobs at once. The next job is the
one with the highest priority, then the earliest ``submitted`` time, then
the earliest submission, among the backends that are active and below their
cap. Each backend keeps its own heap, so choosing a job costs
O(B + log n) for B backends and n queued jobs, never a scan of the queue.

A job's life, the machine of :mod:`txvmbot.daemon.scheduling.lifecycle`
(every state change goes through it; a move it has no transition for is a
bug, an AssertionError)::

    queued -> running -> cleaning -> passed | failed | cancelled | error
       ^         |           |
       +---------+-----------+   (infrastructure failure with attempts left)

``cleaning`` starts with the first ``cleanup ...`` step the worker reports,
or when the daemon itself cleans up after a worker died or the daemon
restarted. Every change is written to the store and told to watchers as a
:class:`~txvmbot.daemon.jobs.JobEvent` (kind ``state``); so is every step event
(kind ``step``).

Infrastructure failures (a worker that died, a cloud that keeps failing at
the transport level) are told apart from failed checks: the job's resources
are cleaned by the injected ``cleaner`` and the job is retried while it has
attempts left; a backend with ``quarantine_after`` of them in a row is
quarantined (its jobs wait) until a health check passes (seed 003: a broken
host must not eat the queue, and an operator must be able to take a backend
out while jobs run).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Literal, Protocol

import attrs
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon.interfaces import IDispatcher, IJobStore, IJobWriter
from txvmbot.daemon.jobs import (
    FINAL_STATES,
    BackendState,
    BackendStatus,
    DaemonStatus,
    Job,
    JobEvent,
    JobSpec,
    JobState,
)
from txvmbot.daemon.scheduling.lifecycle import move
from txvmbot.daemon.stores.sqlite.held import Storage
from txvmbot.daemon.stores.sqlite.store import AnsweredStore
from txvmbot.errors import ConfigError, TxvmbotError, UnknownJob, WorkerDied
from txvmbot.model import CheckResult, FailureKind, StepEvent

__all__ = [
    "API_VERSION",
    "Dispatcher",
    "WorkerPool",
]

#: The version of the daemon's status and job values, reported by status().
API_VERSION = 1

Listener = Callable[[JobEvent], object]
Cleaner = Callable[[Job], Deferred[tuple[str, ...]]]
HealthCheck = Callable[[str], Deferred[bool]]


class WorkerPool(Protocol):
    """What the scheduler needs of a pool: IWorkerPool plus ``cancel``."""

    @property
    def size(self) -> int: ...

    @property
    def busy(self) -> int: ...

    def run(
        self, job: Job, on_event: Callable[[StepEvent], None], journal: Any
    ) -> Deferred[CheckResult]: ...

    def cancel(self, job_id: str, reason: str) -> object: ...


_QueueKey = tuple[int, float, int, str]  # (-priority, submitted, order, job id)


@attrs.define(eq=False)
class _Active:
    """An unfinished job and what the scheduler knows about it."""

    job: Job
    order: int
    last_event: int = 0
    cancel_reason: str | None = None
    bound_call: IDelayedCall | None = None
    waiters: list[Deferred[Job]] = attrs.Factory(list)
    watchers: dict[int, Listener] = attrs.Factory(dict)


@attrs.define(eq=False)
class _Backend:
    name: str
    cap: int
    # A heap of queue keys; entries of jobs no longer queued (cancelled) stay
    # until they reach the top and are skipped there.
    heap: list[_QueueKey] = attrs.Factory(list)
    queued: int = 0
    # Jobs holding a worker, with the instances each runs (the cap limits
    # instances: a job with parallel=N holds N places).
    running: dict[str, int] = attrs.Factory(dict)
    draining: bool = False
    quarantined: bool = False
    consecutive_failures: int = 0
    reason: str = ""
    health_note: str = ""
    health_call: IDelayedCall | None = None
    health_waiters: list[Deferred[None]] | None = None

    @property
    def state(self) -> BackendState:
        if self.quarantined:
            return "quarantined"
        if self.draining:
            return "draining"
        return "active"

    @property
    def instances(self) -> int:
        return sum(self.running.values())

    @property
    def may_start(self) -> bool:
        """Whether it may start its head job, placed aside its size."""
        return self.queued > 0 and not self.quarantined and not self.draining


def _describe(failure: Failure) -> str:
    text = str(failure.value)
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {text}" if text else name


@implementer(IDispatcher)
class Dispatcher:
    """Queues the jobs this daemon holds, hands them to a worker pool, and
    keeps the store, the watchers and the observers told.

    :param clock: schedules the per-job bounds and the health checks.
    :param store: an IJobStore that also provides IJobWriter (the SQLite
        stores): the engine writes through IJobWriter as things happen,
        and reads what :meth:`recover` takes back (and :meth:`list_now`)
        through the Deferred seam; it is the store's only writer. With a
        shared store, the txvmbot.daemon.stores.postgres.writer.JobWriter
        alone (reads and submits then go through the SharedQueue).
    :param pool: runs a job in a worker (IWorkerPool plus ``cancel(job_id,
        reason)``, which makes the job's Deferred fire once the worker has
        cleaned up).
    :param journal: the cleanup journal handed to the pool with each job.
    :param cleaner: cleans a job's resources (from the journal and by tag)
        when its worker died or the daemon restarted under it; fires with a
        tuple of error descriptions, empty when all went.
    :param caps: per-backend caps on running instances (a job with
        ``parallel=N`` takes N); ``default_cap`` for the
        others.
    :param quarantine_after: consecutive infrastructure failures that
        quarantine a backend.
    :param health_check: tells whether a quarantined backend works again;
        tried every ``health_interval`` seconds and on ``resume``. Without
        one a quarantine lasts until an operator resumes the backend.
    :param wall: epoch seconds, for job and event times.
    :param on_free: with a shared store, called with the number of workers
        that no local job will take, whenever the scheduler has dispatched:
        the cluster claims that many jobs from the shared queue and hands
        them over with :meth:`adopt` (txvmbot.daemon.cluster.membership).
    :param storage: the data dir's free space and held writes, for
        :meth:`status` (txvmbot.daemon.stores.sqlite.held.DataDir.storage).
    :param on_requeue: with a shared store, a job queued again after an
        infrastructure failure is not kept here: it is forgotten and
        handed to ``on_requeue``, which gives it back to the shared queue
        (any daemon may run the retry; a backend quarantined here does not
        hold it).

    A job's ``bound`` runs from the start of each attempt (time spent queued
    does not count); when it passes, the job is cancelled with the reason
    "passed its bound of Ns". The scheduler never has more than
    ``pool.size`` jobs in the pool: it counts a worker free when the job's
    Deferred fires, so the pool must be ready for the next ``run`` by then.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IJobStore,
        pool: WorkerPool,
        journal: Any,
        *,
        cleaner: Cleaner,
        caps: Mapping[str, int] = {},  # noqa: B006 - read only
        default_cap: int = 4,
        quarantine_after: int = 3,
        health_check: HealthCheck | None = None,
        health_interval: float = 60.0,
        wall: Callable[[], float] = time.time,
        on_free: Callable[[int], object] | None = None,
        on_requeue: Callable[[Job], object] | None = None,
        storage: Callable[[], Storage] | None = None,
    ) -> None:
        if default_cap < 1 or any(c < 1 for c in caps.values()):
            raise ValueError("backend caps must be at least 1")
        if quarantine_after < 1:
            raise ValueError("quarantine_after must be at least 1")
        self._clock = clock
        # The engine's writes as things happen (_set_state, _emit) ...
        self._store: IJobWriter = IJobWriter(store)
        # ... and what recovery reads, each answer a Deferred.
        self._jobs = store
        self._pool = pool
        self._journal = journal
        self._cleaner = cleaner
        self._caps = dict(caps)
        self._default_cap = default_cap
        self._quarantine_after = quarantine_after
        self._health_check = health_check
        self._health_interval = health_interval
        self._wall = wall
        self._on_free = on_free
        self._on_requeue = on_requeue
        self._storage = storage
        self._order = itertools.count()
        self._active: dict[str, _Active] = {}
        self._backends: dict[str, _Backend] = {}
        self._queued: dict[str, _QueueKey] = {}
        self._in_pool: set[str] = set()
        # Jobs let go of (abandon) whose workers have not answered yet.
        self._abandoned: set[str] = set()
        self._watch_keys = itertools.count()
        self._observers: dict[int, Callable[[Job, JobEvent], None]] = {}
        self._dispatching = False
        self._dispatch_again = False
        self._stopped = False
        for name in self._caps:
            self._backend(name)

    # --- jobs handed over by a front end ---------------------------------------------

    def queue_new(self, new: Sequence[tuple[Job, JobEvent]]) -> None:
        """Queue jobs a front end has just stored (each with its first,
        "queued", event) and start what can start. One call for a batch of
        submits: no Deferred and nothing kept per job beyond its queue
        entry. What goes wrong starting them is logged, not raised: they
        are stored and queued, and a submitter told of an error would
        resubmit and double its jobs."""
        for job, event in new:
            active = _Active(job=job, order=next(self._order))
            active.last_event = 1
            self._active[job.id] = active
            self._enqueue(active)
            self._notify(job, event)
        try:
            self._dispatch()
        except Exception:
            self.log.failure("Starting jobs after a submit")

    def follow(self, job_id: str, listener: Listener) -> Callable[[], None] | None:
        """Call ``listener`` with each new event of the job while this
        daemon holds it (a listener that raises is logged and dropped);
        return a callable that stops it, or None when the job is not held
        here."""
        active = self._active.get(job_id)
        if active is None:
            return None
        key = next(self._watch_keys)
        active.watchers[key] = listener

        def stop() -> None:
            active.watchers.pop(key, None)

        return stop

    # --- what this daemon holds ------------------------------------------------------

    def refusal(self, spec: JobSpec) -> ConfigError | None:
        """Why ``spec`` can never start here, or None."""
        cap = self.cap(spec.backend)
        if spec.instances > cap:
            return ConfigError(
                "job.parallel",
                f"backend {spec.backend!r} runs at most {cap} instances at once; "
                f"this job asks for {spec.instances}, so it could never start",
            )
        return None

    def cap(self, backend: str) -> int:
        """``backend``'s cap on running instances."""
        return self._caps.get(backend, self._default_cap)

    def holding(self, job_id: str) -> Job | None:
        """The job as this daemon holds it now (unfinished here), or None:
        for in-process callers that cannot wait (the front ends)."""
        active = self._active.get(job_id)
        return None if active is None else active.job

    def observe(self, observer: Callable[[Job, JobEvent], None]) -> Callable[[], None]:
        """Tell ``observer`` every event of every job from now on, with the
        job as it is after that event (the web page's live view and the
        metrics). Returns a callable that stops it. An observer that raises
        is logged and dropped; a slow one slows the daemon: keep it cheap."""
        key = next(self._watch_keys)
        self._observers[key] = observer

        def stop() -> None:
            self._observers.pop(key, None)

        return stop

    def tell_observers(self, job: Job, event: JobEvent) -> None:
        """Tell the observers of :meth:`observe` of an event that happened
        elsewhere (a submit to the shared store)."""
        self._notify(job, event)

    def _notify(self, job: Job, event: JobEvent) -> None:
        for key, observer in list(self._observers.items()):
            try:
                observer(job, event)
            except Exception:
                self.log.failure("Observer of all jobs failed; it is dropped")
                self._observers.pop(key, None)

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job held here: a queued one at once; a running one
        through the pool, final once its worker has cleaned up. Fires with
        the final Job; fails with UnknownJob for a job not held here (the
        front end asks :meth:`holds` first)."""
        active = self._active.get(job_id)
        if active is None:
            return fail(UnknownJob(job_id))
        d: Deferred[Job] = Deferred()
        active.waiters.append(d)
        self._request_cancel(active, reason)
        return d

    def drain(self, backend: str) -> Deferred[BackendStatus]:
        """Stop starting jobs on ``backend``; running ones finish, queued
        ones wait for :meth:`resume`."""
        b = self._backend(backend)
        if not b.draining:
            b.draining = True
            self.log.info("Backend {backend} draining", backend=backend)
        return succeed(self._backend_status(b))

    def resume(self, backend: str) -> Deferred[BackendStatus]:
        """Undo :meth:`drain`. A quarantined backend runs its health check
        first and becomes active only if it passes; otherwise it stays
        quarantined and the BackendStatus's ``reason`` says why. (Without a
        health check, resume lifts the quarantine: the operator vouches.)"""
        b = self._backend(backend)
        if b.draining:
            b.draining = False
            self.log.info("Backend {backend} resumed", backend=backend)
        if b.quarantined:
            if self._health_check is None:
                self._end_quarantine(b, "resumed by the operator (no health check configured)")
            else:
                return self._check_health(b).addCallback(lambda _: self._backend_status(b))
        self._dispatch()
        return succeed(self._backend_status(b))

    def list_now(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Sequence[Job]:
        """:meth:`list` for an in-process reader that cannot wait (the
        metrics' seed at start-up), through the synchronous path of an
        SQLite store; none with a store kept elsewhere."""
        if not isinstance(self._jobs, AnsweredStore):
            return []
        return self._jobs.sync.list(states=states, backend=backend, limit=limit, before=before)

    def status_now(self) -> DaemonStatus:
        """Workers, queue and backends, for in-process callers that cannot
        wait (the metrics, the front ends). A backend's ``running`` counts the
        jobs holding a worker (what its cap limits); the daemon's ``running``
        counts every job in state running or cleaning, including those the
        daemon is cleaning up itself after a worker died. With ``storage``,
        the data dir's free space and whether writes are held."""
        st = Storage("", -1, "", "") if self._storage is None else self._storage()
        return DaemonStatus(
            api_version=API_VERSION,
            workers=self._pool.size,
            busy_workers=self._pool.busy,
            queue_depth=len(self._queued),
            running=len(self._active) - len(self._queued),
            backends=tuple(
                self._backend_status(self._backends[name]) for name in sorted(self._backends)
            ),
            data_dir=st.data_dir,
            data_dir_free=st.free,
            writes_held=st.held,
            refusing=st.refusing,
        )

    # --- a shared store: jobs handed over by the cluster ---------------------------

    def adopt(self, job: Job, last_seq: int, cancel: str | None = None) -> None:
        """Take ``job`` (queued, claimed from the shared queue by this
        daemon) and start it when a worker is free; ``last_seq`` is its
        last stored event's. ``cancel``: a cancel asked for before the
        claim (the job ends cancelled at once)."""
        if job.id in self._active:
            return
        active = _Active(job=job, order=next(self._order), last_event=last_seq)
        self._active[job.id] = active
        self._enqueue(active)
        if cancel is not None:
            self._request_cancel(active, cancel)
        else:
            self._dispatch()

    def adopt_interrupted(
        self, job: Job, last_seq: int, reason: str, cancel: str | None = None
    ) -> Deferred[None]:
        """Take ``job`` (running or cleaning under a daemon that died) and
        clean up after it, then retry or end it, as :meth:`recover` does.
        Fires when the cleanup has run."""
        if job.id in self._active:
            return succeed(None)
        active = _Active(job=job, order=next(self._order), last_event=last_seq)
        active.cancel_reason = cancel
        self._active[job.id] = active
        self.log.error(
            "Job {job_id} was {state} on {backend} under a lost daemon; cleaning up",
            job_id=job.id,
            state=job.state,
            backend=job.spec.backend,
        )
        return self._clean_up(active, reason)

    def holds(self, job_id: str) -> bool:
        """Whether the job is unfinished here (queued, running or being
        cleaned up by this daemon)."""
        return job_id in self._active

    def held_back(self) -> frozenset[str]:
        """The backends this daemon starts no job of now: quarantined here,
        or draining (the cluster claims none of their jobs)."""
        return frozenset(
            b.name for b in self._backends.values() if b.quarantined or b.draining
        )

    def set_draining(self, backend: str, draining: bool) -> None:
        """Follow a drain or resume made on another daemon."""
        b = self._backend(backend)
        if b.draining != draining:
            b.draining = draining
            self.log.info(
                "Backend {backend} {what} (on another daemon)",
                backend=backend,
                what="draining" if draining else "resumed",
            )
            if not draining:
                self._dispatch()

    def abandon(self, reason: str, job_ids: Collection[str] | None = None) -> None:
        """Let go of jobs (all, or those in ``job_ids``): another daemon has
        taken them over, or may (this daemon's lease ran out). They are
        forgotten at once: queued ones leave the queue; running ones are
        cancelled in their workers, which clean up what they made, and
        whatever their workers or cleanups report later is ignored. No
        write about them follows (the store would fence it anyway)."""
        for active in list(self._active.values()):
            job_id = active.job.id
            if job_ids is not None and job_id not in job_ids:
                continue
            self.log.warn("Letting go of job {job_id}: {reason}", job_id=job_id, reason=reason)
            self._unqueue(active)
            self._cancel_bound(active)
            del self._active[job_id]
            for d in active.waiters:
                d.errback(Failure(TxvmbotError(f"job {job_id}: {reason}")))
            active.waiters = []
            if job_id in self._in_pool:
                self._abandoned.add(job_id)
                try:
                    self._pool.cancel(job_id, reason)
                except Exception:
                    self.log.failure("While cancelling job {job_id}", job_id=job_id)

    # --- start-up and shut-down ----------------------------------------------------

    def recover(self) -> Deferred[None]:
        """Take back the jobs the store holds unfinished, after a crash or a
        stop. Queued ones keep their places. Ones the daemon died under
        (running, cleaning) are cleaned by the cleaner, then queued again if
        they have attempts left, else ended as ``error``; either way with
        the reason "daemon restarted". Call once at start-up, after the pool
        started and before clients can submit. Fires when every cleanup has
        run; queued jobs start at once."""
        async def last_seqs() -> list[tuple[Job, int]]:
            jobs = await self._jobs.unfinished()
            return [(job, await self._jobs.last_event_seq(job.id)) for job in jobs]

        return Deferred.fromCoroutine(last_seqs()).addCallback(self._take_back)

    def _take_back(self, found: Sequence[tuple[Job, int]]) -> Deferred[None]:
        """:meth:`recover` with the unfinished jobs and their last seqs."""
        queued = 0
        interrupted: list[_Active] = []
        for job, last in found:
            if job.id in self._active:
                continue
            active = _Active(job=job, order=next(self._order), last_event=last)
            self._active[job.id] = active
            if job.state == "queued":
                self._enqueue(active)
                queued += 1
            else:
                interrupted.append(active)
        self.log.info(
            "Recovered {queued} queued jobs and {interrupted} the daemon died under",
            queued=queued,
            interrupted=len(interrupted),
        )
        cleanups = []
        for active in interrupted:
            self.log.error(
                "Job {job_id} was {state} on {backend} when the daemon stopped; cleaning up",
                job_id=active.job.id,
                state=active.job.state,
                backend=active.job.spec.backend,
            )
            cleanups.append(self._clean_up(active, "daemon restarted"))
        self._dispatch()
        done = gatherResults(cleanups, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def stop(self) -> Deferred[None]:
        """Stop starting jobs and cancel the scheduler's timers; call before
        stopping the pool. Jobs the pool's stop interrupts (cancelled, or
        their worker gone) stay running in the store, and the next
        :meth:`recover` cleans them up and retries them (the interrupted
        attempt counts). Results that do arrive are recorded. Fires at once."""
        self._stopped = True
        for active in self._active.values():
            self._cancel_bound(active)
        for b in self._backends.values():
            if b.health_call is not None and b.health_call.active():
                b.health_call.cancel()
            b.health_call = None
        return succeed(None)

    # --- the queue ---------------------------------------------------------------

    def _backend(self, name: str) -> _Backend:
        b = self._backends.get(name)
        if b is None:
            b = self._backends[name] = _Backend(name, self._caps.get(name, self._default_cap))
        return b

    def _backend_status(self, b: _Backend) -> BackendStatus:
        reason = b.reason
        if b.quarantined and b.health_note:
            reason = f"{reason}; {b.health_note}"
        return BackendStatus(
            name=b.name,
            capacity=b.cap,
            running=len(b.running),
            instances=b.instances,
            queued=b.queued,
            state=b.state,
            consecutive_failures=b.consecutive_failures,
            reason=reason,
        )

    def _enqueue(self, active: _Active) -> None:
        job = active.job
        key: _QueueKey = (-job.spec.priority, job.submitted, active.order, job.id)
        b = self._backend(job.spec.backend)
        self._queued[job.id] = key
        heapq.heappush(b.heap, key)
        b.queued += 1

    def _unqueue(self, active: _Active) -> None:
        if self._queued.pop(active.job.id, None) is not None:
            self._backends[active.job.spec.backend].queued -= 1

    def _head(self, b: _Backend) -> _QueueKey:
        """The first queued job of ``b`` (which has one), dropping stale
        entries on the way."""
        heap = b.heap
        while self._queued.get(heap[0][3]) != heap[0]:
            heapq.heappop(heap)
        return heap[0]

    def _dispatch(self) -> None:
        """Start queued jobs while a worker is free and some backend takes
        jobs. Re-entrant calls (a pool that answers at once) loop here."""
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._dispatch_again = False
                while not self._stopped and len(self._in_pool) < self._pool.size:
                    best: tuple[_QueueKey, _Backend] | None = None
                    for b in self._backends.values():
                        if b.may_start:
                            head = self._head(b)
                            size = self._active[head[3]].job.spec.instances
                            if b.instances + size > b.cap:
                                continue  # its head waits for room: no overtaking
                            if best is None or head < best[0]:
                                best = (head, b)
                    if best is None:
                        break
                    key, b = best
                    heapq.heappop(b.heap)
                    del self._queued[key[3]]
                    b.queued -= 1
                    self._start(self._active[key[3]], b)
                again = self._dispatch_again
        finally:
            self._dispatching = False
        if self._on_free is not None and not self._stopped:
            free = self.free_workers()
            if free > 0:
                self._on_free(free)

    def free_workers(self) -> int:
        """Workers that neither run a job nor will run a job queued here."""
        if self._stopped:
            return 0
        return max(0, self._pool.size - len(self._in_pool) - len(self._queued))

    # --- running a job ------------------------------------------------------------

    def _start(self, active: _Active, b: _Backend) -> None:
        job = active.job
        b.running[job.id] = job.spec.instances
        self._in_pool.add(job.id)
        self._set_state(
            active,
            "running",
            started=float(self._wall()),
            attempts=job.attempts + 1,
            reason="",
            result=None,
        )
        active.bound_call = self._clock.callLater(job.spec.bound, self._bound_passed, job.id)
        try:
            d = self._pool.run(active.job, partial(self._on_step, job.id), self._journal)
        except Exception:
            d = fail()
        d.addBoth(self._pool_done, job.id)
        d.addErrback(self._bug, "handling the end of job {job_id}", job.id)

    def _on_step(self, job_id: str, event: StepEvent) -> None:
        active = self._active.get(job_id)
        if active is None or job_id not in self._in_pool:
            self.log.warn(
                "Step event {step} for job {job_id}, which is not running; ignored",
                step=event.name,
                job_id=job_id,
            )
            return
        if active.job.state == "running" and (
            event.name == "cleanup" or event.name.startswith("cleanup ")
        ):
            self._set_state(active, "cleaning")
        self._emit(active, "step", event.state, step=event.name, detail=event.detail, at=event.at)

    def _bound_passed(self, job_id: str) -> None:
        active = self._active.get(job_id)
        if active is None:
            return
        active.bound_call = None
        reason = f"passed its bound of {active.job.spec.bound:g}s"
        self.log.warn("Job {job_id} {reason}; cancelling", job_id=job_id, reason=reason)
        self._request_cancel(active, reason)

    def _cancel_bound(self, active: _Active) -> None:
        if active.bound_call is not None and active.bound_call.active():
            active.bound_call.cancel()
        active.bound_call = None

    def _request_cancel(self, active: _Active, reason: str) -> None:
        job_id = active.job.id
        if active.job.state == "queued":
            self._unqueue(active)
            self._set_state(active, "cancelled", reason=reason)
            self._dispatch()
            return
        if active.cancel_reason is not None:
            return
        active.cancel_reason = reason
        self.log.info("Cancelling job {job_id}: {reason}", job_id=job_id, reason=reason)
        if job_id in self._in_pool:
            try:
                self._pool.cancel(job_id, reason)
            except Exception:
                self.log.failure("While asking the pool to cancel job {job_id}", job_id=job_id)
        # Otherwise the daemon is cleaning up after it; it ends cancelled then.

    def _pool_done(self, outcome: CheckResult | Failure, job_id: str) -> None:
        if job_id in self._abandoned or job_id not in self._active:
            self._abandoned.discard(job_id)
            self._in_pool.discard(job_id)
            for b in self._backends.values():
                b.running.pop(job_id, None)
            self._dispatch()
            return
        self._in_pool.discard(job_id)
        active = self._active[job_id]
        self._cancel_bound(active)
        b = self._backends[active.job.spec.backend]
        b.running.pop(job_id, None)
        if isinstance(outcome, Failure):
            if outcome.check(CancelledError):
                self._set_state(active, "cancelled", reason=active.cancel_reason or "cancelled")
            elif self._stopped:
                self.log.info(
                    "Job {job_id} interrupted by the daemon stopping: {why}",
                    job_id=job_id,
                    why=_describe(outcome),
                )
            else:
                self._worker_failed(active, b, outcome)
        elif self._stopped and _interrupted(outcome) and active.cancel_reason is None:
            self.log.info(
                "Job {job_id} interrupted by the daemon stopping: {why}",
                job_id=job_id,
                why=outcome.error,
            )
        else:
            self._finished(active, b, outcome)
        self._dispatch()

    def _finished(self, active: _Active, b: _Backend, result: CheckResult) -> None:
        state: JobState
        if result.passed:
            state, reason = "passed", ""
            b.consecutive_failures = 0
        elif active.cancel_reason is not None:
            state, reason = "cancelled", active.cancel_reason
        else:
            state, reason = "failed", result.error
            if result.kind is FailureKind.INFRASTRUCTURE:
                self.log.error(
                    "Job {job_id} on {backend} failed in the infrastructure: {error}",
                    job_id=active.job.id,
                    backend=b.name,
                    error=result.error,
                )
                self._backend_failed(b, result.error)
            else:
                b.consecutive_failures = 0
        self._set_state(active, state, reason=reason, result=result)

    def _worker_failed(self, active: _Active, b: _Backend, failure: Failure) -> None:
        job_id = active.job.id
        if failure.check(WorkerDied):
            reason = str(failure.value)
            self.log.error(
                "Job {job_id} on {backend}: {reason}", job_id=job_id, backend=b.name, reason=reason
            )
        else:
            reason = _describe(failure)
            self.log.failure(
                "The pool failed job {job_id} on {backend}",
                failure,
                job_id=job_id,
                backend=b.name,
            )
        self._backend_failed(b, reason)
        self._clean_up(active, reason)

    def _clean_up(self, active: _Active, reason: str) -> Deferred[None]:
        """Clean up after a job whose worker is gone, then retry or end it."""
        job = active.job
        self._set_state(active, "cleaning", reason=reason)
        d: Deferred[None] = maybeDeferred(self._cleaner, active.job).addBoth(
            self._cleaned, job.id, reason
        )
        d.addErrback(self._bug, "cleaning up after job {job_id}", job.id)
        return d

    def _cleaned(self, outcome: tuple[str, ...] | Failure, job_id: str, reason: str) -> None:
        active = self._active.get(job_id)
        if active is None:  # let go of meanwhile (abandon)
            if isinstance(outcome, Failure):
                self.log.failure("While cleaning up after job {job_id}", outcome, job_id=job_id)
            return
        job = active.job
        if isinstance(outcome, Failure):
            self.log.failure("While cleaning up after job {job_id}", outcome, job_id=job_id)
        elif outcome:
            self.log.error(
                "Cleanup after job {job_id} left errors (the reaper will find what is left):"
                " {errors}",
                job_id=job_id,
                errors="; ".join(outcome),
            )
        if active.cancel_reason is not None:
            self._set_state(active, "cancelled", reason=active.cancel_reason)
        elif job.attempts < job.spec.max_attempts:
            self.log.info(
                "Job {job_id} queued again (attempt {attempt} of {max_attempts}) after: {reason}",
                job_id=job_id,
                attempt=job.attempts + 1,
                max_attempts=job.spec.max_attempts,
                reason=reason,
            )
            self._set_state(active, "queued", reason=reason)
            if self._on_requeue is not None:
                del self._active[job_id]
                self._on_requeue(active.job)
            else:
                self._enqueue(active)
        else:
            self._set_state(active, "error", reason=reason)
        self._dispatch()

    # --- backends -------------------------------------------------------------------

    def _backend_failed(self, b: _Backend, reason: str) -> None:
        b.consecutive_failures += 1
        if b.consecutive_failures < self._quarantine_after:
            return
        b.reason = f"{b.consecutive_failures} infrastructure failures in a row; last: {reason}"
        if not b.quarantined:
            b.quarantined = True
            b.health_note = ""
            self.log.error(
                "Backend {backend} quarantined: {reason}", backend=b.name, reason=b.reason
            )
            self._schedule_health(b)

    def _end_quarantine(self, b: _Backend, why: str) -> None:
        b.quarantined = False
        b.consecutive_failures = 0
        b.reason = b.health_note = ""
        if b.health_call is not None and b.health_call.active():
            b.health_call.cancel()
        b.health_call = None
        self.log.info("Backend {backend} active again: {why}", backend=b.name, why=why)
        self._dispatch()

    def _schedule_health(self, b: _Backend) -> None:
        if self._health_check is None or self._stopped or not b.quarantined:
            return
        if b.health_call is None or not b.health_call.active():
            b.health_call = self._clock.callLater(self._health_interval, self._health_tick, b)

    def _health_tick(self, b: _Backend) -> None:
        b.health_call = None
        self._check_health(b).addCallback(lambda _: self._schedule_health(b))

    def _check_health(self, b: _Backend) -> Deferred[None]:
        """Run the health check of quarantined ``b`` (once at a time); fires
        when it has answered and the backend's state follows the answer."""
        waiter: Deferred[None] = Deferred()
        if b.health_waiters is not None:
            b.health_waiters.append(waiter)
            return waiter
        b.health_waiters = [waiter]
        check = self._health_check
        assert check is not None

        def answered(outcome: object) -> None:
            waiters, b.health_waiters = b.health_waiters or [], None
            if not b.quarantined:
                pass
            elif outcome is True:
                self._end_quarantine(b, "health check passed")
            else:
                if isinstance(outcome, Failure):
                    note = f"health check failed: {_describe(outcome)}"
                else:
                    note = f"health check did not pass (answered {outcome!r})"
                b.health_note = note
                self.log.error(
                    "Backend {backend} stays quarantined: {note}", backend=b.name, note=note
                )
            for w in waiters:
                w.callback(None)

        maybeDeferred(check, b.name).addBoth(answered)
        return waiter

    # --- state, events, watchers --------------------------------------------------------

    def _set_state(self, active: _Active, state: JobState, **changes: Any) -> None:
        old = active.job
        move(old.id, old.state, state)  # the lifecycle's input; AssertionError if none
        final = state in FINAL_STATES
        if final:
            changes["finished"] = float(self._wall())
        job = attrs.evolve(old, state=state, **changes)
        self._store.update(job)
        active.job = job
        self._emit(active, "state", state, detail=job.reason)
        if state != old.state:
            self.log.info(
                "Job {job_id} {old} -> {new}{why}",
                job_id=job.id,
                old=old.state,
                new=state,
                why=f": {job.reason}" if job.reason else "",
            )
        if final:
            self._cancel_bound(active)
            del self._active[job.id]
            active.watchers.clear()
            waiters, active.waiters = active.waiters, []
            for d in waiters:
                d.callback(job)

    def _emit(
        self,
        active: _Active,
        kind: Literal["state", "step"],
        state: str,
        *,
        step: str = "",
        detail: str = "",
        at: float | None = None,
    ) -> None:
        active.last_event += 1
        event = JobEvent(
            job_id=active.job.id,
            seq=active.last_event,
            at=float(self._wall()) if at is None else float(at),
            kind=kind,
            state=state,
            step=step,
            detail=detail,
        )
        self._store.add_event(event)
        for key, listener in list(active.watchers.items()):
            if not self._tell(listener, event):
                active.watchers.pop(key, None)
        self._notify(active.job, event)

    def _tell(self, listener: Listener, event: JobEvent) -> bool:
        try:
            listener(event)
        except Exception:
            self.log.failure("Watcher of job {job_id} failed; it is dropped", job_id=event.job_id)
            return False
        return True

    def _bug(self, failure: Failure, what: str, job_id: str) -> None:
        self.log.failure("Bug while " + what, failure, job_id=job_id)

def _interrupted(result: CheckResult) -> bool:
    """Whether ``result`` is that of a check cancelled under it (the pool
    cancels every job when it stops)."""
    return result.kind is FailureKind.CANCELLED
