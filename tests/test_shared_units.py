"""Unit tests of the shared store's JobWriter and Cluster on a Clock, with a
fake Database whose every ``run`` waits for the test to answer it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.shared.cluster import TAKEOVERS_PER_BEAT, Cluster
from txvmbot.daemon.shared.db import DatabaseError, DatabaseUnavailable
from txvmbot.daemon.shared.store import Claimed, TakenOver
from txvmbot.daemon.shared.writer import JobWriter
from txvmbot.testing import make_job_spec

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
        self.cancels: list[tuple[str, str]] = []
        self.draining: list[tuple[str, bool]] = []

    def free_workers(self) -> int:
        return self.free

    def quarantined(self) -> frozenset[str]:
        return self.quarantine

    def adopt(self, job: Job, last_seq: int, cancel: str | None = None) -> None:
        self.adopted.append((job.id, last_seq, cancel))

    def adopt_interrupted(
        self, job: Job, last_seq: int, reason: str, cancel: str | None = None
    ) -> Deferred[None]:
        self.interrupted.append((job.id, last_seq, reason, cancel))
        return Deferred()

    def abandon(self, reason: str) -> None:
        self.abandoned.append(reason)

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

    def host_checks(self, host: str) -> list[str]:
        self.asked.append(host)
        return self.checks


class ClusterHarness:
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

    def start(self, journal: FakeJournal | None = None) -> Deferred[None]:
        """Start the cluster; answers its register."""
        d = ensureDeferred(self.c.start(self.s, self.cleaner, journal or FakeJournal()))
        self.db.answer("register", None)
        return d

    def beat_ok(self) -> None:
        """Answer the waiting renew (True) and the takeover search (none)."""
        self.db.answer("renew", True)
        self.db.answer("take_over", None)


class ClusterTests(SynchronousTestCase):
    def started(self, free: int = 0, claim_interval: float = 1000.0) -> ClusterHarness:
        h = ClusterHarness(free, claim_interval)
        self.successResultOf(h.start())
        self.addCleanup(h.c.stop)
        return h

    def test_start_registers_then_beats_every_third_of_the_lease(self) -> None:
        h = ClusterHarness()
        journal = FakeJournal()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, journal))
        self.assertEqual(h.db.names(), ["register"])
        self.assertNoResult(d)
        self.assertEqual(h.db.calls[0].args, (h.c.owner, "h1", os.getpid(), 9.0, T0))
        self.assertTrue(h.c.owner.startswith("h1/"))
        h.db.answer("register", None)
        self.successResultOf(d)
        self.addCleanup(h.c.stop)
        self.assertEqual(journal.asked, ["h1"])
        self.assertEqual(h.db.names(), ["register", "renew"])  # no free worker: no claim
        self.assertEqual(h.db.calls[1].args, (h.c.owner, 9.0))
        h.beat_ok()
        for beat in range(3):
            h.clock.advance(2.99)
            self.assertEqual(h.db.pending("renew"), [])
            h.clock.advance(0.01)
            self.assertEqual(len(h.db.pending("renew")), 1, f"beat {beat}")
            h.beat_ok()
        self.assertEqual(h.db.names().count("renew"), 4)
        self.assertEqual(h.s.abandoned, [])

    def test_start_fails_when_the_database_does_not_answer(self) -> None:
        h = ClusterHarness()
        d = ensureDeferred(h.c.start(h.s, h.cleaner, FakeJournal()))
        h.db.refuse("register", unavailable())
        self.failureResultOf(d, DatabaseUnavailable)
        h.clock.advance(60)
        self.assertEqual(h.db.names(), ["register"])

    def test_start_cleans_up_after_final_jobs_of_this_host(self) -> None:
        h = ClusterHarness()
        journal = FakeJournal(["j1-1", "j2-3"])
        d = ensureDeferred(h.c.start(h.s, h.cleaner, journal))
        h.db.answer("register", None)
        self.assertEqual(h.db.pending("get")[0].args, ("j1",))
        ended = job("j1", "failed")
        h.db.answer("get", ended)
        self.assertEqual(h.cleaned, [ended])
        self.assertEqual(h.db.pending("get")[0].args, ("j2",))
        h.db.answer("get", job("j2", "running"))  # still held: not cleaned here
        self.successResultOf(d)
        self.addCleanup(h.c.stop)
        self.assertEqual(h.cleaned, [ended])
        self.assertEqual(h.db.names(), ["register", "get", "get", "renew"])

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

    def test_renew_refused_lets_go_and_joins_with_a_new_owner(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        old = h.c.owner
        with capturedLogs() as logs:
            h.db.answer("renew", False)
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertIn("another daemon took over its lease", h.s.abandoned[0])
        self.assertTrue(any(e["log_level"] == LogLevel.critical for e in logs))
        self.assertNotIn("take_over", h.db.names())
        # No claims under a lease that is gone.
        h.c.want_claim()
        self.assertEqual(h.db.names().count("claim"), 1)
        h.clock.advance(3.0)
        register = h.db.pending("register")[0]
        new = h.c.owner
        self.assertNotEqual(new, old)
        self.assertEqual(register.args[0], new)
        h.db.answer("register", None)
        h.db.answer("take_over", None)
        h.c.want_claim()
        self.assertEqual(h.db.pending("claim")[0].args[0], new)
        self.assertEqual(len(h.s.abandoned), 1)

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
        h.db.answer("renew", False)
        self.assertEqual(len(h.s.abandoned), 1)
        h.db.answer("claim", [Claimed(job("j1", "queued", 0), 1)])
        self.assertEqual(h.s.adopted, [])

    def test_unreachable_stops_claims_and_lets_go_after_the_lease(self) -> None:
        h = self.started(free=2)
        h.db.answer("claim", [])
        h.beat_ok()  # renewed at T0: the lease runs to T0 + 9 on this clock
        h.clock.advance(3.0)
        with capturedLogs() as logs:
            h.db.refuse("renew", unavailable())
        self.assertEqual(len([e for e in logs if e["log_level"] == LogLevel.error]), 1)
        h.c.want_claim()
        h.c.notified("txvmbot_queue", "")
        self.assertEqual(h.db.names().count("claim"), 1)
        h.clock.advance(3.0)  # T0 + 6
        h.db.refuse("renew", unavailable())
        h.clock.advance(3.0)  # T0 + 9: not past the lease yet
        h.db.refuse("renew", unavailable())
        self.assertEqual(h.s.abandoned, [])
        old = h.c.owner
        h.clock.advance(3.0)  # T0 + 12
        h.db.refuse("renew", unavailable())
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertIn("expired while the database was unreachable", h.s.abandoned[0])
        new = h.c.owner
        self.assertNotEqual(new, old)
        # Still unreachable: registering fails, nothing more is let go.
        h.clock.advance(3.0)
        h.db.refuse("register", unavailable())
        self.assertEqual(len(h.s.abandoned), 1)
        self.assertEqual(h.db.names().count("claim"), 1)
        # Back: a new lease, and claims under it at once.
        h.clock.advance(3.0)
        self.assertEqual(h.db.pending("register")[0].args[0], new)
        h.db.answer("register", None)
        (claim,) = h.db.pending("claim")
        self.assertEqual(claim.args[0], new)
        h.db.answer("take_over", None)
        self.assertEqual(len(h.s.abandoned), 1)

    def test_short_outage_within_the_lease_keeps_the_jobs(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.beat_ok()
        h.clock.advance(3.0)
        h.db.refuse("renew", unavailable())
        h.clock.advance(3.0)
        h.db.answer("renew", True)  # back at T0 + 6: claims again at once
        self.assertEqual(len(h.db.pending("claim")), 1)
        h.db.answer("take_over", None)
        for _ in range(3):  # T0 + 9, 12, 15: well past the first lease
            h.clock.advance(3.0)
            h.beat_ok()
        self.assertEqual(h.s.abandoned, [])
        self.assertEqual(h.db.names().count("register"), 1)

    def test_claim_unavailable_stops_claims_until_a_beat_gets_through(self) -> None:
        h = self.started(free=1)
        h.db.refuse("claim", unavailable())
        h.c.want_claim()
        self.assertEqual(h.db.names().count("claim"), 1)
        h.beat_ok()
        self.assertEqual(h.db.names().count("claim"), 2)

    def test_takeover_adopts_running_jobs_of_the_dead(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.db.answer("renew", True)
        taken = TakenOver(
            dead="h2/7/abc",
            dead_host="h2",
            requeued=("q1",),
            host_lost=("l1",),
            adopted=(Claimed(job("j1"), 4), Claimed(job("j2", "cleaning"), 2, "stop")),
        )
        self.assertEqual(h.db.pending("take_over")[0].args, (h.c.owner, "h1", T0))
        h.db.answer("take_over", taken)
        reason = "daemon h2/7/abc on h2 lost (its lease expired)"
        self.assertEqual(h.s.interrupted, [("j1", 4, reason, None), ("j2", 2, reason, "stop")])
        self.assertEqual(h.c.takeovers, 1)
        self.assertEqual(len(h.db.pending("claim")), 1)  # requeued jobs: claim
        h.db.answer("take_over", None)
        self.assertEqual(h.db.pending("take_over"), [])

    def test_at_most_some_takeovers_per_beat(self) -> None:
        h = self.started()
        h.db.answer("renew", True)
        for i in range(TAKEOVERS_PER_BEAT):
            h.db.answer("take_over", TakenOver(f"d{i}", "h2", (), (), ()))
        self.assertEqual(h.db.pending("take_over"), [])
        self.assertEqual(h.c.takeovers, TAKEOVERS_PER_BEAT)
        h.clock.advance(3.0)
        h.db.answer("renew", True)
        self.assertEqual(len(h.db.pending("take_over")), 1)

    def test_notifications(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.beat_ok()
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
        h.beat_ok()
        with capturedLogs() as logs:
            h.c.notified("txvmbot_backends", "b")
            h.db.refuse("backends", unavailable())
        self.assertEqual(h.s.draining, [])
        self.assertTrue(any(e["log_level"] == LogLevel.warn for e in logs))

    def test_listening_again_claims(self) -> None:
        h = self.started(free=1)
        h.db.answer("claim", [])
        h.beat_ok()
        up: list[bool] = []
        h.c.on_listening = lambda: up.append(True)
        h.c.listening(False, "connection lost")
        self.assertEqual(h.db.pending(), [])
        h.c.listening(True, "")
        self.assertEqual(up, [True])
        self.assertEqual(len(h.db.pending("claim")), 1)

    def test_stop_ends_the_lease_and_the_loops(self) -> None:
        h = ClusterHarness(free=1, claim_interval=1.0)
        self.successResultOf(h.start())
        h.db.answer("claim", [])
        h.beat_ok()
        owner = h.c.owner
        d = h.c.stop()
        h.db.answer("unregister", None)
        self.successResultOf(d)
        h.clock.advance(30)
        h.c.want_claim()
        self.assertEqual(h.db.pending(), [])
        self.assertEqual(h.db.calls[-1].args, (owner,))
        self.assertEqual(h.clock.getDelayedCalls(), [])
