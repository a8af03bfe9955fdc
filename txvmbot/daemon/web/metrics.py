"""The daemon's Prometheus metrics, served as ``/metrics`` in the text format.

:class:`DaemonMetrics` keeps its own ``CollectorRegistry`` (never the
global one, which holds whatever else the process registered) and learns
from four sources:

- the scheduler's events (:meth:`DaemonMetrics.attach` subscribes with
  ``Scheduler.observe``): jobs by state and backend, finished jobs, and how
  long each step took. The observer runs on every event of every job, so it
  does no I/O and O(1) work per event;
- the scheduler's ``status()``, read at scrape time: queue depth, workers,
  busy workers, each backend's state;
- hooks of the pool (``on_worker_death``, ``on_api_calls``: the EC2 API
  calls a worker counted for its job) and of the cleaner (``on_reaped``);
- ``api_call``, an EC2 client ``api_observer`` for the daemon's own calls
  (its cleaner's and health checks').

Label values are bounded: ids never go in a label (a cleanup step
``cleanup instance i-123`` is labelled ``cleanup instance``), and each label
keeps at most ``label_limit`` distinct values; later ones are counted as
``other``.

Quarantines are counted as transitions into ``quarantined`` seen by the
metrics: the scheduler quarantines a backend just before it records the
``failed`` or ``cleaning`` state of the job that tipped it over, so the
observer checks the backend's state on those two events (and each scrape
does); a ``running`` event shows the backend was not quarantined when the
job started. A quarantine lifted by a health check and entered again with
no job of that backend starting, and no scrape, in between is counted once:
an exact count needs a scheduler hook at the transition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from txvmbot.daemon.jobs import FINAL_STATES, DaemonStatus, Job, JobEvent
from txvmbot.daemon.workers.protocol import ApiCalls

__all__ = ["DaemonMetrics", "MetricsPage", "step_label"]

#: How many distinct values one label keeps before it says "other".
LABEL_LIMIT = 500
#: Step durations from a tenth of a second to an hour.
STEP_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: How many steps of one job may be in flight at once before later ones
#: are not timed (a bound on memory, far above any real job).
MAX_OPEN_STEPS = 1000

_UNFINISHED = ("queued", "running", "cleaning")
_BACKEND_STATES = ("active", "draining", "quarantined")
_STEP_ENDS = frozenset({"passed", "failed", "timeout", "cancelled"})
_OTHER = "other"


class _Observable(Protocol):
    """What :meth:`DaemonMetrics.attach` needs of the scheduler: answers
    at once (a scrape cannot wait), as the local Scheduler's ``status_now``
    and ``list_now`` give them."""

    def observe(self, observer: Callable[[Job, JobEvent], None]) -> Callable[[], None]: ...

    def status_now(self) -> DaemonStatus: ...

    def list_now(
        self,
        states: Any = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Job]: ...


def step_label(step: str) -> str:
    """The label of a step: its name, without the resource of a cleanup
    step (``cleanup instance i-0abc`` -> ``cleanup instance``)."""
    if step.startswith("cleanup "):
        return " ".join(step.split(" ", 2)[:2])
    return step


class _Bounded:
    """Maps label values to themselves, up to ``limit`` distinct ones, then
    to "other"."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return _OTHER
        self._seen.add(value)
        return value


class _StatusCollector(Collector):
    """The gauges read at scrape time: jobs by state (kept by the
    observer), and what the scheduler's status says."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        jobs, queue, workers, busy, backends, free, held = self._families()
        for backend in m._job_backends:
            for state in _UNFINISHED:
                jobs.add_metric([state, backend], m._job_counts.get((state, backend), 0))
        status = m._read_status()
        if status is not None:
            queue.add_metric([], status.queue_depth)
            workers.add_metric([], status.workers)
            busy.add_metric([], status.busy_workers)
            if status.data_dir:
                free.add_metric([], status.data_dir_free)
                held.add_metric([], 1 if status.writes_held else 0)
            # Backends past the label limit share the label "other": their
            # values add up (one series each, or Prometheus refuses the scrape).
            by_label: dict[tuple[str, str], int] = {}
            for b in status.backends:
                name = m._backend_label(b.name)
                for state in _BACKEND_STATES:
                    key = (name, state)
                    by_label[key] = by_label.get(key, 0) + (1 if b.state == state else 0)
            for (name, state), value in by_label.items():
                backends.add_metric([name, state], value)
        return [jobs, queue, workers, busy, backends, free, held]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "txvmbot_jobs",
                "Unfinished jobs by state (queued, running, cleaning) and backend.",
                labels=["state", "backend"],
            ),
            GaugeMetricFamily("txvmbot_queue_depth", "Jobs waiting for a worker."),
            GaugeMetricFamily("txvmbot_workers", "Worker processes of the pool."),
            GaugeMetricFamily("txvmbot_workers_busy", "Workers running a job."),
            GaugeMetricFamily(
                "txvmbot_backend_state",
                "1 for the state each backend is in (active, draining, quarantined), else 0.",
                labels=["backend", "state"],
            ),
            GaugeMetricFamily(
                "txvmbot_data_dir_free_bytes",
                "Free bytes in the daemon's data dir (-1: cannot be read). Below "
                "daemon.min_free_mb new jobs are refused.",
            ),
            GaugeMetricFamily(
                "txvmbot_writes_held",
                "1 while writes to the job store or journal are held (disk full, I/O error) "
                "and tried again; new jobs are refused meanwhile.",
            ),
        )


class MetricsPage(Resource):
    """``GET`` answers the registry in Prometheus' text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        body = generate_latest(self._registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return body


class DaemonMetrics:
    """The daemon's metrics and the means to feed them (see the module's
    docstring). Its hooks are cheap and never raise on their inputs.

    :param label_limit: distinct values kept per label.
    """

    log = Logger()

    def __init__(self, *, label_limit: int = LABEL_LIMIT) -> None:
        self.registry = CollectorRegistry()
        self._status: Callable[[], DaemonStatus] | None = None
        self._backend_label = _Bounded(label_limit)
        self._step_label = _Bounded(label_limit)
        self._action_label = _Bounded(label_limit)
        self._code_label = _Bounded(label_limit)
        self._kind_label = _Bounded(label_limit)
        # job id -> (state, backend label) of each unfinished job seen.
        self._jobs: dict[str, tuple[str, str]] = {}
        self._job_counts: dict[tuple[str, str], int] = {}
        self._job_backends: dict[str, None] = {}  # ordered set
        # job id -> step name -> when its first "running" event said it began.
        self._open_steps: dict[str, dict[str, float]] = {}
        # backend name -> whether it was quarantined when last seen.
        self._quarantined: dict[str, bool] = {}
        # Registered first, so a scrape reads status (and counts a
        # quarantine it finds) before the counters are collected.
        self.registry.register(_StatusCollector(self))
        r = self.registry
        self._finished = Counter(
            "txvmbot_jobs_finished",
            "Jobs that ended, by final state (passed, failed, cancelled, error) and backend.",
            ["state", "backend"],
            registry=r,
        )
        self._steps = Histogram(
            "txvmbot_step_duration_seconds",
            "How long steps took, from their start to their end, by step and backend.",
            ["step", "backend"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._quarantines = Counter(
            "txvmbot_quarantines",
            "Times a backend was quarantined (infrastructure failures in a row).",
            ["backend"],
            registry=r,
        )
        self._deaths = Counter(
            "txvmbot_worker_deaths", "Worker processes that died unasked.", registry=r
        )
        self._api_calls = Counter(
            "txvmbot_cloud_api_calls",
            "EC2 API HTTP attempts, by action and outcome code (OK, the cloud's error code, "
            "or the transport error).",
            ["action", "code"],
            registry=r,
        )
        self._api_retries = Counter(
            "txvmbot_cloud_api_retries",
            "EC2 API attempts that were retried, by action and the code that caused it.",
            ["action", "code"],
            registry=r,
        )
        self._reaped = Counter(
            "txvmbot_resources_reaped",
            "Resources the daemon's cleaner removed after a dead worker or a restart, by kind.",
            ["kind"],
            registry=r,
        )
        self._children: dict[tuple[object, ...], Any] = {}

    # -- wiring --------------------------------------------------------------

    def resource(self) -> Resource:
        """The ``/metrics`` page: a twisted.web resource answering
        ``generate_latest`` of this registry."""
        return MetricsPage(self.registry)

    def attach(self, scheduler: _Observable, *, seed: bool = True) -> Callable[[], None]:
        """Count ``scheduler``'s jobs from now on: read its unfinished jobs
        once (so jobs queued before count; not with ``seed=False``, for a
        scheduler that holds none yet), observe its events and read its
        status at each scrape. Returns the callable that detaches."""
        self._status = scheduler.status_now
        if seed:
            self._seed(scheduler)
        status = scheduler.status_now()
        for b in status.backends:
            self._quarantined[b.name] = b.state == "quarantined"
        stop_observing = scheduler.observe(self.observe)

        def stop() -> None:
            stop_observing()
            self._status = None

        return stop

    def _seed(self, scheduler: _Observable, page: int = 1000, max_pages: int = 100_000) -> None:
        before: str | None = None
        for _ in range(max_pages):
            jobs = scheduler.list_now(states=_UNFINISHED, limit=page, before=before)
            for job in jobs:
                if job.id not in self._jobs:
                    self._set_job(job.id, job.state, job.spec.backend)
            if len(jobs) < page:
                return
            before = jobs[-1].id

    # -- the scheduler's events -----------------------------------------------

    def observe(self, job: Job, event: JobEvent) -> None:
        """Count one event of ``job`` (a Scheduler.observe observer)."""
        if event.kind == "step":
            self._step(job, event)
        else:
            self._state(job, event)

    def _state(self, job: Job, event: JobEvent) -> None:
        state = event.state
        backend = job.spec.backend
        if state in FINAL_STATES:
            self._forget_job(job.id)
            self._child(self._finished, state, self._backend_label(backend)).inc()
        else:
            self._set_job(job.id, state, backend)
            if state == "queued":
                self._open_steps.pop(job.id, None)  # a new attempt starts afresh
        if state == "running":
            self._quarantined[backend] = False  # it took the job: not quarantined
        if state in ("failed", "cleaning"):
            self._read_status()  # notes a quarantine this failure began

    def _set_job(self, job_id: str, state: str, backend: str) -> None:
        label = self._backend_label(backend)
        key = (state, label)
        old = self._jobs.get(job_id)
        if old is not None:
            self._job_counts[old] -= 1
        self._jobs[job_id] = key
        self._job_counts[key] = self._job_counts.get(key, 0) + 1
        self._job_backends[label] = None

    def _forget_job(self, job_id: str) -> None:
        old = self._jobs.pop(job_id, None)
        if old is not None:
            self._job_counts[old] -= 1
        self._open_steps.pop(job_id, None)

    def _step(self, job: Job, event: JobEvent) -> None:
        state = event.state
        if state == "running":
            steps = self._open_steps.get(job.id)
            if steps is None:
                steps = self._open_steps[job.id] = {}
            if event.step not in steps and len(steps) < MAX_OPEN_STEPS:
                steps[event.step] = event.at  # progress reports keep the first start
            return
        steps = self._open_steps.get(job.id)
        start = None if steps is None else steps.pop(event.step, None)
        if start is None or state not in _STEP_ENDS:
            return
        labels = (self._step_label(step_label(event.step)), self._backend_label(job.spec.backend))
        self._child(self._steps, *labels).observe(max(0.0, event.at - start))

    def _saw_backend(self, name: str, quarantined: bool) -> None:
        was = self._quarantined.get(name, False)
        self._quarantined[name] = quarantined
        if quarantined and not was:
            self._child(self._quarantines, self._backend_label(name)).inc()

    def _read_status(self) -> DaemonStatus | None:
        """The scheduler's status, noting any quarantine it shows."""
        if self._status is None:
            return None
        try:
            status = self._status()
        except Exception:
            self.log.failure("Reading the scheduler's status for the metrics")
            return None
        for b in status.backends:
            self._saw_backend(b.name, b.state == "quarantined")
        return status

    # -- hooks of the pool and the cleaner --------------------------------------

    def worker_died(self, job_id: str | None = None) -> None:
        """Count a worker that died unasked (the pool's ``on_worker_death``)."""
        self._deaths.inc()

    def api_calls(self, job_id: str, counts: Sequence[ApiCalls]) -> None:
        """Count the EC2 API attempts a job's worker counted (the pool's
        ``on_api_calls``)."""
        for c in counts:
            self._count_api(c.action, c.code, c.calls, c.retries)

    def api_call(self, action: str, code: str, retrying: bool) -> None:
        """Count one EC2 API attempt made in the daemon itself (an EC2
        client ``api_observer``, for the cleaner and health checks)."""
        self._count_api(action, code, 1, 1 if retrying else 0)

    def resource_reaped(self, kind: str) -> None:
        """Count a resource the daemon's cleaner removed (its ``on_reaped``)."""
        self._child(self._reaped, self._kind_label(kind)).inc()

    def _count_api(self, action: str, code: str, calls: int, retries: int) -> None:
        labels = (self._action_label(action), self._code_label(code))
        if calls > 0:
            self._child(self._api_calls, *labels).inc(calls)
        if retries > 0:
            self._child(self._api_retries, *labels).inc(retries)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached (labels() takes a lock and
        checks its arguments on every call)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
