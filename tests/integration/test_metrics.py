"""Integration tests of the daemon's Prometheus metrics: the EC2 client's
per-attempt observer and the cleaner's ``on_reaped`` against the
session's moto (directly and through the fault proxy), and the pool's
hooks with real worker processes (tests/support/pool_case.py)."""

from __future__ import annotations

import os
import signal
import uuid
from contextlib import ExitStack
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support.deferreds import result_of, sleep
from tests.support.faultproxy import fault_proxy
from tests.support.metrics_scrape import scrape, value, with_name
from tests.support.pool_case import PoolTestBase
from tests.support.servers import Moto
from txvmbot.daemon.jobs import Job, JobSpec, check_id_for
from txvmbot.daemon.scheduling.upkeep import make_cleaner
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

T0 = 1_000_000.0


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
        e1 = result_of(journal.intend(check_id, "keypair", name, cloud.endpoint, cloud.region))
        await c.call("CreateKeyPair", {"KeyName": name})
        result_of(journal.created(e1, name))
        e2 = result_of(journal.intend(check_id, "security-group", name, cloud.endpoint, cloud.region))
        group = await c.call("CreateSecurityGroup", {"GroupName": name, "Description": "m"})
        result_of(journal.created(e2, group["GroupId"]))
        metrics = DaemonMetrics()
        clean = make_cleaner(
            self.reactor, journal, on_reaped=metrics.resource_reaped, api_observer=metrics.api_call
        )
        errors = await clean(job)
        self.assertEqual(errors, ())
        self.assertEqual(result_of(journal.pending(check_id)), [])
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
