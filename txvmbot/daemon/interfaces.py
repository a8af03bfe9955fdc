"""The seams inside the daemon. Data flows one way:

    AMP server -> IScheduler -> IWorkerPool -> worker process (Check)
                      |                            |
                  IJobStore  <---- events, journal (acked) ----+
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IJobStore(Interface):
    """Durable jobs and their events, in SQLite, written by the daemon
    process alone. (With a shared PostgreSQL store the scheduler writes
    through a txvmbot.daemon.stores.postgres.writer.JobWriter, ``update`` and
    ``add_event`` only, and clients read through SharedScheduler.)"""

    def add(job: Any, event: Any = None) -> None:
        """Store a new job (a txvmbot.daemon.jobs.Job in state queued), and its
        first JobEvent if given, in one transaction."""

    def add_many(submits: Any) -> None:
        """Store new jobs, each with its first JobEvent ((job, event)
        pairs), in one transaction: all or none."""

    def update(job: Any) -> None:
        """Replace the stored job with this newer value of it."""

    def get(job_id: str) -> Any:
        """The Job, or None."""

    def list(
        states: Any = None, backend: str | None = None, limit: int = 100, before: str | None = None
    ) -> Any:
        """Jobs, newest first, filtered by state set and backend; with
        ``before`` (a job id), those listed after that job."""

    def unfinished() -> Any:
        """Jobs not in a final state, oldest first (for recovery)."""

    def add_event(event: Any) -> None:
        """Append a JobEvent."""

    def events(job_id: str, after_seq: int = 0) -> Any:
        """A job's events with seq > after_seq, in order."""

    def last_event_seq(job_id: str) -> int:
        """The seq of the job's last event, 0 if none."""

    def prune(finished_before: float, limit: int = 500) -> int:
        """Delete up to ``limit`` jobs in a final state that finished before
        ``finished_before`` (epoch seconds), with their events, in one
        transaction; return how many jobs went. Never touches unfinished
        jobs. Call again while it returns ``limit``."""

    def close() -> None:
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
    """What the AMP API drives."""

    def submit(spec: Any) -> Any:
        """Queue a JobSpec; return the Job (state queued), stored."""

    def submit_many(specs: Any) -> Any:
        """Queue JobSpecs with one write to the store; return, for each in
        order, its Job (state queued) or the TxvmbotError that refused it
        alone. Raises (nothing queued) when the store write fails."""

    def get(job_id: str) -> Any:
        """The Job, or raise UnknownJob."""

    def list(
        states: Any = None, backend: str | None = None, limit: int = 100, before: str | None = None
    ) -> Any:
        """Jobs, newest first; with ``before`` (a job id, the last of the
        previous page), the next page. Raises UnknownJob for an unknown
        ``before``."""

    def watch(job_id: str, after_seq: int, listener: Any) -> Any:
        """Call ``listener(event)`` with the job's events after ``after_seq``
        (the stored ones now, new ones as they happen) until the job is
        final; return a callable that stops watching."""

    def cancel(job_id: str) -> Any:
        """Cancel a queued or running job (running: cleanup runs in the
        worker first). Returns a Deferred firing with the final Job."""

    def drain(backend: str) -> Any:
        """New jobs for ``backend`` wait; running ones finish."""

    def resume(backend: str) -> Any:
        """Undo drain (and quarantine, after a passing health check)."""

    def status() -> Any:
        """A DaemonStatus."""

    def failures(by: Any, since: float, limit: int = 10000) -> Any:
        """A txvmbot.daemon.scheduling.failures.FailureReport (or a Deferred firing
        with one): of the newest ``limit`` finished jobs, those that
        finished at or after ``since`` (epoch seconds), grouped by the
        facts named in ``by``. Raises ConfigError for an unknown name."""
