"""Unit tests of txvmbot.ec2: no network, no real reactor, no real time.

The HTTP side is a scripted in-memory IAgent (answers, connection errors or
no answer at all); time is a Clock; jitter is a fixed function.
"""

from __future__ import annotations

import base64
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

from treq.testing import StubTreq
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import _newclient
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support import paths, sigserver
from txvmbot.ec2 import EC2Client, ParamError, is_transient, make_client
from txvmbot.ec2.credentials import resolve
from txvmbot.ec2.retry import backoff_delay, call_with_retries
from txvmbot.errors import CloudError, ConfigError, TransportError
from txvmbot.interfaces import IEC2Client
from txvmbot.model import Cloud, Credentials, RetryPolicy

ENDPOINT = "http://127.0.0.1:8773/services/compute"
CREDS = Credentials("AKIDTEST", "sekrit")
POLICY = RetryPolicy(
    max_attempts=5, base_delay=1.0, max_delay=8.0, max_elapsed=100.0, request_timeout=10.0
)
CLOUD = Cloud(endpoint=ENDPOINT, region="us-east-1", credentials=CREDS, retry=POLICY)
NS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'


def ok(operation: str, inner: str = "") -> tuple[int, bytes]:
    return 200, (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{operation}Response {NS}>'
        f"<requestId>req-ok</requestId>{inner}</{operation}Response>"
    ).encode()


def ec2_error(status: int, code: str, message: str, request_id: str = "req-1") -> tuple[int, bytes]:
    return status, (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        f"<RequestID>{request_id}</RequestID></Response>"
    ).encode()


RUN_OK = ok(
    "RunInstances",
    "<reservationId>r-1</reservationId><ownerId>123</ownerId><instancesSet><item>"
    "<instanceId>i-1</instanceId><imageId>ami-1</imageId>"
    "<instanceState><code>0</code><name>pending</name></instanceState></item></instancesSet>",
)
HANG = object()
SLOW_BODY = object()


class FakeResponse:
    """Just enough of IResponse for readBody."""

    def __init__(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.code = code
        self.phrase = b"X"
        self.version = (b"HTTP", 1, 1)
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = len(body)
        self._body = body
        self.complete = True
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)
        protocol.dataReceived(self._body)
        if self.complete:
            protocol.connectionLost(Failure(ResponseDone()))


@implementer(IAgent)
class ScriptedAgent:
    """Answers requests from a script: (status, body) tuples, exceptions, or
    HANG (a Deferred that never fires; cancelling it is recorded)."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0
        self.slow: list[FakeResponse] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: Any = None
    ) -> Deferred[Any]:
        sink = StringTransport()
        if bodyProducer is not None:
            bodyProducer.startProducing(sink)
        body = sink.value()
        raw = {
            k.decode().lower(): v[-1].decode() for k, v in (headers or Headers()).getAllRawHeaders()
        }
        self.requests.append(
            {
                "method": method.decode(),
                "url": uri.decode(),
                "headers": raw,
                "body": body,
                "length": getattr(bodyProducer, "length", None),
                "params": dict(parse_qsl(body.decode(), keep_blank_values=True)),
            }
        )
        if not self.script:
            raise AssertionError(f"unexpected request {self.requests[-1]['params']}")
        step = self.script.pop(0)
        if step is HANG:

            def cancel(d: Deferred[Any]) -> None:
                self.cancelled += 1

            return Deferred(cancel)
        if step is SLOW_BODY:
            response = FakeResponse(200, b"<DescribeRegionsResponse>")
            response.complete = False
            self.slow.append(response)
            return succeed(response)
        if isinstance(step, BaseException):
            return fail(step)
        status, body = step
        ctype = "text/xml" if body.lstrip().startswith(b"<?xml") else "text/html"
        return succeed(FakeResponse(status, body, {"Content-Type": ctype}))


def client_for(
    agent: Any, cloud: Cloud = CLOUD, jitter: Callable[[], float] = lambda: 1.0
) -> tuple[EC2Client, Clock]:
    clock = Clock()
    return EC2Client(cloud, CREDS, agent=agent, clock=clock, random=jitter), clock


def never_received() -> Exception:
    return _newclient.ResponseNeverReceived([Failure(ierror.ConnectionDone())])


class SerializeAndSignTests(SynchronousTestCase):
    def call(self, operation: str, params: dict[str, Any], cloud: Cloud = CLOUD) -> dict[str, Any]:
        agent = ScriptedAgent(ok(operation))
        client, _ = client_for(agent, cloud)
        self.successResultOf(client.call(operation, params))
        [request] = agent.requests
        return request

    def assertSigned(self, request: dict[str, Any], version: str) -> None:
        url = urlsplit(request["url"])
        seen, error = sigserver.verify(
            request["method"],
            url.netloc,
            url.path,
            request["headers"],
            request["body"],
            {CREDS.access_key: CREDS.secret_key},
            "us-east-1",
        )
        self.assertEqual((seen, error), (version, None))

    def test_v4_custom_path(self) -> None:
        request = self.call("DescribeRegions", {})
        self.assertEqual(request["method"], "POST")
        self.assertEqual(request["url"], ENDPOINT)
        self.assertEqual(request["params"]["Action"], "DescribeRegions")
        self.assertEqual(request["params"]["Version"], "2016-11-15")
        self.assertIn("Credential=AKIDTEST/", request["headers"]["authorization"])
        self.assertIn("/us-east-1/ec2/aws4_request", request["headers"]["authorization"])
        self.assertNotIn("content-length", request["headers"])
        self.assertNotIn("host", request["headers"])
        self.assertEqual(request["length"], len(request["body"]))
        self.assertTrue(request["headers"]["user-agent"].startswith("txvmbot/"))
        self.assertSigned(request, "v4")

    def test_v2(self) -> None:
        cloud = Cloud(
            endpoint=ENDPOINT, region="us-east-1", credentials=CREDS, signature_version="v2"
        )
        request = self.call("DescribeRegions", {}, cloud)
        self.assertNotIn("authorization", request["headers"])
        self.assertEqual(request["params"]["SignatureVersion"], "2")
        self.assertEqual(request["params"]["AWSAccessKeyId"], "AKIDTEST")
        self.assertSigned(request, "v2")

    def test_session_token_v4(self) -> None:
        creds = Credentials("AKIDTEST", "sekrit", "tok")
        agent = ScriptedAgent(ok("DescribeRegions"))
        client = EC2Client(CLOUD, creds, agent=agent, clock=Clock())
        self.successResultOf(client.call("DescribeRegions", {}))
        self.assertEqual(agent.requests[0]["headers"]["x-amz-security-token"], "tok")
        self.assertSigned(agent.requests[0], "v4")

    def test_default_port_dropped(self) -> None:
        cloud = Cloud(endpoint="http://ec2.example:80", region="r", credentials=CREDS)
        agent = ScriptedAgent(ok("DescribeRegions"))
        client, _ = client_for(agent, cloud)
        self.assertEqual(client.endpoint, "http://ec2.example/")
        self.successResultOf(client.call("DescribeRegions", {}))
        self.assertEqual(agent.requests[0]["url"], "http://ec2.example/")

    def test_filters(self) -> None:
        request = self.call(
            "DescribeImages",
            {"Owners": ["self"], "Filters": [{"Name": "name", "Values": ["debian-*", "x"]}]},
        )
        params = request["params"]
        self.assertEqual(params["Owner.1"], "self")
        self.assertEqual(params["Filter.1.Name"], "name")
        self.assertEqual(params["Filter.1.Value.1"], "debian-*")
        self.assertEqual(params["Filter.1.Value.2"], "x")
        self.assertSigned(request, "v4")

    def test_run_instances_tags_token_userdata(self) -> None:
        agent = ScriptedAgent(RUN_OK)
        client, _ = client_for(agent)
        params = {
            "ImageId": "ami-1",
            "MinCount": 1,
            "MaxCount": 1,
            "UserData": "#!/bin/sh\necho hi\n",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": "txvmbot", "Value": "c1"}]}
            ],
        }
        result = self.successResultOf(client.call("RunInstances", params))
        self.assertEqual(result["Instances"][0]["InstanceId"], "i-1")
        self.assertNotIn("ResponseMetadata", result)
        sent = agent.requests[0]["params"]
        self.assertEqual(base64.b64decode(sent["UserData"]), b"#!/bin/sh\necho hi\n")
        self.assertEqual(len(sent["ClientToken"]), 36)
        self.assertEqual(sent["TagSpecification.1.ResourceType"], "instance")
        self.assertEqual(sent["TagSpecification.1.Tag.1.Key"], "txvmbot")
        self.assertNotIn("ClientToken", params)  # the caller's dict is not changed

    def test_caller_client_token_kept(self) -> None:
        agent = ScriptedAgent(RUN_OK)
        client, _ = client_for(agent)
        params = {"ImageId": "ami-1", "MinCount": 1, "MaxCount": 1, "ClientToken": "mine"}
        self.successResultOf(client.call("RunInstances", params))
        self.assertEqual(agent.requests[0]["params"]["ClientToken"], "mine")

    def test_console_output_decoded(self) -> None:
        text = "boot ok\n\u00e9t\u00e9\n"
        encoded = base64.b64encode(text.encode() + b"\xff").decode()
        agent = ScriptedAgent(
            ok("GetConsoleOutput", f"<instanceId>i-1</instanceId><output>{encoded}</output>")
        )
        client, _ = client_for(agent)
        result = self.successResultOf(client.call("GetConsoleOutput", {"InstanceId": "i-1"}))
        self.assertEqual(result["Output"], text + "\ufffd")
        self.assertEqual(result["InstanceId"], "i-1")

    def test_bad_params(self) -> None:
        agent = ScriptedAgent()
        client, _ = client_for(agent)
        f = self.failureResultOf(client.call("RunInstances", {"ImageId": 3, "MinCount": 1}))
        self.assertIsInstance(f.value, ParamError)
        self.assertIsInstance(f.value, TypeError)
        self.assertIn("MaxCount", str(f.value))
        self.assertIn("ImageId", str(f.value))
        f = self.failureResultOf(client.call("DescribeThings", {}))
        self.assertIsInstance(f.value, ParamError)
        self.assertIn("no such EC2 operation", str(f.value))
        f = self.failureResultOf(client.call("DescribeInstances", {"Bogus": 1}))
        self.assertIn("Bogus", str(f.value))
        self.assertEqual(agent.requests, [])


class ResponseTests(SynchronousTestCase):
    def test_wrong_root(self) -> None:
        agent = ScriptedAgent(ok("DescribeRegions"))
        client, _ = client_for(agent)
        f = self.failureResultOf(client.call("DescribeInstances", {}))
        self.assertIsInstance(f.value, TransportError)
        self.assertIn("<DescribeRegionsResponse>", str(f.value))
        self.assertIn("expected <DescribeInstancesResponse>", str(f.value))
        self.assertEqual(len(agent.requests), 1)

    def test_200_html(self) -> None:
        agent = ScriptedAgent((200, b"<html><body>Welcome to nginx</body></html>"))
        client, _ = client_for(agent)
        f = self.failureResultOf(client.call("DescribeInstances", {}))
        self.assertIsInstance(f.value, TransportError)
        self.assertIn("root element <html>", str(f.value))
        self.assertIn("Welcome to nginx", str(f.value))
        self.assertEqual(len(agent.requests), 1)

    def test_timestamps(self) -> None:
        """Timestamps parse to the same aware datetimes botocore's own
        parser gives, whichever of the two parses them."""
        from botocore.utils import parse_timestamp as botocore_parse

        from txvmbot.ec2._botocore import parse_timestamp

        for text in (
            "2026-11-22T05:39:00.000Z",
            "2026-11-22T05:39:00Z",
            "2026-11-22T07:39:00.250+02:00",
            "2026-11-22T05:39:00",  # no zone: botocore's parser, as before
            "Sun, 22 Nov 2026 05:39:00 GMT",
            "1795325940",
            1795325940,
        ):
            with self.subTest(text=text):
                self.assertEqual(parse_timestamp(text), botocore_parse(text))
        self.assertRaises(ValueError, parse_timestamp, "not a time")
        launch = "<launchTime>2026-11-22T05:39:00.000Z</launchTime>"
        agent = ScriptedAgent(
            ok(
                "DescribeInstances",
                "<reservationSet><item><instancesSet><item><instanceId>i-1</instanceId>"
                f"{launch}</item></instancesSet></item></reservationSet>",
            )
        )
        client, _ = client_for(agent)
        answer = self.successResultOf(client.call("DescribeInstances", {}))
        instance = answer["Reservations"][0]["Instances"][0]
        self.assertEqual(instance["LaunchTime"], botocore_parse("2026-11-22T05:39:00.000Z"))
        self.assertIsNotNone(instance["LaunchTime"].tzinfo)

    def test_ec2_error(self) -> None:
        agent = ScriptedAgent(
            ec2_error(400, "InvalidKeyPair.NotFound", "The key pair 'k' does not exist", "rid-9")
        )
        client, _ = client_for(agent)
        f = self.failureResultOf(client.call("DeleteKeyPair", {"KeyName": "k"}))
        err = f.value
        assert isinstance(err, CloudError)
        self.assertEqual(
            (err.operation, err.code, err.message, err.status, err.request_id),
            (
                "DeleteKeyPair",
                "InvalidKeyPair.NotFound",
                "The key pair 'k' does not exist",
                400,
                "rid-9",
            ),
        )
        self.assertFalse(is_transient(f))
        self.assertEqual(len(agent.requests), 1)

    def test_non_xml_error(self) -> None:
        html = b"<html><head><title>502 Bad Gateway</title></head></html>"
        agent = ScriptedAgent((502, html), (502, html))
        client, clock = client_for(
            agent, Cloud(ENDPOINT, "r", credentials=CREDS, retry=RetryPolicy(max_attempts=2))
        )
        d = client.call("DescribeInstances", {})
        clock.advance(10)
        err = self.failureResultOf(d).value
        assert isinstance(err, CloudError)
        self.assertEqual((err.code, err.status), ("HTTP502", 502))
        self.assertIn("502 Bad Gateway", str(err))
        self.assertIn("text/html", str(err))
        self.assertIn("gave up after 2 attempts", str(err))


class RetryTests(SynchronousTestCase):
    def test_transient_then_ok(self) -> None:
        """Throttle, 503, reset, timeout: each retried after a growing delay,
        each logged; the ClientToken is the same in every attempt."""
        agent = ScriptedAgent(
            ec2_error(503, "RequestLimitExceeded", "slow down"),
            ec2_error(503, "Unavailable", "try later"),
            never_received(),
            HANG,
            RUN_OK,
        )
        client, clock = client_for(agent)
        with capturedLogs() as events:
            d = client.call("RunInstances", {"ImageId": "ami-1", "MinCount": 1, "MaxCount": 1})
            self.assertNoResult(d)
            for expected_requests, step in [(2, 1.0), (3, 2.0), (4, 4.0)]:
                clock.advance(step - 0.001)
                self.assertEqual(len(agent.requests), expected_requests - 1)
                clock.advance(0.001)
                self.assertEqual(len(agent.requests), expected_requests)
            clock.advance(POLICY.request_timeout)  # the hung attempt times out
            self.assertEqual(agent.cancelled, 1)
            clock.advance(8.0)
            result = self.successResultOf(d)
        self.assertEqual(result["Instances"][0]["InstanceId"], "i-1")
        tokens = {r["params"]["ClientToken"] for r in agent.requests}
        self.assertEqual(len(tokens), 1)
        self.assertEqual(len(agent.requests), 5)
        warnings = [
            e for e in events if e.get("log_level") is not None and e["log_level"].name == "warn"
        ]
        self.assertEqual([e["attempt"] for e in warnings], [1, 2, 3, 4])
        self.assertEqual([e["delay"] for e in warnings], [1.0, 2.0, 4.0, 8.0])
        texts = [formatEvent(e) for e in warnings]
        self.assertIn("RunInstances: attempt 1/5 failed", texts[0])
        self.assertIn("RequestLimitExceeded", texts[0])
        self.assertIn("retrying in 1.000s", texts[0])
        self.assertIn("ResponseNeverReceived", texts[2])
        self.assertIn("no answer within 10s", texts[3])

    def test_unrepeatable_call_retries_only_refusals(self) -> None:
        """repeatable=False: throttling (the cloud did not act) is retried; a
        503 or a lost answer (it may have acted) is not."""
        refused_then_ok = ScriptedAgent(
            ec2_error(503, "RequestLimitExceeded", "slow down"),
            ok("AllocateAddress", "<publicIp>203.0.113.5</publicIp><domain>standard</domain>"),
        )
        client, clock = client_for(refused_then_ok)
        d = client.call("AllocateAddress", {"Domain": "standard"}, repeatable=False)
        clock.advance(10)
        self.assertEqual(self.successResultOf(d)["PublicIp"], "203.0.113.5")
        self.assertEqual(len(refused_then_ok.requests), 2)
        for answer in (ec2_error(503, "Unavailable", "try later"), never_received()):
            with self.subTest(answer=answer):
                agent = ScriptedAgent(answer, ok("AllocateAddress"))
                client, clock = client_for(agent)
                d = client.call("AllocateAddress", {"Domain": "standard"}, repeatable=False)
                clock.advance(10)
                self.failureResultOf(d)
                self.assertEqual(len(agent.requests), 1)

    def test_no_retry_on_4xx(self) -> None:
        agent = ScriptedAgent(ec2_error(400, "InvalidParameterValue", "nope"))
        client, _ = client_for(agent)
        with capturedLogs() as events:
            f = self.failureResultOf(client.call("DescribeInstances", {}))
        self.assertEqual(f.value.code, "InvalidParameterValue")
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual([e for e in events if e["log_level"].name == "warn"], [])

    def test_throttle_400_retried(self) -> None:
        agent = ScriptedAgent(
            ec2_error(400, "Throttling", "Rate exceeded"),
            ok("DescribeInstances", "<reservationSet/>"),
        )
        client, clock = client_for(agent)
        d = client.call("DescribeInstances", {})
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), {"Reservations": []})

    def test_no_retry_on_refused(self) -> None:
        agent = ScriptedAgent(ierror.ConnectionRefusedError("127.0.0.1", 8773))
        client, _ = client_for(agent)
        f = self.failureResultOf(client.call("DescribeInstances", {}))
        self.assertIsInstance(f.value, TransportError)
        self.assertIn("connection refused", str(f.value))
        self.assertEqual(len(agent.requests), 1)

    def test_bounded_by_attempts(self) -> None:
        agent = ScriptedAgent(*[ec2_error(503, "InternalError", "boom")] * 5)
        client, clock = client_for(agent)
        d = client.call("DescribeInstances", {})
        clock.pump([1, 2, 4, 8])
        err = self.failureResultOf(d).value
        assert isinstance(err, CloudError)
        self.assertEqual(err.code, "InternalError")
        self.assertEqual(err.status, 503)
        self.assertEqual(err.attempts, 5)  # type: ignore[attr-defined]
        self.assertIn("gave up after 5 attempts in 15.0s (max_attempts reached)", str(err))
        self.assertIsInstance(err.__cause__, CloudError)
        self.assertEqual(len(agent.requests), 5)

    def test_bounded_by_elapsed(self) -> None:
        """max_elapsed 5s: attempts at 0, 1 and 3s; the next delay (4s) would
        end past 5s, so it gives up after 3 attempts."""
        policy = RetryPolicy(max_attempts=10, base_delay=1.0, max_delay=8.0, max_elapsed=5.0)
        agent = ScriptedAgent(*[never_received()] * 3)
        client, clock = client_for(agent, Cloud(ENDPOINT, "r", credentials=CREDS, retry=policy))
        d = client.call("DescribeInstances", {})
        clock.pump([1, 2])
        err = self.failureResultOf(d).value
        assert isinstance(err, TransportError)
        self.assertIn("gave up after 3 attempts in 3.0s (max_elapsed 5s reached)", str(err))
        self.assertIn("ResponseNeverReceived(ConnectionDone", str(err))

    def test_timeout_capped_by_elapsed(self) -> None:
        policy = RetryPolicy(max_attempts=10, base_delay=1.0, max_elapsed=4.0, request_timeout=30)
        agent = ScriptedAgent(HANG)
        client, clock = client_for(agent, Cloud(ENDPOINT, "r", credentials=CREDS, retry=policy))
        d = client.call("DescribeInstances", {})
        clock.advance(4.0)
        err = self.failureResultOf(d).value
        self.assertIn("no answer within 4s", str(err))
        self.assertEqual(agent.cancelled, 1)

    def test_timeout_mid_body(self) -> None:
        """The answer's body stops coming: the attempt times out, the
        connection is closed, and the retry succeeds."""
        agent = ScriptedAgent(SLOW_BODY, ok("DescribeRegions"))
        client, clock = client_for(agent)
        d = client.call("DescribeRegions", {})
        clock.advance(POLICY.request_timeout)
        self.assertEqual(agent.slow[0].transport.producerState, "stopped")
        self.assertNoResult(d)
        clock.advance(1.0)
        self.assertEqual(self.successResultOf(d), {})

    def test_cancel(self) -> None:
        agent = ScriptedAgent(never_received())
        client, clock = client_for(agent)
        d = client.call("DescribeInstances", {})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        clock.advance(100)
        self.assertEqual(len(agent.requests), 1)

    def test_jitter_within_bounds(self) -> None:
        policy = RetryPolicy(base_delay=0.2, max_delay=5.0)
        rng = random.Random(42)
        caps = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
        for n, cap in enumerate(caps, start=1):
            for _ in range(50):
                delay = backoff_delay(policy, n, rng.random)
                self.assertTrue(0 <= delay <= cap, (n, delay, cap))
        self.assertEqual(backoff_delay(policy, 3, lambda: 0.5), 0.4)
        delays = [backoff_delay(policy, n, lambda: 1.0) for n in range(1, 8)]
        self.assertEqual(delays, caps)

    def test_half_jitter_used(self) -> None:
        agent = ScriptedAgent(never_received(), ok("DescribeRegions"))
        client, clock = client_for(agent, jitter=lambda: 0.25)
        d = client.call("DescribeRegions", {})
        clock.advance(0.249)
        self.assertNoResult(d)
        clock.advance(0.001)
        self.successResultOf(d)

    def test_is_transient(self) -> None:
        transient = [
            CloudError("X", "RequestLimitExceeded", "", 503),
            CloudError("X", "Throttling", "", 400),
            CloudError("X", "SlowDown", "", 400),
            CloudError("X", "ServiceUnavailable", "", 503),
            CloudError("X", "HTTP502", "", 502),
            CloudError("X", "Whatever", "", 500),
            CloudError("X", "TooMany", "", 429),
            never_received(),
            _newclient.ResponseFailed([Failure(ierror.ConnectionLost())]),
            _newclient.RequestTransmissionFailed([Failure(ierror.ConnectionLost())]),
            ierror.ConnectionLost(),
            ConnectionResetError(),
        ]
        permanent = [
            CloudError("X", "PriorInstanceTransferInProgress", "", 400),
            CloudError("X", "AuthFailure", "", 401),
            CloudError("X", "InvalidAMIID.NotFound", "", 400),
            ierror.ConnectionRefusedError(),
            ierror.DNSLookupError(),
            TransportError("X", "wrong root"),
            ValueError(),
        ]
        for exc in transient:
            self.assertTrue(is_transient(exc), exc)
            self.assertTrue(is_transient(Failure(exc)), exc)
        for exc in permanent:
            self.assertFalse(is_transient(exc), exc)

    def test_call_with_retries_generic(self) -> None:
        clock = Clock()
        attempts: list[int] = []

        def attempt() -> Deferred[str]:
            attempts.append(1)
            if len(attempts) < 3:
                return fail(ierror.ConnectionLost())
            return succeed("done")

        d = call_with_retries(clock, POLICY, "Op", attempt, random=lambda: 0.0)
        clock.advance(0)
        clock.advance(0)
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(len(attempts), 3)


class StubTreqTests(SynchronousTestCase):
    """A treq-like agent (StubTreq over a twisted.web resource) works too."""

    def test_stubtreq(self) -> None:
        seen: list[dict[str, str]] = []

        class EC2(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                seen.append(dict(parse_qsl(request.content.read().decode())))
                request.setHeader(b"content-type", b"text/xml")
                return ok("DescribeKeyPairs", "<keySet><item><keyName>k</keyName></item></keySet>")[
                    1
                ]

        stub = StubTreq(EC2())
        client = make_client(MemoryReactorClock(), CLOUD, agent=stub, clock=Clock())
        d = client.call("DescribeKeyPairs", {"KeyNames": ["k"]})
        stub.flush()
        self.assertEqual(self.successResultOf(d), {"KeyPairs": [{"KeyName": "k"}]})
        self.assertEqual(seen[0]["KeyName.1"], "k")


class MakeClientTests(SynchronousTestCase):
    def test_provides_interface(self) -> None:
        reactor = MemoryReactorClock()
        client = make_client(reactor, CLOUD)
        self.assertTrue(verifyObject(IEC2Client, client))
        self.assertEqual(client.api_version, "2016-11-15")
        self.assertEqual(client.endpoint, ENDPOINT)
        self.assertEqual(client.region, "us-east-1")
        self.assertEqual(client.signature_version, "v4")
        self.assertNotIn("sekrit", repr(client))
        self.successResultOf(client.close())

    def test_real_agent_connects_to_endpoint(self) -> None:
        reactor = MemoryReactorClock()
        client = make_client(reactor, CLOUD)
        d = client.call("DescribeRegions", {})
        self.assertNoResult(d)
        [(host, port, *_)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 8773))
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_bad_endpoint(self) -> None:
        for endpoint in ["ec2.example.com", "ftp://x/", "http://x/?a=b", "http://x:99999/"]:
            cloud = Cloud(endpoint=endpoint, region="r", credentials=CREDS)
            with self.assertRaises(ConfigError) as ctx:
                make_client(MemoryReactorClock(), cloud)
            self.assertIn("endpoint", str(ctx.exception))

    def test_lazy_imports(self) -> None:
        """Importing txvmbot.ec2 loads neither the reactor nor botocore."""
        code = (
            "import sys, txvmbot.ec2, txvmbot.ec2.client, txvmbot.ec2.retry;"
            "bad = [m for m in ('twisted.internet.reactor', 'botocore', 'botocore.session')"
            " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=paths.ROOT,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)


class CredentialsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))
        self.credfile = os.path.join(self.dir, "credentials")
        with open(self.credfile, "w") as f:
            f.write(
                "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n\n"
                "[euca]\naws_access_key_id = EUCAKEY\naws_secret_access_key = eucasecret\n"
                "aws_session_token = eucatoken\n"
            )
        self.env = {
            "HOME": self.dir,  # ~/.aws/* does not exist there
            "AWS_SHARED_CREDENTIALS_FILE": self.credfile,
        }

    def cloud(self, **kw: Any) -> Cloud:
        return Cloud(endpoint=ENDPOINT, region="r", name="prod", **kw)

    def test_config_wins(self) -> None:
        env = dict(self.env, AWS_ACCESS_KEY_ID="ENVKEY", AWS_SECRET_ACCESS_KEY="envsecret")
        self.assertEqual(resolve(self.cloud(credentials=CREDS, profile="euca"), env), CREDS)

    def test_environment(self) -> None:
        env = dict(
            self.env,
            AWS_ACCESS_KEY_ID="ENVKEY",
            AWS_SECRET_ACCESS_KEY="envsecret",
            AWS_SESSION_TOKEN="envtoken",
        )
        self.assertEqual(resolve(self.cloud(), env), Credentials("ENVKEY", "envsecret", "envtoken"))

    def test_partial_environment(self) -> None:
        env = dict(self.env, AWS_ACCESS_KEY_ID="ENVKEY")
        with self.assertRaises(ConfigError) as ctx:
            resolve(self.cloud(), env)
        self.assertIn("AWS_SECRET_ACCESS_KEY", str(ctx.exception))

    def test_shared_file_default(self) -> None:
        self.assertEqual(resolve(self.cloud(), self.env), Credentials("DEFKEY", "defsecret"))

    def test_shared_file_aws_profile(self) -> None:
        env = dict(self.env, AWS_PROFILE="euca")
        self.assertEqual(
            resolve(self.cloud(), env), Credentials("EUCAKEY", "eucasecret", "eucatoken")
        )

    def test_cloud_profile_beats_environment(self) -> None:
        env = dict(self.env, AWS_ACCESS_KEY_ID="ENVKEY", AWS_SECRET_ACCESS_KEY="envsecret")
        self.assertEqual(resolve(self.cloud(profile="euca"), env).access_key, "EUCAKEY")

    def test_home_default_path_and_config_file(self) -> None:
        os.mkdir(os.path.join(self.dir, ".aws"))
        with open(os.path.join(self.dir, ".aws", "config"), "w") as f:
            f.write("[profile cfg]\naws_access_key_id = CFGKEY\naws_secret_access_key = s\n")
        env = {"HOME": self.dir, "AWS_PROFILE": "cfg"}
        self.assertEqual(resolve(self.cloud(), env), Credentials("CFGKEY", "s"))

    def test_missing_profile(self) -> None:
        with self.assertRaises(ConfigError) as ctx:
            resolve(self.cloud(profile="nope"), self.env)
        self.assertIn("profile 'nope'", str(ctx.exception))
        self.assertIn(self.credfile, str(ctx.exception))
        self.assertEqual(ctx.exception.where, "clouds.prod.profile")

    def test_none(self) -> None:
        env = {"HOME": self.dir}
        with self.assertRaises(ConfigError) as ctx:
            resolve(self.cloud(), env)
        message = str(ctx.exception)
        self.assertIn("environment (AWS_ACCESS_KEY_ID", message)
        self.assertIn(os.path.join(self.dir, ".aws", "credentials"), message)
        self.assertIn("instance metadata is never consulted", message)

    def test_make_client_resolves(self) -> None:
        cloud = self.cloud()
        with mock.patch.dict(os.environ, {"HOME": self.dir}, clear=True):
            with self.assertRaises(ConfigError):
                make_client(MemoryReactorClock(), cloud)


class DirectEndpointsTests(SynchronousTestCase):
    """IP literals connect without a name lookup; names and https as the
    Agent's default would."""

    def endpoint(self, url: str) -> object:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.web.client import URI

        from txvmbot.ec2.client import DirectEndpoints

        return DirectEndpoints(MemoryReactorClock(), 7.0).endpointForURI(URI.fromBytes(url.encode()))

    def test_ipv4_literal_is_a_plain_tcp4_endpoint(self) -> None:
        from twisted.internet.endpoints import TCP4ClientEndpoint

        ep = self.endpoint("http://127.0.0.1:5000/")
        self.assertIsInstance(ep, TCP4ClientEndpoint)
        self.assertEqual((ep._host, ep._port, ep._timeout), ("127.0.0.1", 5000, 7.0))  # type: ignore[attr-defined]

    def test_ipv6_literal_is_a_plain_tcp6_endpoint(self) -> None:
        from twisted.internet.endpoints import TCP6ClientEndpoint

        self.assertIsInstance(self.endpoint("http://[::1]:5000/"), TCP6ClientEndpoint)

    def test_names_are_resolved(self) -> None:
        from twisted.internet.endpoints import HostnameEndpoint

        self.assertIsInstance(self.endpoint("http://localhost:5000/"), HostnameEndpoint)

    def test_https_is_wrapped_in_tls(self) -> None:
        from twisted.internet.endpoints import _WrapperEndpoint

        self.assertIsInstance(self.endpoint("https://ec2.example.com/"), _WrapperEndpoint)
