"""Integration tests for the client through tests/support/faultproxy.py (a
subprocess) to the session's moto: throttling, 503s, dropped connections
and lost answers are retried, logged, and the sequence of calls still
completes.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import Counter
from contextlib import ExitStack
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import TestCase

from tests.support.faultproxy import fault_proxy, read_log
from tests.support.servers import Moto
from txvmbot.ec2 import make_client
from txvmbot.errors import CloudError, TransportError
from txvmbot.model import Cloud, Credentials, RetryPolicy

TAG_KEY = "txvmbot-faultproxy"
SPEC = "throttle:3,503:5,drop:7,lost:4"


def cloud(url: str, policy: RetryPolicy) -> Cloud:
    return Cloud(
        endpoint=url,
        region="us-east-1",
        credentials=Credentials("testing", "testing"),
        retry=policy,
    )


class FaultProxyTests(TestCase):
    timeout = 180

    @pytest.fixture(autouse=True)
    def _moto(self, moto: Moto) -> None:
        self.moto = moto

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.stack = ExitStack()
        self.addCleanup(self.stack.close)
        fd, self.log_path = tempfile.mkstemp(prefix="faultproxy-", suffix=".log")
        os.close(fd)
        self.addCleanup(os.unlink, self.log_path)

    def proxy(self, faults: str) -> str:
        return self.stack.enter_context(fault_proxy(self.moto.url, faults, self.log_path))

    def client(self, url: str, policy: RetryPolicy) -> Any:
        client = make_client(self.reactor, cloud(url, policy))
        self.addCleanup(client.close)
        return client

    async def _sequence(self) -> None:
        # Up to 8 requests in a row are faulted by SPEC (3..10), so allow 10.
        policy = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05, max_elapsed=60)
        c = self.client(self.proxy(SPEC), policy)
        direct = self.client(self.moto.url, policy)
        name = f"txvmbot-fp-{uuid.uuid4().hex[:12]}"
        with capturedLogs() as events:
            await c.call("CreateKeyPair", {"KeyName": name})
            images = await c.call(
                "DescribeImages", {"Filters": [{"Name": "architecture", "Values": ["x86_64"]}]}
            )
            run = await c.call(
                "RunInstances",
                {
                    "ImageId": images["Images"][0]["ImageId"],
                    "MinCount": 1,
                    "MaxCount": 1,
                    "KeyName": name,
                    "TagSpecifications": [
                        {"ResourceType": "instance", "Tags": [{"Key": TAG_KEY, "Value": name}]}
                    ],
                },
            )
            iid = run["Instances"][0]["InstanceId"]
            found = await c.call(
                "DescribeInstances", {"Filters": [{"Name": f"tag:{TAG_KEY}", "Values": [name]}]}
            )
            tagged = [i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]]
            self.assertIn(iid, tagged)
            gone = await c.call("TerminateInstances", {"InstanceIds": tagged})
            self.assertEqual(
                sorted(t["InstanceId"] for t in gone["TerminatingInstances"]), sorted(tagged)
            )
            await c.call("DeleteKeyPair", {"KeyName": name})

        log = read_log(self.log_path)
        faulted = [e for e in log if e[1] != "forward"]
        self.assertTrue({"throttle", "503", "drop", "lost"} <= {e[1] for e in faulted}, log)

        # Every faulted request cost exactly one retry, and each was logged.
        warnings = [e for e in events if e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), len(faulted), [formatEvent(e) for e in warnings])
        self.assertEqual(Counter(e["operation"] for e in warnings), Counter(e[2] for e in faulted))
        texts = " | ".join(formatEvent(e) for e in warnings)
        self.assertIn("RunInstances: attempt 1/10 failed", texts)
        self.assertIn("RequestLimitExceeded", texts)
        self.assertIn("HTTP503", texts)
        self.assertIn("ResponseNeverReceived", texts)

        # The lost answers: RunInstances reached moto every time it was
        # forwarded, lost or not. A real EC2 would return the first instance
        # again for the same ClientToken; moto ignores ClientToken and starts
        # one instance per forwarded request. The tag finds them all.
        runs_reaching_moto = [
            e for e in log if e[2] == "RunInstances" and e[1] in ("forward", "lost")
        ]
        self.assertEqual(len(runs_reaching_moto), 3, log)  # n=4 lost, n=8 lost, n=11 forwarded
        self.assertEqual(len(tagged), len(runs_reaching_moto))
        check = await direct.call(
            "DescribeInstances", {"Filters": [{"Name": f"tag:{TAG_KEY}", "Values": [name]}]}
        )
        states = {
            i["InstanceId"]: i["State"]["Name"]
            for r in check["Reservations"]
            for i in r["Instances"]
        }
        self.assertEqual(set(states), set(tagged))
        self.assertTrue(all(s in ("shutting-down", "terminated") for s in states.values()), states)

    def test_sequence_completes(self) -> Any:
        return ensureDeferred(self._sequence())

    async def _exhausted(self) -> None:
        policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02)
        c = self.client(self.proxy("drop:1"), policy)
        try:
            await c.call("DescribeRegions", {})
        except TransportError as e:
            self.assertIn("gave up after 3 attempts", str(e))
            self.assertIn("ResponseNeverReceived", str(e))
            self.assertEqual(getattr(e, "attempts", None), 3)
        else:
            self.fail("a dropped request succeeded")
        self.assertEqual([e[1] for e in read_log(self.log_path)], ["drop"] * 3)

    def test_exhausted_attempts(self) -> Any:
        return ensureDeferred(self._exhausted())

    async def _elapsed(self) -> None:
        policy = RetryPolicy(max_attempts=1000, base_delay=0.05, max_delay=0.1, max_elapsed=1.0)
        c = self.client(self.proxy("503:1"), policy)
        start = self.reactor.seconds()
        try:
            await c.call("DescribeRegions", {})
        except CloudError as e:
            self.assertEqual((e.code, e.status), ("HTTP503", 503))
            self.assertIn("max_elapsed 1s reached", str(e))
        else:
            self.fail("a 503 succeeded")
        self.assertLess(self.reactor.seconds() - start, 1.5)
        self.assertGreater(len(read_log(self.log_path)), 5)

    def test_exhausted_elapsed(self) -> Any:
        return ensureDeferred(self._elapsed())
