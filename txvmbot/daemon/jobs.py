"""Frozen values for the daemon's jobs: what a client submits, what the
daemon stores and reports, what watchers are told."""

from __future__ import annotations

from typing import Literal

from attrs import frozen

from txvmbot.jobs.suite.spec import SuiteSpec
from txvmbot.model import CheckResult, CheckSpec
from txvmbot.qemu.model import LocalSpec

JobState = Literal["queued", "running", "cleaning", "passed", "failed", "cancelled", "error"]
FINAL_STATES: frozenset[str] = frozenset({"passed", "failed", "cancelled", "error"})
BackendState = Literal["active", "draining", "quarantined"]


@frozen
class JobSpec:
    """A job as submitted: one check, where to run it, how urgent it is.

    ``backend`` names the pool the job runs on (a cloud of the daemon's
    config, or the endpoint and region the check names); per-backend caps,
    drain and quarantine apply to it. Higher ``priority`` runs first; FIFO
    within one priority. ``bound`` is the job's overall time limit in
    seconds; ``max_attempts`` how often an infrastructure failure (a worker
    that died, a daemon restart) may start it again.
    """

    check: CheckSpec | LocalSpec | SuiteSpec
    backend: str
    priority: int = 0
    bound: float = 3600.0
    max_attempts: int = 2

    @property
    def machines(self) -> CheckSpec | LocalSpec:
        """The spec of the machines the job runs on (a suite's target)."""
        return self.check.target if isinstance(self.check, SuiteSpec) else self.check

    @property
    def instances(self) -> int:
        """How many machines the job runs at once (what backend caps count)."""
        if isinstance(self.check, SuiteSpec):
            return self.check.machines
        return self.check.parallel if isinstance(self.check, CheckSpec) else 1

    @property
    def target(self) -> str:
        """What the job runs on, for people: an image on a cloud, or a pool."""
        c = self.machines
        where = (
            f"local pool {c.pool.name}"
            if isinstance(c, LocalSpec)
            else f"{c.image or c.image_name or ''} on {c.cloud.endpoint} ({c.cloud.region})"
        )
        if isinstance(self.check, SuiteSpec):
            return f"suite {self.check.name} on {self.check.machines} x {where}"
        return where


@frozen
class Job:
    """A job as the daemon knows it. Times are epoch seconds (numbers)."""

    id: str
    spec: JobSpec
    state: JobState
    submitted: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    reason: str = ""
    result: CheckResult | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@frozen
class JobEvent:
    """Something that happened to a job, in order (``seq`` per job).

    ``kind`` is ``"state"`` (the job's state changed; ``state`` holds it) or
    ``"step"`` (a step changed; ``step`` and ``state`` hold it).
    """

    job_id: str
    seq: int
    at: float
    kind: Literal["state", "step"]
    state: str
    step: str = ""
    detail: str = ""


@frozen
class BackendStatus:
    name: str
    capacity: int
    running: int
    queued: int
    state: BackendState
    consecutive_failures: int = 0
    reason: str = ""
    instances: int = 0


@frozen
class DaemonStatus:
    api_version: int
    workers: int
    busy_workers: int
    queue_depth: int
    running: int
    backends: tuple[BackendStatus, ...] = ()
    #: The data dir ("" with a shared store), its free bytes (-1: not
    #: known), why the daemon holds writes it could not make ("" when none)
    #: and why it refuses new jobs ("" when it takes them).
    data_dir: str = ""
    data_dir_free: int = -1
    writes_held: str = ""
    refusing: str = ""


def check_id_for(job: Job) -> str:
    """The check id (tag value, resource name part, journal key) of the
    current attempt of ``job``. Each attempt gets its own, so an attempt's
    leftovers never collide with the next attempt's names."""
    return f"{job.id}-{job.attempts}"
