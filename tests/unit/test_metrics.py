"""Unit tests of the daemon's Prometheus metrics (txvmbot.daemon.web.metrics)
and the hooks that feed them, with no server: a real Scheduler on a Clock
with the FakeWorkerPool, the page rendered by twisted.web and parsed back
with prometheus_client's parser (tests/support/metrics_scrape.py); the EC2
client's per-attempt observer on a fake call; the worker's ``api_calls``
over AMP in memory; the pool's hooks on doubles of its workers."""

from __future__ import annotations

import itertools
import tempfile
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.support.deferreds import result_of
from tests.support.metrics_scrape import Samples, parse, scrape, value, with_name
from txvmbot.daemon import codec
from txvmbot.daemon.jobs import Job
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.daemon.web.metrics import DaemonMetrics, step_label
from txvmbot.daemon.workers.pool import AmpoulePool, _JobRun, _ParentAMP, _Worker
from txvmbot.daemon.workers.protocol import (
    MAX_API_CALL_KINDS,
    MAX_API_CALLS_BYTES,
    MAX_RESULT_BYTES,
    ApiCalls,
    Blob,
    MalformedArgument,
    RunJob,
    _Command,
    decode_api_calls,
    encode_api_calls,
)
from txvmbot.daemon.workers.worker import ApiCallCounter, Worker, encode_result
from txvmbot.ec2.retry import call_with_retries, outcome_code
from txvmbot.errors import CloudError, TransportError, WorkerDied
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckResult, Facts, RetryPolicy
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0


class Harness:
    """A scheduler on a Clock, a memory store, the fake pool; metrics attached."""

    def __init__(self, size: int = 2, **kw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SQLiteJobStore.memory(clock=self.clock.seconds)
        self.pool = FakeWorkerPool(size)
        self.journal = MemoryJournal(self.clock.seconds)
        counter = itertools.count()
        self.s = Scheduler(
            self.clock,
            self.store,
            self.pool,
            self.journal,
            cleaner=RecordingCleaner(),
            new_id=lambda: f"j{next(counter)}",
            wall=self.clock.seconds,
            **kw,
        )
        self.metrics = DaemonMetrics()
        self.detach = self.metrics.attach(self.s)

    def submit(self, backend: str = "b", **kw: Any) -> Job:
        return result_of(self.s.submit(make_job_spec(backend, **kw)))

    def scrape(self) -> Samples:
        return scrape(self.metrics)


class SchedulerMetricsTests(SynchronousTestCase):
    def test_jobs_steps_and_finished(self) -> None:
        h = Harness(size=2)
        j0, j1, j2 = (h.submit().id for _ in range(3))
        m = h.scrape()
        self.assertEqual(value(m, "txvmbot_jobs", state="running", backend="b"), 2)
        self.assertEqual(value(m, "txvmbot_jobs", state="queued", backend="b"), 1)
        self.assertEqual(value(m, "txvmbot_jobs", state="cleaning", backend="b"), 0)
        self.assertEqual(value(m, "txvmbot_queue_depth"), 1)
        self.assertEqual(value(m, "txvmbot_workers"), 2)
        self.assertEqual(value(m, "txvmbot_workers_busy"), 2)
        self.assertEqual(value(m, "txvmbot_backend_state", backend="b", state="active"), 1)
        self.assertEqual(value(m, "txvmbot_backend_state", backend="b", state="quarantined"), 0)

        run = h.pool.get(j0)
        run.step("keypair", "running", at=10.0)
        run.step("keypair", "running", detail="still at it", at=11.0)  # progress
        run.step("keypair", "passed", at=13.0)
        run.step("wait-ssh", "running", at=13.0)
        run.step("wait-ssh", "timeout", at=73.0)
        run.step("cleanup instance i-0abc", "running", at=80.0)
        m = h.scrape()
        self.assertEqual(value(m, "txvmbot_jobs", state="cleaning", backend="b"), 1)
        self.assertEqual(value(m, "txvmbot_jobs", state="running", backend="b"), 1)
        run.step("cleanup instance i-0abc", "passed", at=81.5)
        run.step("cleanup keypair k-1", "skipped", at=81.5)
        h.pool.finish(j0)
        h.pool.finish(j1, passed=False, error="commands: uname failed")
        d = h.s.cancel(j2, "operator asked")
        h.pool.get(j2).finish_cancelled()
        self.assertEqual(self.successResultOf(d).state, "cancelled")

        m = h.scrape()
        for state in ("queued", "running", "cleaning"):
            self.assertEqual(value(m, "txvmbot_jobs", state=state, backend="b"), 0, state)
        finished = with_name(m, "txvmbot_jobs_finished_total")
        self.assertEqual(
            finished,
            {
                frozenset({("state", s), ("backend", "b")}): 1.0
                for s in ("passed", "failed", "cancelled")
            },
        )
        self.assertEqual(value(m, "txvmbot_queue_depth"), 0)
        self.assertEqual(value(m, "txvmbot_workers_busy"), 0)

        count = with_name(m, "txvmbot_step_duration_seconds_count")
        self.assertEqual(
            count,
            {
                frozenset({("step", step), ("backend", "b")}): 1.0
                for step in ("keypair", "wait-ssh", "cleanup instance")
            },
        )
        h_sum = "txvmbot_step_duration_seconds_sum"
        self.assertEqual(value(m, h_sum, step="keypair", backend="b"), 3.0)  # first start kept
        self.assertEqual(value(m, h_sum, step="wait-ssh", backend="b"), 60.0)
        self.assertEqual(value(m, h_sum, step="cleanup instance", backend="b"), 1.5)
        bucket = "txvmbot_step_duration_seconds_bucket"
        self.assertEqual(value(m, bucket, step="keypair", backend="b", le="2.5"), 0)
        self.assertEqual(value(m, bucket, step="keypair", backend="b", le="5.0"), 1)
        # No id ever becomes a label value.
        self.assertFalse([k for k in m if any("i-0abc" in v or "j0" in v for _, v in k[1])])

    def test_quarantine_and_worker_deaths(self) -> None:
        h = Harness(size=2, quarantine_after=2)
        a, b = (h.submit("c", max_attempts=1).id for _ in range(2))
        h.pool.die(a)
        m = h.scrape()
        self.assertEqual(value(m, "txvmbot_backend_state", backend="c", state="active"), 1)
        self.assertEqual(value(m, "txvmbot_quarantines_total", backend="c"), None)
        h.pool.die(b)  # the second infrastructure failure in a row
        m = h.scrape()
        self.assertEqual(value(m, "txvmbot_quarantines_total", backend="c"), 1)
        self.assertEqual(value(m, "txvmbot_backend_state", backend="c", state="quarantined"), 1)
        self.assertEqual(value(m, "txvmbot_backend_state", backend="c", state="active"), 0)
        self.assertEqual(value(m, "txvmbot_jobs_finished_total", state="error", backend="c"), 2)
        self.assertEqual(
            h.scrape()[("txvmbot_quarantines_total", frozenset({("backend", "c")}))], 1
        )

        # Quarantined: the next job waits. The operator lifts it (no health
        # check configured); two more deaths quarantine it again, seen by
        # the observer without a scrape in between.
        c = h.submit("c", max_attempts=1).id
        self.assertEqual(value(h.scrape(), "txvmbot_jobs", state="queued", backend="c"), 1)
        self.successResultOf(h.s.resume("c"))
        d = h.submit("c", max_attempts=1).id
        h.pool.die(c)
        h.pool.die(d)
        h.s.resume("c")
        m = h.scrape()
        self.assertEqual(value(m, "txvmbot_quarantines_total", backend="c"), 2)
        self.assertEqual(value(m, "txvmbot_backend_state", backend="c", state="active"), 1)
        self.assertEqual(value(m, "txvmbot_jobs_finished_total", state="error", backend="c"), 4)

    def test_a_retried_job_times_its_new_attempt_afresh(self) -> None:
        h = Harness(size=1)
        j = h.submit(max_attempts=2).id
        h.pool.get(j).step("keypair", "running", at=1.0)
        h.pool.die(j)  # cleaned, queued again, started again at once
        self.assertEqual(value(h.scrape(), "txvmbot_jobs", state="running", backend="b"), 1)
        h.pool.get(j).step("keypair", "running", at=100.0)
        h.pool.get(j).step("keypair", "passed", at=104.0)
        h.pool.finish(j)
        m = h.scrape()
        self.assertEqual(
            value(m, "txvmbot_step_duration_seconds_sum", step="keypair", backend="b"), 4.0
        )
        self.assertEqual(value(m, "txvmbot_jobs_finished_total", state="passed", backend="b"), 1)

    def test_jobs_queued_before_attach_count(self) -> None:
        clock = Clock()
        store = SQLiteJobStore.memory(clock=clock.seconds)
        pool = FakeWorkerPool(1)
        s = Scheduler(clock, store, pool, MemoryJournal(clock.seconds), cleaner=RecordingCleaner())
        first = result_of(s.submit(make_job_spec("b")))
        result_of(s.submit(make_job_spec("b")))
        result_of(s.submit(make_job_spec("e")))
        metrics = DaemonMetrics()
        metrics.attach(s)
        m = scrape(metrics)
        self.assertEqual(value(m, "txvmbot_jobs", state="running", backend="b"), 1)
        self.assertEqual(value(m, "txvmbot_jobs", state="queued", backend="b"), 1)
        self.assertEqual(value(m, "txvmbot_jobs", state="queued", backend="e"), 1)
        pool.finish(first.id)
        m = scrape(metrics)
        self.assertEqual(value(m, "txvmbot_jobs", state="running", backend="b"), 1)
        self.assertEqual(value(m, "txvmbot_jobs", state="queued", backend="b"), 0)

    def test_detach(self) -> None:
        h = Harness()
        h.detach()
        h.submit()
        m = h.scrape()
        self.assertEqual(with_name(m, "txvmbot_jobs"), {})
        self.assertEqual(value(m, "txvmbot_workers"), None)

    def test_label_values_are_bounded(self) -> None:
        h = Harness(size=3)
        h.metrics = DaemonMetrics(label_limit=2)
        h.metrics.attach(h.s)
        for backend in ("x", "y", "z"):
            h.submit(backend)
        m = h.scrape()
        running = with_name(m, "txvmbot_jobs")
        self.assertEqual({dict(k)["backend"] for k in running}, {"x", "y", "other"}, running)
        self.assertEqual(value(m, "txvmbot_jobs", state="running", backend="other"), 1)

    def test_step_label(self) -> None:
        self.assertEqual(step_label("cleanup instance i-0abc"), "cleanup instance")
        self.assertEqual(step_label("cleanup security-group sg-1 x"), "cleanup security-group")
        self.assertEqual(step_label("cleanup"), "cleanup")
        self.assertEqual(step_label("wait-ssh"), "wait-ssh")


class PageTests(SynchronousTestCase):
    def test_own_registry(self) -> None:
        one, two = DaemonMetrics(), DaemonMetrics()  # no DuplicateTimeseries
        one.worker_died("j1")
        self.assertEqual(value(scrape(one), "txvmbot_worker_deaths_total"), 1)
        self.assertEqual(value(scrape(two), "txvmbot_worker_deaths_total"), 0)
        self.assertIsNone(REGISTRY.get_sample_value("txvmbot_worker_deaths_total"))
        # Nothing of the process's default collectors on our page.
        self.assertFalse([k for k in scrape(one) if not k[0].startswith("txvmbot_")])

    def test_dummy_request(self) -> None:
        metrics = DaemonMetrics()
        metrics.resource_reaped("keypair")
        request = DummyRequest([b""])
        body = metrics.resource().render(request)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [CONTENT_TYPE_LATEST.encode()],
        )
        self.assertEqual(
            value(parse(body.decode()), "txvmbot_resources_reaped_total", kind="keypair"), 1
        )

    def test_hooks(self) -> None:
        metrics = DaemonMetrics()
        metrics.api_calls(
            "j1",
            [
                ApiCalls("RunInstances", "OK", 2),
                ApiCalls("RunInstances", "RequestLimitExceeded", 3, 3),
                ApiCalls("DescribeInstances", "OK", 5),
            ],
        )
        metrics.api_call("DeleteKeyPair", "HTTP503", True)
        metrics.api_call("DeleteKeyPair", "OK", False)
        metrics.resource_reaped("instances")
        metrics.resource_reaped("instances")
        metrics.worker_died(None)
        m = scrape(metrics)
        calls = "txvmbot_cloud_api_calls_total"
        retries = "txvmbot_cloud_api_retries_total"
        self.assertEqual(value(m, calls, action="RunInstances", code="OK"), 2)
        self.assertEqual(value(m, calls, action="RunInstances", code="RequestLimitExceeded"), 3)
        self.assertEqual(value(m, retries, action="RunInstances", code="RequestLimitExceeded"), 3)
        self.assertEqual(value(m, calls, action="DescribeInstances", code="OK"), 5)
        self.assertEqual(value(m, calls, action="DeleteKeyPair", code="HTTP503"), 1)
        self.assertEqual(value(m, retries, action="DeleteKeyPair", code="HTTP503"), 1)
        self.assertEqual(
            set(with_name(m, retries)),
            {
                frozenset({("action", "RunInstances"), ("code", "RequestLimitExceeded")}),
                frozenset({("action", "DeleteKeyPair"), ("code", "HTTP503")}),
            },
        )
        self.assertEqual(value(m, "txvmbot_resources_reaped_total", kind="instances"), 2)
        self.assertEqual(value(m, "txvmbot_worker_deaths_total"), 1)


# --- the EC2 client's observer ---------------------------------------------------


class OutcomeCodeTests(SynchronousTestCase):
    def test_codes(self) -> None:
        from twisted.internet.defer import TimeoutError as DeferredTimeoutError
        from twisted.web._newclient import ResponseNeverReceived

        self.assertEqual(outcome_code(None), "OK")
        self.assertEqual(
            outcome_code(CloudError("X", "InvalidGroup.NotFound", "m", 400)),
            "InvalidGroup.NotFound",
        )
        lost = TransportError("X", "lost")
        lost.__cause__ = ResponseNeverReceived([])
        self.assertEqual(outcome_code(lost), "ResponseNeverReceived")
        late = TransportError("X", "late")
        late.__cause__ = DeferredTimeoutError()
        self.assertEqual(outcome_code(late), "TimeoutError")
        self.assertEqual(outcome_code(TransportError("X", "bare")), "TransportError")
        self.assertEqual(outcome_code(ValueError("x")), "ValueError")
        self.assertEqual(len(outcome_code(CloudError("X", "C" * 500, "m"))), 64)

    def test_retries_then_gives_up_and_a_broken_observer_is_ignored(self) -> None:
        clock = Clock()
        seen: list[tuple[str, str, bool]] = []

        def observer(action: str, code: str, retrying: bool) -> None:
            seen.append((action, code, retrying))
            raise RuntimeError("observer bug")

        policy = RetryPolicy(max_attempts=3, base_delay=1, max_delay=1, max_elapsed=100)
        with capturedLogs() as events:
            d = call_with_retries(
                clock,
                policy,
                "RunInstances",
                lambda: Deferred.fromCoroutine(throttled()),
                random=lambda: 1.0,
                observer=observer,
            )
            clock.advance(1)
            clock.advance(1)
        self.failureResultOf(d, CloudError)
        self.assertEqual(
            seen,
            [("RunInstances", "RequestLimitExceeded", True)] * 2
            + [("RunInstances", "RequestLimitExceeded", False)],
        )
        bugs = [e for e in events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(bugs), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 3)

    def test_cancelled_attempt(self) -> None:
        clock = Clock()
        seen: list[tuple[str, str, bool]] = []
        policy = RetryPolicy(max_attempts=3, base_delay=1, max_delay=1, max_elapsed=100)

        def never() -> Deferred[dict[str, Any]]:
            return Deferred()

        d = call_with_retries(
            clock,
            policy,
            "DescribeImages",
            never,
            observer=lambda *a: seen.append(a),
        )
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(seen, [("DescribeImages", "CancelledError", False)])


async def throttled() -> dict[str, Any]:
    raise CloudError("RunInstances", "RequestLimitExceeded", "slow down", 400)


# --- api_calls between the worker and the daemon -----------------------------------


class CountingCheck:
    """A check that makes the API calls it is told to, through the worker's
    counter, and then passes."""

    calls: list[tuple[str, str, bool]] = []
    made: list[CountingCheck] = []

    def __init__(self, reactor: Any, spec: Any, *, check_id: str, **kw: Any) -> None:
        self.check_id = check_id
        self.api_observer = kw.get("api_observer")
        self.done: Deferred[CheckResult] = Deferred()
        CountingCheck.made.append(self)

    def run(self) -> Deferred[CheckResult]:
        if self.api_observer is not None:
            for call in CountingCheck.calls:
                self.api_observer(*call)
        return succeed(CheckResult(check_id=self.check_id, passed=True, steps=(), facts=Facts()))

    def cancel(self, reason: str) -> None:
        pass


class OldRunJob(_Command):
    """RunJob as a daemon or worker from before ``api_calls`` knew it."""

    commandName = b"RunJob"
    arguments = RunJob.arguments
    response = [(b"result", Blob(MAX_RESULT_BYTES))]


class OldWorker(amp.AMP):
    @OldRunJob.responder
    def run_job(
        self, job_id: str, check_id: str, spec: bytes, evidence_root: str
    ) -> dict[str, bytes]:
        result = CheckResult(check_id=check_id, passed=True, steps=(), facts=Facts())
        return {"result": encode_result(result)}


SPEC = {"endpoint": "http://127.0.0.1:1/", "region": "r1", "image": "ami-1", "ssh": False}


class ApiCallsOverAmpTests(SynchronousTestCase):
    def setUp(self) -> None:
        CountingCheck.calls = [
            ("RunInstances", "RequestLimitExceeded", True),
            ("RunInstances", "OK", False),
            ("DescribeInstances", "OK", False),
            ("DescribeInstances", "OK", False),
        ]
        CountingCheck.made = []

    def connect(self, worker: amp.AMP, command: type[amp.Command] = RunJob) -> dict[str, Any]:
        parent = amp.AMP()
        _, _, pump = connectedServerAndClient(lambda: worker, lambda: parent)
        d = parent.callRemote(
            command, job_id="j1", check_id="j1-1", spec=codec.dumps(SPEC), evidence_root=""
        )
        pump.flush()
        answer: dict[str, Any] = self.successResultOf(d)
        return answer

    def test_api_calls_travel(self) -> None:
        answer = self.connect(
            Worker(reactor=Clock(), check_factory=CountingCheck, count_api_calls=True)
        )
        self.assertEqual(
            decode_api_calls(answer["api_calls"]),
            (
                ApiCalls("RunInstances", "RequestLimitExceeded", 1, 1),
                ApiCalls("RunInstances", "OK", 1, 0),
                ApiCalls("DescribeInstances", "OK", 2, 0),
            ),
        )

    def test_a_fake_factory_gets_no_observer_by_default(self) -> None:
        answer = self.connect(Worker(reactor=Clock(), check_factory=CountingCheck))
        self.assertIsNone(CountingCheck.made[0].api_observer)
        self.assertIsNone(answer["api_calls"])
        self.assertTrue(codec.result_from_dict(codec.loads(answer["result"], "r")).passed)

    def test_an_old_worker_answers_without_api_calls(self) -> None:
        answer = self.connect(OldWorker())
        self.assertIsNone(answer["api_calls"])
        self.assertTrue(codec.result_from_dict(codec.loads(answer["result"], "r")).passed)

    def test_an_old_daemon_ignores_api_calls(self) -> None:
        worker = Worker(reactor=Clock(), check_factory=CountingCheck, count_api_calls=True)
        answer = self.connect(worker, OldRunJob)
        self.assertEqual(set(answer), {"result"})

    def test_counter_is_bounded(self) -> None:
        counter = ApiCallCounter(limit=2)
        for i in range(5):
            counter(f"Action{i}", "OK", i % 2 == 1)
        counter("Action0", "OK", False)
        counter("é" * 100, "x" * 100, False)
        self.assertEqual(
            counter.counts(),
            (
                ApiCalls("Action0", "OK", 2, 0),
                ApiCalls("Action1", "OK", 1, 1),
                ApiCalls("other", "other", 4, 1),
            ),
        )
        big = ApiCallCounter()
        for i in range(MAX_API_CALL_KINDS + 50):
            big(str(i) + '"\\' * 40, "\\" * 64, True)
        data = encode_api_calls(big.counts())
        self.assertLessEqual(len(data), MAX_API_CALLS_BYTES)
        self.assertEqual(len(decode_api_calls(data)), MAX_API_CALL_KINDS + 1)
        self.assertTrue(all(len(c.action) <= 64 for c in decode_api_calls(data)))

    def test_decode_refuses_what_is_not_counts(self) -> None:
        for bad in [
            b"{",
            b"{}",
            b'[["a", "b", 1]]',
            b'[["a", "b", -1, 0]]',
            b'[["a", "", 1, 0]]',
            b'[["a", "b", 1.5, 0]]',
            b'[["' + b"a" * 65 + b'", "b", 1, 0]]',
            b"[" + b",".join([b'["a","b",1,0]'] * (MAX_API_CALL_KINDS + 2)) + b"]",
        ]:
            with self.assertRaises(MalformedArgument, msg=bad[:40]):
                decode_api_calls(bad)


class PoolHookTests(SynchronousTestCase):
    """The pool's hooks, on its answer and death paths, without processes."""

    def setUp(self) -> None:
        self.api: list[tuple[str, tuple[ApiCalls, ...]]] = []
        self.deaths: list[str | None] = []
        self.pool = AmpoulePool(
            Clock(),
            size=1,
            recycle_after=0,
            evidence_root=tempfile.gettempdir(),
            on_api_calls=lambda job_id, counts: self.api.append((job_id, tuple(counts))),
            on_worker_death=self.deaths.append,
        )
        self.pool._state = "running"
        self.worker = _Worker(name="w1", parent=_ParentAMP())
        self.worker.state = "busy"
        self.worker.ready.callback(None)  # it answered its Hello long ago
        self.run_ = _JobRun(
            job_id="j1",
            check_id="j1-1",
            on_event=lambda e: None,
            journal=None,
            spec=b"",
            result=Deferred(),
        )
        self.worker.job = self.run_
        self.run_.worker = self.worker
        self.pool._jobs["j1"] = self.run_

    def answer(self, **extra: Any) -> CheckResult:
        result = CheckResult(check_id="j1-1", passed=True, steps=(), facts=Facts())
        self.pool._job_answered(self.worker, self.run_, {"result": encode_result(result), **extra})
        got: CheckResult = self.successResultOf(self.run_.result)
        return got

    def test_api_calls_handed_over(self) -> None:
        counts = (ApiCalls("RunInstances", "OK", 1), ApiCalls("DescribeImages", "HTTP503", 2, 2))
        self.assertTrue(self.answer(api_calls=encode_api_calls(counts)).passed)
        self.assertEqual(self.api, [("j1", counts)])

    def test_absent_api_calls(self) -> None:
        self.assertTrue(self.answer(api_calls=None).passed)
        self.assertEqual(self.api, [])

    def test_garbled_api_calls_are_logged_and_ignored(self) -> None:
        with capturedLogs() as events:
            self.assertTrue(self.answer(api_calls=b"[[1]]").passed)
        self.assertEqual(self.api, [])
        warned = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warned), 1)
        self.assertEqual(warned[0]["job_id"], "j1")

    def test_death_while_running_a_job(self) -> None:
        from twisted.internet.error import ProcessTerminated

        self.pool._state = "stopped"  # no replacement worker in this test
        self.pool._workers.append(self.worker)
        with capturedLogs():
            self.pool._ended(self.worker, Failure(ProcessTerminated(signal=9)))
        self.failureResultOf(self.run_.result, WorkerDied)
        self.assertEqual(self.deaths, ["j1"])

    def test_asked_exit_is_no_death(self) -> None:
        from twisted.internet.error import ProcessDone

        self.pool._state = "stopped"
        self.worker.job = None
        self.worker.state = "stopping"
        with capturedLogs():
            self.pool._ended(self.worker, Failure(ProcessDone(0)))
        self.assertEqual(self.deaths, [])
        idle = _Worker(name="w2", parent=_ParentAMP())
        idle.state = "ready"
        idle.ready.callback(None)
        with capturedLogs():
            self.pool._ended(idle, Failure(ProcessDone(0)))
        self.assertEqual(self.deaths, [None])


def test_backends_past_the_label_limit_add_up_in_one_series() -> None:
    """More backends than labels: they share "other", one series per state
    (a duplicate series would make Prometheus refuse the whole scrape)."""
    from prometheus_client import generate_latest

    from tests.support.scheduler_harness import Harness

    h = Harness()
    m = DaemonMetrics(label_limit=1)
    m.attach(h.s)
    for backend in ("a", "b", "c", "d"):
        h.submit(backend)
    result_of(h.s.drain("c"))
    result_of(h.s.drain("d"))
    text = generate_latest(m.registry).decode()
    seen: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in seen, key
            seen.append(key)
            if sample.name == "txvmbot_backend_state":
                values[(sample.labels["backend"], sample.labels["state"])] = sample.value
    assert values[("a", "active")] == 1
    assert values[("other", "active")] == 1 and values[("other", "draining")] == 2
