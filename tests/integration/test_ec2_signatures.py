"""The client's signatures, checked by a server that verifies them.

tests/support/sigserver.py listens on 127.0.0.1 (free port) behind the custom path
/services/compute, as Eucalyptus and OpenStack's ec2-api do. Real reactor,
real TCP.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support import sigserver
from txvmbot.ec2 import make_client
from txvmbot.errors import CloudError, TransportError
from txvmbot.model import Cloud, Credentials, RetryPolicy
from txvmbot.model import SignatureVersion as SigVer

SECRETS = {"AKIDSIGTEST": "right-secret"}
POLICY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, request_timeout=10.0)


class SignatureTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.server = sigserver.start(reactor, SECRETS, region="eu-test-1")
        self.addCleanup(self.server.stop)

    def client(self, secret: str, version: SigVer, region: str = "eu-test-1") -> Any:
        cloud = Cloud(
            endpoint=self.server.url,
            region=region,
            signature_version=version,
            credentials=Credentials("AKIDSIGTEST", secret),
            retry=POLICY,
        )
        client = make_client(self.reactor, cloud)
        self.addCleanup(client.close)
        return client

    async def _accepted(self, version: SigVer) -> None:
        client = self.client("right-secret", version)
        for _ in range(2):  # the second goes over the same, persistent connection
            result = await client.call("DescribeRegions", {})
            self.assertEqual(
                result, {"Regions": [{"RegionName": "eu-test-1", "Endpoint": "127.0.0.1"}]}
            )
        self.assertEqual(
            [(s.action, s.version, s.error) for s in self.server.seen],
            [("DescribeRegions", version, None)] * 2,
        )

    def test_v4_accepted(self) -> Any:
        return ensureDeferred(self._accepted("v4"))

    def test_v2_accepted(self) -> Any:
        return ensureDeferred(self._accepted("v2"))

    async def _rejected(self, version: SigVer, region: str = "eu-test-1") -> None:
        client = self.client("wrong-secret", version, region)
        try:
            await client.call("DescribeRegions", {})
        except CloudError as e:
            self.assertEqual(e.code, "AuthFailure")
            self.assertEqual(e.status, 401)
            self.assertTrue(e.request_id)
            self.assertIn("signature mismatch" if region == "eu-test-1" else "scope", e.message)
        else:
            self.fail("a wrong secret was accepted")
        self.assertEqual(len(self.server.seen), 1, "an AuthFailure must not be retried")

    def test_v4_wrong_secret(self) -> Any:
        return ensureDeferred(self._rejected("v4"))

    def test_v2_wrong_secret(self) -> Any:
        return ensureDeferred(self._rejected("v2"))

    async def _wrong_path(self) -> None:
        cloud = Cloud(
            endpoint=self.server.url.replace("/services/compute", "/"),
            region="eu-test-1",
            credentials=Credentials("AKIDSIGTEST", "right-secret"),
            retry=POLICY,
        )
        client = make_client(self.reactor, cloud)
        self.addCleanup(client.close)
        try:
            await client.call("DescribeRegions", {})
        except CloudError as e:
            self.assertEqual((e.code, e.status), ("HTTP404", 404))
        else:
            self.fail("expected a 404")

    def test_wrong_path(self) -> Any:
        return ensureDeferred(self._wrong_path())

    async def _refused(self) -> None:
        from tests.support.servers import free_port

        cloud = Cloud(
            endpoint=f"http://127.0.0.1:{free_port()}/services/compute",
            region="eu-test-1",
            credentials=Credentials("AKIDSIGTEST", "right-secret"),
            retry=POLICY,
        )
        client = make_client(self.reactor, cloud)
        self.addCleanup(client.close)
        try:
            await client.call("DescribeRegions", {})
        except TransportError as e:
            self.assertIn("connection refused", str(e))
            self.assertNotIn("gave up", str(e))  # failed fast, first attempt
        else:
            self.fail("expected connection refused")

    def test_refused_fails_fast(self) -> Any:
        return ensureDeferred(self._refused())
