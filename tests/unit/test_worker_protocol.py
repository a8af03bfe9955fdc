"""The daemon<->worker AMP protocol, in memory: the worker's Worker and the
pool's parent protocol connected by twisted.test.iosim, with a fake check
(no processes, no network, no reactor)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tests.support.deferreds import result_of
from txvmbot.daemon import codec
from txvmbot.daemon.workers.pool import _JobRun, _ParentAMP, _Worker, describe_exit
from txvmbot.daemon.workers.protocol import (
    MAX_EVENT_BYTES,
    ArgumentTooLarge,
    Blob,
    CancelJob,
    JournalIntend,
    JournalWriteFailed,
    MalformedArgument,
    RunJob,
    StepEventCmd,
    UnknownJobError,
    WorkerBusy,
    WorkerProtocolError,
    WorkerUp,
    _Command,
)
from txvmbot.daemon.workers.worker import RemoteJournal, Worker, encode_result
from txvmbot.engine import Cleanup, StepRunner, track
from txvmbot.journal import MemoryJournal
from txvmbot.model import (
    CheckResult,
    CommandResult,
    Facts,
    FailureKind,
    JournalEntry,
    StepEvent,
    StepResult,
)

SPEC = {"endpoint": "http://127.0.0.1:1/", "region": "r1", "image": "ami-1", "ssh": False}


def _same(value: Any) -> Any:
    return value


def caught(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred with d's outcome, listening before the answer arrives
    (AMP hands an error nobody listens for yet to unhandledError)."""
    out: Deferred[Any] = Deferred()
    d.chainDeferred(out)
    return out


class FakeCheck:
    """Stands in for txvmbot.jobs.smoke.Check inside the worker."""

    made: list[FakeCheck] = []

    def __init__(
        self,
        reactor: Any,
        spec: Any,
        *,
        journal: Any,
        observer: Any,
        evidence_root: str | None,
        check_id: str,
    ) -> None:
        self.spec = spec
        self.journal = journal
        self.observer = observer
        self.evidence_root = evidence_root
        self.check_id = check_id
        self.done: Deferred[CheckResult] = Deferred()
        self.cancelled: str | None = None
        FakeCheck.made.append(self)

    def run(self) -> Deferred[CheckResult]:
        return self.done

    def cancel(self, reason: str) -> None:
        self.cancelled = reason
        self.done.callback(
            result(self.check_id, passed=False, error=f"cancelled: {reason}", kind=FailureKind.CANCELLED)
        )


def result(
    check_id: str, passed: bool = True, error: str = "", kind: FailureKind | None = None
) -> CheckResult:
    return CheckResult(
        check_id=check_id, passed=passed, steps=(), facts=Facts(), error=error, kind=kind
    )


class GatedJournal:
    """A daemon-side journal whose writes the test acknowledges one by one."""

    def __init__(self) -> None:
        self.inner = MemoryJournal(lambda: 5.0)
        self.waiting: list[tuple[str, Deferred[Any], Any]] = []

    def _gate(self, what: str, value: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((what, d, value))
        return d

    def ack(self) -> str:
        what, d, value = self.waiting.pop(0)
        d.callback(value)
        return what

    def intend(self, *args: Any) -> Deferred[Any]:
        return self._gate("intend", self.inner._intend(*args))

    def created(self, entry: JournalEntry, rid: str) -> Deferred[Any]:
        return self._gate("created", self.inner._created(entry, rid))

    def done(self, entry: JournalEntry) -> Deferred[Any]:
        self.inner._done(entry)
        return self._gate("done", None)

    def pending(self, check_id: str | None = None) -> Deferred[Any]:
        return self._gate("pending", self.inner._pending(check_id))

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        return self.inner.checks(older_than)


class Connected(SynchronousTestCase):
    def setUp(self) -> None:
        FakeCheck.made = []
        self.events: list[StepEvent] = []
        self.journal: Any = MemoryJournal(lambda: 5.0)
        self.worker = Worker(reactor=Clock(), check_factory=FakeCheck)
        self.parent = _ParentAMP()
        w = _Worker(name="w1", parent=self.parent)
        self.parent.worker = w
        self.run_ = _JobRun(
            job_id="j1",
            check_id="j1-0",
            on_event=self.events.append,
            journal=self,  # forwards to self.journal, so tests can swap it
            spec=b"",
            result=Deferred(),
        )
        w.job = self.run_
        parent, worker, pump = connectedServerAndClient(lambda: self.worker, lambda: self.parent)
        self.pump: IOPump = pump

    # the job's journal, as the pool sees it
    def intend(self, *a: Any) -> Any:
        return self.journal.intend(*a)

    def created(self, *a: Any) -> Any:
        return self.journal.created(*a)

    def done(self, *a: Any) -> Any:
        return self.journal.done(*a)

    def pending(self, *a: Any) -> Any:
        return self.journal.pending(*a)

    def call(self, proto: amp.AMP, command: type[amp.Command], **kw: Any) -> Deferred[Any]:
        """callRemote, with the caller's callbacks attached before the answer
        arrives (AMP hands an error nobody listens for yet to unhandledError)."""
        out = caught(proto.callRemote(command, **kw))
        self.pump.flush()
        return out

    def start_job(self, job_id: str = "j1", check_id: str = "j1-0") -> Deferred[Any]:
        return self.call(
            self.parent,
            RunJob,
            job_id=job_id,
            check_id=check_id,
            spec=codec.dumps(SPEC),
            evidence_root="/var/lib/txvmbot/evidence",
        )


class RunJobTests(Connected):
    def test_hello(self) -> None:
        answer = self.successResultOf(self.call(self.parent, WorkerUp))
        self.assertIsInstance(answer["pid"], int)

    def test_round_trip_with_events_in_order(self) -> None:
        d = self.start_job()
        (check,) = FakeCheck.made
        self.assertEqual(check.check_id, "j1-0")
        self.assertEqual(check.spec.cloud.endpoint, SPEC["endpoint"])
        self.assertEqual(check.spec.image, "ami-1")
        self.assertEqual(check.evidence_root, "/var/lib/txvmbot/evidence")
        self.assertIsInstance(check.journal, RemoteJournal)
        self.assertEqual(self.worker.running, "j1")
        check.observer(StepEvent(name="keypair", state="running", at=0.0, detail="0"))
        check.observer(StepEvent(name="keypair", state="running", at=1.0, detail="1"))
        check.observer(StepEvent(name="keypair", state="passed", at=2.0, detail="2"))
        self.assertNoResult(d)
        check.done.callback(result("j1-0"))
        self.pump.flush()
        answer = self.successResultOf(d)
        self.assertEqual(codec.result_from_dict(codec.loads(answer["result"], "r")), result("j1-0"))
        self.assertEqual([(e.state, e.detail) for e in self.events], [
            ("running", "0"), ("running", "1"), ("passed", "2"),
        ])
        self.assertIsNone(self.worker.running)

    def test_one_job_at_a_time(self) -> None:
        self.start_job()
        self.failureResultOf(self.start_job("j2", "j2-0"), WorkerBusy)

    def test_malformed_spec(self) -> None:
        d = self.call(
            self.parent, RunJob, job_id="j1", check_id="c", spec=b'{"endpoint": 3}', evidence_root=""
        )
        f = self.failureResultOf(d, MalformedArgument)
        self.assertIn("job.endpoint", f.getErrorMessage())
        d = self.call(self.parent, RunJob, job_id="j1", check_id="c", spec=b"{", evidence_root="")
        self.failureResultOf(d, MalformedArgument)
        self.assertEqual(FakeCheck.made, [])

    def test_cancel(self) -> None:
        d = self.start_job()
        answer = self.successResultOf(self.call(self.parent, CancelJob, job_id="j1", reason="op"))
        self.assertEqual(answer, {"cancelling": True})
        self.pump.flush()
        self.assertEqual(FakeCheck.made[0].cancelled, "op")
        r = codec.result_from_dict(codec.loads(self.successResultOf(d)["result"], "r"))
        self.assertEqual((r.passed, r.error, r.kind), (False, "cancelled: op", FailureKind.CANCELLED))
        # No job (any more): nothing to cancel, and no error either.
        answer = self.successResultOf(self.call(self.parent, CancelJob, job_id="j1", reason="x"))
        self.assertEqual(answer, {"cancelling": False})

    def test_crashing_check_is_an_error_not_a_dead_connection(self) -> None:
        d = self.start_job()
        FakeCheck.made[0].done.errback(RuntimeError("bug"))
        self.pump.flush()
        self.flushLoggedErrors(RuntimeError)
        self.assertIn("bug", self.failureResultOf(d).getErrorMessage())
        self.successResultOf(self.call(self.parent, WorkerUp))


class FailureKindTests(Connected):
    """The kind of a failure crosses the wire with the result; a result from
    a worker of the version before kinds gets the kind the old text-guessing
    gave it."""

    def test_kinds_travel_with_the_result(self) -> None:
        step = StepResult("run-instances", 1.0, 2.0, "failed", "x", FailureKind.INFRASTRUCTURE)
        for kind in FailureKind:
            d = self.start_job()
            sent = attrs.evolve(
                result("j1-0", passed=False, error="x", kind=kind), steps=(step,)
            )
            FakeCheck.made[-1].done.callback(sent)
            self.pump.flush()
            got = codec.result_from_dict(codec.loads(self.successResultOf(d)["result"], "r"))
            self.assertEqual(got, sent)

    def test_a_cut_result_keeps_its_kind(self) -> None:
        big = CommandResult("cat big", 0, stdout=b"a" * 200_000)
        r = attrs.evolve(
            result("c", passed=False, error="x", kind=FailureKind.INFRASTRUCTURE), commands=(big,)
        )
        for limit in (150_000, 1000):
            back = codec.result_from_dict(codec.loads(encode_result(r, limit=limit), "r"))
            self.assertIs(back.kind, FailureKind.INFRASTRUCTURE)

    def test_an_old_workers_result_reaches_the_pool_with_its_kind(self) -> None:
        from txvmbot.daemon.workers.pool import AmpoulePool

        old_results = [
            ({"passed": False, "error": "step 'x' failed: TransportError: X: reset"},
             FailureKind.INFRASTRUCTURE),
            ({"passed": False, "error": "cancelled: the daemon is stopping"}, FailureKind.CANCELLED),
            ({"passed": False, "error": "step 'commands' failed: 'false' ended with exit status 1"},
             FailureKind.TEST),
            ({"passed": True, "error": ""}, None),
        ]

        class OldWorker(amp.AMP):
            """A worker of the version before kinds: its result has no
            ``schema``, no ``kind``."""

            answer: dict[str, Any] = {}

            @RunJob.responder
            def run_job(
                self, job_id: str, check_id: str, spec: bytes, evidence_root: str
            ) -> dict[str, Any]:
                doc = {
                    "check_id": check_id,
                    "evidence_dir": None,
                    "steps": [],
                    "facts": {},
                    "commands": [],
                    "console": [],
                    "host_keys": [],
                    **OldWorker.answer,
                }
                return {"result": codec.dumps(doc), "api_calls": None}

        for old, want in old_results:
            OldWorker.answer = old
            parent = _ParentAMP()
            _, _, pump = connectedServerAndClient(OldWorker, partial(_same, parent))
            pool = AmpoulePool(Clock(), size=1, recycle_after=0, evidence_root="/tmp")
            pool._state = "running"
            w = _Worker(name="w1", parent=parent)
            w.state = "busy"
            run = _JobRun(
                job_id="j1", check_id="j1-0", on_event=lambda e: None, journal=None, spec=b"",
                result=Deferred(),
            )
            w.job, run.worker = run, w
            d = caught(
                parent.callRemote(
                    RunJob, job_id="j1", check_id="j1-0", spec=codec.dumps(SPEC), evidence_root=""
                )
            )
            pump.flush()
            answer = self.successResultOf(d)
            pool._job_answered(w, run, answer)  # as the pool reads every answer
            got: CheckResult = self.successResultOf(run.result)
            self.assertEqual((got.passed, got.error), (old["passed"], old["error"]))
            self.assertIs(got.kind, want, old["error"])


class SizeLimitTests(Connected):
    def test_text_over_limit_refused_before_sending(self) -> None:
        with self.assertRaises(ArgumentTooLarge) as e:
            self.parent.callRemote(CancelJob, job_id="j" * 201, reason="r")
        self.assertIn("'job_id' is 201 bytes, over the limit of 200", str(e.exception))

    def test_blob_over_limit_refused_before_sending(self) -> None:
        with self.assertRaises(ArgumentTooLarge):
            self.worker.callRemote(StepEventCmd, job_id="j1", event=b"x" * (MAX_EVENT_BYTES + 1))

    def test_oversized_on_the_wire_is_answered_with_an_error(self) -> None:
        """A peer that ignores the limits gets an AMP error back and the
        connection stays up."""
        box = amp.AmpBox({b"job_id": b"j1", b"event": b"x" * 60000, b"event.1": b"x" * 10000})
        d = caught(self.worker._sendBoxCommand(b"StepEvent", box))
        self.pump.flush()
        f = self.failureResultOf(d, amp.RemoteAmpError)
        self.assertEqual(f.value.errorCode, b"ARGUMENT_TOO_LARGE")
        self.assertIn("'event' is 70000 bytes", str(f.value))
        box = amp.AmpBox({b"job_id": b"j" * 300, b"event": b"{}"})
        d = caught(self.worker._sendBoxCommand(b"StepEvent", box))
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d).value.errorCode, b"ARGUMENT_TOO_LARGE")
        self.assertEqual(self.events, [])
        self.successResultOf(self.call(self.parent, WorkerUp))

    def test_blob_splits_over_amp_value_limit(self) -> None:
        class Echo(_Command):
            arguments = [(b"data", Blob(300_000))]
            response = [(b"data", Blob(300_000))]

        class Echoer(amp.AMP):
            @Echo.responder
            def echo(self, data: bytes) -> dict[str, bytes]:
                return {"data": data}

        client, server, pump = connectedServerAndClient(Echoer, amp.AMP)
        data = bytes(range(256)) * 1000  # 256,000 bytes: four AMP values
        d = client.callRemote(Echo, data=data)
        pump.flush()
        self.assertEqual(self.successResultOf(d)["data"], data)
        strings = amp.AmpBox()
        Blob(300_000).toBox(b"data", strings, {"data": data}, None)
        self.assertEqual(sorted(strings), [b"data", b"data.1", b"data.2", b"data.3"])


class ParentTests(Connected):
    def test_malformed_event_json_answered_with_an_error(self) -> None:
        for bad in [b"{not json", b'{"name": "x"}', b"[1]", b'{"name": "x", "state": "odd", "at": 1}']:
            d = self.call(self.worker, StepEventCmd, job_id="j1", event=bad)
            self.failureResultOf(d, MalformedArgument)
        self.assertEqual(self.events, [])
        good = codec.dumps(codec.step_event_to_dict(StepEvent("a", "running", 1.0)))
        self.successResultOf(self.call(self.worker, StepEventCmd, job_id="j1", event=good))
        self.assertEqual(self.events, [StepEvent("a", "running", 1.0)])

    def test_broken_listener_does_not_fail_the_worker(self) -> None:
        def broken(event: StepEvent) -> None:
            raise ValueError("watcher bug")

        self.run_.on_event = broken
        good = codec.dumps(codec.step_event_to_dict(StepEvent("a", "running", 1.0)))
        self.successResultOf(self.call(self.worker, StepEventCmd, job_id="j1", event=good))
        self.flushLoggedErrors(ValueError)

    def test_only_the_running_job_and_its_check(self) -> None:
        kw = dict(kind="keypair", name="n", endpoint="e", region="r", parent_id=None)
        d = self.call(self.worker, JournalIntend, job_id="j2", check_id="j1-0", **kw)
        self.failureResultOf(d, UnknownJobError)
        d = self.call(self.worker, JournalIntend, job_id="j1", check_id="other", **kw)
        self.failureResultOf(d, UnknownJobError)
        self.assertEqual(result_of(self.journal.pending()), [])
        self.run_.finished = True
        d = self.call(self.worker, JournalIntend, job_id="j1", check_id="j1-0", **kw)
        self.failureResultOf(d, UnknownJobError)

    def test_journal_error_is_answered_and_nothing_is_created(self) -> None:
        self.journal.close()
        journal = RemoteJournal(self.worker, "j1", "j1-0")
        creates: list[int] = []
        d = track(journal, "j1-0", "keypair", "n", "e", "r", lambda: creates.append(1))  # type: ignore[arg-type, return-value]
        self.pump.flush()
        f = self.failureResultOf(d, JournalWriteFailed)
        self.assertIn("is closed", f.getErrorMessage())
        self.assertEqual(creates, [])


class JournalAckTests(Connected):
    """A worker's journal write is answered only after the daemon's journal
    wrote it; the create waits for that answer."""

    def setUp(self) -> None:
        super().setUp()
        self.journal = GatedJournal()
        self.remote = RemoteJournal(self.worker, "j1", "j1-0")

    def test_track_waits_for_each_ack(self) -> None:
        creates: list[str] = []
        made: Deferred[str] = Deferred()

        def create() -> Deferred[str]:
            creates.append("create")
            return made

        d = track(self.remote, "j1-0", "instances", "vm", "e", "r", create, "sg-1")
        self.pump.flush()
        # The daemon has the intend but has not written it: no create yet.
        self.assertEqual([w[0] for w in self.journal.waiting], ["intend"])
        self.assertEqual(creates, [])
        self.assertEqual(self.journal.ack(), "intend")
        self.pump.flush()
        self.assertEqual(creates, ["create"])
        made.callback("i-1")
        self.pump.flush()
        self.assertNoResult(d)
        self.assertEqual(self.journal.ack(), "created")
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), "i-1")
        (entry,) = result_of(self.journal.inner.pending("j1-0"))
        self.assertEqual(
            (entry.kind, entry.name, entry.resource_id, entry.parent_id, entry.created),
            ("instances", "vm", "i-1", "sg-1", 5.0),
        )

    def test_cleanup_reads_pending_and_marks_done_through_the_daemon(self) -> None:
        inner = self.journal.inner
        result_of(inner.created(result_of(inner.intend("j1-0", "keypair", "kp", "e", "r")), "kp-1"))
        result_of(inner.created(result_of(inner.intend("j1-0", "instances", "vm", "e", "r")), "i-1"))
        result_of(inner.intend("other-check", "keypair", "x", "e", "r"))
        undone: list[str] = []

        def undo(entry: JournalEntry) -> Deferred[bool]:
            undone.append(entry.resource_id or entry.name)
            return succeed(True)

        d = Cleanup(self.remote, undo, StepRunner(Clock()), 30).run("j1-0")
        self.pump.flush()
        self.assertEqual(self.journal.ack(), "pending")
        self.pump.flush()
        self.assertEqual(undone, ["i-1"])
        self.assertEqual(self.journal.ack(), "done")
        self.pump.flush()
        self.assertEqual(undone, ["i-1", "kp-1"])
        self.assertEqual(self.journal.ack(), "done")
        self.pump.flush()
        self.assertEqual(self.successResultOf(d), ())
        self.assertEqual([e.name for e in result_of(inner.pending())], ["x"])

    def test_reads_only_its_own_check(self) -> None:
        self.failureResultOf(self.remote.pending(None), WorkerProtocolError)
        self.failureResultOf(self.remote.pending("other-check"), WorkerProtocolError)
        self.failureResultOf(self.remote.checks(), WorkerProtocolError)

    def test_created_for_an_unknown_entry(self) -> None:
        entry = JournalEntry("j1-0", 7, "keypair", "kp", "e", "r", 1.0)
        d = caught(self.remote.created(entry, "kp-1"))
        self.pump.flush()
        self.failureResultOf(d, MalformedArgument)


class ValueTests(SynchronousTestCase):
    def test_encode_result_cuts_to_fit(self) -> None:
        big = CommandResult("cat big", 0, stdout=b"a" * 200_000 + b"END", stderr=b"")
        r = attrs.evolve(result("c"), commands=(big,), console=(("i-1", "c" * 200_000),))
        self.assertEqual(codec.loads(encode_result(r), "r")["error"], "")
        data = encode_result(r, limit=150_000)
        self.assertLessEqual(len(data), 150_000)
        back = codec.result_from_dict(codec.loads(data, "r"))
        self.assertTrue(back.commands[0].stdout.endswith(b"END"))
        self.assertIn("result cut to fit 150000 bytes", back.error)
        data = encode_result(r, limit=1000)
        self.assertIn("output dropped", codec.loads(data, "r")["error"])

    def test_describe_exit(self) -> None:
        self.assertEqual(
            describe_exit(Failure(ProcessTerminated(signal=9))), "killed by signal 9 (SIGKILL)"
        )
        self.assertEqual(describe_exit(Failure(ProcessTerminated(exitCode=3))), "exit status 3")
        self.assertEqual(describe_exit(Failure(ProcessDone(0))), "exit status 0")

    def test_remote_errors_keep_their_message(self) -> None:
        e = JournalWriteFailed(b"intend keypair kp: disk full")
        self.assertEqual(str(e), "intend keypair kp: disk full")

    def test_importing_does_nothing(self) -> None:
        """The daemon imports these before its reactor is chosen."""
        code = (
            "import sys\n"
            "import txvmbot.daemon.workers.pool, txvmbot.daemon.workers.worker, txvmbot.daemon.workers.bootstrap\n"
            "import txvmbot.daemon.workers.protocol\n"
            "bad = [m for m in sys.modules if m == 'twisted.internet.reactor'"
            " or m.startswith('ampoule')]\n"
            "assert not bad, bad\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    def test_worker_child_is_an_ampoule_child_built_on_demand(self) -> None:
        from ampoule.child import AMPChild
        from twisted.python import reflect

        from txvmbot.daemon.workers import worker

        cls = worker.WorkerChild
        self.assertTrue(issubclass(cls, AMPChild) and issubclass(cls, Worker))
        self.assertIs(reflect.namedAny(reflect.qual(cls)), cls)



def test_no_command_name_is_both_a_client_and_a_worker_command() -> None:
    """The clients' AMP API and the daemon-worker protocol are two protocols:
    a command name in both would say two things (and a log line one)."""
    from twisted.protocols import amp

    from txvmbot.daemon.api import protocol as api
    from txvmbot.daemon.workers import protocol as workers

    def names(module: object) -> set[bytes]:
        return {
            c.commandName
            for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, amp.Command) and c.__module__ == module.__name__
            and c.__name__ != "_Command"
        }

    api_names, worker_names = names(api), names(workers)
    assert b"Submit" in api_names and b"RunJob" in worker_names
    assert api_names.isdisjoint(worker_names), api_names & worker_names
