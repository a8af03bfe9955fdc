"""The server keeps serving whatever a client sends: bad arguments, unknown
commands, scheduler errors and bugs get typed AMP errors on a connection
that stays up; a broken frame drops that one connection only. Watches
stream in order and end; a disconnect unsubscribes them."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tests.support.fakes import SPEC, FakeScheduler
from txvmbot import __version__
from txvmbot.daemon import codec
from txvmbot.daemon.api.client import DaemonClient, _ClientAMP
from txvmbot.daemon.api.protocol import (
    API_VERSION,
    InternalError,
    NotAllowed,
    UnknownJobError,
    Watch,
)
from txvmbot.daemon.api.server import MAX_WATCHES, AMPServerFactory
from txvmbot.daemon.jobs import JobEvent
from txvmbot.daemon.stores.sqlite.store import StoreError
from txvmbot.errors import DaemonUnavailable


class Conn:
    """One client connection over iosim."""

    def __init__(self, factory: AMPServerFactory) -> None:
        self.proto, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), _ClientAMP
        )
        self.client = DaemonClient(self.proto, "iosim", API_VERSION, __version__)

    def raw(self, command: bytes, **kw: bytes) -> Any:
        """Send a box as given; the answer box, or the error."""
        out: list[Any] = []
        self.proto.callRemoteString(command, **kw).addBoth(out.append)
        self.pump.flush()
        assert out, f"no answer to {command!r}"
        return out[0]

    def result(self, d: Any) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        self.pump.flush()
        assert out, "no result"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def works(self) -> bool:
        """A valid Get and Status are served on this connection."""
        job = self.result(self.client.get("job-1"))
        status = self.result(self.client.status())
        return job.id == "job-1" and status.workers == 2


class ServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sched = FakeScheduler()
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.factory = AMPServerFactory(self.sched)
        self.a = Conn(self.factory)
        self.b = Conn(self.factory)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def assertError(self, answer: Any, code: bytes, *words: str) -> str:
        self.assertIsInstance(answer, Failure)
        err = answer.value
        self.assertIsInstance(err, (amp.RemoteAmpError, amp.UnhandledCommand))
        if isinstance(err, amp.RemoteAmpError):
            got, description = err.errorCode, err.description
        else:
            got, description = err.args[:2]
        self.assertEqual(got, code, description)
        for w in words:
            self.assertIn(w, description)
        # The connection that sent it and another one still work.
        self.assertTrue(self.a.works())
        self.assertTrue(self.b.works())
        return str(description)

    def test_bad_arguments(self) -> None:
        bad: list[tuple[bytes, dict[str, bytes], tuple[str, ...]]] = [
            (b"Get", {"job_id": b"x" * 65}, ("'job_id'", "64")),
            (b"Get", {"job_id": b"../../etc/passwd"}, ("'job_id'",)),
            (b"Get", {"job_id": b"\xff\xfe"}, ("'job_id'",)),
            (b"Get", {}, ("'job_id': missing",)),
            (b"Watch", {"job_id": b"job-1", "after_seq": b"-1"}, ("'after_seq'",)),
            (b"Watch", {"job_id": b"job-1", "after_seq": b"one"}, ("'after_seq'",)),
            (b"List", {"limit": b"0"}, ("'limit'", "from 1 to 1000")),
            (b"List", {"limit": b"1001"}, ("'limit'",)),
            (b"List", {"limit": b"many"}, ("'limit'",)),
            (b"List", {"limit": b"5", "backend": b"b" * 201}, ("'backend'", "200")),
            (
                b"List",
                {"limit": b"5", "states": b"\x00\x05bogus"},
                ("'states'", "unknown job state"),
            ),
            (b"List", {"limit": b"5", "states": b"\x00\x09"}, ("'states'",)),
            (b"Drain", {"backend": b""}, ("'backend'",)),
            (b"Submit", {"spec": b"{not json"}, ("'spec'", "not valid JSON")),
            (b"Submit", {"spec": b"[1, 2]"}, ("'spec'", "object")),
            (b"Submit", {"spec": b"\xff"}, ("'spec'",)),
            (b"Cancel", {"job_id": b""}, ("'job_id'",)),
        ]
        for command, kw, words in bad:
            with self.subTest(command=command, kw=kw):
                self.assertError(
                    self.a.raw(command, **kw), b"BAD_REQUEST", command.decode(), *words
                )

    def test_invalid_specs_name_the_key(self) -> None:
        cases = [
            ({"region": "r", "image": "a"}, "spec.endpoint"),
            ({**SPEC, "timeouts": {"running": -1}}, "spec.timeouts.running"),
            ({**SPEC, "commands": "uname"}, "spec.commands"),
            ({**SPEC, "secret_key": "s"}, "spec.secret_key"),
            ({**SPEC, "priority": 5000}, "spec.priority"),
            ({**SPEC, "frobnicate": 1}, "spec.frobnicate"),
            ({**SPEC, "backend": "b" * 201}, "spec.backend"),
        ]
        for spec, key in cases:
            with self.subTest(key=key):
                self.assertError(self.a.raw(b"Submit", spec=codec.dumps(spec)), b"BAD_REQUEST", key)
        self.assertEqual(list(self.sched.jobs), ["job-1"])

    def test_submits_of_one_read_are_stored_together(self) -> None:
        """Group commit: the Submits that arrive in one read reach the
        scheduler as one submit_many (one store commit); a bad spec among
        them is refused alone; each is answered only once stored."""
        self.sched.batches.clear()
        specs = [SPEC, {**SPEC, "priority": 5000}, {**SPEC, "image": "ami-2"}]
        answers: list[list[Any]] = [[] for _ in specs]
        for spec, answer in zip(specs, answers, strict=True):
            self.a.proto.callRemoteString(b"Submit", spec=codec.dumps(spec)).addBoth(
                answer.append
            )
        self.a.pump.flush()
        self.assertEqual(self.sched.batches, [2])
        (first,), (refused,), (last,) = answers
        self.assertEqual(
            [codec.loads(a[b"job"], "job")["id"] for a in (first, last)], ["job-2", "job-3"]
        )
        self.assertEqual(self.sched.jobs["job-3"].spec.check.image, "ami-2")  # type: ignore[union-attr]
        self.assertError(refused, b"BAD_REQUEST", "spec.priority")
        # A batch the store refuses fails every submit in it, with the
        # store's words; the connection goes on.
        self.sched.batches.clear()
        self.sched.boom = StoreError("/data/jobs.sqlite", "cannot add 2 jobs: disk I/O error")
        failed: list[Any] = []
        for spec in specs[:1] * 2:
            self.a.proto.callRemoteString(b"Submit", spec=codec.dumps(spec)).addBoth(
                failed.append
            )
        self.a.pump.flush()
        self.sched.boom = None
        self.assertEqual(len(failed), 2)
        for answer in failed:
            self.assertError(answer, b"NOT_ALLOWED", "/data/jobs.sqlite", "disk I/O error")
        self.assertEqual(sorted(self.sched.jobs), ["job-1", "job-2", "job-3"])

    def test_a_pipeline_keeps_its_order(self) -> None:
        """Submits held for one commit are stored before any other command
        of the same read runs: a Status after two Submits counts them."""
        self.sched.batches.clear()
        answers: list[Any] = []
        for command, kw in [
            (b"Submit", {"spec": codec.dumps(SPEC)}),
            (b"Submit", {"spec": codec.dumps(SPEC)}),
            (b"Status", {}),
            (b"Submit", {"spec": codec.dumps(SPEC)}),
        ]:
            self.a.proto.callRemoteString(command, **kw).addBoth(answers.append)
        self.a.pump.flush()
        self.assertEqual(self.sched.batches, [2, 1])
        status = [a for a in answers if b"status" in a]
        self.assertEqual(codec.loads(status[0][b"status"], "status")["queue_depth"], 3)

    def test_unknown_command(self) -> None:
        self.assertError(self.a.raw(b"Frobnicate", x=b"1"), b"UNHANDLED", "Frobnicate")

    def test_unknown_job(self) -> None:
        for command in (b"Get", b"Cancel"):
            self.assertError(self.a.raw(command, job_id=b"job-99"), b"UNKNOWN_JOB", "job-99")
        self.assertError(
            self.a.raw(b"Watch", job_id=b"job-99", after_seq=b"0"), b"UNKNOWN_JOB", "job-99"
        )

    def test_bad_request_without_answer_keeps_the_connection(self) -> None:
        # A box that asks for no answer: AMP would drop the connection when it fails.
        self.a.proto.callRemoteString(b"Get", requiresAnswer=False, job_id=b"../x")
        self.a.proto.callRemoteString(b"Nothing", requiresAnswer=False)
        self.a.pump.flush()
        self.assertTrue(self.a.works())

    def test_scheduler_bug_is_logged_and_answered(self) -> None:
        self.sched.boom = ZeroDivisionError("oops")
        for command, kw in [
            (b"Get", {"job_id": b"job-1"}),
            (b"Status", {}),
            (b"List", {"limit": b"3"}),
            (b"Submit", {"spec": codec.dumps(SPEC)}),
            (b"Watch", {"job_id": b"job-1", "after_seq": b"0"}),
            (b"Drain", {"backend": b"prod"}),
        ]:
            answer = self.a.raw(command, **kw)
            self.assertIsInstance(answer.value, amp.RemoteAmpError)
            self.assertEqual(answer.value.errorCode, b"INTERNAL_ERROR")
            self.assertNotIn("oops", answer.value.description)  # no internals leak
        failures = [e for e in self.logged if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 6)
        self.assertTrue(all(e["log_failure"].check(ZeroDivisionError) for e in failures))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 6)
        self.sched.boom = None
        self.assertTrue(self.a.works() and self.b.works())
        # The typed error reaches the client library as InternalError.
        self.sched.boom = ZeroDivisionError("oops")
        self.assertRaises(InternalError, self.a.result, self.a.client.status())
        self.flushLoggedErrors(ZeroDivisionError)

    def test_unencodable_answer_is_an_internal_error(self) -> None:
        self.sched.status = lambda: "not a status"  # type: ignore[method-assign,assignment,return-value]
        answer = self.a.raw(b"Status")
        self.assertEqual(answer.value.errorCode, b"INTERNAL_ERROR")
        del self.sched.status
        self.assertTrue(self.a.works())
        self.assertEqual(len(self.flushLoggedErrors()), 1)

    def test_malformed_box_drops_that_connection_only(self) -> None:
        # A key longer than AMP allows (255 bytes): AMP cannot parse the box.
        frame = b"\x01\x00" + b"k" * 256 + b"\x00\x01v\x00\x00"
        self.a.proto.transport.write(frame)  # type: ignore[union-attr]
        try:
            self.a.pump.flush()
        except Exception:
            pass  # iosim raises what a reactor would log before closing
        if self.a.server.transport is not None:
            self.a.server.transport.loseConnection()  # what a reactor does then
            self.a.pump.flush()
        self.assertFalse(self.a.server.connected)
        self.assertTrue(self.b.works())
        c = Conn(self.factory)
        self.assertTrue(c.works())


class WatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sched = FakeScheduler()
        self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.factory = AMPServerFactory(self.sched)
        self.a = Conn(self.factory)

    def test_answer_comes_before_events(self) -> None:
        order: list[str] = []
        out: list[Any] = []
        self.a.proto.watchers["job-1"] = type(
            "W", (), {"on_event": lambda self, e: order.append(f"event {e.seq}"), "ended": None}
        )()
        d = self.a.proto.callRemote(Watch, job_id="job-1", after_seq=0)
        d.addCallback(lambda _: order.append("answer"))
        d.addBoth(out.append)
        self.a.pump.flush()
        self.assertEqual(order, ["answer", "event 1"])

    def test_events_are_sent_one_at_a_time_in_order(self) -> None:
        seen: list[int] = []
        d = self.a.client.watch("job-1", lambda e: seen.append(e.seq))
        self.a.pump.flush()
        for i in range(20):
            self.sched.step("job-1", f"s{i}", "running")
        # Nothing pumped yet: one event is in flight, the rest wait their turn.
        self.assertEqual(len(self.a.server._watches["job-1"].queue), 19)
        self.sched.finish("job-1")
        job = self.a.result(d)
        self.assertEqual(seen, list(range(1, 23)))
        self.assertEqual(job.state, "passed")

    def test_watch_from_a_seq(self) -> None:
        self.sched.set_state("job-1", "running")
        self.sched.step("job-1", "keypair", "running")
        seen: list[JobEvent] = []
        d = self.a.client.watch("job-1", seen.append, after_seq=2)
        self.a.pump.flush()
        self.assertEqual([e.seq for e in seen], [3])
        self.sched.finish("job-1", passed=False)
        self.assertEqual(self.a.result(d).state, "failed")

    def test_watch_a_final_job(self) -> None:
        self.sched.finish("job-1")
        seen: list[JobEvent] = []
        job = self.a.result(self.a.client.watch("job-1", seen.append))
        self.assertEqual((job.state, [e.state for e in seen]), ("passed", ["queued", "passed"]))
        # Past its last event: nothing to send, the watch ends at once.
        seen.clear()
        job = self.a.result(self.a.client.watch("job-1", seen.append, after_seq=2))
        self.assertEqual((job.state, seen), ("passed", []))

    def test_disconnect_unsubscribes(self) -> None:
        d = self.a.client.watch("job-1", lambda e: None)
        self.a.pump.flush()
        self.assertEqual(self.sched.watcher_count("job-1"), 1)
        self.a.proto.transport.loseConnection()  # type: ignore[union-attr]
        self.a.pump.flush()
        self.assertEqual(self.sched.watcher_count("job-1"), 0)
        self.assertEqual(self.a.server._watches, {})
        err = self.failureResultOf(d, DaemonUnavailable).value
        self.assertIn("while watching job job-1", str(err))
        # Events after the disconnect go nowhere and hurt nobody.
        self.sched.finish("job-1")

    def test_disconnect_with_events_in_flight(self) -> None:
        self.a.client.watch("job-1", lambda e: None).addErrback(lambda _: None)
        self.a.pump.flush()
        self.sched.step("job-1", "a", "running")
        self.sched.step("job-1", "a", "passed")
        self.a.server.transport.loseConnection()  # type: ignore[union-attr]
        self.a.pump.flush()
        self.assertEqual(self.sched.watcher_count("job-1"), 0)
        self.sched.step("job-1", "b", "running")

    def test_cancelling_the_watch_unwatches(self) -> None:
        d = self.a.client.watch("job-1", lambda e: None)
        self.a.pump.flush()
        d.cancel()
        self.a.pump.flush()
        self.assertEqual(self.sched.watcher_count("job-1"), 0)
        self.assertEqual(self.a.server._watches, {})
        self.failureResultOf(d)
        self.assertTrue(self.a.works())

    def test_one_watch_per_job_per_connection(self) -> None:
        self.a.client.watch("job-1", lambda e: None)
        self.a.pump.flush()
        self.assertRaises(NotAllowed, self.a.client.watch, "job-1", lambda e: None)
        answer = self.a.raw(b"Watch", job_id=b"job-1", after_seq=b"0")
        self.assertEqual(answer.value.errorCode, b"NOT_ALLOWED")

    def test_watch_limit(self) -> None:
        for _ in range(MAX_WATCHES):
            job = self.sched.submit_now(codec.spec_from_dict(SPEC))
            self.a.client.watch(job.id, lambda e: None).addErrback(lambda _: None)
        self.a.pump.flush()
        extra = self.sched.submit_now(codec.spec_from_dict(SPEC))
        self.assertRaises(NotAllowed, self.a.result, self.a.client.watch(extra.id, lambda e: None))

    def test_a_broken_listener_does_not_stop_the_stream(self) -> None:
        seen: list[int] = []

        def listener(e: JobEvent) -> None:
            seen.append(e.seq)
            if e.seq == 2:
                raise RuntimeError("client bug")

        d = self.a.client.watch("job-1", listener)
        self.sched.set_state("job-1", "running")
        self.sched.finish("job-1")
        self.assertEqual(self.a.result(d).state, "passed")
        self.assertEqual(seen, [1, 2, 3])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_unknown_job_watch_is_cleaned_up(self) -> None:
        d = self.a.client.watch("job-404", lambda e: None)
        self.assertRaises(UnknownJobError, self.a.result, d)
        self.assertEqual(self.a.proto.watchers, {})
        self.assertEqual(self.a.server._watches, {})
