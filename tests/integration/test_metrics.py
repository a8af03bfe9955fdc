"""The daemon's Prometheus metrics (txvmbot.daemon.web.metrics) and the hooks
that feed them: a real Scheduler on a Clock with the FakeWorkerPool, the
page rendered by twisted.web and parsed back with prometheus_client's
parser; the EC2 client's per-attempt observer against moto (directly and
through the fault proxy); the worker's ``api_calls`` over AMP in memory;
the pool's hooks with real worker processes; the cleaner's ``on_reaped``."""

from __future__ import annotations

import itertools
import os
import signal
import uuid
from contextlib import ExitStack
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.integration.test_pool import PoolTestBase, sleep
from tests.support.deferreds import result_of
from tests.support.faultproxy import fault_proxy
from tests.support.servers import Moto
from txvmbot.daemon.jobs import Job, JobSpec, check_id_for
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.scheduling.upkeep import make_cleaner
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.daemon.web.metrics import DaemonMetrics
from txvmbot.daemon.workers.protocol import (
    decode_api_calls,
    encode_api_calls,
)
from txvmbot.daemon.workers.worker import ApiCallCounter
from txvmbot.ec2 import make_client
from txvmbot.errors import CloudError, WorkerDied
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckSpec, Cloud, Credentials, RetryPolicy
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def with_name(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def scrape(metrics: DaemonMetrics) -> Samples:
    """GET /metrics through a real twisted.web Site over a StringTransport."""
    root = Resource()
    root.putChild(b"metrics", metrics.resource())
    protocol = Site(root).buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"content-type: " + CONTENT_TYPE_LATEST.encode() in head.lower(), head
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    protocol.connectionLost(Failure(Exception("done")))
    return parse(body.decode("utf-8"))


def dechunk(data: bytes) -> bytes:
    out = b""
    for _ in range(10_000):
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]
    raise AssertionError("too many chunks")


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


def moto_cloud(url: str, policy: RetryPolicy | None = None) -> Cloud:
    return Cloud(
        endpoint=url,
        region="us-east-1",
        credentials=Credentials("testing", "testing"),
        retry=policy or RetryPolicy(),
        name="moto",
    )


class ClientObserverTests(TestCase):
    """The observer on a real client against moto, and through the fault
    proxy for retries; what it sees feeds the worker's counter and the
    metrics."""

    timeout = 120

    @pytest.fixture(autouse=True)
    def _moto(self, moto: Moto) -> None:
        self.moto = moto

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.stack = ExitStack()
        self.addCleanup(self.stack.close)

    def client(self, url: str, seen: list[tuple[str, str, bool]], **kw: Any) -> Any:
        client = make_client(
            self.reactor,
            moto_cloud(url, **kw),
            api_observer=lambda *a: seen.append(a),
        )
        self.addCleanup(client.close)
        return client

    async def _counts_by_action(self) -> None:
        seen: list[tuple[str, str, bool]] = []
        c = self.client(self.moto.url, seen)
        await c.call("DescribeRegions", {})
        await c.call("DescribeRegions", {})
        await c.call("DescribeImages", {"Owners": ["amazon"]})
        with self.assertRaises(CloudError) as caught:
            await c.call("DeleteSecurityGroup", {"GroupId": "sg-0123456789abcdef0"})
        code = caught.exception.code
        self.assertEqual(
            seen,
            [
                ("DescribeRegions", "OK", False),
                ("DescribeRegions", "OK", False),
                ("DescribeImages", "OK", False),
                ("DeleteSecurityGroup", code, False),
            ],
        )
        counter = ApiCallCounter()
        for s in seen:
            counter(*s)
        metrics = DaemonMetrics()
        metrics.api_calls("j1", decode_api_calls(encode_api_calls(counter.counts())))
        m = scrape(metrics)
        calls = "txvmbot_cloud_api_calls_total"
        self.assertEqual(value(m, calls, action="DescribeRegions", code="OK"), 2)
        self.assertEqual(value(m, calls, action="DescribeImages", code="OK"), 1)
        self.assertEqual(value(m, calls, action="DeleteSecurityGroup", code=code), 1)
        self.assertEqual(with_name(m, "txvmbot_cloud_api_retries_total"), {})

    def test_counts_by_action(self) -> Any:
        return ensureDeferred(self._counts_by_action())

    async def _retried(self) -> None:
        # Requests 2, 4, 6 are throttled, 5 dropped: the second call is
        # retried once, the third three times.
        url = self.stack.enter_context(fault_proxy(self.moto.url, "throttle:2,drop:5"))
        seen: list[tuple[str, str, bool]] = []
        policy = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.02, max_elapsed=30)
        c = self.client(url, seen, policy=policy)
        for _ in range(3):
            await c.call("DescribeRegions", {})
        self.assertEqual(
            seen,
            [
                ("DescribeRegions", "OK", False),
                ("DescribeRegions", "RequestLimitExceeded", True),
                ("DescribeRegions", "OK", False),
                ("DescribeRegions", "RequestLimitExceeded", True),
                ("DescribeRegions", "ResponseNeverReceived", True),
                ("DescribeRegions", "RequestLimitExceeded", True),
                ("DescribeRegions", "OK", False),
            ],
        )
        metrics = DaemonMetrics()
        for s in seen:
            metrics.api_call(*s)
        m = scrape(metrics)
        calls = "txvmbot_cloud_api_calls_total"
        retries = "txvmbot_cloud_api_retries_total"
        self.assertEqual(value(m, calls, action="DescribeRegions", code="OK"), 3)
        self.assertEqual(
            value(m, retries, action="DescribeRegions", code="RequestLimitExceeded"), 3
        )
        self.assertEqual(
            value(m, retries, action="DescribeRegions", code="ResponseNeverReceived"), 1
        )
        self.assertEqual(value(m, retries, action="DescribeRegions", code="OK"), None)

    def test_retried(self) -> Any:
        return ensureDeferred(self._retried())

    async def _cleaner(self) -> None:
        """The daemon's cleaner counts the entries it cleaned by kind."""
        name = f"txvmbot-metrics-{uuid.uuid4().hex[:10]}"
        cloud = moto_cloud(self.moto.url)
        job = Job(
            id="m1",
            spec=JobSpec(check=CheckSpec(cloud=cloud, image="ami-1"), backend="moto"),
            state="cleaning",
            submitted=T0,
            attempts=1,
        )
        check_id = check_id_for(job)
        seen: list[tuple[str, str, bool]] = []
        c = self.client(self.moto.url, seen)
        journal = MemoryJournal()
        e1 = journal.intend(check_id, "keypair", name, cloud.endpoint, cloud.region)
        await c.call("CreateKeyPair", {"KeyName": name})
        journal.created(e1, name)
        e2 = journal.intend(check_id, "security-group", name, cloud.endpoint, cloud.region)
        group = await c.call("CreateSecurityGroup", {"GroupName": name, "Description": "m"})
        journal.created(e2, group["GroupId"])
        metrics = DaemonMetrics()
        clean = make_cleaner(
            self.reactor, journal, on_reaped=metrics.resource_reaped, api_observer=metrics.api_call
        )
        errors = await clean(job)
        self.assertEqual(errors, ())
        self.assertEqual(journal.pending(check_id), [])
        m = scrape(metrics)
        self.assertEqual(
            with_name(m, "txvmbot_resources_reaped_total"),
            {frozenset({("kind", "keypair")}): 1.0, frozenset({("kind", "security-group")}): 1.0},
        )
        calls = "txvmbot_cloud_api_calls_total"
        self.assertEqual(value(m, calls, action="DeleteKeyPair", code="OK"), 1)
        self.assertEqual(value(m, calls, action="DeleteSecurityGroup", code="OK"), 1)

    def test_cleaner_counts_reaped(self) -> Any:
        return ensureDeferred(self._cleaner())


class PoolProcessTests(PoolTestBase):
    """Real workers: a job's API calls reach the daemon's metrics; a killed
    worker counts as a death."""

    async def _real(self) -> None:
        metrics = DaemonMetrics()
        pool = self.pool(on_api_calls=metrics.api_calls, on_worker_death=metrics.worker_died)
        await pool.start()
        job = self.job()
        result = await pool.run(job, self.on_event(job), self.journal)
        self.assertTrue(result.passed, result.error)
        m = scrape(metrics)
        calls = with_name(m, "txvmbot_cloud_api_calls_total")
        actions = {dict(k)["action"] for k in calls}
        self.assertTrue(
            {"CreateKeyPair", "RunInstances", "TerminateInstances", "DeleteKeyPair"} <= actions,
            actions,
        )
        self.assertEqual(
            value(m, "txvmbot_cloud_api_calls_total", action="RunInstances", code="OK"), 1
        )
        self.assertEqual(value(m, "txvmbot_worker_deaths_total"), 0)

        hanging = self.hanging_job()
        d = pool.run(hanging, self.on_event(hanging), self.journal)
        await self.wait_event(hanging, "wait-ssh")
        pid = pool.pid_of(hanging.id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with self.assertRaises(WorkerDied):
            await d
        self.assertEqual(value(scrape(metrics), "txvmbot_worker_deaths_total"), 1)
        for _ in range(100):  # the replacement starts; stopping the pool is no death
            if any(w.state == "ready" for w in pool.workers()):
                break
            await sleep(0.1)
        await pool.stop()
        self.assertEqual(value(scrape(metrics), "txvmbot_worker_deaths_total"), 1)

    def test_api_calls_and_deaths_from_real_workers(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._real())
