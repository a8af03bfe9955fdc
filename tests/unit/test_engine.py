"""Tests for txvmbot.engine: bounded steps, polling, journalled creates, cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.deferreds import result_of
from txvmbot.engine import Cleanup, StepContext, StepRunner, poll, track
from txvmbot.errors import CloudError, StepFailed, StepTimeout, TransportError
from txvmbot.journal import JournalError, MemoryJournal, SQLiteJournal
from txvmbot.model import FailureKind, JournalEntry, StepEvent, StepResult


class Wall:
    """An epoch clock that follows a task.Clock, offset to look like a date."""

    def __init__(self, clock: Clock, base: float = 1_700_000_000.0) -> None:
        self.clock = clock
        self.base = base

    def __call__(self) -> float:
        return self.base + self.clock.seconds()


class RunnerMixin:
    def setUp(self) -> None:
        self.clock = Clock()
        self.wall = Wall(self.clock)
        self.events: list[StepEvent] = []
        self.runner = StepRunner(self.clock, self.events.append, self.wall)

    def states(self) -> list[tuple[str, str, str]]:
        return [(e.name, e.state, e.detail) for e in self.events]


class StepRunnerTests(RunnerMixin, SynchronousTestCase):
    def test_pass(self) -> None:
        inner: Deferred[str] = Deferred()
        d = self.runner.run("boot", 10, lambda ctx: inner)
        self.assertNoResult(d)
        self.clock.advance(3)
        inner.callback("up")
        self.assertEqual(self.successResultOf(d), "up")
        self.assertEqual(
            self.runner.results,
            (StepResult("boot", 1_700_000_000.0, 3.0, "passed", ""),),
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sync_value_and_coroutine(self) -> None:
        self.assertEqual(self.successResultOf(self.runner.run("a", 1, lambda ctx: 5)), 5)

        async def action(ctx: StepContext) -> str:
            await deferLaterish(self.clock, 2)
            return ctx.name

        d = self.runner.run("b", 5, action)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(d), "b")
        self.assertEqual([(r.name, r.duration) for r in self.runner.results], [("a", 0), ("b", 2)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fail(self) -> None:
        def action(ctx: StepContext) -> Deferred[None]:
            self.clock.advance(1.5)
            return fail(ValueError("boom"))

        f = self.failureResultOf(self.runner.run("keypair", 10, action), StepFailed)
        err = f.value
        assert isinstance(err, StepFailed)
        self.assertEqual(err.step, "keypair")
        self.assertEqual(err.reason, "ValueError: boom")
        self.assertIsInstance(err.__cause__, ValueError)
        self.assertEqual(str(err), "step 'keypair' failed: ValueError: boom")
        (r,) = self.runner.results
        self.assertEqual((r.outcome, r.duration, r.detail), ("failed", 1.5, "ValueError: boom"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sync_raise(self) -> None:
        def action(ctx: StepContext) -> None:
            raise KeyError("x")

        f = self.failureResultOf(self.runner.run("s", 1, action), StepFailed)
        self.assertEqual(f.value.reason, "KeyError: 'x'")

    def test_own_step_failed_kept(self) -> None:
        mine = StepFailed("ssh", "exit status 3")
        f = self.failureResultOf(self.runner.run("ssh", 1, lambda ctx: fail(mine)))
        self.assertIs(f.value, mine)
        self.assertEqual(self.runner.results[0].detail, "exit status 3")

    def test_other_steps_failure_wrapped(self) -> None:
        other = StepFailed("inner", "nope")
        f = self.failureResultOf(self.runner.run("outer", 1, lambda ctx: fail(other)), StepFailed)
        self.assertEqual(f.value.step, "outer")
        self.assertIn("step 'inner' failed: nope", str(f.value))

    def test_timeout(self) -> None:
        cancelled: list[bool] = []
        inner: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        ctxs: list[StepContext] = []

        def action(ctx: StepContext) -> Deferred[None]:
            ctxs.append(ctx)
            return inner

        d = self.runner.run("wait running", 30, action)
        self.clock.advance(10)
        ctxs[0].saw("i-1 pending")
        self.clock.advance(10)
        ctxs[0].saw("i-1 pending, no address")
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        f = self.failureResultOf(d, StepTimeout)
        err = f.value
        assert isinstance(err, StepTimeout)
        self.assertEqual(err.bound, 30)
        self.assertEqual(err.last_seen, "i-1 pending, no address")
        self.assertEqual(
            str(err),
            "step 'wait running' failed: did not finish within 30s; last seen: i-1 pending, no address",
        )
        self.assertEqual(cancelled, [True])
        (r,) = self.runner.results
        self.assertEqual((r.outcome, r.duration), ("timeout", 30.0))
        self.assertIn("last seen: i-1 pending, no address", r.detail)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # Progress after the end is ignored, not reported.
        ctxs[0].saw("late")
        self.assertEqual(self.events[-1].state, "timeout")

    def test_timeout_without_anything_seen(self) -> None:
        d: Deferred[None] = self.runner.run("x", 2, lambda ctx: Deferred())
        self.clock.advance(2)
        f = self.failureResultOf(d, StepTimeout)
        self.assertEqual(str(f.value), "step 'x' failed: did not finish within 2s")

    def test_timeout_holds_even_if_action_answers_cancel_with_success(self) -> None:
        inner: Deferred[str] = Deferred(lambda d: d.callback("too late"))
        d = self.runner.run("x", 2, lambda ctx: inner)
        self.clock.advance(2)
        self.failureResultOf(d, StepTimeout)
        self.assertEqual(self.runner.results[0].outcome, "timeout")

    def test_cancel_by_caller(self) -> None:
        cancelled: list[bool] = []
        inner: Deferred[None] = Deferred(lambda d: cancelled.append(True))
        d = self.runner.run("ssh", 60, lambda ctx: inner)
        self.clock.advance(4)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, [True])
        (r,) = self.runner.results
        self.assertEqual((r.name, r.outcome, r.duration), ("ssh", "cancelled", 4.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.states()[-1], ("ssh", "cancelled", "cancelled"))

    def test_cancel_propagates_from_an_awaiting_coroutine(self) -> None:
        async def scenario() -> None:
            await self.runner.run("boot", 60, lambda ctx: Deferred())

        d = Deferred.fromCoroutine(scenario())
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.runner.results[0].outcome, "cancelled")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_observer_events_in_order(self) -> None:
        inner: Deferred[int] = Deferred()
        ctxs: list[StepContext] = []

        def action(ctx: StepContext) -> Deferred[int]:
            ctxs.append(ctx)
            return inner

        d = self.runner.run("one", 10, action)
        self.clock.advance(1)
        ctxs[0].saw("pending")
        self.clock.advance(1)
        inner.callback(1)
        self.successResultOf(d)
        self.runner.skip("two", "no floating ip asked for")
        self.failureResultOf(self.runner.run("three", 1, lambda ctx: fail(OSError("x"))))
        self.assertEqual(
            self.states(),
            [
                ("one", "running", ""),
                ("one", "running", "pending"),
                ("one", "passed", "pending"),
                ("two", "skipped", "no floating ip asked for"),
                ("three", "running", ""),
                ("three", "failed", "OSError: x"),
            ],
        )
        base = 1_700_000_000.0
        self.assertEqual([e.at - base for e in self.events], [0, 1, 2, 2, 2, 2])
        self.assertEqual(
            [(r.name, r.outcome, r.started - base, r.duration) for r in self.runner.results],
            [
                ("one", "passed", 0, 2),
                ("two", "skipped", 2, 0),
                ("three", "failed", 2, 0),
            ],
        )

    def test_broken_observer_does_not_break_the_step(self) -> None:
        def observer(event: StepEvent) -> None:
            raise RuntimeError("watcher bug")

        runner = StepRunner(self.clock, observer, self.wall)
        self.assertEqual(self.successResultOf(runner.run("s", 1, lambda ctx: 7)), 7)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_no_observer(self) -> None:
        runner = StepRunner(self.clock)
        self.assertEqual(self.successResultOf(runner.run("s", 1, lambda ctx: 7)), 7)
        self.assertEqual(runner.results[0].outcome, "passed")

    def test_bad_bound(self) -> None:
        for bound in (0, -1, float("inf"), float("nan")):
            self.assertRaises(ValueError, self.runner.run, "s", bound, lambda ctx: 1)
        self.assertEqual(self.runner.results, ())

    def test_each_step_records_the_kind_of_its_failure(self) -> None:
        self.successResultOf(self.runner.run("ok", 5, lambda ctx: 1))
        self.runner.skip("skipped", "not asked for")
        gave_up = CloudError("RunInstances", "Unavailable", "down", 503)
        for name, exc in (
            ("cloud-5xx", gave_up),
            ("cloud-4xx", CloudError("RunInstances", "InvalidParameter", "no", 400)),
            ("transport", TransportError("RunInstances", "connection lost")),
            ("own", StepFailed("own", "said so", FailureKind.INFRASTRUCTURE)),
            ("other-step", StepTimeout("inner", 3.0)),
            ("bug", ValueError("boom")),
        ):
            f = self.failureResultOf(self.runner.run(name, 5, failing(exc)), StepFailed)
            self.assertIs(f.value.kind, self.runner.results[-1].kind)
        self.runner.run("slow", 5, lambda ctx: Deferred()).addErrback(lambda f: None)
        self.clock.advance(5)
        cancelled: Deferred[None] = self.runner.run("cancelled", 5, lambda ctx: Deferred())
        cancelled.addErrback(lambda f: f.trap(CancelledError))
        cancelled.cancel()
        self.assertEqual(
            [(r.name, r.kind) for r in self.runner.results],
            [
                ("ok", None),
                ("skipped", None),
                ("cloud-5xx", FailureKind.INFRASTRUCTURE),
                ("cloud-4xx", FailureKind.TEST),
                ("transport", FailureKind.INFRASTRUCTURE),
                ("own", FailureKind.INFRASTRUCTURE),
                ("other-step", FailureKind.TIMEOUT),
                ("bug", FailureKind.TEST),
                ("slow", FailureKind.TIMEOUT),
                ("cancelled", FailureKind.CANCELLED),
            ],
        )


def failing(exc: BaseException) -> Any:
    return lambda ctx: fail(exc)


def deferLaterish(clock: Clock, delay: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    clock.callLater(delay, d.callback, None)
    return d


class PollTests(RunnerMixin, SynchronousTestCase):
    def start(
        self, answers: list[str], interval: float = 1.0, max_interval: float = 4.0
    ) -> tuple[Deferred[str], list[float]]:
        probed: list[float] = []
        it = iter(answers)

        def probe() -> Deferred[str]:
            probed.append(self.clock.seconds())
            return succeed(next(it))

        def run(ctx: StepContext) -> Deferred[str]:
            return poll(
                ctx,
                probe,
                lambda v: v == "running",
                lambda v: f"state {v}",
                interval=interval,
                max_interval=max_interval,
            )

        return self.runner.run("wait running", 1000, run), probed

    def test_backoff_schedule(self) -> None:
        d, probed = self.start(["pending"] * 6 + ["running"])
        self.clock.pump([0.5] * 60)
        self.assertEqual(self.successResultOf(d), "running")
        # waits 1, 2, 4, 4, 4, 4 (doubling, capped at max_interval)
        self.assertEqual(probed, [0, 1, 3, 7, 11, 15, 19])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(
            [e.detail for e in self.events if e.state == "running"][1:], ["state pending"] * 6
        )

    def test_ready_at_once(self) -> None:
        d, probed = self.start(["running"])
        self.assertEqual(self.successResultOf(d), "running")
        self.assertEqual(probed, [0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_waiting_leaves_no_delayed_call(self) -> None:
        d, probed = self.start(["pending"] * 10)
        self.clock.advance(1)
        self.assertEqual(probed, [0, 1])
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # the wait and the bound
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_probing(self) -> None:
        cancelled: list[bool] = []
        inner: Deferred[str] = Deferred(lambda d: cancelled.append(True))
        ctx = StepContext("p", self.clock, self.runner)
        d = poll(ctx, lambda: inner, bool, str, interval=1, max_interval=2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_step_bound_ends_poll_with_last_seen(self) -> None:
        ctx_holder: list[Deferred[str]] = []

        def run(ctx: StepContext) -> Deferred[str]:
            d = poll(
                ctx,
                lambda: succeed(0),
                lambda v: False,
                lambda v: "instance i-1 pending, no address",
                interval=2,
                max_interval=8,
            ).addCallback(str)
            ctx_holder.append(d)
            return d

        d = self.runner.run("wait running", 20, run)
        self.clock.pump([1] * 25)
        f = self.failureResultOf(d, StepTimeout)
        self.assertIn("within 20s; last seen: instance i-1 pending, no address", str(f.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_probe_error_raised(self) -> None:
        ctx = StepContext("p", self.clock, self.runner)
        answers = [succeed("pending"), fail(ConnectionResetError("reset"))]
        d = poll(ctx, lambda: answers.pop(0), lambda v: False, str, interval=1, max_interval=1)
        self.clock.advance(1)
        self.failureResultOf(d, ConnectionResetError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_intervals(self) -> None:
        ctx = StepContext("p", self.clock, self.runner)
        for interval, mx in ((0, 1), (2, 1), (-1, -1)):
            self.assertRaises(
                ValueError,
                poll,
                ctx,
                lambda: succeed(1),
                bool,
                str,
                interval=interval,
                max_interval=mx,
            )


class TrackTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.journal = MemoryJournal(lambda: 100.0)

    def test_intent_written_before_create(self) -> None:
        seen_in_create: list[list[JournalEntry]] = []
        created: Deferred[str] = Deferred()

        def create() -> Deferred[str]:
            seen_in_create.append(result_of(self.journal.pending("c1")))
            return created

        d = track(self.journal, "c1", "instance", "txvmbot-c1", "http://e/", "r1", create)
        # create has not answered: the journal already holds the intent.
        self.assertNoResult(d)
        (entry,) = seen_in_create[0]
        self.assertEqual(
            (entry.kind, entry.name, entry.endpoint, entry.region, entry.resource_id),
            ("instance", "txvmbot-c1", "http://e/", "r1", None),
        )
        self.assertEqual(result_of(self.journal.pending("c1")), [entry])
        created.callback("i-123")
        self.assertEqual(self.successResultOf(d), "i-123")
        self.assertEqual([e.resource_id for e in result_of(self.journal.pending("c1"))], ["i-123"])

    def test_intent_on_disk_before_create(self) -> None:
        """With the SQLite journal, another handle on the file (another
        process, after a crash) sees the intent while create is in flight."""
        d = tempfile.mkdtemp(prefix="txvmbot-engine-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "journal.sqlite")
        journal = SQLiteJournal(path)
        self.addCleanup(journal.close)
        seen: list[list[tuple[str, str | None]]] = []
        created: Deferred[str] = Deferred()

        def create() -> Deferred[str]:
            other = SQLiteJournal(path)
            seen.append([(e.name, e.resource_id) for e in result_of(other.pending("c1"))])
            other.close()
            return created

        result = track(journal, "c1", "instance", "txvmbot-c1", "e", "r", create)
        self.assertEqual(seen, [[("txvmbot-c1", None)]])
        created.callback("i-1")
        self.assertEqual(self.successResultOf(result), "i-1")
        other = SQLiteJournal(path)
        self.addCleanup(other.close)
        self.assertEqual([e.resource_id for e in result_of(other.pending("c1"))], ["i-1"])

    def test_parent_id(self) -> None:
        d = track(self.journal, "c", "rule", "tcp/22", "e", "r", lambda: succeed("r-1"), "sg-1")
        self.successResultOf(d)
        self.assertEqual(result_of(self.journal.pending("c"))[0].parent_id, "sg-1")

    def test_create_fails_entry_stays_pending(self) -> None:
        d = track(self.journal, "c", "group", "g", "e", "r", lambda: fail(OSError("reset")))
        self.failureResultOf(d, OSError)
        (entry,) = result_of(self.journal.pending("c"))
        self.assertEqual((entry.name, entry.resource_id), ("g", None))

    def test_create_returns_no_id(self) -> None:
        d = track(self.journal, "c", "group", "g", "e", "r", lambda: succeed(""))
        self.failureResultOf(d, TypeError)
        self.assertEqual(len(result_of(self.journal.pending("c"))), 1)

    def test_journal_failure_means_no_create(self) -> None:
        self.journal.close()
        calls: list[int] = []

        def create() -> Deferred[str]:
            calls.append(1)
            return succeed("x")

        self.failureResultOf(track(self.journal, "c", "k", "n", "e", "r", create), JournalError)
        self.assertEqual(calls, [])


class DeferredJournal:
    """An IJournal whose every method answers with a Deferred that fires
    only when the test says so, like a worker's journal over AMP."""

    def __init__(self, inner: MemoryJournal) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Deferred[Any], Any]] = []

    def _later(self, what: str, value: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((what, d, value))
        return d

    def ack(self) -> str:
        """Fire the oldest unanswered call; return its name."""
        what, d, value = self.calls.pop(0)
        d.callback(value)
        return what

    def intend(self, *args: Any) -> Deferred[Any]:
        return self._later("intend", self.inner._intend(*args))

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[Any]:
        return self._later("created", self.inner._created(entry, resource_id))

    def done(self, entry: JournalEntry) -> Deferred[Any]:
        self.inner._done(entry)
        return self._later("done", None)

    def pending(self, check_id: str | None = None) -> Deferred[Any]:
        return self._later("pending", self.inner._pending(check_id))

    def checks(self, older_than: float | None = None) -> Deferred[Any]:
        return self._later("checks", self.inner._checks(older_than))


class DeferredJournalTests(RunnerMixin, SynchronousTestCase):
    """track and Cleanup wait for each journal write to be acknowledged."""

    def test_track_creates_only_after_the_intent_is_acknowledged(self) -> None:
        journal = DeferredJournal(MemoryJournal(lambda: 1.0))
        creates: list[int] = []

        def create() -> Deferred[str]:
            creates.append(1)
            return succeed("i-1")

        d = track(journal, "c", "instance", "vm", "e", "r", create)  # type: ignore[arg-type]
        self.assertEqual(creates, [])
        self.assertNoResult(d)
        self.assertEqual(journal.ack(), "intend")
        self.assertEqual(creates, [1])
        # The id is recorded before track fires.
        self.assertNoResult(d)
        self.assertEqual(journal.ack(), "created")
        self.assertEqual(self.successResultOf(d), "i-1")
        self.assertEqual([e.resource_id for e in result_of(journal.inner.pending("c"))], ["i-1"])

    def test_track_failed_intent_means_no_create(self) -> None:
        journal = DeferredJournal(MemoryJournal(lambda: 1.0))
        creates: list[int] = []
        def create() -> Deferred[str]:
            creates.append(1)
            return succeed("x")

        d = track(journal, "c", "k", "n", "e", "r", create)  # type: ignore[arg-type]
        _, pending, _ = journal.calls.pop(0)
        pending.errback(JournalError("/j", "disk full"))
        self.failureResultOf(d, JournalError)
        self.assertEqual(creates, [])

    def test_cleanup_reads_and_marks_done_through_deferreds(self) -> None:
        inner = MemoryJournal(self.wall)
        result_of(inner.created(result_of(inner.intend("c1", "keypair", "kp", "e", "r")), "kp-1"))
        result_of(inner.created(result_of(inner.intend("c1", "instance", "vm", "e", "r")), "i-1"))
        journal = DeferredJournal(inner)
        undone: list[str] = []

        def undo(entry: JournalEntry) -> Deferred[bool]:
            undone.append(entry.resource_id or entry.name)
            return succeed(True)

        d = Cleanup(journal, undo, self.runner, 30).run("c1")  # type: ignore[arg-type]
        self.assertEqual(journal.ack(), "pending")
        self.assertEqual(undone, ["i-1"])
        # The next undo waits for the done of this one.
        self.assertEqual(journal.ack(), "done")
        self.assertEqual(undone, ["i-1", "kp-1"])
        self.assertEqual(journal.ack(), "done")
        self.assertEqual(self.successResultOf(d), ())
        self.assertEqual(result_of(inner.pending("c1")), [])


class CleanupTests(RunnerMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.journal = MemoryJournal(self.wall)
        self.undone: list[str] = []
        self.answers: dict[str, Any] = {}

    def add(self, kind: str, name: str, rid: str | None, check: str = "c1") -> JournalEntry:
        e = result_of(self.journal.intend(check, kind, name, "e", "r"))
        return result_of(self.journal.created(e, rid)) if rid else e

    def undo(self, entry: JournalEntry) -> Deferred[bool]:
        key = entry.resource_id or entry.name
        self.undone.append(key)
        answer = self.answers.get(key, True)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, BaseException):
            return fail(answer)
        return succeed(answer)

    def cleanup(self, bound: float = 30) -> Cleanup:
        return Cleanup(self.journal, self.undo, self.runner, bound)

    def test_reverse_order_and_done(self) -> None:
        self.add("keypair", "kp", "kp-1")
        self.add("group", "sg", "sg-1")
        self.add("instance", "txvmbot-c1", None)
        self.add("keypair", "other-check", "kp-9", check="c2")
        errors = self.successResultOf(self.cleanup().run("c1"))
        self.assertEqual(errors, ())
        self.assertEqual(self.undone, ["txvmbot-c1", "sg-1", "kp-1"])
        self.assertEqual(result_of(self.journal.pending("c1")), [])
        self.assertEqual([e.name for e in result_of(self.journal.pending())], ["other-check"])
        self.assertEqual(
            [(r.name, r.outcome) for r in self.runner.results],
            [
                ("cleanup instance txvmbot-c1", "passed"),
                ("cleanup group sg-1", "passed"),
                ("cleanup keypair kp-1", "passed"),
            ],
        )

    def test_continues_past_failures(self) -> None:
        self.add("keypair", "kp", "kp-1")
        self.add("group", "sg", "sg-1")
        self.add("rule", "tcp/22", "rule-1")
        self.add("instance", "vm", "i-1")
        self.answers["i-1"] = False
        self.answers["rule-1"] = RuntimeError("InvalidPermission.NotFound")
        errors = self.successResultOf(self.cleanup().run("c1"))
        self.assertEqual(self.undone, ["i-1", "rule-1", "sg-1", "kp-1"])
        self.assertEqual(
            errors,
            (
                "step 'cleanup instance i-1' failed: instance i-1 still exists",
                "step 'cleanup rule rule-1' failed: RuntimeError: InvalidPermission.NotFound",
            ),
        )
        self.assertEqual([e.resource_id for e in result_of(self.journal.pending("c1"))], ["i-1", "rule-1"])
        self.assertEqual(
            [r.outcome for r in self.runner.results], ["failed", "failed", "passed", "passed"]
        )

    def test_each_undo_bounded(self) -> None:
        self.add("keypair", "kp", "kp-1")
        self.add("instance", "vm", "i-1")
        self.answers["i-1"] = Deferred()
        d = self.cleanup(bound=60).run("c1")
        self.assertNoResult(d)
        self.clock.advance(60)
        errors = self.successResultOf(d)
        self.assertEqual(errors, ("step 'cleanup instance i-1' failed: did not finish within 60s",))
        self.assertEqual([e.resource_id for e in result_of(self.journal.pending("c1"))], ["i-1"])
        self.assertEqual([r.outcome for r in self.runner.results], ["timeout", "passed"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_done_failing_is_collected(self) -> None:
        e = self.add("keypair", "kp", "kp-1")
        self.add("group", "sg", "sg-1")

        class Broken(MemoryJournal):
            def _done(self, entry: JournalEntry) -> None:
                raise JournalError("/j", "disk full")

        broken = Broken()
        broken._records = self.journal._records
        errors = self.successResultOf(Cleanup(broken, self.undo, self.runner, 5).run("c1"))
        self.assertEqual(len(errors), 2)
        self.assertIn("journal /j: disk full", errors[0])
        self.assertEqual(result_of(self.journal.pending("c1"))[-1], e)

    def test_nothing_to_do(self) -> None:
        self.assertEqual(self.successResultOf(self.cleanup().run("none")), ())
        self.assertEqual(self.runner.results, ())

    def test_cancel_stops_and_keeps_the_rest_pending(self) -> None:
        self.add("keypair", "kp", "kp-1")
        self.add("instance", "vm", "i-1")
        self.answers["i-1"] = Deferred()
        d = self.cleanup().run("c1")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.undone, ["i-1"])
        self.assertEqual(len(result_of(self.journal.pending("c1"))), 2)
        self.assertEqual([r.outcome for r in self.runner.results], ["cancelled"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unreadable_journal_reported_not_raised(self) -> None:
        self.journal.close()
        errors = self.successResultOf(self.cleanup().run("c1"))
        self.assertEqual(len(errors), 1)
        self.assertIn("journal :memory:: is closed", errors[0])
        self.flushLoggedErrors(JournalError)
