"""Failures say what they are: the kind of a failure (the test's, the
infrastructure's, cancelled, timed out) is decided where the error is
caught, travels in the result and through the codec, and a result stored
before kinds existed gets the kind the old text-guessing gave it.

The table below runs real errors (built as the EC2 client, the retry loop,
the step runner and the pool build them) through the step runner and the
job's step sequence, and checks that the kind they record is the one the
old classification (kept only in the codec's migration,
``codec.kind_from_v1``) reads from the same error text and steps."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from typing import Any

import attrs
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.support.deferreds import result_of
from txvmbot.daemon import codec
from txvmbot.daemon.jobs import Job
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.daemon.workers.pool import _cancelled_result
from txvmbot.ec2.retry import call_with_retries
from txvmbot.engine import Cleanup, StepRunner, StepSequence, cleanup_failure_kind
from txvmbot.errors import (
    CloudError,
    SSHError,
    StepFailed,
    TransportError,
    WorkerDied,
    failure_kind,
)
from txvmbot.journal import MemoryJournal
from txvmbot.machines import IMachines
from txvmbot.model import CheckResult, Facts, FailureKind, JournalEntry, RetryPolicy, StepResult
from txvmbot.testing import make_job_spec

INFRA = FailureKind.INFRASTRUCTURE
TEST = FailureKind.TEST
TIMEOUT = FailureKind.TIMEOUT
CANCELLED = FailureKind.CANCELLED


def now(value: Any) -> Any:
    """The value of a Deferred that has fired (or a plain value as is): the
    job store answers plain values or fired Deferreds."""
    if not isinstance(value, Deferred):
        return value
    out: list[Any] = []
    value.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def exhausted(err: BaseException | None = None) -> BaseException:
    """The error call_with_retries raises when every attempt failed with
    ``err`` (None: every attempt got no answer in time)."""
    clock = Clock()
    policy = RetryPolicy(max_attempts=3, base_delay=0.1, max_delay=0.1, request_timeout=5.0)

    def attempt() -> Deferred[Any]:
        return Deferred() if err is None else fail(err)

    d = call_with_retries(clock, policy, "DescribeInstances", attempt, random=lambda: 1.0)
    for _ in range(20):
        clock.advance(5.0)
    out: list[Failure] = []
    d.addErrback(out.append)
    assert out, "the retries did not end"
    return out[0].value  # type: ignore[return-value]


def transport(cause: BaseException) -> TransportError:
    """As txvmbot.ec2.client wraps an error of the HTTP layer."""
    e = TransportError("RunInstances", f"{type(cause).__name__}: {cause} (https://ec2.example/)")
    e.__cause__ = cause
    return e


def gone_image() -> StepFailed:
    """As txvmbot.ec2.machines says the image is missing."""
    cause = CloudError("DescribeImages", "InvalidAMIID.NotFound", "no such image", 400, "r-1")
    e = StepFailed("image", f"no image ami-1: {cause.code}: {cause.message}")
    e.__cause__ = cause
    return e


#: (what, error raised in the step "run-instances", the kind it must be).
IN_A_STEP: list[tuple[str, BaseException, FailureKind]] = [
    ("connection refused", transport(ierror.ConnectionRefusedError()), INFRA),
    (
        "not an EC2 answer",
        TransportError("RunInstances", "HTTP 200 with no XML, expected <RunInstancesResponse>"),
        INFRA,
    ),
    (
        "503 until the retries ran out",
        exhausted(CloudError("DescribeInstances", "Unavailable", "slow down", 503, "r-2")),
        INFRA,
    ),
    (
        "throttled (a 400) until the retries ran out",
        exhausted(CloudError("DescribeInstances", "RequestLimitExceeded", "slow down", 400)),
        INFRA,
    ),
    ("connection lost until the retries ran out", exhausted(ierror.ConnectionLost()), INFRA),
    ("no answer in time until the retries ran out", exhausted(None), INFRA),
    ("a 500 not retried", CloudError("RunInstances", "InternalError", "oops", 500), INFRA),
    (
        "a 502 that is not an EC2 answer",
        CloudError("RunInstances", "HTTP502", "not an EC2 error answer (text/html)", 502),
        INFRA,
    ),
    (
        "a 400",
        CloudError("RunInstances", "InvalidParameterValue", "bad instance type", 400, "r-3"),
        TEST,
    ),
    ("a 404 that is not an EC2 answer", CloudError("RunInstances", "HTTP404", "no", 404), TEST),
    ("a missing image", gone_image(), TEST),
    ("a command that failed", StepFailed("run-instances", "'false' ended with exit status 1"), TEST),
    ("ssh refused", SSHError("ssh root@127.0.0.1:2222: connection refused"), TEST),
    ("a bug of ours in a step", RuntimeError("boom"), TEST),
    ("a CancelledError nobody asked for", CancelledError(), TEST),
]


def run_job(action: Any, *, cancel: bool = False, bound: float = 10.0) -> tuple[str, Any]:
    """Run one step, "run-instances", with ``action`` in a job's step
    sequence; return the job's error and the sequence (its kind, its steps)."""
    clock = Clock()
    runner = StepRunner(clock, wall=lambda: 1_700_000_000.0)
    sequence = StepSequence(runner, "job j1")

    async def work() -> None:
        await sequence.step("run-instances", bound, action)

    d = Deferred.fromCoroutine(sequence.error_of(work()))
    if cancel:
        sequence.cancel("cancelled by request")
    clock.advance(bound + 1)
    out: list[str] = []
    d.addCallback(out.append)
    assert out, "the job did not end"
    return out[0], sequence


def raising(exc: BaseException) -> Any:
    def action(ctx: Any) -> None:
        raise exc

    return action


def hanging(ctx: Any) -> Deferred[None]:
    return Deferred()


def old_verdict(error: str, steps: tuple[StepResult, ...]) -> FailureKind | None:
    """What a failed result with this error and these steps was taken for
    before kinds: the codec's migration of a version 1 result."""
    kind, _ = codec.kind_from_v1(False, error, steps)
    return kind


def old_interrupted(error: str, steps: tuple[StepResult, ...]) -> bool:
    """The scheduler's old test of a check cancelled under it."""
    return error.lower().startswith("cancelled") or any(s.outcome == "cancelled" for s in steps)


class KindWhereCaughtTests(SynchronousTestCase):
    def check(self, what: str, error: str, sequence: StepSequence, want: FailureKind) -> None:
        steps = sequence.steps.results
        self.assertTrue(error, what)
        self.assertIs(sequence.kind, want, f"{what}: {error}")
        self.assertIs(old_verdict(error, steps), want, f"{what}: old and new disagree on {error}")
        self.assertEqual(old_interrupted(error, steps), want is CANCELLED, what)
        # The step that failed says so too, and the migration of a stored
        # step (no kind) derives the same kind.
        failed = [s for s in steps if s.outcome != "passed"]
        self.assertEqual(len(failed), 1, what)
        (step,) = failed
        self.assertIsNotNone(step.kind, what)
        _, migrated = codec.kind_from_v1(False, error, (attrs.evolve(step, kind=None),))
        self.assertIs(migrated[0].kind, step.kind, what)

    def test_errors_raised_in_a_step(self) -> None:
        for what, exc, want in IN_A_STEP:
            error, sequence = run_job(raising(exc))
            self.check(what, error, sequence, want)
        self.flushLoggedErrors()

    def test_the_table_is_of_the_errors_it_says(self) -> None:
        texts = {what: str(exc) for what, exc, _ in IN_A_STEP}
        self.assertIn("gave up after 3 attempts", texts["503 until the retries ran out"])
        self.assertIn("HTTP 503", texts["503 until the retries ran out"])
        self.assertIn("gave up after", texts["throttled (a 400) until the retries ran out"])
        self.assertNotIn("HTTP 5", texts["throttled (a 400) until the retries ran out"])
        self.assertIn("no answer within 5s", texts["no answer in time until the retries ran out"])
        for what in ("connection lost until the retries ran out", "connection refused"):
            self.assertIsInstance(dict((w, e) for w, e, _ in IN_A_STEP)[what], TransportError)

    def test_a_step_that_passed_its_bound(self) -> None:
        error, sequence = run_job(hanging)
        self.assertIn("did not finish within 10s", error)
        self.check("timeout", error, sequence, TIMEOUT)

    def test_a_cancelled_job(self) -> None:
        error, sequence = run_job(hanging, cancel=True)
        self.assertEqual(error, "cancelled: cancelled by request")
        self.check("cancel", error, sequence, CANCELLED)

    def test_a_failure_after_the_cancel_is_the_cancel(self) -> None:
        clock = Clock()
        sequence = StepSequence(StepRunner(clock), "job j1")

        async def work() -> None:
            sequence.cancel("the daemon is stopping")
            raise TransportError("TerminateInstances", "connection lost")

        d = Deferred.fromCoroutine(sequence.error_of(work()))
        self.assertEqual(self.successResultOf(d), "TerminateInstances: connection lost")
        self.assertIs(sequence.kind, CANCELLED)

    def test_a_bug_outside_any_step(self) -> None:
        sequence = StepSequence(StepRunner(Clock()), "job j1")

        async def work() -> None:
            raise KeyError("oops")

        error = self.successResultOf(Deferred.fromCoroutine(sequence.error_of(work())))
        self.assertEqual(error, "internal error: KeyError('oops')")
        self.assertIs(sequence.kind, TEST)
        self.assertIs(old_verdict(error, ()), TEST)
        self.flushLoggedErrors(KeyError)

    def test_steps_that_passed_leave_no_kind(self) -> None:
        error, sequence = run_job(lambda ctx: None)
        self.assertEqual(error, "")
        self.assertIsNone(sequence.kind)
        self.assertEqual([s.kind for s in sequence.steps.results], [None])

    def test_a_dead_worker(self) -> None:
        # The pool fails the job's Deferred with WorkerDied: no result, the
        # error itself says whose fault it is.
        for e in (
            WorkerDied("j1", "killed by signal 9 (SIGKILL)", "Traceback ..."),
            WorkerDied("j1", "a new worker exited while starting: exit status 1"),
        ):
            self.assertIs(failure_kind(e), INFRA)
            self.assertIs(old_verdict(str(e), ()), INFRA)

    def test_the_pools_cancelled_result(self) -> None:
        r = _cancelled_result("j1-0", "cancelled by request")
        self.assertIs(r.kind, CANCELLED)
        self.assertTrue(r.cancelled)
        self.assertIs(old_verdict(r.error, r.steps), CANCELLED)

    def test_only_txvmbot_errors_are_judged(self) -> None:
        self.assertIs(failure_kind(RuntimeError("x")), TEST)
        wrapped = RuntimeError("x")
        wrapped.__cause__ = TransportError("op", "reset")
        self.assertIs(failure_kind(wrapped), TEST)  # its text never named it either
        step = StepFailed("s", "reset")
        step.__cause__ = TransportError("op", "reset")
        self.assertIs(step.kind, INFRA)
        self.assertIs(StepFailed("s", "x", CANCELLED).kind, CANCELLED)

    def test_where_the_old_text_guess_was_wrong(self) -> None:
        # A guest command whose output mentions an HTTP 503 (a package
        # mirror down) is the test's failure, not the cloud's: the regex
        # counted it towards the backend's quarantine.
        exc = StepFailed(
            "run-instances",
            "'curl -f http://mirror/x' ended with exit status 22: "
            "curl: (22) The requested URL returned error: HTTP 503",
        )
        error, sequence = run_job(raising(exc))
        self.assertIs(sequence.kind, TEST)
        self.assertIs(old_verdict(error, sequence.steps.results), INFRA)


class CleanupKindTests(SynchronousTestCase):
    def cleanup_with(self, exc: BaseException | None, hang: bool = False) -> tuple[str, ...]:
        clock = Clock()
        journal = MemoryJournal(lambda: 5.0)
        entry = result_of(journal.intend("c1", "instance", "txvmbot-c1", "https://ec2.example/", "r1"))
        result_of(journal.created(entry, "i-1"))
        self.runner = StepRunner(clock, wall=lambda: 0.0)

        def undo(e: JournalEntry) -> Deferred[bool]:
            if hang:
                return Deferred()
            assert exc is not None
            return fail(exc)

        d = Cleanup(journal, undo, self.runner, 30.0).run("c1")
        clock.advance(31.0)
        return self.successResultOf(d)

    def test_cleanup_failures(self) -> None:
        for exc, hang, want in (
            (CloudError("TerminateInstances", "Unavailable", "down", 503), False, INFRA),
            (transport(ierror.ConnectionLost()), False, INFRA),
            (CloudError("TerminateInstances", "UnauthorizedOperation", "no", 403), False, TEST),
            (None, True, TIMEOUT),
        ):
            errors = self.cleanup_with(exc, hang)
            self.assertEqual(len(errors), 1)
            error = "cleanup failed: " + "; ".join(errors)  # as the smoke job says it
            kind = cleanup_failure_kind(self.runner.results)
            self.assertIs(kind, want, error)
            self.assertIs(old_verdict(error, self.runner.results), want, error)


@implementer(IMachines)
class OneMachine:
    """A backend (IMachines) whose boot step fails with ``boot_error`` (or
    passes) and whose cleanup, a real Cleanup of one instance, fails with
    ``undo_error`` (or passes)."""

    check_id = "c1"

    def __init__(
        self, clock: Clock, boot_error: BaseException | None, undo_error: BaseException | None
    ) -> None:
        self.clock = clock
        self.boot_error = boot_error
        self.undo_error = undo_error
        self.journal = MemoryJournal(lambda: 5.0)
        entry = result_of(self.journal.intend("c1", "instance", "txvmbot-c1", "https://ec2.example/", "r1"))
        result_of(self.journal.created(entry, "i-1"))

    def prepare(self, sequence: StepSequence) -> Deferred[None]:
        return succeed(None)

    def acquire(self, sequence: StepSequence, count: int, *, ssh: bool = True) -> Deferred[Any]:
        async def boot(ctx: Any) -> tuple[()]:
            if self.boot_error is not None:
                raise self.boot_error
            return ()

        return Deferred.fromCoroutine(sequence.step("boot", 10, boot))

    def release(self, machine: Any) -> Deferred[None]:
        return succeed(None)

    def console(self, steps: StepRunner) -> Deferred[tuple[()]]:
        return succeed(())

    def keep(self, steps: StepRunner, error: str) -> Deferred[bool]:
        return succeed(False)

    def cleanup(self, steps: StepRunner) -> Deferred[tuple[str, ...]]:
        def undo(entry: JournalEntry) -> Deferred[bool]:
            return succeed(True) if self.undo_error is None else fail(self.undo_error)

        return Cleanup(self.journal, undo, steps, 30.0).run("c1")

    def host_keys(self) -> tuple[()]:
        return ()

    def facts(self, guest_uname: str) -> Facts:
        return Facts()

    def close(self) -> Deferred[None]:
        return succeed(None)


class SmokeJobKindTests(SynchronousTestCase):
    def run_smoke(
        self, boot_error: BaseException | None, undo_error: BaseException | None = None
    ) -> CheckResult:
        from txvmbot.jobs.smoke import SmokeJob, SmokeOptions

        clock = Clock()
        machines = OneMachine(clock, boot_error, undo_error)
        options = SmokeOptions(commands=(), command_timeout=1.0, connect_timeout=1.0, ssh=False)
        job = SmokeJob(clock, machines, options)
        return self.successResultOf(job.run())

    def test_the_kind_of_the_jobs_failure(self) -> None:
        cloud_down = CloudError("RunInstances", "Unavailable", "down", 503)
        for boot_error, undo_error, want in (
            (None, None, None),
            (cloud_down, None, INFRA),
            (CloudError("RunInstances", "InvalidAMIID.NotFound", "no", 400), None, TEST),
            # Its own steps failed: the job's failure, whatever cleanup did.
            (StepFailed("boot", "the guest panicked"), cloud_down, TEST),
            # Its steps passed, its cleanup failed: the cleanup's kind.
            (None, cloud_down, INFRA),
            (None, CloudError("TerminateInstances", "UnauthorizedOperation", "no", 403), TEST),
        ):
            r = self.run_smoke(boot_error, undo_error)
            self.assertIs(r.kind, want, r.error)
            self.assertEqual(r.passed, want is None)
            if not r.passed:
                self.assertIs(old_verdict(r.error, r.steps), want, r.error)


class ResultKindTests(SynchronousTestCase):
    def test_a_failed_result_without_a_kind_is_the_tests(self) -> None:
        r = CheckResult("c", False, (), Facts(), error="x")
        self.assertIs(r.kind, TEST)
        self.assertFalse(r.infrastructure_failed)

    def test_a_passed_result_has_no_kind(self) -> None:
        self.assertIsNone(CheckResult("c", True, (), Facts()).kind)
        with self.assertRaises(ValueError):
            CheckResult("c", True, (), Facts(), kind=INFRA)

    def test_evolve_keeps_the_kind(self) -> None:
        r = CheckResult("c", False, (), Facts(), error="x", kind=INFRA)
        self.assertTrue(attrs.evolve(r, error="x; cut").infrastructure_failed)


# --- through the codec, and the stored rows of the version before ---------------


def v1_result(error: str, passed: bool = False, steps: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A check result as codec.result_to_dict wrote it before kinds."""
    return {
        "check_id": "j1-0",
        "passed": passed,
        "error": error,
        "evidence_dir": None,
        "steps": steps or [],
        "facts": {"endpoint": "https://ec2.example/"},
        "commands": [],
        "console": [],
        "host_keys": [],
    }


def step(name: str, outcome: str, detail: str = "") -> dict[str, Any]:
    return {"name": name, "started": 1.0, "duration": 2.0, "outcome": outcome, "detail": detail}


V1_ROWS: list[tuple[dict[str, Any], FailureKind | None]] = [
    (v1_result("", passed=True, steps=[step("keypair", "passed")]), None),
    (
        v1_result(
            "step 'run-instances' failed: TransportError: RunInstances: connection refused",
            steps=[step("run-instances", "failed", "TransportError: RunInstances: connection refused")],
        ),
        INFRA,
    ),
    (
        v1_result(
            "RunInstances: HTTP 503 Unavailable: slow down [gave up after 6 attempts in 60.0s "
            "(max_attempts reached)]"
        ),
        INFRA,
    ),
    (v1_result("worker running job j1 died: killed by signal 9"), INFRA),
    (v1_result("cancelled: cancelled by request"), CANCELLED),
    (v1_result("step 'x' failed: y", steps=[step("x", "cancelled", "cancelled")]), CANCELLED),
    (
        v1_result(
            "step 'wait-ssh' failed: did not finish within 180s",
            steps=[step("wait-ssh", "timeout", "did not finish within 180s")],
        ),
        TIMEOUT,
    ),
    (v1_result("step 'commands' failed: 'false' ended with exit status 1"), TEST),
    (v1_result("CloudError: RunInstances: HTTP 400 InvalidAMIID.NotFound: no such image"), TEST),
]


class CodecTests(SynchronousTestCase):
    def test_round_trip_keeps_kinds(self) -> None:
        steps = (
            StepResult("keypair", 1.0, 1.0, "passed", ""),
            StepResult("run-instances", 2.0, 1.0, "failed", "TransportError: x", INFRA),
        )
        for kind in (INFRA, TEST, TIMEOUT, CANCELLED):
            r = CheckResult("c", False, steps, Facts(), error="e", kind=kind)
            d = json.loads(codec.dumps(codec.result_to_dict(r)))
            self.assertEqual((d["schema"], d["kind"]), (codec.RESULT_SCHEMA, kind.value))
            self.assertEqual(d["step_kinds"], [None, "infrastructure"])
            self.assertEqual(codec.result_from_dict(d), r)
        ok = CheckResult("c", True, steps[:1], Facts())
        self.assertEqual(codec.result_from_dict(codec.result_to_dict(ok)), ok)

    def test_steps_stay_readable_by_a_version_1_reader(self) -> None:
        r = CheckResult("c", False, (StepResult("s", 1.0, 1.0, "timeout", "d", TIMEOUT),), Facts())
        (s,) = codec.result_to_dict(r)["steps"]
        self.assertEqual(StepResult(**s), StepResult("s", 1.0, 1.0, "timeout", "d"))

    def test_version_1_results_get_their_kind_once(self) -> None:
        for d, want in V1_ROWS:
            r = codec.result_from_dict(d)
            self.assertIs(r.kind, want, d["error"])
            again = codec.result_from_dict(codec.result_to_dict(r))
            self.assertEqual(again, r)

    def test_version_1s_text_guess(self) -> None:
        # What the scheduler's is_infrastructure_failure said (its tests).
        for error in (
            "step 'run instance' failed: TransportError: RunInstances: connection refused",
            "CloudError: DescribeInstances: HTTP 503 Unavailable: slow down [gave up after 6 "
            "attempts in 60.0s (throttled)]",
            "RunInstances: HTTP 500 InternalError: oops",
            "worker running job x died: killed by signal 9",
        ):
            self.assertTrue(codec.infrastructure_failure_v1(error), error)
        for error in (
            "",
            "step 'ssh' failed: command exited 1",
            "CloudError: RunInstances: HTTP 400 InvalidAMIID.NotFound: no such image",
            "instance reached HTTP 5000 port",
        ):
            self.assertFalse(codec.infrastructure_failure_v1(error), error)

    def test_a_version_2_result_is_not_guessed_from_its_text(self) -> None:
        d = {**v1_result("TransportError: looks like the infrastructure"), "schema": 2, "kind": "test"}
        self.assertIs(codec.result_from_dict(d).kind, TEST)

    def test_malformed_kinds(self) -> None:
        from txvmbot.errors import ConfigError

        base = {**v1_result("e", steps=[step("s", "failed")]), "schema": 2}
        for bad in (
            {"kind": "the weather"},
            {"kind": "test", "step_kinds": ["nope"]},
            {"kind": "test", "step_kinds": []},
            {"schema": "2"},
            {"schema": 0},
        ):
            with self.assertRaises(ConfigError, msg=str(bad)):
                codec.result_from_dict({**base, **bad})


class StoredRowTests(SynchronousTestCase):
    """A job store file holding a result written before kinds: read back,
    the result has its kind."""

    def test_old_rows_in_a_sqlite_file(self) -> None:
        where = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, where, True)
        path = os.path.join(where, "jobs.sqlite")
        store = SQLiteJobStore(path)
        spec = make_job_spec()
        for i, (row, _) in enumerate(V1_ROWS):
            passed = row["passed"]
            job = Job(
                id=f"j{i}",
                spec=spec,
                state="passed" if passed else "failed",
                submitted=1.0 + i,
                started=2.0,
                finished=3.0,
                attempts=1,
                reason=row["error"],
                result=codec.result_from_dict(row),
            )
            now(store.add(job))
        now(store.close())
        # What an older daemon left there: each job's JSON with its result
        # in the form of version 1.
        conn = sqlite3.connect(path)
        with conn:
            for i, (row, _) in enumerate(V1_ROWS):
                (data,) = conn.execute("SELECT data FROM jobs WHERE id = ?", (f"j{i}",)).fetchone()
                doc = json.loads(data)
                self.assertEqual(doc["result"]["schema"], codec.RESULT_SCHEMA)
                doc["result"] = row
                conn.execute(
                    "UPDATE jobs SET data = ? WHERE id = ?", (json.dumps(doc), f"j{i}")
                )
        conn.close()
        store = SQLiteJobStore(path)
        self.addCleanup(lambda: now(store.close()))
        for i, (row, want) in enumerate(V1_ROWS):
            job = now(store.get(f"j{i}"))
            assert job is not None and job.result is not None
            self.assertIs(job.result.kind, want, row["error"])
            self.assertEqual(job.result.error, row["error"])
