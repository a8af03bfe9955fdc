"""The AMP API: argument types, and a round trip of every command between
the client library and the server (over iosim) against a fake scheduler."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.protocols import amp
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tests.support.fakes import SPEC, FakeScheduler
from txvmbot import __version__
from txvmbot.daemon import codec
from txvmbot.daemon.api.client import DaemonClient, JobSummary, _ClientAMP
from txvmbot.daemon.api.protocol import (
    API_VERSION,
    BackendArgument,
    BadRequest,
    BoundedInteger,
    Hello,
    JobIdArgument,
    JSONArgument,
    NotAllowed,
    StatesArgument,
    UnknownJobError,
    fit_document,
)
from txvmbot.daemon.api.server import AMPServerFactory, DaemonAMP
from txvmbot.daemon.jobs import JobEvent
from txvmbot.errors import UnknownJob


def decode(arg: amp.Argument, value: bytes, name: bytes = b"x") -> Any:
    objects: dict[str, Any] = {}
    arg.fromBox(name, {name: value}, objects, None)
    return objects[name.decode()]


def encode(arg: amp.Argument, value: Any, name: bytes = b"x") -> bytes:
    strings: dict[bytes, bytes] = {}
    arg.toBox(name, strings, {name.decode(): value}, None)
    return strings[name]


class ArgumentTests(SynchronousTestCase):
    def assertBad(self, arg: amp.Argument, value: bytes, *words: str) -> str:
        e = self.assertRaises(BadRequest, decode, arg, value, b"job_id")
        self.assertIn("'job_id'", str(e))
        for w in words:
            self.assertIn(w, str(e))
        return str(e)

    def test_job_id(self) -> None:
        a = JobIdArgument()
        self.assertEqual(decode(a, b"job-1"), "job-1")
        self.assertEqual(decode(a, b"a" * 64), "a" * 64)
        self.assertBad(a, b"a" * 65, "64")
        self.assertBad(a, b"../etc/passwd")
        self.assertBad(a, b"")
        self.assertBad(a, b"\xff\xfe")
        self.assertRaises(BadRequest, encode, a, "no/slashes")

    def test_missing(self) -> None:
        e = self.assertRaises(BadRequest, JobIdArgument().fromBox, b"job_id", {}, {}, None)
        self.assertIn("'job_id': missing", str(e))
        objects: dict[str, Any] = {}
        BackendArgument(optional=True).fromBox(b"backend", {}, objects, None)
        self.assertEqual(objects, {"backend": None})

    def test_backend(self) -> None:
        a = BackendArgument()
        self.assertEqual(decode(a, "prod é".encode()), "prod é")
        self.assertBad(a, b"b" * 201, "200")
        self.assertBad(a, b"a\nb", "control")

    def test_integer(self) -> None:
        a = BoundedInteger(1, 1000)
        self.assertEqual(decode(a, b"1000"), 1000)
        self.assertBad(a, b"0", "from 1 to 1000")
        self.assertBad(a, b"1001")
        self.assertBad(a, b"ten")
        self.assertBad(a, b"1" * 400)
        self.assertRaises(BadRequest, encode, a, True)

    def test_json(self) -> None:
        a = JSONArgument(100)
        self.assertEqual(decode(a, b'{"a":1}'), {"a": 1})
        self.assertBad(a, b"[1]", "object")
        self.assertBad(a, b"{", "JSON")
        self.assertBad(a, b'{"a":"' + b"x" * 200 + b'"}', "over the limit of 100")
        self.assertEqual(JSONArgument(10**9).limit, amp.MAX_VALUE_LENGTH)

    def test_states(self) -> None:
        a = StatesArgument()
        self.assertEqual(decode(a, encode(a, ["queued", "passed"])), ["queued", "passed"])
        self.assertRaises(BadRequest, encode, a, ["bogus"])
        raw = encode(amp.ListOf(amp.Unicode()), ["bogus"])
        self.assertBad(a, raw, "unknown job state")

    @given(st.binary(max_size=300))
    def test_any_bytes_decode_or_bad_request(self, data: bytes) -> None:
        """Whatever arrives, decoding answers a value or BadRequest: never
        another exception (which would make AMP drop the connection)."""
        for arg in (
            JobIdArgument(),
            BackendArgument(),
            BoundedInteger(1, 1000),
            JSONArgument(),
            StatesArgument(),
        ):
            try:
                decode(arg, data)
            except BadRequest:
                pass

    @given(st.from_regex(r"[a-zA-Z0-9-]{1,64}", fullmatch=True))
    def test_job_ids_round_trip(self, job_id: str) -> None:
        a = JobIdArgument()
        self.assertEqual(decode(a, encode(a, job_id)), job_id)


class FitTests(SynchronousTestCase):
    def test_small_documents_are_unchanged(self) -> None:
        doc = {"a": "b", "result": {"console": [["i", "x" * 10]]}}
        fitted = fit_document(doc, "result")
        self.assertIs(fitted.doc, doc)
        self.assertEqual(fitted.data, codec.dumps(doc))

    def test_long_outputs_are_cut_to_their_ends(self) -> None:
        doc = {"id": "j", "result": {"console": [["i", "a" * 100_000 + "THE END"]]}}
        fitted = fit_document(doc, "result")
        self.assertTrue(fitted.doc["truncated"])
        self.assertTrue(fitted.doc["result"]["console"][0][1].endswith("THE END"))
        self.assertEqual(fitted.data, codec.dumps(fitted.doc))
        self.assertLessEqual(len(fitted.data), amp.MAX_VALUE_LENGTH)


def connected(
    sched: FakeScheduler,
) -> tuple[DaemonClient, DaemonAMP, IOPump]:
    factory = AMPServerFactory(sched)
    client, server, pump = connectedServerAndClient(lambda: factory.buildProtocol(None), _ClientAMP)
    return DaemonClient(client, "iosim", API_VERSION, __version__), server, pump


class RoundTripTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sched = FakeScheduler()
        self.client, self.server, self.pump = connected(self.sched)

    def result(self, d: Any) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def failure(self, d: Any, *types: type[BaseException]) -> Any:
        self.pump.flush()
        return self.failureResultOf(d, *types).value

    def test_factory_checks_the_interface(self) -> None:
        e = self.assertRaises(TypeError, AMPServerFactory, object())
        self.assertIn("IScheduler", str(e))

    def test_hello(self) -> None:
        d = self.client._proto.callRemote(Hello, api_version=API_VERSION, client="test")
        self.assertEqual(
            self.result(d),
            {"api_version": 1, "min_api_version": 1, "daemon_version": __version__},
        )

    def test_submit(self) -> None:
        job = self.result(self.client.submit({**SPEC, "backend": "prod", "priority": 5}))
        self.assertEqual((job.id, job.state, job.spec.backend), ("job-1", "queued", "prod"))
        self.assertEqual(job.spec.priority, 5)
        self.assertEqual(self.sched.jobs["job-1"].spec, job.spec)
        # A JobSpec is accepted too.
        again = self.result(self.client.submit(job.spec))
        self.assertEqual(again.spec, job.spec)

    def test_get(self) -> None:
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.sched.finish("job-1", passed=False)
        job = self.result(self.client.get("job-1"))
        self.assertEqual(job, self.sched.jobs["job-1"])
        e = self.failure(self.client.get("job-9"), UnknownJobError)
        self.assertIsInstance(e, UnknownJob)
        self.assertIn("job-9", str(e))

    def test_big_results_are_cut_to_fit(self) -> None:
        import attrs

        self.sched.submit_now(codec.spec_from_dict(SPEC))
        job = self.sched.finish("job-1", passed=False)
        assert job.result is not None
        big = attrs.evolve(job.result, console=(("i-1", "x" * 200_000 + "kernel panic"),))
        self.sched.jobs["job-1"] = attrs.evolve(job, result=big)
        got = self.result(self.client.get("job-1"))
        self.assertTrue(got.result.console[0][1].endswith("kernel panic"))

    def test_list(self) -> None:
        for i in range(5):
            self.sched.submit_now(codec.spec_from_dict({**SPEC, "backend": f"b{i % 2}"}))
        self.sched.finish("job-1")
        page = self.result(self.client.list())
        self.assertEqual([j.id for j in page.jobs], ["job-5", "job-4", "job-3", "job-2", "job-1"])
        self.assertFalse(page.more)
        self.assertIsInstance(page.jobs[0], JobSummary)
        self.assertEqual(page.jobs[-1].passed, True)
        page = self.result(self.client.list(states=["queued"], backend="b0", limit=1))
        self.assertEqual([j.id for j in page.jobs], ["job-5"])
        self.assertTrue(page.more)

    def test_list_fits_in_one_value(self) -> None:
        for _ in range(1000):
            self.sched.submit_now(codec.spec_from_dict(SPEC))
        page = self.result(self.client.list(limit=1000))
        self.assertTrue(page.more)
        self.assertGreater(len(page.jobs), 100)

    def test_watch(self) -> None:
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        seen: list[JobEvent] = []
        d = self.client.watch("job-1", seen.append)
        self.pump.flush()
        self.assertEqual([(e.seq, e.state) for e in seen], [(1, "queued")])
        self.sched.set_state("job-1", "running")
        self.sched.step("job-1", "keypair", "running")
        self.sched.step("job-1", "keypair", "passed", "kp-1")
        self.pump.flush()
        self.assertNoResult(d)
        self.sched.finish("job-1")
        job = self.result(d)
        self.assertEqual(job.state, "passed")
        self.assertEqual(
            [(e.kind, e.step, e.state) for e in seen],
            [
                ("state", "", "queued"),
                ("state", "", "running"),
                ("step", "keypair", "running"),
                ("step", "keypair", "passed"),
                ("state", "", "passed"),
            ],
        )
        self.assertEqual([e.seq for e in seen], [1, 2, 3, 4, 5])
        self.assertEqual(self.server._watches, {})

    def test_cancel(self) -> None:
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.sched.cancel_later = True
        d = self.client.cancel("job-1")
        self.pump.flush()
        self.assertNoResult(d)
        self.sched.finish_cancel("job-1")
        job = self.result(d)
        self.assertEqual((job.state, job.reason), ("cancelled", "cancelled by a client"))

    def test_drain_and_resume(self) -> None:
        b = self.result(self.client.drain("prod"))
        self.assertEqual((b.name, b.state, b.capacity), ("prod", "draining", 4))
        b = self.result(self.client.resume("prod"))
        self.assertEqual((b.name, b.state), ("prod", "active"))
        e = self.failure(self.client.drain("nowhere"), NotAllowed)
        self.assertIn("no backend named 'nowhere'", str(e))

    def test_status(self) -> None:
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.sched.drain("prod")
        s = self.result(self.client.status())
        self.assertEqual((s.api_version, s.workers, s.queue_depth), (1, 2, 1))
        self.assertEqual(s.backends[0].state, "draining")
