"""The seams inside the daemon. Data flows one way:

    AMP server -> IScheduler -> IDispatcher -> IWorkerPool -> worker (Check)
                      |              |                            |
                  IJobStore      IJobWriter <---- events, journal (acked)

IScheduler is what clients drive (the front end: submits, reads, watches,
cancels), over an IJobQueue (SQLite: a cluster of one, which claims a
submit at once; PostgreSQL: the cluster claims); IDispatcher runs the jobs this daemon holds (queue, caps, drain,
quarantine, recovery), handed to it by the front end or by the cluster.

A seam answers one way: every method of IJobStore and IScheduler returns a
Deferred, also where the answer is known at once (the SQLite store answers
with ``succeed()``), so a caller never asks whether it got one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent, JobSpec
    from txvmbot.daemon.scheduling.failures import FailureReport
    from txvmbot.errors import TxvmbotError


class IJobWriter(Interface):
    """Where the scheduler's engine writes what happens to the jobs it runs,
    in order, without waiting: a job's new value and its new events. The
    provider holds or queues a write it cannot make now (a full disk, a
    database out of reach) and reports trouble itself; the engine goes on.
    The SQLite stores provide it beside IJobStore; with a shared PostgreSQL
    store it is a txvmbot.daemon.stores.postgres.writer.JobWriter."""

    def update(job: Job) -> None:
        """Replace the stored job with this newer value of it."""

    def add_event(event: JobEvent) -> None:
        """Append a JobEvent."""


class IJobStore(Interface):
    """Durable jobs and their events, in SQLite, written by the daemon
    process alone. Every method returns a Deferred. (With a shared
    PostgreSQL store the scheduler writes through a JobWriter and clients
    read through the SharedQueue.)"""

    def add(job: Job, event: JobEvent | None = None) -> Deferred[None]:
        """Store a new job (in state queued), and its first JobEvent if
        given, in one transaction."""

    def add_many(submits: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        """Store new jobs, each with its first JobEvent, in one
        transaction: all or none."""

    def get(job_id: str) -> Deferred[Job | None]:
        """The Job, or None."""

    def list(
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        """Jobs, newest first, filtered by state set and backend; with
        ``before`` (a job id), those listed after that job."""

    def unfinished() -> Deferred[Sequence[Job]]:
        """Jobs not in a final state, oldest first (for recovery)."""

    def events(job_id: str, after_seq: int = 0) -> Deferred[Sequence[JobEvent]]:
        """A job's events with seq > after_seq, in order."""

    def last_event_seq(job_id: str) -> Deferred[int]:
        """The seq of the job's last event, 0 if none."""

    def prune(finished_before: float, limit: int = 500) -> Deferred[int]:
        """Delete up to ``limit`` jobs in a final state that finished before
        ``finished_before`` (epoch seconds), with their events, in one
        transaction; fire with how many jobs went. Never touches unfinished
        jobs. Call again while it fires with ``limit``."""

    def close() -> Deferred[None]:
        """Close the database."""


class IWorkerPool(Interface):
    """Worker processes that run one job each at a time."""

    size = Attribute("How many workers the pool runs (int).")
    busy = Attribute("How many are running a job right now (int).")

    def start() -> Any:
        """Start the workers; Deferred fires when they are ready."""

    def run(job: Any, on_event: Any, journal: Any) -> Any:
        """Run ``job`` (a txvmbot.daemon.jobs.Job) in a free worker. ``on_event``
        is called with each StepEvent the worker streams; ``journal`` (an
        IJournal) records, before each create, what the worker is about to
        create. Returns a Deferred firing with the CheckResult (also after
        cancel(): then a failed result, cleanup done), or failing with
        WorkerDied (exit status, stderr tail)."""

    def cancel(job_id: str, reason: str) -> None:
        """Cancel the running job: the worker stops at its current step and
        cleans up; the job's run() Deferred then fires with the cancelled
        CheckResult."""

    def stop() -> Any:
        """Stop all workers; Deferred."""


class IScheduler(Interface):
    """What the AMP API, the web page and the CLI's daemon drive. Every
    method returns a Deferred; errors named below fail it."""

    def submit(spec: JobSpec) -> Deferred[Job]:
        """Queue a JobSpec; fire with the Job (state queued), stored."""

    def submit_many(specs: Sequence[JobSpec]) -> Deferred[Sequence[Job | TxvmbotError]]:
        """Queue JobSpecs with one write to the store; fire, for each in
        order, with its Job (state queued) or the TxvmbotError that refused
        it alone. Fails (nothing queued) when the store write fails."""

    def get(job_id: str) -> Deferred[Job]:
        """The Job; fails with UnknownJob."""

    def list(
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        """Jobs, newest first; with ``before`` (a job id, the last of the
        previous page), the next page. Fails with UnknownJob for an unknown
        ``before``."""

    def watch(
        job_id: str, after_seq: int, listener: Callable[[JobEvent], object]
    ) -> Deferred[Callable[[], None]]:
        """Call ``listener(event)`` with the job's events after ``after_seq``
        (the stored ones first, new ones as they happen) until the job is
        final; fire, once the stored ones were told, with a callable that
        stops watching. Fails with UnknownJob."""

    def cancel(job_id: str) -> Deferred[Job]:
        """Cancel a queued or running job (running: cleanup runs in the
        worker first). Fires with the final Job."""

    def drain(backend: str) -> Deferred[BackendStatus]:
        """New jobs for ``backend`` wait; running ones finish."""

    def resume(backend: str) -> Deferred[BackendStatus]:
        """Undo drain (and quarantine, after a passing health check)."""

    def status() -> Deferred[DaemonStatus]:
        """Workers, queue and backends."""

    def failures(by: Sequence[str], since: float, limit: int = 10000) -> Deferred[FailureReport]:
        """Of the newest ``limit`` finished jobs, those that finished at or
        after ``since`` (epoch seconds), grouped by the facts named in
        ``by``. Fails with ConfigError for an unknown name."""



class IDispatcher(Interface):
    """The engine that runs the jobs this daemon holds: what the front ends
    (IScheduler), the cluster, the shared store's writer and the metrics
    drive. Its methods answer at once, but for those that wait on a worker
    or a health check (Deferreds); it never reads or writes for a client."""

    def queue_new(new: Sequence[tuple[Job, JobEvent]]) -> None:
        """Hold and queue jobs a front end has just stored, each with its
        first ("queued") event; start what can start."""

    def adopt(job: Job, last_seq: int, cancel: str | None = None) -> None:
        """Hold and queue ``job`` (queued, claimed from a shared queue);
        ``last_seq`` is its last stored event's; ``cancel``, a cancel asked
        for before the claim."""

    def adopt_interrupted(
        job: Job, last_seq: int, reason: str, cancel: str | None = None
    ) -> Deferred[None]:
        """Hold ``job`` (running or cleaning under a daemon that died), clean
        up after it, then retry or end it. Fires when the cleanup has run."""

    def recover() -> Deferred[None]:
        """Take back the jobs the store holds unfinished (start-up)."""

    def abandon(reason: str, job_ids: Collection[str] | None = None) -> None:
        """Let go of the jobs held here (all, or those in ``job_ids``)."""

    def holds(job_id: str) -> bool:
        """Whether the job is unfinished here."""

    def holding(job_id: str) -> Job | None:
        """The job as held here now, or None."""

    def follow(job_id: str, listener: Callable[[JobEvent], object]) -> Callable[[], None] | None:
        """Tell ``listener`` the held job's new events; a callable that stops
        it, or None when the job is not held here."""

    def cancel(job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job held here; fires with the final Job. Fails with
        UnknownJob for a job not held here."""

    def refusal(spec: JobSpec) -> TxvmbotError | None:
        """Why ``spec`` can never start here, or None."""

    def cap(backend: str) -> int:
        """``backend``'s cap on running instances."""

    def drain(backend: str) -> Deferred[BackendStatus]:
        """Start no more jobs of ``backend`` here (fires at once)."""

    def resume(backend: str) -> Deferred[BackendStatus]:
        """Undo drain here (and quarantine, after a passing health check)."""

    def set_draining(backend: str, draining: bool) -> None:
        """Follow a drain or resume made on another daemon."""

    def held_back() -> frozenset[str]:
        """The backends this daemon starts no job of now."""

    def free_workers() -> int:
        """Workers that neither run a job nor will run a job queued here."""

    def status_now() -> DaemonStatus:
        """Workers, queue and backends of this daemon, at once."""

    def list_now(
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Sequence[Job]:
        """Stored jobs, at once, where the store answers at once (SQLite);
        none otherwise (the metrics' seed)."""

    def observe(observer: Callable[[Job, JobEvent], None]) -> Callable[[], None]:
        """Tell ``observer`` every event of every job held here from now on;
        returns a callable that stops it."""

    def tell_observers(job: Job, event: JobEvent) -> None:
        """Tell the observers of an event that happened elsewhere (a submit
        to a shared store)."""

    def stop() -> Deferred[None]:
        """Start no more jobs and cancel the timers (before the pool
        stops); fires at once."""


class IJobQueue(Interface):
    """Where the front end (IScheduler) keeps clients' jobs until a daemon
    claims them, and reads them: over a daemon's own SQLite store (a
    cluster of one: a submit is claimed by this daemon at once), or over a
    shared PostgreSQL (the cluster's lease and claims decide). The jobs
    this daemon holds are the front end's and the dispatcher's affair."""

    def enqueue(new: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        """Store new queued jobs, each with its first event, in one
        transaction (all or none), and have them claimed."""

    def get(job_id: str) -> Deferred[Job | None]:
        """The stored Job, or None."""

    def list(
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        """Stored jobs, newest first (IJobStore.list)."""

    def watch(
        job_id: str, after_seq: int, listener: Callable[[JobEvent], object]
    ) -> Deferred[Callable[[], None]]:
        """IScheduler.watch, wherever the job runs."""

    def cancel(job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """Cancel a job this daemon does not hold; fires with the final Job,
        fails with UnknownJob."""

    def set_draining(backend: str, draining: bool) -> Deferred[None]:
        """Drain or resume ``backend`` for every daemon of the queue."""

    def status(mine: DaemonStatus) -> Deferred[DaemonStatus]:
        """The queue's status, given this daemon's (``mine``)."""

    def notice(noticer: Callable[[str], object]) -> Callable[[], None]:
        """Call ``noticer(job_id)`` when another daemon stores events of a
        job; returns a callable that stops it."""
