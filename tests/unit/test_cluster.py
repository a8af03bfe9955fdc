"""Unit tests of the shared store's JobWriter and Cluster on a Clock, with a
fake Database whose every ``run`` waits for the test to answer it; and of
the local Scheduler's ``abandon``, which the cluster and the writer use to
let go of jobs."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.support.deferreds import result_of
from txvmbot.daemon.cluster.membership import LEFTOVER_EVERY, TAKEOVERS_PER_BEAT, Cluster
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.postgres.db import DatabaseError, DatabaseUnavailable
from txvmbot.daemon.stores.postgres.store import Claimed, TakenOver
from txvmbot.daemon.stores.postgres.writer import JobWriter
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.errors import TxvmbotError
from txvmbot.journal import MemoryJournal
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0


# --- doubles ----------------------------------------------------------------------


@attrs.define
class Call:
    """One ``Database.run``: the function's name, its arguments, and the
    Deferred the test fires."""

    name: str
    args: tuple[Any, ...]
    d: Deferred[Any]


class FakeDatabase:
    """A Database whose transactions wait for the test: it records each
    ``run(fn, *args)`` and hands back a Deferred the test fires or fails."""

    where = "fake database"

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(Call(fn.__name__, args, d))
        return d

    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def pending(self, name: str | None = None) -> list[Call]:
        return [c for c in self.calls if not c.d.called and name in (None, c.name)]

    def _one(self, name: str) -> Call:
        waiting = self.pending(name)
        assert waiting, f"no {name} waits; calls: {self.names()}"
        return waiting[0]

    def answer(self, name: str, value: Any) -> Call:
        """Fire the oldest waiting call of ``name`` with ``value``."""
        c = self._one(name)
        c.d.callback(value)
        return c

    def refuse(self, name: str, error: Exception) -> Call:
        """Fail the oldest waiting call of ``name`` with ``error``."""
        c = self._one(name)
        c.d.errback(error)
        return c


def unavailable() -> DatabaseUnavailable:
    return DatabaseUnavailable("fake database", "connection refused")


def job(job_id: str, state: Any = "running", attempts: int = 1) -> Job:
    return Job(id=job_id, spec=make_job_spec("b"), state=state, submitted=T0, attempts=attempts)


def event(job_id: str, seq: int, state: str = "running") -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, at=T0, kind="state", state=state)


# --- JobWriter --------------------------------------------------------------------


class WriterHarness:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.db = FakeDatabase()
        self.owner = "A"
        self.states: list[bool] = []
        self.fenced: list[set[str]] = []
        self.w = JobWriter(
            self.clock,
            self.db,  # type: ignore[arg-type]
            lambda: self.owner,
            "host-a",
            wall=self.clock.seconds,
            on_fenced=self.fenced.append,
            on_state=self.states.append,
        )

    def batches(self) -> list[tuple[list[str], list[tuple[str, int]]]]:
        """Each write_batch sent: (job ids with state, (job id, seq) of events)."""
        out = []
        for c in self.db.calls:
            assert c.name == "write_batch", c.name
            _, _, updates, events, _ = c.args
            out.append(
                (
                    [f"{j.id}:{j.state}" for j in updates],
                    [(e.job_id, e.seq) for e in events],
                )
            )
        return out


class JobWriterTests(SynchronousTestCase):
    def test_writes_during_a_batch_go_in_the_next_in_order(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        self.assertEqual(h.db.names(), ["write_batch"])
        self.assertEqual(h.db.calls[0].args[:2], ("A", "host-a"))
        self.assertEqual(h.db.calls[0].args[4], T0)
        h.w.add_event(event("a", 2))
        h.w.update(job("b"))
        h.w.add_event(event("b", 2))
        h.w.add_event(event("a", 3))
        h.w.update(job("a", "cleaning"))
        self.assertEqual(len(h.db.calls), 1)  # one batch in flight at a time
        self.assertEqual(h.w.pending, 6)
        h.owner = "A2"  # the owner is asked per batch
        h.db.answer("write_batch", set())
        self.assertEqual(
            h.batches(),
            [
                (["a:running"], []),
                (["b:running", "a:cleaning"], [("a", 2), ("b", 2), ("a", 3)]),
            ],
        )
        self.assertEqual(h.db.calls[1].args[0], "A2")
        self.assertEqual(h.w.pending, 5)
        h.db.answer("write_batch", set())
        self.assertEqual((h.w.pending, len(h.db.calls)), (0, 2))
        self.assertEqual((h.states, h.fenced), ([], []))

    def test_unavailable_retries_with_backoff_losing_nothing(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        h.w.add_event(event("a", 2))
        with capturedLogs() as logs:
            h.db.refuse("write_batch", unavailable())
            self.assertEqual(h.states, [False])
            h.clock.advance(0.49)
            h.w.add_event(event("a", 3))  # waits for the retry
            self.assertEqual(len(h.db.calls), 1)
            h.clock.advance(0.01)
            self.assertEqual(len(h.db.calls), 2)
            # A write during the retry, then the retry fails too.
            h.w.update(job("a", "cleaning"))
            h.w.add_event(event("a", 4))
            h.db.refuse("write_batch", unavailable())
            h.clock.advance(0.99)
            self.assertEqual(len(h.db.calls), 2)
            h.clock.advance(0.01)
            self.assertEqual(len(h.db.calls), 3)
            self.assertEqual(h.states, [False])  # told once per outage
            h.db.answer("write_batch", set())
        self.assertEqual(
            h.batches(),
            [
                (["a:running"], []),
                (["a:running"], [("a", 2), ("a", 3)]),
                (["a:running", "a:cleaning"], [("a", 2), ("a", 3), ("a", 4)]),
            ],
        )
        self.assertEqual(h.states, [False, True])
        self.assertEqual(h.w.pending, 0)
        errors = [e for e in logs if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        # The backoff starts again at 0.5 s after a success.
        h.w.update(job("b"))
        h.db.refuse("write_batch", unavailable())
        self.assertEqual(h.states, [False, True, False])
        h.clock.advance(0.5)
        self.assertEqual(len(h.db.calls), 5)

    def test_backoff_doubles_up_to_ten_seconds(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        waits = []
        for _ in range(7):
            h.db.refuse("write_batch", unavailable())
            sent = len(h.db.calls)
            (retry,) = h.clock.getDelayedCalls()
            waits.append(retry.getTime() - h.clock.seconds())
            h.clock.advance(waits[-1])
            self.assertEqual(len(h.db.calls), sent + 1)
        self.assertEqual(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0])
        self.assertEqual(h.states, [False])

    def test_refused_batch_is_retried_without_changing_state(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        h.db.refuse("write_batch", DatabaseError("fake database", "syntax error"))
        self.assertEqual(len(self.flushLoggedErrors(DatabaseError)), 1)
        self.assertEqual(h.states, [])
        h.clock.advance(0.5)
        self.assertEqual(h.batches(), [(["a:running"], []), (["a:running"], [])])

    def test_flushed_waits_for_everything_handed_over_before_it(self) -> None:
        h = WriterHarness()
        self.successResultOf(h.w.flushed())  # nothing pending
        h.w.update(job("a"))
        first = h.w.flushed()
        h.w.add_event(event("a", 2))
        second = h.w.flushed()
        self.assertNoResult(first)
        h.db.refuse("write_batch", unavailable())
        h.clock.advance(0.5)
        self.assertNoResult(first)
        h.w.update(job("b"))  # after both flushed(): neither waits for it
        h.db.answer("write_batch", set())  # a and event a/2
        self.successResultOf(first)
        self.successResultOf(second)
        third = h.w.flushed()
        self.assertNoResult(third)
        h.db.answer("write_batch", set())
        self.successResultOf(third)

    def test_flushed_counts_fenced_writes_as_done(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        h.w.add_event(event("a", 2))
        h.w.update(job("b"))
        d = h.w.flushed()
        h.db.answer("write_batch", set())
        with capturedLogs() as logs:
            h.db.answer("write_batch", {"a"})
        self.successResultOf(d)
        self.assertEqual(h.fenced, [{"a"}])
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in logs))
        # Later writes go on as usual.
        h.w.update(job("b", "cleaning"))
        h.db.answer("write_batch", {"b"})
        self.assertEqual(h.fenced, [{"a"}, {"b"}])

    def test_close_stops_retrying(self) -> None:
        h = WriterHarness()
        h.w.update(job("a"))
        h.db.refuse("write_batch", unavailable())
        h.w.close()
        h.clock.advance(60)
        h.w.update(job("b"))
        self.assertEqual(len(h.db.calls), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])


# --- Cluster ----------------------------------------------------------------------


class FakeScheduler:
    """What the cluster drives of the local scheduler, recorded."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.quarantine: frozenset[str] = frozenset()
        self.held: set[str] = set()
        self.adopted: list[tuple[str, int, str | None]] = []
        self.interrupted: list[tuple[str, int, str, str | None]] = []
        self.abandoned: list[str] = []
        self.abandoned_ids: list[Collection[str] | None] = []
        self.cancels: list[tuple[str, str]] = []
        self.draining: list[tuple[str, bool]] = []

    def free_workers(self) -> int:
        return self.free

    def held_back(self) -> frozenset[str]:
        return self.quarantine

    def adopt(self, job: Job, last_seq: int, cancel: str | None = None) -> None:
        self.adopted.append((job.id, last_seq, cancel))

    def adopt_interrupted(
        self, job: Job, last_seq: int, reason: str, cancel: str | None = None
    ) -> Deferred[None]:
        self.interrupted.append((job.id, last_seq, reason, cancel))
        return Deferred()

    def abandon(self, reason: str, job_ids: Collection[str] | None = None) -> None:
        self.abandoned.append(reason)
        self.abandoned_ids.append(job_ids)

    def holds(self, job_id: str) -> bool:
        return job_id in self.held

    def cancel(self, job_id: str, reason: str) -> Deferred[Job]:
        self.cancels.append((job_id, reason))
        return Deferred()

    def set_draining(self, backend: str, draining: bool) -> None:
        self.draining.append((backend, draining))


class FakeJournal:
    def __init__(self, checks: Sequence[str] = ()) -> None:
        self.checks = list(checks)
        self.asked: list[str] = []

    def host_checks(self, host: str) -> Deferred[Sequence[str]]:
        self.asked.append(host)
        return succeed(self.checks)


#: For ClusterHarness.advance: leave these calls waiting.
WAIT: Any = object()


class ClusterHarness:
    """A Cluster with a lease of 9 s: a beat every 3 s, a scan every 2 s,
    a grace of 2.25 s."""

    LEASE = 9.0

    def __init__(self, free: int = 0, claim_interval: float = 1000.0) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.db = FakeDatabase()
        self.s = FakeScheduler(free)
        self.cleaned: list[Job] = []
        self.c = Cluster(
            self.clock,
            self.db,  # type: ignore[arg-type]
            host="h1",
            lease=self.LEASE,
            wall=self.clock.seconds,
            claim_interval=claim_interval,
        )

    def cleaner(self, j: Job) -> Deferred[Any]:
        self.cleaned.append(j)
        return succeed(())

    def start(
        self, journal: FakeJournal | None = None, draining: dict[str, bool] | None = None
    ) -> Deferred[None]:
        """Start the cluster; answer its register and its read of the
        backends (the first scan then waits)."""
        d = ensureDeferred(self.c.start(self.s, self.cleaner, journal or FakeJournal()))
        self.db.answer("register", None)
        self.db.answer("backends", draining or {})
        return d

    def scan_ok(self) -> None:
        """Answer the waiting scan: no expired lease."""
        self.db.answer("take_over", None)

    def beat_ok(self, cancels: Sequence[tuple[str, str]] = ()) -> None:
        """Answer the waiting renew (True) and the read of cancels."""
        self.db.answer("renew", True)
        self.db.answer("cancels", list(cancels))

    def answer_all(self, name: str, value: Any) -> None:
        """Answer (or, with an exception, fail) every waiting ``name``."""
        if value is WAIT:
            return
        for _ in range(1000):
            if not self.db.pending(name):
                return
            if isinstance(value, Exception):
                self.db.refuse(name, value)
            else:
                self.db.answer(name, value)
        raise AssertionError(f"{name} keeps coming back")

    def advance(self, seconds: float, **answers: Any) -> None:
        """Advance the clock by ``seconds``, one delayed call at a time,
        answering on the way every waiting call named in ``answers`` with its
        value (an exception fails it, WAIT leaves it waiting); scans
        (take_over) find nothing unless given."""
        answers.setdefault("take_over", None)
        end = self.clock.seconds() + seconds

        def answer() -> None:
            for name, value in answers.items():
                self.answer_all(name, value)

        for _ in range(10_000):
            answer()
            now = self.clock.seconds()
            if now >= end:
                return
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            self.clock.advance(min([t for t in due if now < t <= end], default=end) - now)
        raise AssertionError("the clock did not reach its end")


class ClusterTests(SynchronousTestCase):
    def started(
        self, free: int = 0, claim_interval: float = 1000.0, journal: FakeJournal | None = None
    ) -> ClusterHarness:
        """A started cluster whose first scan found nothing."""
        h = ClusterHarness(free, claim_interval)
        self.successResultOf(h.start(journal))
        h.scan_ok()
        self.addCleanup(h.c.stop)
        return h

    # --- start, beats and scans --------------------------------------------------------

    def test_start_registers_reads_backends_then_beats_every_third_of_the_lease(self) -> None:
        h = ClusterHarness()
        journal = FakeJournal()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, journal))
        self.assertEqual(h.db.names(), ["register"])  # no caps given: none stored
        self.assertNoResult(d)
        self.assertEqual(h.db.calls[0].args, (h.c.owner, "h1", os.getpid(), 9.0, T0))
        self.assertTrue(h.c.owner.startswith("h1/"))
        h.db.answer("register", None)
        self.assertEqual(h.db.names(), ["register", "backends"])
        self.assertNoResult(d)
        h.db.answer("backends", {"b": True, "c": False})
        self.successResultOf(d)
        self.addCleanup(h.c.stop)
        self.assertEqual(h.s.draining, [("b", True), ("c", False)])
        # A scan at once; no renew at once (just registered); no free worker: no claim.
        self.assertEqual(h.db.names(), ["register", "backends", "take_over"])
        self.assertEqual(journal.asked, [])  # start does not wait for the scan
        h.scan_ok()
        self.assertEqual(journal.asked, ["h1"])  # the first scan looks for leftovers
        for beat in range(3):
            h.advance(2.99)
            self.assertEqual(h.db.pending("renew"), [], f"beat {beat}")
            h.advance(0.01)
            (renew,) = h.db.pending("renew")
            self.assertEqual(renew.args, (h.c.owner, 9.0))
            h.beat_ok()
        self.assertEqual(h.db.names().count("renew"), 3)
        self.assertEqual(h.db.names().count("register"), 1)
        self.assertEqual(h.s.abandoned, [])

    def test_start_stores_the_configured_caps_first(self) -> None:
        h = ClusterHarness()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, FakeJournal(), {"b": 2, "c": 5}))
        self.assertEqual(h.db.names(), ["set_caps"])
        self.assertEqual(h.db.calls[0].args, ({"b": 2, "c": 5},))
        h.db.answer("set_caps", None)
        self.assertEqual(h.db.names(), ["set_caps", "register"])
        h.db.answer("register", None)
        h.db.answer("backends", {})
        self.successResultOf(d)
        self.addCleanup(h.c.stop)
        self.assertEqual(h.db.names().count("set_caps"), 1)

    def test_start_fails_when_the_database_does_not_answer(self) -> None:
        h = ClusterHarness()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, FakeJournal()))
        h.db.refuse("register", unavailable())
        self.failureResultOf(d, DatabaseUnavailable)
        h.clock.advance(60)
        self.assertEqual(h.db.names(), ["register"])
        self.assertEqual(h.s.abandoned, [])

    def test_start_fails_when_storing_caps_fails(self) -> None:
        h = ClusterHarness()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, FakeJournal(), {"b": 2}))
        h.db.refuse("set_caps", unavailable())
        self.failureResultOf(d, DatabaseUnavailable)
        h.clock.advance(60)
        self.assertEqual(h.db.names(), ["set_caps"])

    def test_scan_every_scan_interval_passes_the_grace(self) -> None:
        h = ClusterHarness()
        self.assertEqual((h.c.grace, h.c.scan_interval), (2.25, 2.0))
        self.successResultOf(h.start())
        self.addCleanup(h.c.stop)
        times = []
        for _ in range(5):
            (scan,) = h.db.pending("take_over")
            self.assertEqual(scan.args, (h.c.owner, "h1", h.clock.seconds(), 2.25))
            times.append(h.clock.seconds() - T0)
            h.scan_ok()
            h.advance(1.99, renew=True, cancels=[], take_over=WAIT)
            self.assertEqual(h.db.pending("take_over"), [])
            h.clock.advance(0.01)
        self.assertEqual(times, [0.0, 2.0, 4.0, 6.0, 8.0])
        self.assertEqual(h.s.abandoned, [])
        # The grace is a quarter of the lease, at most 5 s; scans every 2 s at most.
        for lease, grace, interval in [(3.0, 0.75, 1.0), (9.0, 2.25, 2.0), (60.0, 5.0, 2.0)]:
            c = Cluster(h.clock, h.db, host="h1", lease=lease)  # type: ignore[arg-type]
            self.assertEqual((c.grace, c.scan_interval), (grace, interval), lease)

    def test_heartbeat_cancels_held_jobs_asked_to_cancel(self) -> None:
        h = self.started()
        h.s.held = {"j1", "j3"}
        h.advance(3.0)
        self.assertEqual(h.db.pending("cancels"), [])  # read after the renew got through
        h.db.answer("renew", True)
        (read,) = h.db.pending("cancels")
        self.assertEqual(read.args, (h.c.owner,))
        h.db.answer("cancels", [("j1", "cancelled by request"), ("j2", "stop")])
        self.assertEqual(h.s.cancels, [("j1", "cancelled by request (on another daemon)")])
        h.advance(3.0)
        h.beat_ok([("j3", "passed its bound")])
        self.assertEqual(
            h.s.cancels,
            [
                ("j1", "cancelled by request (on another daemon)"),
                ("j3", "passed its bound (on another daemon)"),
            ],
        )

    # --- claims -------------------------------------------------------------------------

    def test_one_more_claim_for_asks_made_during_a_claim(self) -> None:
        h = self.started(free=2)
        (claim,) = h.db.pending("claim")
        self.assertEqual(claim.args, (h.c.owner, "h1", 2, frozenset(), T0))
        h.c.want_claim(1)
        h.c.want_claim(2)
        h.c.notified("txvmbot_queue", "")
        self.assertEqual(h.db.names().count("claim"), 1)
        h.db.answer("claim", [])
        self.assertEqual(h.db.names().count("claim"), 2)
        h.db.answer("claim", [])
        self.assertEqual(h.db.names().count("claim"), 2)

    def test_no_claim_without_a_free_worker(self) -> None:
        h = self.started(free=0)
        h.c.want_claim()
        h.c.notified("txvmbot_queue", "")
        self.assertNotIn("claim", h.db.names())

    def test_claimed_jobs_are_adopted(self) -> None:
        h = self.started(free=3)
        h.s.quarantine = frozenset({"q"})
        h.db.answer("claim", [])
        h.c.want_claim()
        self.assertEqual(h.db.pending("claim")[0].args[3], frozenset({"q"}))
        h.db.answer(
            "claim",
            [Claimed(job("j1", "queued", 0), 1), Claimed(job("j2", "queued", 1), 4, "stop")],
        )
        self.assertEqual(h.s.adopted, [("j1", 1, None), ("j2", 4, "stop")])
        self.assertEqual(h.c.claims, 2)

    def test_claims_every_interval(self) -> None:
        h = self.started(free=1, claim_interval=1.0)
        h.db.answer("claim", [])
        h.clock.advance(1.0)
        h.db.answer("claim", [])
        h.clock.advance(1.0)
        self.assertEqual(h.db.names().count("claim"), 3)

    def test_claim_unavailable_stops_claims_and_scans_until_a_beat_gets_through(self) -> None:
        h = self.started(free=1)
        h.db.refuse("claim", unavailable())
        h.c.want_claim()
        self.assertEqual(h.db.names().count("claim"), 1)
        h.advance(3.0)  # the scan at T0 + 2 is skipped
        self.assertEqual(h.db.names().count("take_over"), 1)
        h.beat_ok()
        self.assertEqual(h.db.names().count("claim"), 2)
        h.clock.advance(1.0)  # T0 + 4: scans again
        self.assertEqual(len(h.db.pending("take_over")), 1)

    # --- the lease ----------------------------------------------------------------------

    def test_renew_refused_lets_go_and_joins_with_a_new_owner(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        old = h.c.owner
        h.advance(3.0)
        with capturedLogs() as logs:
            h.db.answer("renew", False)
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertIn("another daemon took over its lease", h.s.abandoned[0])
        self.assertEqual(h.s.abandoned_ids, [None])  # every job
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logs))
        self.assertNotIn("cancels", h.db.names())
        # No claims and no scans under a lease that is gone.
        h.c.want_claim()
        h.advance(2.99)
        self.assertEqual(h.db.names().count("claim"), 1)
        self.assertEqual(h.db.names().count("take_over"), 2)  # T0 and T0 + 2
        h.advance(0.01)  # T0 + 6: the beat joins again
        register = h.db.pending("register")[0]
        new = h.c.owner
        self.assertNotEqual(new, old)
        self.assertEqual(register.args[0], new)
        h.db.answer("register", None)
        self.assertEqual(h.db.pending("cancels")[0].args, (new,))
        h.db.answer("cancels", [])
        h.c.want_claim()
        self.assertEqual(h.db.pending("claim")[0].args[0], new)
        h.db.answer("claim", [])
        # Scans again; the timer of the old lease lets nothing more go.
        h.advance(9.0, renew=True, cancels=[])
        self.assertEqual(h.db.calls[-1].args[0], new)
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertEqual(h.db.names().count("register"), 2)

    def test_claim_answered_after_the_lease_was_lost_adopts_nothing(self) -> None:
        """A claim made under the old lease that answers after the lease
        was lost (another daemon took this one's jobs): its jobs are not
        this daemon's any more (they were claimed for the dead owner, whom
        every write about them is fenced against). Running them would run
        them twice, or leave them held by a lease nobody renews."""
        h = self.started(free=1)
        old = h.c.owner
        (claim,) = h.db.pending("claim")
        self.assertEqual(claim.args[0], old)
        h.advance(3.0)
        h.db.answer("renew", False)
        self.assertEqual(len(h.s.abandoned), 1)
        h.db.answer("claim", [Claimed(job("j1", "queued", 0), 1)])
        self.assertEqual(h.s.adopted, [])
        (release,) = h.db.pending("release")
        self.assertEqual(release.args, (old, ["j1"]))

    def test_unreachable_stops_claims_and_lets_go_when_the_lease_runs_out(self) -> None:
        h = self.started(free=2)
        h.db.answer("claim", [])
        h.advance(3.0)
        h.beat_ok()  # sent at T0 + 3: the lease holds to T0 + 12 on this clock
        h.advance(3.0)  # T0 + 6
        with capturedLogs() as logs:
            h.db.refuse("renew", unavailable())
        self.assertEqual(len([e for e in logs if e["log_level"] == LogLevel.error]), 1)
        h.c.want_claim()
        h.c.notified("txvmbot_queue", "")
        self.assertEqual(h.db.names().count("claim"), 1)
        scans = h.db.names().count("take_over")
        h.advance(3.0)  # T0 + 9
        h.db.refuse("renew", unavailable())
        h.advance(2.99)  # T0 + 11.99: the lease still holds
        self.assertEqual(h.s.abandoned, [])
        self.assertEqual(h.db.names().count("take_over"), scans)  # no scans meanwhile
        old = h.c.owner
        with capturedLogs() as logs:
            h.advance(0.01)  # T0 + 12
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertIn("ran out before a renewal got through", h.s.abandoned[0])
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logs))
        new = h.c.owner
        self.assertNotEqual(new, old)
        # Still unreachable: joining again fails, nothing more is let go.
        h.advance(3.0, renew=unavailable(), register=unavailable())  # T0 + 15
        self.assertEqual(h.db.pending(), [])
        self.assertEqual(h.db.calls[-1].name, "register")
        self.assertEqual(h.db.calls[-1].args[0], new)
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertEqual(h.db.names().count("claim"), 1)
        # Back: a new lease, and claims under it at once.
        h.advance(3.0)  # T0 + 18
        self.assertEqual(h.db.pending("register")[0].args[0], new)
        h.db.answer("register", None)
        (claim,) = h.db.pending("claim")
        self.assertEqual(claim.args[0], new)
        h.db.answer("cancels", [])
        self.assertEqual(len(h.s.abandoned), 1)

    def test_short_outage_within_the_lease_keeps_the_jobs(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.advance(3.0)
        h.beat_ok()
        h.advance(3.0)
        h.db.refuse("renew", unavailable())
        h.advance(3.0)
        h.db.answer("renew", True)  # back at T0 + 9: claims again at once
        self.assertEqual(len(h.db.pending("claim")), 1)
        h.db.answer("cancels", [])
        h.db.answer("claim", [])
        h.advance(12.0, renew=True, cancels=[])  # to T0 + 21: well past the first lease
        self.assertEqual(h.s.abandoned, [])
        self.assertEqual(h.db.names().count("register"), 1)

    def _renew_hangs_past_the_lease(self, h: ClusterHarness) -> Call:
        """Renew once, then let the next renew hang until the lease runs
        out on this clock; the hanging renew."""
        h.db.answer("claim", [])
        h.advance(3.0)
        h.beat_ok()  # sent at T0 + 3: the lease holds to T0 + 12
        h.advance(3.0)  # T0 + 6: this renew never answers
        (hung,) = h.db.pending("renew")
        h.advance(5.99)
        self.assertEqual(h.s.abandoned, [])
        # Beats wait for the hanging one.
        self.assertEqual(h.db.names().count("renew"), 2)
        return hung

    def test_lease_timer_lets_go_when_a_renew_hangs(self) -> None:
        h = self.started(free=1)
        old = h.c.owner
        self._renew_hangs_past_the_lease(h)
        with capturedLogs() as logs:
            h.advance(0.01)  # T0 + 12
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertIn("ran out before a renewal got through", h.s.abandoned[0])
        self.assertEqual(h.s.abandoned_ids, [None])
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logs))
        self.assertNotEqual(h.c.owner, old)
        # No claims, no scans under a lease that ran out.
        calls = len(h.db.calls)
        h.c.want_claim()
        h.c.notified("txvmbot_queue", "")
        h.clock.advance(2.0)
        self.assertEqual(len(h.db.calls), calls)

    def test_renew_answering_after_the_lease_ran_out_brings_nothing_back(self) -> None:
        for answer in (True, False):
            h = self.started(free=1)
            old = h.c.owner
            hung = self._renew_hangs_past_the_lease(h)
            h.advance(0.01)  # T0 + 12: let go
            new = h.c.owner
            self.assertNotEqual(new, old)
            calls = len(h.db.calls)
            hung.d.callback(answer)
            self.assertEqual(h.c.owner, new, answer)
            self.assertEqual(len(h.s.abandoned), 1, answer)
            self.assertEqual(len(h.db.calls), calls, answer)  # no cancels read, no claim
            h.c.want_claim()
            self.assertEqual(len(h.db.calls), calls, answer)
            # The next beat joins with the new owner.
            h.advance(3.0)  # T0 + 15
            (register,) = h.db.pending("register")
            self.assertEqual(register.args[0], new)
            h.db.answer("register", None)
            h.db.answer("cancels", [])
            h.c.want_claim()
            self.assertEqual(h.db.pending("claim")[0].args[0], new)
            h.db.answer("claim", [])
            h.advance(12.0, renew=True, cancels=[])
            self.assertEqual(len(h.s.abandoned), 1, answer)

    # --- takeovers and leftovers ----------------------------------------------------

    def test_takeover_adopts_running_jobs_of_the_dead(self) -> None:
        h = ClusterHarness(free=1)
        journal = FakeJournal()
        self.successResultOf(h.start(journal))
        self.addCleanup(h.c.stop)
        h.db.answer("claim", [])
        taken = TakenOver(
            dead="h2/7/abc",
            dead_host="h2",
            requeued=("q1",),
            host_lost=("l1",),
            adopted=(Claimed(job("j1"), 4), Claimed(job("j2", "cleaning"), 2, "stop")),
        )
        self.assertEqual(h.db.pending("take_over")[0].args, (h.c.owner, "h1", T0, 2.25))
        h.db.answer("take_over", taken)
        reason = "daemon h2/7/abc on h2 lost (its lease expired)"
        self.assertEqual(h.s.interrupted, [("j1", 4, reason, None), ("j2", 2, reason, "stop")])
        self.assertEqual(h.c.takeovers, 1)
        self.assertEqual(len(h.db.pending("claim")), 1)  # requeued jobs: claim
        h.db.answer("take_over", None)
        self.assertEqual(h.db.pending("take_over"), [])
        self.assertEqual(journal.asked, ["h1"])

    def test_takeover_answered_after_the_lease_ran_out_adopts_nothing(self) -> None:
        """A scan sent under the old lease that answers after the lease ran
        out: the dead daemon's jobs now name the old owner, which this
        daemon let go of (another daemon will take it over, and them with
        it). Cleaning them up and retrying them here would do it twice, as
        with a late claim."""
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.advance(3.0)
        h.beat_ok()  # the lease holds to T0 + 12
        h.advance(3.0)  # T0 + 6: this renew hangs
        h.advance(3.99)
        h.clock.advance(0.01)  # T0 + 10: this scan hangs too
        self.assertEqual(h.s.abandoned, [])
        h.clock.advance(2.0)  # T0 + 12: the lease ran out
        self.assertEqual(len(h.s.abandoned), 1)
        (scan,) = h.db.pending("take_over")
        taken = TakenOver("h2/7/abc", "h2", ("q1",), (), (Claimed(job("j1"), 4),))
        calls = len(h.db.calls)
        scan.d.callback(taken)
        self.assertEqual(h.s.interrupted, [])
        self.assertEqual(h.c.takeovers, 0)
        self.assertEqual(len(h.db.calls), calls)  # no claim, no further take_over

    def test_at_most_some_takeovers_per_scan(self) -> None:
        h = ClusterHarness()
        self.successResultOf(h.start())
        self.addCleanup(h.c.stop)
        for i in range(TAKEOVERS_PER_BEAT):
            h.db.answer("take_over", TakenOver(f"d{i}", "h2", (), (), ()))
        self.assertEqual(h.db.pending("take_over"), [])
        self.assertEqual(h.c.takeovers, TAKEOVERS_PER_BEAT)
        h.clock.advance(2.0)
        self.assertEqual(len(h.db.pending("take_over")), 1)

    def test_first_scan_cleans_up_after_final_jobs_of_this_host(self) -> None:
        h = ClusterHarness()
        journal = FakeJournal(["j1-1", "j2-3"])
        self.successResultOf(h.start(journal))
        self.addCleanup(h.c.stop)
        self.assertEqual(journal.asked, [])
        h.scan_ok()
        self.assertEqual(journal.asked, ["h1"])
        self.assertEqual(h.db.pending("get")[0].args, ("j1",))
        ended = job("j1", "failed")
        h.db.answer("get", ended)
        self.assertEqual(h.cleaned, [ended])
        self.assertEqual(h.db.pending("get")[0].args, ("j2",))
        h.db.answer("get", job("j2", "running", 3))  # still held: not cleaned here
        self.assertEqual(h.cleaned, [ended])
        self.assertEqual(h.db.names(), ["register", "backends", "take_over", "get", "get"])
        # The scan has ended: the next one comes after scan_interval.
        h.clock.advance(2.0)
        self.assertEqual(len(h.db.pending("take_over")), 1)

    def test_leftover_cleanup_cleans_the_attempt_the_check_id_names(self) -> None:
        h = ClusterHarness()
        journal = FakeJournal(["j1-1", "j1-2", "j2-x"])
        self.successResultOf(h.start(journal))
        self.addCleanup(h.c.stop)
        h.scan_ok()
        stored = job("j1", "error", attempts=3)
        h.db.answer("get", stored)
        h.db.answer("get", stored)
        h.db.answer("get", job("j2", "failed", 2))  # no attempt in its check id
        self.assertEqual(
            [g.args for g in h.db.calls if g.name == "get"], [("j1",), ("j1",), ("j2",)]
        )
        self.assertEqual(
            h.cleaned, [attrs.evolve(stored, attempts=1), attrs.evolve(stored, attempts=2)]
        )

    def test_leftovers_looked_for_after_a_takeover_and_every_so_many_scans(self) -> None:
        journal = FakeJournal()
        h = self.started(journal=journal)
        self.assertEqual(journal.asked, ["h1"])  # scan 1
        h.clock.advance(2.0)  # scan 2 takes one over
        h.db.answer("take_over", TakenOver("d1", "h2", (), (), ()))
        self.assertEqual(journal.asked, ["h1"])
        h.scan_ok()
        self.assertEqual(journal.asked, ["h1", "h1"])
        # Scans 3 to LEFTOVER_EVERY find nothing to take over, nor look.
        h.advance(2.0 * (LEFTOVER_EVERY - 2), renew=True, cancels=[])
        self.assertEqual(h.db.names().count("take_over"), LEFTOVER_EVERY + 1)
        self.assertEqual(journal.asked, ["h1", "h1"])
        h.advance(2.0, renew=True, cancels=[])  # scan LEFTOVER_EVERY + 1
        self.assertEqual(journal.asked, ["h1", "h1", "h1"])
        self.assertEqual(h.s.abandoned, [])

    # --- notifications and stop ---------------------------------------------------

    def test_notifications(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        events: list[str] = []
        h.c.on_events = events.append
        h.c.notified("txvmbot_queue", "")
        self.assertEqual(len(h.db.pending("claim")), 1)
        h.db.answer("claim", [])
        h.c.notified("txvmbot_events", "j9")
        self.assertEqual(events, ["j9"])
        h.s.held = {"j1"}
        h.c.notified("txvmbot_cancel", "j1")
        h.c.notified("txvmbot_cancel", "j2")  # not held here
        self.assertEqual(h.s.cancels, [("j1", "cancelled by request (on another daemon)")])
        h.c.notified("txvmbot_backends", "b")
        h.db.answer("backends", {"b": True, "c": False})
        self.assertEqual(h.s.draining, [("b", True), ("c", False)])
        self.assertEqual(h.db.pending(), [])

    def test_backends_read_failing_is_logged(self) -> None:
        h = self.started()
        with capturedLogs() as logs:
            h.c.notified("txvmbot_backends", "b")
            h.db.refuse("backends", unavailable())
        self.assertEqual(h.s.draining, [])
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in logs))

    def test_listening_again_reads_backends_and_claims(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        up: list[bool] = []
        h.c.on_listening = lambda: up.append(True)
        h.c.listening(False, "connection lost")
        self.assertEqual(h.db.pending(), [])
        h.c.listening(True, "")
        self.assertEqual(up, [True])
        self.assertEqual(len(h.db.pending("claim")), 1)
        h.db.answer("backends", {"b": True})  # a drain missed meanwhile
        self.assertEqual(h.s.draining, [("b", True)])

    def test_stop_ends_the_lease_and_the_loops(self) -> None:
        h = ClusterHarness(free=1, claim_interval=1.0)
        self.successResultOf(h.start())
        h.scan_ok()
        h.db.answer("claim", [])
        h.advance(3.0, claim=[])
        h.beat_ok()
        self.assertEqual(h.db.pending(), [])
        owner = h.c.owner
        d = h.c.stop()
        h.db.answer("unregister", None)
        self.successResultOf(d)
        self.assertEqual(h.db.calls[-1].args, (owner,))
        # Beat, scan, claim poll and the lease timer: all gone.
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(30)
        h.c.want_claim()
        h.c.notified("txvmbot_queue", "")
        self.assertEqual(h.db.pending(), [])
        self.assertEqual(h.s.abandoned, [])


# --- Dispatcher.abandon --------------------------------------------------------------


class WritesStore(SQLiteJobStore):
    """A store in memory that records each write after the first: (what,
    job id, state)."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.writes: list[tuple[str, str, str]] = []

    def update(self, job: Job) -> None:
        self.writes.append(("update", job.id, job.state))
        super().update(job)

    def add_event(self, event: JobEvent) -> None:
        self.writes.append(("event", event.job_id, event.state))
        super().add_event(event)


class AbandonHarness:
    """A local Scheduler (front end and dispatcher) on a Clock with the fake
    pool of txvmbot.testing."""

    def __init__(
        self,
        size: int = 1,
        cleaner: RecordingCleaner | None = None,
        on_requeue: Callable[[Job], object] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        store = WritesStore.memory(clock=self.clock.seconds)
        assert isinstance(store, WritesStore)
        self.store = store
        self.pool = FakeWorkerPool(size)
        self.cleaner = cleaner or RecordingCleaner()
        ids = itertools.count()
        self.s = Scheduler(
            self.clock,
            self.store,
            self.pool,
            MemoryJournal(self.clock.seconds),
            cleaner=self.cleaner,
            new_id=lambda: f"j{next(ids)}",
            wall=self.clock.seconds,
            on_requeue=on_requeue,
        )

    def submit(self, n: int = 1) -> None:
        for _ in range(n):
            result_of(self.s.submit(make_job_spec("b", max_attempts=3)))

    def state(self, job_id: str) -> str:
        """The job's state in the store."""
        job = self.store.sync.get(job_id)
        assert job is not None, job_id
        return job.state

    def writes_since(self, mark: int) -> list[tuple[str, str, str]]:
        return self.store.writes[mark:]


class SchedulerAbandonTests(SynchronousTestCase):
    def test_running_job_let_go_is_cancelled_and_its_result_ignored(self) -> None:
        h = AbandonHarness(size=1)
        h.submit(2)  # j0 runs, j1 waits for its worker
        self.assertEqual(list(h.pool.running), ["j0"])
        mark = len(h.store.writes)
        with capturedLogs() as logs:
            h.s.dispatcher.abandon("this daemon lost its lease", ["j0"])
        self.assertTrue(
            any(e["log_level"] == LogLevel.warn and e.get("job_id") == "j0" for e in logs)
        )
        self.assertEqual(h.pool.cancels, [("j0", "this daemon lost its lease")])
        self.assertFalse(h.s.dispatcher.holds("j0"))
        self.assertTrue(h.s.dispatcher.holds("j1"))
        # Its worker still cleans up: it stays busy until it answers.
        self.assertEqual(list(h.pool.running), ["j0"])
        self.assertEqual(h.s.status_now().queue_depth, 1)
        run = h.pool.get("j0")
        run.step("cleanup instance i-1")  # late step events: ignored
        self.assertEqual(h.writes_since(mark), [])
        # Its answer writes nothing and frees the worker for j1.
        run.finish_cancelled()
        self.assertEqual(list(h.pool.running), ["j1"])
        self.assertNotIn("j0", [w[1] for w in h.writes_since(mark)])
        self.assertEqual(
            h.writes_since(mark), [("update", "j1", "running"), ("event", "j1", "running")]
        )
        self.assertEqual(h.state("j0"), "running")  # for its new holder to end
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)  # j1's bound; j0's is gone
        h.pool.finish("j1")
        self.assertEqual(h.state("j1"), "passed")
        self.assertEqual(h.clock.getDelayedCalls(), [])
        self.assertEqual(h.s.status_now().backends[0].running, 0)

    def test_worker_dying_under_a_job_let_go_is_not_cleaned_up_here(self) -> None:
        h = AbandonHarness(size=1)
        h.submit(2)
        h.s.dispatcher.abandon("another daemon took it over", ["j0"])
        mark = len(h.store.writes)
        h.pool.die("j0")
        self.assertEqual(h.cleaner.jobs, [])  # its new holder cleans up
        self.assertEqual(list(h.pool.running), ["j1"])
        self.assertNotIn("j0", [w[1] for w in h.writes_since(mark)])
        self.assertEqual(h.s.status_now().backends[0].consecutive_failures, 0)

    def test_job_being_cleaned_up_let_go_writes_nothing_when_cleaned(self) -> None:
        cleaner = RecordingCleaner(manual=True)
        h = AbandonHarness(cleaner=cleaner)
        j = Job(
            id="x1",
            spec=make_job_spec("b", max_attempts=3),
            state="running",
            submitted=T0,
            attempts=1,
        )
        h.store.sync.add_many([(j, JobEvent(job_id="x1", seq=1, at=T0, kind="state", state="queued"))])
        d = h.s.dispatcher.adopt_interrupted(j, 1, "daemon h2 lost")
        self.assertEqual(h.state("x1"), "cleaning")
        self.assertEqual([c.id for c in cleaner.jobs], ["x1"])
        mark = len(h.store.writes)
        h.s.dispatcher.abandon("this daemon lost its lease")
        self.assertFalse(h.s.dispatcher.holds("x1"))
        self.assertEqual(h.pool.cancels, [])  # no worker runs it
        cleaner.release_all()
        self.successResultOf(d)
        self.assertEqual(h.writes_since(mark), [])
        self.assertEqual(h.state("x1"), "cleaning")
        # Not queued again here, though it has attempts left.
        self.assertEqual((h.pool.runs, h.s.status_now().queue_depth), ([], 0))

    def test_abandon_with_ids_lets_go_of_only_those(self) -> None:
        h = AbandonHarness(size=2)
        h.submit(4)  # j0, j1 run; j2, j3 wait
        h.s.dispatcher.abandon("another daemon took it over", ["j0", "j2", "nope"])
        self.assertEqual(h.pool.cancels, [("j0", "another daemon took it over")])
        self.assertEqual([h.s.dispatcher.holds(f"j{i}") for i in range(4)], [False, True, False, True])
        self.assertEqual(h.s.status_now().queue_depth, 1)
        mark = len(h.store.writes)
        h.pool.finish("j1")
        self.assertEqual(h.state("j1"), "passed")
        self.assertEqual(sorted(h.pool.running), ["j0", "j3"])  # j2 is not started
        h.pool.get("j0").finish_cancelled()
        self.assertEqual(list(h.pool.running), ["j3"])
        self.assertEqual({w[1] for w in h.writes_since(mark)}, {"j1", "j3"})
        self.assertEqual(h.s.dispatcher.free_workers(), 1)

    def test_abandon_all_forgets_queued_jobs_and_fails_waiters(self) -> None:
        h = AbandonHarness(size=1)
        h.submit(2)
        waiter = h.s.cancel("j0")
        h.s.dispatcher.abandon("this daemon lost its lease")
        err = self.failureResultOf(waiter, TxvmbotError)
        self.assertIn("j0", str(err.value))
        self.assertIn("this daemon lost its lease", str(err.value))
        self.assertEqual([h.s.dispatcher.holds("j0"), h.s.dispatcher.holds("j1")], [False, False])
        status = h.s.status_now()
        self.assertEqual((status.queue_depth, status.running), (0, 0))
        mark = len(h.store.writes)
        h.pool.get("j0").finish_cancelled()
        self.assertEqual(h.writes_since(mark), [])
        self.assertEqual(len(h.pool.runs), 1)  # j1 was forgotten, not started
        self.assertEqual(h.s.dispatcher.free_workers(), 1)


class GiveBackTests(SynchronousTestCase):
    """A retry after an infrastructure failure goes back to the shared
    queue, not to this daemon's own queue."""

    def test_a_job_queued_again_is_handed_over_not_kept(self) -> None:
        given: list[Job] = []
        h = AbandonHarness(size=1, on_requeue=given.append)
        h.submit(1)
        h.pool.die("j0")  # an infrastructure failure with attempts left
        self.assertEqual([(j.id, j.state, j.attempts) for j in given], [("j0", "queued", 1)])
        self.assertEqual(h.state("j0"), "queued")  # written before it was handed over
        self.assertFalse(h.s.dispatcher.holds("j0"))
        self.assertEqual(h.pool.running, {})  # not started again here
        self.assertEqual(h.s.status_now().queue_depth, 0)

    def test_give_back_waits_for_the_write_then_releases_under_its_owner(self) -> None:
        h = ClusterHarness()
        self.successResultOf(h.start())
        self.addCleanup(h.c.stop)
        flushed: Deferred[None] = Deferred()
        h.c.flushed = lambda: flushed
        owner = h.c.owner
        d = h.c.give_back(job("j9", "queued"))
        self.assertEqual(h.db.pending("release"), [])  # its "queued" write first
        flushed.callback(None)
        (call,) = h.db.pending("release")
        self.assertEqual(call.args, (owner, ["j9"]))
        h.db.refuse("release", unavailable())  # the database away: again later
        h.clock.advance(0.5)
        (call,) = h.db.pending("release")
        h.db.answer("release", None)
        self.successResultOf(d)

    def test_give_back_stops_when_the_lease_is_lost(self) -> None:
        h = ClusterHarness()
        self.successResultOf(h.start())
        self.addCleanup(h.c.stop)
        d = h.c.give_back(job("j9", "queued"))
        h.db.refuse("release", unavailable())
        h.c.owner = "h1/another"  # as _lease_lost does; the takeover queues it
        h.clock.advance(0.5)
        self.assertEqual(h.db.pending("release"), [])
        self.successResultOf(d)


class HeldBackTests(SynchronousTestCase):
    def test_draining_or_quarantined_backends_are_held_back_from_claims(self) -> None:
        h = AbandonHarness()
        self.assertEqual(h.s.dispatcher.held_back(), frozenset())
        result_of(h.s.drain("b"))
        self.assertEqual(h.s.dispatcher.held_back(), frozenset({"b"}))
        h.s.dispatcher.set_draining("b", False)
        self.assertEqual(h.s.dispatcher.held_back(), frozenset())
