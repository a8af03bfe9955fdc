"""Tests for the daemon's retention (txvmbot.daemon.scheduling.upkeep.Pruner): it
prunes the real store and journal at start-up and every interval, a batch
per reactor turn, logs what went, survives errors and stops cleanly."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.support.deferreds import result_of
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.scheduling.upkeep import PRUNE_INTERVAL, Pruner
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore, StoreError
from txvmbot.journal import MemoryJournal
from txvmbot.testing import make_job_spec

DAY = 86400.0
NOW = 1_700_000_000.0
KEEP = 30 * DAY


def final_job(job_id: str, finished: float, state: str = "passed") -> Job:
    return Job(
        id=job_id,
        spec=make_job_spec("b"),
        state=state,  # type: ignore[arg-type]
        submitted=finished - 60,
        started=finished - 50,
        finished=finished,
        attempts=1,
    )


def event(job_id: str, seq: int) -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, at=NOW - 90 * DAY, kind="state", state="queued")


class PrunerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = SQLiteJobStore.memory(clock=self.clock.seconds)
        self.addCleanup(self.store.close)
        self.journal = MemoryJournal(self.clock.seconds)
        self.logged = self.enterContext(capturedLogs())

    def pruner(self, batch: int = 2, **kw: Any) -> Pruner:
        p = Pruner(self.clock, self.store, self.journal, KEEP, batch=batch, **kw)
        self.addCleanup(lambda: p.running and p.stopService())
        return p

    def add_jobs(self, prefix: str, n: int, finished: float, events: int = 3) -> None:
        for i in range(n):
            j = final_job(
                f"{prefix}{i}", finished, ("passed", "failed", "cancelled", "error")[i % 4]
            )
            self.store.sync.add(j, event(j.id, 1))
            for seq in range(2, events + 1):
                self.store.add_event(event(j.id, seq))

    def add_done_entries(self, check: str, n: int, when: float) -> None:
        now = self.clock.seconds()
        self.clock.rightNow = when
        for i in range(n):
            result_of(self.journal.done(result_of(self.journal.intend(check, "k", f"n{i}", "e", "r"))))
        self.clock.rightNow = now

    def turn(self) -> None:
        """One reactor turn: run the calls that are due now, not the ones
        they schedule (Clock.advance would run those too)."""
        now = self.clock.seconds()
        due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= now]
        for call in due:
            self.clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)

    def ids(self) -> set[str]:
        return {j.id for j in self.store.sync.list(limit=1000)}

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(e) for e in self.logged if level is None or e.get("log_level") == level]

    def test_prunes_at_start_a_batch_a_turn_and_logs_once(self) -> None:
        self.add_jobs("old", 5, NOW - 31 * DAY)
        self.add_jobs("new", 2, NOW - 29 * DAY)
        self.store.sync.add(Job(id="queued", spec=make_job_spec("b"), state="queued", submitted=1.0))
        self.add_done_entries("old-check", 3, NOW - 40 * DAY)
        self.add_done_entries("new-check", 2, NOW - DAY)
        pending = result_of(self.journal.intend("stuck", "k", "n", "e", "r"))

        self.pruner().startService()
        # One batch ran at once; the rest waits for later reactor turns.
        self.assertEqual(len([i for i in self.ids() if i.startswith("old")]), 3)
        self.turn()
        self.assertEqual(len([i for i in self.ids() if i.startswith("old")]), 1)
        self.assertEqual(len(self.journal.entries), 6)
        self.assertEqual(self.lines(LogLevel.info), [])
        self.turn()  # the last, short job batch; then the journal's first
        self.assertEqual(len(self.journal.entries), 4)
        self.turn()  # the journal's last

        self.assertEqual(self.ids(), {"new0", "new1", "queued"})
        for i in range(5):
            self.assertEqual(self.store.sync.events(f"old{i}"), [])
        self.assertEqual(self.store.sync.last_event_seq("new0"), 3)
        self.assertEqual(sorted({e.check_id for e in self.journal.entries}), ["new-check", "stuck"])
        self.assertEqual(result_of(self.journal.pending()), [pending])
        self.assertEqual(
            self.lines(LogLevel.info),
            [
                "Pruned 5 finished jobs (with their events) and 3 done journal entries "
                "older than 30 days"
            ],
        )
        # Nothing more to do until the next round.
        self.assertEqual(
            [c.getTime() for c in self.clock.getDelayedCalls()], [NOW + PRUNE_INTERVAL]
        )

    def test_prunes_again_every_interval(self) -> None:
        self.add_jobs("a", 1, NOW - 29.5 * DAY)
        self.pruner(batch=500).startService()
        self.assertEqual(self.ids(), {"a0"})
        self.assertEqual(self.lines(LogLevel.info), [])  # nothing pruned, nothing said

        self.clock.advance(PRUNE_INTERVAL)  # a0 is 29.54 days old: kept
        self.assertEqual(self.ids(), {"a0"})
        self.add_done_entries("c", 1, NOW - 29.9 * DAY)
        self.clock.advance(11 * PRUNE_INTERVAL)
        # a0 exactly 30 days old (kept: strictly older goes), the entry 30.4.
        self.assertEqual((self.ids(), self.journal.entries), ({"a0"}, ()))
        self.clock.advance(PRUNE_INTERVAL)
        self.assertEqual(self.ids(), set())
        self.assertEqual(
            self.lines(LogLevel.info),
            [
                "Pruned 0 finished jobs (with their events) and 1 done journal entries "
                "older than 30 days",
                "Pruned 1 finished jobs (with their events) and 0 done journal entries "
                "older than 30 days",
            ],
        )

    def test_store_error_is_logged_and_retried_next_interval(self) -> None:
        self.add_jobs("old", 1, NOW - 31 * DAY)
        self.add_done_entries("c", 1, NOW - 31 * DAY)
        real = self.store.prune
        failures = [StoreError(self.store.path, "cannot prune finished jobs: disk I/O error")]

        def prune(before: float, limit: int) -> int:
            if failures:
                raise failures.pop()
            return real(before, limit)

        self.store.prune = prune  # type: ignore[method-assign]
        pruner = self.pruner()
        pruner.startService()

        (error,) = self.lines(LogLevel.error)
        self.assertIn("Cannot prune finished jobs", error)
        self.assertIn("disk I/O error", error)
        self.assertIn("trying again in 3600s", error)
        # The journal was still pruned; the daemon goes on.
        self.assertEqual(self.journal.entries, ())
        self.assertEqual(self.ids(), {"old0"})
        self.assertTrue(pruner.running)
        self.clock.advance(PRUNE_INTERVAL)
        self.assertEqual(self.ids(), set())
        self.assertIn("Pruned 1 finished jobs", self.lines(LogLevel.info)[-1])

    def test_a_bug_is_logged_and_the_rounds_go_on(self) -> None:
        def broken(before: float, limit: int) -> int:
            raise TypeError("oops")

        self.journal.prune = broken  # type: ignore[method-assign]
        self.pruner().startService()
        self.clock.advance(PRUNE_INTERVAL)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop_between_batches(self) -> None:
        self.add_jobs("old", 5, NOW - 31 * DAY)
        pruner = self.pruner()
        pruner.startService()
        self.assertEqual(len(self.ids()), 3)
        d = pruner.stopService()
        self.successResultOf(d)
        self.assertFalse(pruner.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(2 * PRUNE_INTERVAL)
        self.assertEqual(len(self.ids()), 3)
        # What went before the stop is still told.
        self.assertEqual(
            self.lines(LogLevel.info),
            [
                "Pruned 2 finished jobs (with their events) and 0 done journal entries "
                "older than 30 days"
            ],
        )
        self.store.sync.close()  # what the daemon does next; nothing touches it after

    def test_stop_when_idle(self) -> None:
        pruner = self.pruner()
        pruner.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(pruner.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_arguments(self) -> None:
        for kw in ({"keep": 0.0}, {"keep": -1.0}, {"interval": 0.0}, {"batch": 0}):
            args: dict[str, Any] = {"keep": KEEP, **kw}
            keep = args.pop("keep")
            self.assertRaises(
                ValueError, Pruner, self.clock, self.store, self.journal, keep, **args
            )
