"""The seams inside the daemon. Data flows one way:

    AMP server -> IScheduler -> IWorkerPool -> worker process (Check)
                      |                            |
                  IJobStore  <---- events, journal (acked) ----+
                  IJobWriter

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
    read through SharedScheduler.)"""

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

