"""An in-memory IScheduler for testing the AMP API and its clients, and
``SPEC``, a job spec (as submitted) whose endpoint reaches nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from txvmbot.daemon.interfaces import IScheduler
from txvmbot.daemon.jobs import (
    FINAL_STATES,
    BackendStatus,
    DaemonStatus,
    Job,
    JobEvent,
    JobSpec,
)
from txvmbot.daemon.scheduling.failures import FailureReport, group_failures
from txvmbot.errors import TxvmbotError, UnknownJob
from txvmbot.model import CheckResult, Facts, StepResult

#: A job spec, as a client submits it; its endpoint reaches nothing.
SPEC = {"endpoint": "http://127.0.0.1:1/", "region": "r", "image": "ami-1"}


class BackendUnknown(TxvmbotError):
    pass


def passing_result(check_id: str) -> CheckResult:
    return CheckResult(
        check_id=check_id,
        passed=True,
        steps=(StepResult("keypair", 1000.0, 0.5, "passed"),),
        facts=Facts(endpoint="http://127.0.0.1:1/"),
    )


def failing_result(check_id: str) -> CheckResult:
    return CheckResult(
        check_id=check_id,
        passed=False,
        steps=(
            StepResult("keypair", 1000.0, 0.5, "passed"),
            StepResult("wait-running", 1000.5, 3.0, "timeout", "last seen: pending"),
        ),
        facts=Facts(),
        error="step 'wait-running' failed: last seen: pending",
    )


@implementer(IScheduler)
class FakeScheduler:
    """Jobs in a dict; tests drive them with :meth:`step`, :meth:`finish`.

    ``cancel_later`` makes :meth:`cancel` return a Deferred the test fires
    (with :meth:`finish_cancel`), as a running job's cleanup would.
    ``boom`` makes every method fail with that exception (a bug in the
    scheduler). Every answer is a Deferred, as IScheduler says; the
    ``*_now`` methods answer at once, for the tests' own use.
    """

    def __init__(self, now: Callable[[], float] = lambda: 1000.0) -> None:
        self.now = now
        self.jobs: dict[str, Job] = {}
        self.events: dict[str, list[JobEvent]] = {}
        self.listeners: dict[str, list[Callable[[JobEvent], Any]]] = {}
        self.backends: dict[str, BackendStatus] = {}
        self.cancel_later = False
        self.pending_cancels: dict[str, Deferred[Job]] = {}
        self.boom: Exception | None = None
        #: How many specs each submit_many call was given, in order.
        self.batches: list[int] = []
        #: The (by, since, limit) of each failures() call, in order.
        self.failure_calls: list[tuple[tuple[str, ...], float, int]] = []
        self._n = 0

    def _check(self) -> None:
        if self.boom is not None:
            raise self.boom

    # --- driving -----------------------------------------------------------------

    def _emit(self, job_id: str, kind: str, state: str, step: str = "", detail: str = "") -> None:
        events = self.events[job_id]
        ev = JobEvent(job_id, len(events) + 1, self.now(), kind, state, step, detail)  # type: ignore[arg-type]
        events.append(ev)
        for listener in list(self.listeners.get(job_id, [])):
            listener(ev)
        if kind == "state" and state in FINAL_STATES:
            self.listeners.pop(job_id, None)

    def set_state(self, job_id: str, state: str, **changes: Any) -> Job:
        job = attrs.evolve(self.jobs[job_id], state=state, **changes)  # type: ignore[arg-type]
        self.jobs[job_id] = job
        self._emit(job_id, "state", state)
        return job

    def step(self, job_id: str, name: str, state: str, detail: str = "") -> None:
        self._emit(job_id, "step", state, name, detail)

    def finish(self, job_id: str, passed: bool = True, state: str | None = None) -> Job:
        job = self.jobs[job_id]
        check_id = f"{job_id}-{job.attempts}"
        result = passing_result(check_id) if passed else failing_result(check_id)
        final = state or ("passed" if passed else "failed")
        return self.set_state(job_id, final, result=result, finished=self.now())

    def finish_cancel(self, job_id: str) -> None:
        job = self.set_state(
            job_id, "cancelled", reason="cancelled by a client", finished=self.now()
        )
        self.pending_cancels.pop(job_id).callback(job)

    def watcher_count(self, job_id: str) -> int:
        return len(self.listeners.get(job_id, []))

    def _answer(self, call: Callable[..., Any], *args: Any, **kw: Any) -> Deferred[Any]:
        try:
            self._check()
            return succeed(call(*args, **kw))
        except Exception:
            return fail()

    # --- IScheduler ----------------------------------------------------------------

    def submit_many(self, specs: Sequence[JobSpec]) -> Deferred[Sequence[Job | TxvmbotError]]:
        self.batches.append(len(specs))
        return self._answer(lambda: [self.submit_now(spec) for spec in specs])

    def submit(self, spec: JobSpec) -> Deferred[Job]:
        return self._answer(self.submit_now, spec)

    def submit_now(self, spec: JobSpec) -> Job:
        self._n += 1
        job = Job(id=f"job-{self._n}", spec=spec, state="queued", submitted=self.now())
        self.jobs[job.id] = job
        self.events[job.id] = []
        self._emit(job.id, "state", "queued")
        return job

    def get(self, job_id: str) -> Deferred[Job]:
        return self._answer(self.get_now, job_id)

    def get_now(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def list(
        self, states: Any = None, backend: str | None = None, limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        return self._answer(self.list_now, states, backend, limit, before)

    def list_now(
        self, states: Any = None, backend: str | None = None, limit: int = 100,
        before: str | None = None,
    ) -> list[Job]:
        # Newest first: by submitted time, then by submission (job-N's N).
        jobs = sorted(
            self.jobs.values(), key=lambda j: (j.submitted, int(j.id.split("-")[1])), reverse=True
        )
        if before is not None:
            jobs = jobs[jobs.index(self.get_now(before)) + 1 :]
        jobs = [
            j
            for j in jobs
            if (states is None or j.state in states)
            and (backend is None or j.spec.backend == backend)
        ]
        return jobs[:limit]

    def watch(
        self, job_id: str, after_seq: int, listener: Callable[[JobEvent], Any]
    ) -> Deferred[Callable[[], None]]:
        return self._answer(self._watch, job_id, after_seq, listener)

    def _watch(
        self, job_id: str, after_seq: int, listener: Callable[[JobEvent], Any]
    ) -> Callable[[], None]:
        job = self.get_now(job_id)
        for ev in self.events[job_id]:
            if ev.seq > after_seq:
                listener(ev)
        if job.final:
            return lambda: None
        self.listeners.setdefault(job_id, []).append(listener)

        def stop() -> None:
            ls = self.listeners.get(job_id, [])
            if listener in ls:
                ls.remove(listener)

        return stop

    def cancel(self, job_id: str) -> Deferred[Job]:
        try:
            self._check()
            job = self.get_now(job_id)
        except Exception:
            return fail()
        if job.final:
            return succeed(job)
        if self.cancel_later:
            d: Deferred[Job] = Deferred()
            self.pending_cancels[job_id] = d
            return d
        return succeed(
            self.set_state(job_id, "cancelled", reason="cancelled by a client", finished=self.now())
        )

    def _backend(self, name: str) -> BackendStatus:
        if name == "nowhere":
            raise BackendUnknown(f"no backend named {name!r}")
        return self.backends.get(name) or BackendStatus(name, 4, 0, 0, "active")

    def drain(self, backend: str) -> Deferred[BackendStatus]:
        return self._answer(self._set_backend, backend, "draining")

    def resume(self, backend: str) -> Deferred[BackendStatus]:
        return self._answer(self._set_backend, backend, "active")

    def _set_backend(self, backend: str, state: str) -> BackendStatus:
        b = attrs.evolve(self._backend(backend), state=state)
        self.backends[backend] = b
        return b

    def status(self) -> Deferred[DaemonStatus]:
        return self._answer(self.status_now)

    def status_now(self) -> DaemonStatus:
        return DaemonStatus(
            api_version=1,
            workers=2,
            busy_workers=sum(1 for j in self.jobs.values() if j.state == "running"),
            queue_depth=sum(1 for j in self.jobs.values() if j.state == "queued"),
            running=sum(1 for j in self.jobs.values() if j.state == "running"),
            backends=tuple(self.backends.values()),
        )

    def failures(
        self, by: Sequence[str], since: float, limit: int = 10_000
    ) -> Deferred[FailureReport]:
        return self._answer(self._failures, by, since, limit)

    def _failures(self, by: Sequence[str], since: float, limit: int) -> FailureReport:
        self.failure_calls.append((tuple(by), since, limit))
        final = self.list_now(states=FINAL_STATES, limit=limit + 1)
        return group_failures(final[:limit], by, since, complete=len(final) <= limit)
