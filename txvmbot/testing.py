"""Test doubles for code that drives txvmbot's daemon parts.

:class:`FakeWorkerPool` is an IWorkerPool whose "workers" do nothing until
the test says so: the test sees each job the pool was given and makes it
report steps, pass, fail, be cancelled, or have its worker die::

    pool = FakeWorkerPool(size=2)
    scheduler = Scheduler(Clock(), SQLiteJobStore.memory(), pool, MemoryJournal(),
                          cleaner=RecordingCleaner())
    job = scheduler.submit(make_job_spec(backend="b"))
    pool.step(job.id, "create keypair", "passed")
    pool.finish(job.id, passed=True)

:func:`make_job_spec` and :func:`make_result` build valid values with
little typing. Nothing here touches the network, the disk or the reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from txvmbot.daemon.interfaces import IWorkerPool
from txvmbot.daemon.jobs import Job, JobSpec, check_id_for
from txvmbot.errors import WorkerDied
from txvmbot.model import (
    CheckResult,
    CheckSpec,
    Cloud,
    Facts,
    FailureKind,
    StepEvent,
    StepResult,
)

__all__ = [
    "FakeRun",
    "FakeWorkerPool",
    "PoolOvercommitted",
    "RecordingCleaner",
    "make_job_spec",
    "make_result",
]


def make_job_spec(
    backend: str = "test",
    *,
    priority: int = 0,
    bound: float = 3600.0,
    max_attempts: int = 2,
    image: str = "ami-12345678",
    endpoint: str = "http://127.0.0.1:5000",
    region: str = "us-east-1",
    parallel: int = 1,
) -> JobSpec:
    """A valid JobSpec that survives the codec's round trip unchanged."""
    cloud = Cloud(endpoint=endpoint, region=region, name=backend)
    return JobSpec(
        check=CheckSpec(cloud=cloud, image=image, parallel=parallel),
        backend=backend,
        priority=priority,
        bound=bound,
        max_attempts=max_attempts,
    )


def make_result(
    job: Job,
    passed: bool = True,
    error: str = "",
    steps: tuple[StepResult, ...] = (),
    kind: FailureKind | None = None,
) -> CheckResult:
    """A CheckResult for the current attempt of ``job`` (a failed one is the
    test's unless ``kind`` says otherwise)."""
    return CheckResult(
        check_id=check_id_for(job), passed=passed, steps=steps, facts=Facts(), error=error,
        kind=kind,
    )


class PoolOvercommitted(AssertionError):
    """The fake pool was asked to run a job while all its workers were busy."""


@attrs.define(eq=False)
class FakeRun:
    """One job the fake pool was asked to run, and the means to end it."""

    pool: FakeWorkerPool
    job: Job
    on_event: Callable[[StepEvent], None]
    journal: Any
    deferred: Deferred[CheckResult]
    cancel_reason: str | None = None
    done: bool = False

    def step(self, name: str, state: Any = "running", detail: str = "", at: float = 0.0) -> None:
        """Report a step event, as the worker streams them."""
        self._check_live()
        self.on_event(StepEvent(name=name, state=state, at=at, detail=detail))

    def finish(
        self,
        passed: bool = True,
        error: str = "",
        result: CheckResult | None = None,
        kind: FailureKind | None = None,
    ) -> None:
        """The worker answers with a result (``make_result`` unless given)."""
        self._end()
        self.deferred.callback(result or make_result(self.job, passed, error, kind=kind))

    def finish_cancelled(self) -> None:
        """The worker, told to cancel, cleaned up and answers: cancelled."""
        error = f"cancelled: {self.cancel_reason or 'by request'}"
        self._end()
        self.deferred.callback(make_result(self.job, False, error, kind=FailureKind.CANCELLED))

    def die(self, status: str = "killed by signal 9", stderr_tail: str = "") -> None:
        """The worker process ends under the job."""
        self._end()
        self.deferred.errback(WorkerDied(self.job.id, status, stderr_tail))

    def fail(self, exc: BaseException) -> None:
        """The run fails with ``exc`` (CancelledError, an AMP error, ...)."""
        self._end()
        self.deferred.errback(exc)

    def _check_live(self) -> None:
        if self.done:
            raise AssertionError(f"job {self.job.id} already ended in the fake pool")

    def _end(self) -> None:
        # The worker is free before its answer arrives, as in a real pool.
        self._check_live()
        self.done = True
        del self.pool.running[self.job.id]


@implementer(IWorkerPool)
class FakeWorkerPool:
    """An IWorkerPool driven by the test.

    ``running`` maps the id of each job now in a worker to its
    :class:`FakeRun`, in the order they started; ``runs`` keeps every run
    ever; ``cancels`` every ``(job_id, reason)`` asked. With
    ``cancel_at_once`` a cancelled job answers "cancelled" as soon as it is
    asked to, else the test calls ``finish_cancelled``. Asking it to run
    more jobs than ``size`` raises :class:`PoolOvercommitted`.
    """

    def __init__(self, size: int = 4, *, cancel_at_once: bool = False) -> None:
        self.size = size
        self.cancel_at_once = cancel_at_once
        self.running: dict[str, FakeRun] = {}
        self.runs: list[FakeRun] = []
        self.cancels: list[tuple[str, str]] = []
        self.started = False
        self.stopped = False

    @property
    def busy(self) -> int:
        return len(self.running)

    def start(self) -> Deferred[None]:
        self.started = True
        return succeed(None)

    def stop(self) -> Deferred[None]:
        self.stopped = True
        return succeed(None)

    def run(
        self, job: Job, on_event: Callable[[StepEvent], None], journal: Any
    ) -> Deferred[CheckResult]:
        if len(self.running) >= self.size:
            raise PoolOvercommitted(
                f"run({job.id}) while all {self.size} workers are busy "
                f"with {', '.join(self.running)}"
            )
        if job.id in self.running:
            raise PoolOvercommitted(f"job {job.id} is already running")
        d: Deferred[CheckResult] = Deferred()
        r = FakeRun(self, job, on_event, journal, d)
        self.running[job.id] = r
        self.runs.append(r)
        return d

    def cancel(self, job_id: str, reason: str) -> None:
        self.cancels.append((job_id, reason))
        r = self.running.get(job_id)
        if r is None:
            return
        r.cancel_reason = reason
        if self.cancel_at_once:
            r.finish_cancelled()

    # --- for the test -------------------------------------------------------------

    def get(self, job_id: str) -> FakeRun:
        """The running job ``job_id``; KeyError names what is running."""
        try:
            return self.running[job_id]
        except KeyError:
            raise KeyError(f"job {job_id} is not running; running: {list(self.running)}") from None

    def step(self, job_id: str, name: str, state: Any = "running", detail: str = "") -> None:
        self.get(job_id).step(name, state, detail)

    def finish(
        self, job_id: str, passed: bool = True, error: str = "", kind: FailureKind | None = None
    ) -> None:
        self.get(job_id).finish(passed, error, kind=kind)

    def die(self, job_id: str, status: str = "killed by signal 9", stderr_tail: str = "") -> None:
        self.get(job_id).die(status, stderr_tail)

    def finish_all(self, passed: bool = True, limit: int = 100_000) -> int:
        """Finish running jobs, and the jobs that start in their place, until
        none runs (at most ``limit``); return how many finished."""
        n = 0
        while self.running and n < limit:
            r = next(iter(self.running.values()))
            if r.cancel_reason is not None:
                r.finish_cancelled()
            else:
                r.finish(passed)
            n += 1
        return n


class RecordingCleaner:
    """A scheduler ``cleaner`` that records the jobs it was given.

    By default it answers at once with ``errors``; with ``manual`` it
    returns a Deferred the test fires from ``pending``.
    """

    def __init__(self, errors: tuple[str, ...] = (), *, manual: bool = False) -> None:
        self.errors = errors
        self.manual = manual
        self.jobs: list[Job] = []
        self.pending: list[Deferred[tuple[str, ...]]] = []

    def __call__(self, job: Job) -> Deferred[tuple[str, ...]]:
        self.jobs.append(job)
        if not self.manual:
            return succeed(self.errors)
        d: Deferred[tuple[str, ...]] = Deferred()
        self.pending.append(d)
        return d

    def release_all(self) -> None:
        """Fire every pending cleanup with ``errors``."""
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(self.errors)
