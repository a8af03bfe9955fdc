"""Tests for txvmbot.daemon.scheduling.scheduler, driven by the FakeWorkerPool."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.deferreds import result_of
from tests.support.scheduler_harness import T0, Harness
from txvmbot.daemon.interfaces import IScheduler, IWorkerPool
from txvmbot.daemon.jobs import FINAL_STATES, BackendStatus, DaemonStatus, Job, JobEvent
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore, StoreError
from txvmbot.errors import ConfigError, UnknownJob
from txvmbot.model import FailureKind, StepEvent
from txvmbot.testing import RecordingCleaner, make_job_spec


class CountingStore(SQLiteJobStore):
    """Records how many jobs each add_many stored."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.batches: list[int] = []

    def add_many(self, submits: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        self.batches.append(len(submits))
        return super().add_many(submits)


class LateEventsStore(SQLiteJobStore):
    """Answers ``events`` only when the test says so (as a database
    would), with what is stored then."""

    def __init__(self, path: str, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.reads: list[tuple[str, int, Deferred[Sequence[JobEvent]]]] = []

    def events(self, job_id: str, after_seq: int = 0) -> Deferred[Sequence[JobEvent]]:
        d: Deferred[Sequence[JobEvent]] = Deferred()
        self.reads.append((job_id, after_seq, d))
        return d

    def answer(self) -> None:
        job_id, after_seq, d = self.reads.pop(0)
        d.callback(self.sync.events(job_id, after_seq))


class UpdateFailsStore(SQLiteJobStore):
    """Stores jobs; cannot update them (a disk that filled up)."""

    def update(self, job: Job) -> None:
        raise StoreError(self.path, f"cannot update job {job.id}: database or disk is full")


class BasicsTests(SynchronousTestCase):
    def test_interfaces(self) -> None:
        h = Harness()
        self.assertTrue(verifyObject(IScheduler, h.s))
        self.assertTrue(verifyObject(IWorkerPool, h.pool))

    def test_submit_stores_and_starts(self) -> None:
        h = Harness()
        job = h.submit()
        self.assertEqual((job.id, job.state, job.submitted), ("j0", "queued", T0))
        self.assertEqual(h.running(), ["j0"])
        run = h.pool.get("j0")
        self.assertEqual((run.job.state, run.job.attempts, run.job.started), ("running", 1, T0))
        self.assertIs(run.journal, h.journal)
        self.assertEqual(h.store.sync.get("j0"), run.job)
        self.assertEqual(h.events("j0"), [("state", "queued", ""), ("state", "running", "")])
        h.clock.advance(5)
        h.pool.finish("j0")
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.finished), ("passed", T0 + 5))
        assert job.result is not None
        self.assertEqual(job.result.check_id, "j0-1")
        self.assertEqual(h.store.sync.get("j0"), job)
        self.assertEqual([e.seq for e in h.store.sync.events("j0")], [1, 2, 3])

    def test_submit_many_stores_once_and_refuses_one_alone(self) -> None:
        store = CountingStore.memory()
        h = Harness(size=1, caps={"b": 2}, store=store)
        out = result_of(h.s.submit_many(
            [make_job_spec("b"), make_job_spec("b", parallel=3), make_job_spec("b", priority=5)]
        ))
        self.assertEqual(store.batches, [2])
        self.assertEqual([r.id for r in out if isinstance(r, Job)], ["j0", "j1"])
        err = out[1]
        assert isinstance(err, ConfigError)
        self.assertEqual(err.where, "job.parallel")
        self.assertIn("at most 2 instances", err.message)
        # Both stored with their queued event; the one free worker took the
        # higher priority, though it came later in the batch.
        self.assertEqual(h.running(), ["j1"])
        self.assertEqual(h.events("j0"), [("state", "queued", "")])
        self.assertEqual(h.s.status_now().queue_depth, 1)

    def test_submit_many_answers_once_stored_whatever_starting_does(self) -> None:
        """Stored and queued is what a submit promises: the store failing
        to record a job's start afterwards is logged, not thrown at the
        submitters (who would resubmit and double their jobs)."""
        store = UpdateFailsStore.memory()
        h = Harness(store=store)
        with capturedLogs() as events:
            out = result_of(h.s.submit_many([make_job_spec("b"), make_job_spec("b")]))
        self.assertEqual([j.id for j in out if isinstance(j, Job)], ["j0", "j1"])
        self.assertEqual([j.id for j in store.sync.unfinished()], ["j0", "j1"])
        failures = [e for e in events if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(StoreError))
        self.flushLoggedErrors(StoreError)

    def test_submit_many_queues_nothing_when_the_store_fails(self) -> None:
        h = Harness()
        h.store.sync.close()
        self.failureResultOf(h.s.submit_many([make_job_spec("b"), make_job_spec("b")]), StoreError)
        self.assertEqual((h.running(), h.s.status_now().queue_depth), ([], 0))

    def test_failed_check(self) -> None:
        h = Harness()
        h.submit()
        h.pool.finish("j0", passed=False, error="step 'ssh' failed: exit 1")
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.reason), ("failed", "step 'ssh' failed: exit 1"))

    def test_get_and_list(self) -> None:
        h = Harness(size=1)
        for _ in range(3):
            h.submit()
            h.clock.advance(1)
        h.submit("other")
        self.failureResultOf(h.s.get("nope"), UnknownJob)
        self.assertEqual([j.id for j in result_of(h.s.list())], ["j3", "j2", "j1", "j0"])
        self.assertEqual([j.id for j in result_of(h.s.list(states={"queued"}, backend="b"))], ["j2", "j1"])
        self.assertEqual([j.id for j in result_of(h.s.list(limit=1))], ["j3"])
        self.assertEqual([j.id for j in result_of(h.s.list(before="j2"))], ["j1", "j0"])
        self.assertEqual([j.id for j in result_of(h.s.list(before="j2", limit=1))], ["j1"])
        self.assertEqual(result_of(h.s.list(before="j0")), [])
        self.failureResultOf(h.s.list(before="nope"), UnknownJob)

    def test_step_events_and_cleaning(self) -> None:
        h = Harness()
        h.submit()
        seen: list[JobEvent] = []
        result_of(h.s.watch("j0", 0, seen.append))
        h.pool.step("j0", "create keypair", "running")
        h.pool.step("j0", "create keypair", "passed", "kp-1")
        self.assertEqual(h.state("j0"), "running")
        h.pool.step("j0", "cleanup instance i-1", "running")
        self.assertEqual(h.state("j0"), "cleaning")
        h.pool.step("j0", "cleanup keypair kp-1", "passed")
        h.pool.finish("j0")
        self.assertEqual(
            [(e.seq, e.kind, e.state, e.step) for e in seen],
            [
                (1, "state", "queued", ""),
                (2, "state", "running", ""),
                (3, "step", "running", "create keypair"),
                (4, "step", "passed", "create keypair"),
                (5, "state", "cleaning", ""),
                (6, "step", "running", "cleanup instance i-1"),
                (7, "step", "passed", "cleanup keypair kp-1"),
                (8, "state", "passed", ""),
            ],
        )
        self.assertEqual(seen, h.store.sync.events("j0"))
        self.assertEqual(seen[3].detail, "kp-1")

    def test_late_step_event_ignored(self) -> None:
        h = Harness()
        h.submit()
        run = h.pool.get("j0")
        run.finish()
        run.on_event(make_step("late"))
        self.assertEqual(len(h.store.sync.events("j0")), 3)

    def test_state_changes_logged_at_info(self) -> None:
        h = Harness()
        with capturedLogs() as events:
            h.submit()
            h.pool.finish("j0")
        text = [(e["log_level"], formatEvent(e)) for e in events]
        self.assertIn((LogLevel.info, "Job j0 queued -> running"), text)
        self.assertIn((LogLevel.info, "Job j0 running -> passed"), text)


def make_step(name: str) -> StepEvent:
    return StepEvent(name=name, state="running", at=0.0)


class OrderTests(SynchronousTestCase):
    def test_priority_then_fifo(self) -> None:
        h = Harness(size=1)
        h.submit()  # takes the only worker
        for p in (0, 5, 0, 5, -1, 5):
            h.submit(priority=p)
        order = []
        while h.pool.running:
            (job_id,) = h.running()
            order.append(job_id)
            h.pool.finish(job_id)
        self.assertEqual(order, ["j0", "j2", "j4", "j6", "j1", "j3", "j5"])

    def test_priority_across_backends(self) -> None:
        h = Harness(size=1)
        h.submit("a")
        h.submit("a", priority=1)
        h.clock.advance(1)
        h.submit("b", priority=1)
        h.submit("b", priority=9)
        order = []
        while h.pool.running:
            (job_id,) = h.running()
            order.append(job_id)
            h.pool.finish(job_id)
        self.assertEqual(order, ["j0", "j3", "j1", "j2"])

    def test_fifo_by_submitted_time_as_number(self) -> None:
        """Recovered queued jobs run by submitted time, compared as numbers
        (seed 004), whatever order they were stored in."""
        store = SQLiteJobStore.memory()
        for job_id, t in (("a", 10.0), ("b", 9.5), ("c", 1000000000.0), ("d", 999999999.0)):
            store.add(Job(id=job_id, spec=make_job_spec("b"), state="queued", submitted=t))
        h = Harness(size=1, store=store)
        h.s.dispatcher.recover()
        order = []
        while h.pool.running:
            (job_id,) = h.running()
            order.append(job_id)
            h.pool.finish(job_id)
        self.assertEqual(order, ["b", "a", "d", "c"])

    def test_caps_per_backend(self) -> None:
        h = Harness(size=4, caps={"a": 1, "b": 2})
        for _ in range(3):
            h.submit("a")
        for _ in range(3):
            h.submit("b")
        self.assertEqual(h.running(), ["j0", "j3", "j4"])
        st = {b.name: b for b in h.s.status_now().backends}
        self.assertEqual(st["a"], BackendStatus("a", 1, 1, 2, "active", instances=1))
        self.assertEqual(st["b"], BackendStatus("b", 2, 2, 1, "active", instances=2))
        # A job for an uncapped backend takes the idle worker.
        h.submit("c")
        self.assertEqual(h.running(), ["j0", "j3", "j4", "j6"])
        h.pool.finish("j0")
        self.assertEqual(h.running(), ["j3", "j4", "j6", "j1"])
        h.pool.finish("j3")
        self.assertEqual(h.running(), ["j4", "j6", "j1", "j5"])

    def test_caps_count_instances_not_jobs(self) -> None:
        """A cap is instances per cloud: a job with parallel=3 takes three
        places, and the head of the queue is not overtaken by smaller jobs."""
        h = Harness(size=4, caps={"a": 4})
        h.submit("a", parallel=3)
        h.submit("a", parallel=2)
        h.submit("a", parallel=1)
        self.assertEqual(h.running(), ["j0"])
        (st,) = h.s.status_now().backends
        self.assertEqual((st.running, st.instances, st.queued), (1, 3, 2))
        h.pool.finish("j0")
        self.assertEqual(h.running(), ["j1", "j2"])

    def test_job_larger_than_its_backend_cap_is_refused(self) -> None:
        h = Harness(size=4, caps={"a": 2})
        with self.assertRaises(ConfigError) as e:
            h.submit("a", parallel=3)
        self.assertEqual(e.exception.where, "job.parallel")
        self.assertIn("at most 2 instances", str(e.exception))
        self.assertEqual(result_of(h.s.list()), [])

    def test_default_cap(self) -> None:
        h = Harness(size=8, default_cap=3)
        for _ in range(5):
            h.submit()
        self.assertEqual(len(h.running()), 3)

    def test_never_idle_200_jobs_4_workers(self) -> None:
        h = Harness(size=4)
        rnd = random.Random(2)
        unfinished = 0
        finished = 0
        for _ in range(200):
            h.submit(priority=rnd.randint(0, 3))
            unfinished += 1
            self.assertEqual(h.pool.busy, min(4, unfinished))
        while h.pool.running:
            job_id = rnd.choice(h.running())
            h.pool.finish(job_id, passed=rnd.random() < 0.8)
            unfinished -= 1
            finished += 1
            self.assertEqual(h.pool.busy, min(4, unfinished))
            status = h.s.status_now()
            self.assertEqual(status.busy_workers, min(4, unfinished))
            self.assertEqual(status.queue_depth, max(0, unfinished - 4))
        self.assertEqual(finished, 200)
        self.assertEqual(result_of(h.s.list(states={"queued", "running", "cleaning"})), [])

    def test_pool_that_answers_at_once(self) -> None:
        """A pool whose Deferred fires inside run() does not recurse into
        dispatch; every job still runs, in order."""
        h = Harness(size=1)
        real_run = h.pool.run
        order = []

        def run(job: Job, on_event: Any, journal: Any) -> Deferred[Any]:
            d = real_run(job, on_event, journal)
            order.append(job.id)
            h.pool.finish(job.id)
            return d

        h.pool.run = run  # type: ignore[method-assign]
        result_of(h.s.drain("b"))
        for _ in range(50):
            h.submit()
        h.s.resume("b")
        self.assertEqual(order, [f"j{i}" for i in range(50)])
        self.assertEqual({j.state for j in result_of(h.s.list(limit=100))}, {"passed"})


class CancelTests(SynchronousTestCase):
    def test_cancel_queued(self) -> None:
        h = Harness(size=1)
        h.submit()
        h.submit()
        h.submit()
        d = h.s.cancel("j1")
        job = self.successResultOf(d)
        self.assertEqual((job.state, job.reason), ("cancelled", "cancelled by request"))
        self.assertEqual(h.store.sync.get("j1"), job)
        h.pool.finish("j0")
        self.assertEqual(h.running(), ["j2"])
        h.pool.finish("j2")
        self.assertEqual([r.job.id for r in h.pool.runs], ["j0", "j2"])
        self.assertEqual(h.s.status_now().queue_depth, 0)

    def test_cancel_running_waits_for_the_pool(self) -> None:
        h = Harness()
        h.submit()
        d = h.s.cancel("j0")
        self.assertNoResult(d)
        self.assertEqual(h.pool.cancels, [("j0", "cancelled by request")])
        self.assertEqual(h.state("j0"), "running")
        # Cancelling again asks the pool once.
        d2 = h.s.cancel("j0")
        self.assertEqual(len(h.pool.cancels), 1)
        h.pool.step("j0", "cleanup instance i-1", "passed")
        self.assertEqual(h.state("j0"), "cleaning")
        h.pool.get("j0").finish_cancelled()
        job = self.successResultOf(d)
        self.assertEqual(self.successResultOf(d2), job)
        self.assertEqual((job.state, job.reason), ("cancelled", "cancelled by request"))
        assert job.result is not None
        self.assertEqual(h.events("j0")[-1], ("state", "cancelled", ""))

    def test_cancel_running_pool_fails_with_cancelled_error(self) -> None:
        h = Harness()
        h.submit()
        d = h.s.cancel("j0", reason="operator said so")
        h.pool.get("j0").fail(CancelledError())
        job = self.successResultOf(d)
        self.assertEqual((job.state, job.reason), ("cancelled", "operator said so"))

    def test_cancelled_job_that_passed_first(self) -> None:
        h = Harness()
        h.submit()
        d = h.s.cancel("j0")
        h.pool.finish("j0", passed=True)
        self.assertEqual(self.successResultOf(d).state, "passed")

    def test_cancel_final_and_unknown(self) -> None:
        h = Harness()
        h.submit()
        h.pool.finish("j0")
        self.assertEqual(self.successResultOf(h.s.cancel("j0")).state, "passed")
        self.assertEqual(h.pool.cancels, [])
        self.failureResultOf(h.s.cancel("nope"), UnknownJob)

    def test_bound_cancels(self) -> None:
        h = Harness(size=1)
        h.submit(bound=30)
        h.submit(bound=30)
        h.clock.advance(29)
        self.assertEqual(h.pool.cancels, [])
        h.clock.advance(1)
        self.assertEqual(h.pool.cancels, [("j0", "passed its bound of 30s")])
        # The queued job's bound has not started.
        h.clock.advance(100)
        self.assertEqual(len(h.pool.cancels), 1)
        h.pool.get("j0").finish_cancelled()
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.reason), ("cancelled", "passed its bound of 30s"))
        self.assertEqual(h.running(), ["j1"])
        h.pool.finish("j1")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_finished_job_leaves_no_timer(self) -> None:
        h = Harness()
        h.submit(bound=30)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)
        h.pool.finish("j0")
        self.assertEqual(h.clock.getDelayedCalls(), [])
        h.clock.advance(60)
        self.assertEqual(h.pool.cancels, [])


class InfrastructureTests(SynchronousTestCase):
    def test_worker_died_cleaned_retried_then_error(self) -> None:
        h = Harness(size=1)
        h.submit(max_attempts=2)
        h.submit()
        with capturedLogs() as logs:
            h.pool.die("j0", "exit status 1", "Traceback: boom")
        msg = "worker running job j0 died: exit status 1; last stderr: Traceback: boom"
        errors = [formatEvent(e) for e in logs if e["log_level"] == LogLevel.error]
        self.assertIn(f"Job j0 on b: {msg}", errors)
        self.assertEqual([j.id for j in h.cleaner.jobs], ["j0"])
        self.assertEqual(h.cleaner.jobs[0].attempts, 1)
        # Queued again, ahead of j1, which came later.
        self.assertEqual(h.running(), ["j0"])
        second = h.pool.get("j0").job
        self.assertEqual((second.attempts, second.reason), (2, ""))
        self.assertEqual(
            [s for k, s, _ in h.events("j0")],
            ["queued", "running", "cleaning", "queued", "running"],
        )
        self.assertEqual(h.store.sync.events("j0")[3].detail, msg)
        h.pool.die("j0", "exit status 1", "Traceback: boom")
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.reason, job.attempts), ("error", msg, 2))
        self.assertEqual(len(h.cleaner.jobs), 2)
        self.assertEqual(h.running(), ["j1"])

    def test_worker_freed_while_daemon_cleans(self) -> None:
        cleaner = RecordingCleaner(manual=True)
        h = Harness(size=1, cleaner=cleaner)
        h.submit(max_attempts=2)
        h.submit()
        h.pool.die("j0")
        self.assertEqual(h.state("j0"), "cleaning")
        self.assertEqual(h.running(), ["j1"])
        status = h.s.status_now()
        self.assertEqual((status.running, status.queue_depth, status.busy_workers), (2, 0, 1))
        h.pool.finish("j1")
        self.assertEqual(h.running(), [])
        cleaner.release_all()
        self.assertEqual(h.running(), ["j0"])

    def test_cancel_while_daemon_cleans(self) -> None:
        cleaner = RecordingCleaner(manual=True)
        h = Harness(cleaner=cleaner)
        h.submit(max_attempts=3)
        h.pool.die("j0")
        d = h.s.cancel("j0")
        self.assertEqual(h.pool.cancels, [])
        self.assertNoResult(d)
        cleaner.release_all()
        self.assertEqual(self.successResultOf(d).state, "cancelled")
        self.assertEqual(h.running(), [])

    def test_cleaner_errors_logged(self) -> None:
        h = Harness(cleaner=RecordingCleaner(("instance i-1: HTTP 500",)))
        h.submit(max_attempts=1)
        with capturedLogs() as logs:
            h.pool.die("j0")
        errors = [formatEvent(e) for e in logs if e["log_level"] == LogLevel.error]
        self.assertTrue(any("instance i-1: HTTP 500" in e for e in errors), errors)
        self.assertEqual(h.state("j0"), "error")

    def test_cleaner_that_fails(self) -> None:
        h = Harness(cleaner=None)
        h.s.dispatcher._cleaner = lambda job: _raise(RuntimeError("journal gone"))
        h.submit(max_attempts=1)
        h.pool.die("j0")
        self.assertEqual(h.state("j0"), "error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_pool_failure_is_infrastructure(self) -> None:
        h = Harness()
        h.submit(max_attempts=1)
        h.pool.get("j0").fail(ConnectionError("amp connection lost"))
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.reason), ("error", "ConnectionError: amp connection lost"))
        self.assertEqual(len(self.flushLoggedErrors(ConnectionError)), 1)
        self.assertEqual(h.s.status_now().backends[0].consecutive_failures, 1)

    def test_pool_run_raises(self) -> None:
        h = Harness()

        def broken(job: Job, on_event: Any, journal: Any) -> Deferred[Any]:
            raise RuntimeError("no worker")

        h.pool.run = broken  # type: ignore[method-assign]
        h.submit(max_attempts=2)
        job = result_of(h.s.get("j0"))
        self.assertEqual((job.state, job.attempts), ("error", 2))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class FakeHealthCheck:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: list[Deferred[bool]] = []

    def __call__(self, backend: str) -> Deferred[bool]:
        self.calls.append(backend)
        d: Deferred[bool] = Deferred()
        self.pending.append(d)
        return d

    def answer(self, ok: bool) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(ok)


class BackendTests(SynchronousTestCase):
    def quarantined(self, **kw: Any) -> tuple[Harness, FakeHealthCheck]:
        hc = FakeHealthCheck()
        h = Harness(size=2, quarantine_after=3, health_check=hc, health_interval=60, **kw)
        for i in range(3):
            h.submit("a", max_attempts=1)
            with capturedLogs():
                h.pool.die(f"j{i}")
        return h, hc

    def backend(self, h: Harness, name: str) -> BackendStatus:
        return {b.name: b for b in h.s.status_now().backends}[name]

    def test_quarantine_and_health_check(self) -> None:
        h, hc = self.quarantined()
        st = self.backend(h, "a")
        self.assertEqual((st.state, st.consecutive_failures), ("quarantined", 3))
        self.assertIn("3 infrastructure failures in a row", st.reason)
        self.assertIn("worker running job j2 died", st.reason)
        h.submit("a")  # j3 waits
        h.submit("b")  # j4 runs
        self.assertEqual(h.running(), ["j4"])
        self.assertEqual(hc.calls, [])
        h.clock.advance(60)
        self.assertEqual(hc.calls, ["a"])
        hc.answer(False)
        st = self.backend(h, "a")
        self.assertEqual(st.state, "quarantined")
        self.assertIn("health check did not pass", st.reason)
        self.assertEqual(h.running(), ["j4"])
        h.clock.advance(60)
        self.assertEqual(hc.calls, ["a", "a"])
        hc.answer(True)
        st = self.backend(h, "a")
        self.assertEqual((st.state, st.consecutive_failures, st.reason), ("active", 0, ""))
        self.assertEqual(h.running(), ["j4", "j3"])
        h.clock.advance(600)
        self.assertEqual(hc.calls, ["a", "a"])

    def test_health_check_error_keeps_quarantine(self) -> None:
        h, hc = self.quarantined()
        h.clock.advance(60)
        hc.pending.pop().errback(RuntimeError("cloud down"))
        st = self.backend(h, "a")
        self.assertEqual(st.state, "quarantined")
        self.assertIn("health check failed: RuntimeError: cloud down", st.reason)
        h.clock.advance(60)
        self.assertEqual(len(hc.calls), 2)

    def test_infrastructure_results_quarantine_and_success_resets(self) -> None:
        h = Harness(quarantine_after=2)
        h.submit("a")
        h.pool.finish("j0", passed=False, error="TransportError: RunInstances: reset",
                      kind=FailureKind.INFRASTRUCTURE)
        self.assertEqual(self.backend(h, "a").consecutive_failures, 1)
        h.submit("a")
        h.pool.finish("j1", passed=False, error="step 'ssh' failed: exit 1")
        self.assertEqual(self.backend(h, "a").consecutive_failures, 0)
        h.submit("a")
        h.pool.finish("j2", passed=False, error="RunInstances: HTTP 503 x: y",
                      kind=FailureKind.INFRASTRUCTURE)
        h.submit("a")
        h.pool.finish("j3", passed=False, error="gave up after 6 attempts",
                      kind=FailureKind.INFRASTRUCTURE)
        st = self.backend(h, "a")
        self.assertEqual(st.state, "quarantined")
        self.assertEqual(result_of(h.s.get("j3")).state, "failed")
        # Without a health check only the operator lifts it.
        h.clock.advance(3600)
        self.assertEqual(self.backend(h, "a").state, "quarantined")
        st = self.successResultOf(h.s.resume("a"))
        self.assertEqual(st.state, "active")

    def test_resume_quarantined_runs_health_check(self) -> None:
        h, hc = self.quarantined()
        h.submit("a")
        d = h.s.resume("a")
        self.assertEqual(hc.calls, ["a"])
        self.assertNoResult(d)
        d2 = h.s.resume("a")  # shares the check in flight
        self.assertEqual(hc.calls, ["a"])
        hc.answer(False)
        st = self.successResultOf(d)
        self.assertEqual(self.successResultOf(d2), st)
        self.assertEqual(st.state, "quarantined")
        self.assertIn("health check did not pass", st.reason)
        self.assertEqual(h.running(), [])
        d = h.s.resume("a")
        hc.answer(True)
        self.assertEqual(self.successResultOf(d).state, "active")
        self.assertEqual(h.running(), ["j3"])

    def test_drain_and_resume(self) -> None:
        h = Harness(size=4)
        h.submit("a")
        h.submit("a")
        st = result_of(h.s.drain("a"))
        self.assertEqual((st.state, st.running), ("draining", 2))
        h.submit("a")
        h.submit("b")
        self.assertEqual(h.running(), ["j0", "j1", "j3"])
        # Running jobs finish normally.
        h.pool.finish("j0")
        h.pool.finish("j1")
        self.assertEqual(result_of(h.s.get("j1")).state, "passed")
        self.assertEqual(h.running(), ["j3"])
        self.assertEqual(self.backend(h, "a"), BackendStatus("a", 4, 0, 1, "draining"))
        st = self.successResultOf(h.s.resume("a"))
        self.assertEqual(st.state, "active")
        self.assertEqual(h.running(), ["j3", "j2"])

    def test_drain_unknown_backend_first(self) -> None:
        h = Harness()
        result_of(h.s.drain("later"))
        h.submit("later")
        self.assertEqual(h.running(), [])
        self.assertEqual(self.backend(h, "later").state, "draining")

    def test_drain_while_quarantined(self) -> None:
        h, hc = self.quarantined()
        result_of(h.s.drain("a"))
        self.assertEqual(self.backend(h, "a").state, "quarantined")
        h.clock.advance(60)
        hc.answer(True)
        self.assertEqual(self.backend(h, "a").state, "draining")

    def test_status(self) -> None:
        h = Harness(size=3, caps={"a": 1, "z": 2})
        h.submit("a")
        h.submit("a")
        h.submit("b", priority=1)
        h.submit("b")
        self.assertEqual(
            h.s.status_now(),
            DaemonStatus(
                api_version=1,
                workers=3,
                busy_workers=3,
                queue_depth=1,
                running=3,
                backends=(
                    BackendStatus("a", 1, 1, 1, "active", instances=1),
                    BackendStatus("b", 4, 2, 0, "active", instances=2),
                    BackendStatus("z", 2, 0, 0, "active"),
                ),
            ),
        )

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, Harness, caps={"a": 0})
        self.assertRaises(ValueError, Harness, quarantine_after=0)


class WatchTests(SynchronousTestCase):
    def test_replay_live_unsubscribe(self) -> None:
        h = Harness()
        h.submit()
        h.pool.step("j0", "create keypair", "running")
        seen: list[JobEvent] = []
        stop = result_of(h.s.watch("j0", 1, seen.append))
        self.assertEqual([e.seq for e in seen], [2, 3])
        h.pool.step("j0", "create keypair", "passed")
        self.assertEqual([e.seq for e in seen], [2, 3, 4])
        stop()
        stop()
        h.pool.step("j0", "run instance", "running")
        self.assertEqual([e.seq for e in seen], [2, 3, 4])

    def test_events_while_the_stored_ones_are_read_follow_them_once(self) -> None:
        """A store that answers later: the watcher is subscribed first, so
        an event that happens during the read is told after the stored
        ones, and one both read and seen live is told once."""
        store = LateEventsStore.memory()
        h = Harness(store=store)
        h.submit()  # seq 1 queued, 2 running
        seen: list[JobEvent] = []
        watching = h.s.watch("j0", 0, seen.append)
        self.assertNoResult(watching)
        h.pool.step("j0", "create keypair", "running")  # seq 3, during the read
        self.assertEqual(seen, [])
        assert isinstance(store, LateEventsStore)
        store.answer()  # the read saw 1..3
        stop = self.successResultOf(watching)
        self.assertEqual([e.seq for e in seen], [1, 2, 3])
        h.pool.step("j0", "create keypair", "passed")
        self.assertEqual([e.seq for e in seen], [1, 2, 3, 4])
        stop()

    def test_ends_with_final_event(self) -> None:
        h = Harness()
        h.submit()
        seen: list[JobEvent] = []
        result_of(h.s.watch("j0", 0, seen.append))
        h.pool.finish("j0")
        self.assertEqual(seen[-1].state, "passed")
        self.assertTrue(seen[-1].state in FINAL_STATES)
        later: list[JobEvent] = []
        stop = result_of(h.s.watch("j0", 0, later.append))
        self.assertEqual(later, seen)
        stop()

    def test_observers_see_every_event_of_every_job_with_the_job(self) -> None:
        h = Harness()
        seen: list[tuple[str, str, str, str]] = []
        stop = h.s.observe(lambda job, e: seen.append((job.id, job.state, e.kind, e.state)))
        h.submit()
        h.submit()
        h.pool.step("j0", "boot", "running")
        h.pool.finish("j0")
        self.assertEqual(seen[:2], [("j0", "queued", "state", "queued"), ("j0", "running", "state", "running")])
        self.assertIn(("j1", "queued", "state", "queued"), seen)
        self.assertIn(("j0", "running", "step", "running"), seen)
        self.assertEqual(seen[-1], ("j0", "passed", "state", "passed"))
        stop()
        stop()
        h.pool.finish("j1")
        self.assertNotIn("j1", {j for j, _, _, st in seen if st == "passed"})

    def test_an_observer_that_raises_is_dropped(self) -> None:
        h = Harness()
        calls: list[str] = []

        def broken(job: Job, e: JobEvent) -> None:
            calls.append(e.state)
            raise RuntimeError("observer bug")

        h.s.observe(broken)
        h.submit()
        h.pool.finish("j0")
        self.assertEqual(calls, ["queued"])
        self.assertEqual(h.state("j0"), "passed")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_two_watchers_and_unknown(self) -> None:
        h = Harness()
        h.submit()
        a: list[JobEvent] = []
        b: list[JobEvent] = []
        result_of(h.s.watch("j0", 0, a.append))
        result_of(h.s.watch("j0", 2, b.append))
        h.pool.finish("j0")
        self.assertEqual(a[2:], b)
        self.failureResultOf(h.s.watch("nope", 0, a.append), UnknownJob)

    def test_listener_that_raises_is_dropped(self) -> None:
        h = Harness()
        h.submit()
        calls: list[int] = []

        def bad(event: JobEvent) -> None:
            calls.append(event.seq)
            raise ValueError("client gone")

        good: list[JobEvent] = []
        result_of(h.s.watch("j0", 2, bad))
        result_of(h.s.watch("j0", 2, good.append))
        h.pool.step("j0", "x")
        h.pool.step("j0", "y")
        self.assertEqual(calls, [3])
        self.assertEqual([e.seq for e in good], [3, 4])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_unsubscribe_from_inside_listener(self) -> None:
        h = Harness()
        h.submit()
        seen: list[int] = []
        stops: list[Callable[[], None]] = []

        def once(event: JobEvent) -> None:
            seen.append(event.seq)
            stops[0]()

        stops.append(result_of(h.s.watch("j0", 2, once)))
        h.pool.step("j0", "x")
        h.pool.step("j0", "y")
        self.assertEqual(seen, [3])


class RecoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "jobs.sqlite")

    def test_crash_and_recover(self) -> None:
        first = Harness(size=2, store=SQLiteJobStore(self.path))
        first.submit(max_attempts=2)  # j0: running, will be retried
        first.submit(max_attempts=1)  # j1: cleaning, attempts used up
        first.submit(priority=0)  # j2: queued
        first.submit(priority=3)  # j3: queued, higher priority
        first.pool.step("j1", "cleanup instance i-1")
        self.assertEqual(
            [first.state(j) for j in ("j0", "j1", "j2", "j3")],
            ["running", "cleaning", "queued", "queued"],
        )
        events_before = {j: len(first.store.sync.events(j)) for j in ("j0", "j1")}
        # The daemon dies: nothing is closed, stopped or told.
        first.store.sync.close()

        cleaner = RecordingCleaner(manual=True)
        second = Harness(size=2, store=SQLiteJobStore(self.path), cleaner=cleaner, ids="k")
        with capturedLogs() as logs:
            d = second.s.dispatcher.recover()
        errors = [formatEvent(e) for e in logs if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 2, errors)
        self.assertEqual(sorted(j.id for j in cleaner.jobs), ["j0", "j1"])
        # The queued ones run at once, in order; the interrupted wait for cleanup.
        self.assertEqual(second.running(), ["j3", "j2"])
        self.assertEqual(second.state("j0"), "cleaning")
        self.assertNoResult(d)
        cleaner.release_all()
        self.assertIsNone(self.successResultOf(d))
        j0, j1 = result_of(second.s.get("j0")), result_of(second.s.get("j1"))
        self.assertEqual((j0.state, j0.reason), ("queued", "daemon restarted"))
        self.assertEqual((j1.state, j1.reason), ("error", "daemon restarted"))
        # Events carry on from where the dead daemon stopped.
        self.assertEqual(
            [(e.seq, e.state, e.detail) for e in second.store.sync.events("j1", events_before["j1"])],
            [
                (events_before["j1"] + 1, "cleaning", "daemon restarted"),
                (events_before["j1"] + 2, "error", "daemon restarted"),
            ],
        )
        second.pool.finish("j3")
        self.assertEqual(second.running(), ["j2", "j0"])
        self.assertEqual(second.pool.get("j0").job.attempts, 2)
        second.pool.finish_all()
        states = {j.id: j.state for j in result_of(second.s.list())}
        self.assertEqual(states, {"j0": "passed", "j1": "error", "j2": "passed", "j3": "passed"})
        # New ids do not collide with the recovered ones.
        self.assertEqual(second.submit().id, "k0")

    def test_recover_is_idempotent_and_empty(self) -> None:
        h = Harness()
        self.assertIsNone(self.successResultOf(h.s.dispatcher.recover()))
        h.submit()
        self.successResultOf(h.s.dispatcher.recover())
        self.assertEqual(h.running(), ["j0"])
        self.assertEqual(len(h.pool.runs), 1)

    def test_stop_leaves_cancelled_jobs_for_recovery(self) -> None:
        h = Harness(size=3)
        for _ in range(4):
            h.submit()
        self.assertIsNone(self.successResultOf(h.s.dispatcher.stop()))
        # The pool's stop cancels what runs; a result that arrives counts.
        with capturedLogs():
            h.pool.get("j0").finish(passed=False, error="cancelled: the daemon is stopping",
                                    kind=FailureKind.CANCELLED)
            h.pool.finish("j1", passed=True)
            h.pool.finish("j2", passed=False, error="step 'ssh' failed: exit 1")
        self.assertEqual(
            [h.store.sync.get(f"j{i}").state for i in range(4)],  # type: ignore[union-attr]
            ["running", "passed", "failed", "queued"],
        )
        self.assertEqual(h.running(), [])

    def test_stop_then_recover(self) -> None:
        store = SQLiteJobStore(self.path)
        first = Harness(size=1, store=store)
        first.submit(bound=30)
        first.submit()
        first.s.dispatcher.stop()
        self.assertEqual(first.clock.getDelayedCalls(), [])
        # The pool stopping kills the worker: the job is left for recovery.
        with capturedLogs():
            first.pool.die("j0", "pool stopped")
        self.assertEqual(first.state("j0"), "running")
        self.assertEqual(first.cleaner.jobs, [])
        self.assertEqual(first.running(), [])
        store.close()
        second = Harness(size=1, store=SQLiteJobStore(self.path))
        self.successResultOf(second.s.dispatcher.recover())
        # Cleaned, queued again in its old place (before j1), and started.
        self.assertEqual([j.id for j in second.cleaner.jobs], ["j0"])
        self.assertEqual(second.running(), ["j0"])
        self.assertEqual(second.pool.get("j0").job.attempts, 2)
        self.assertEqual(second.state("j1"), "queued")


# --- property: random submit / finish / kill / cancel sequences ---------------------

BACKENDS = ("a", "b", "c")
CAPS = {"a": 1, "b": 2}
SIZE = 3

ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(BACKENDS), st.integers(0, 2)),
        st.tuples(st.just("finish"), st.integers(0, 10), st.booleans()),
        st.tuples(st.just("kill"), st.integers(0, 10), st.just(False)),
        st.tuples(st.just("cancel"), st.integers(0, 40), st.just(False)),
        st.tuples(st.just("cleanup"), st.integers(0, 10), st.just(False)),
        st.tuples(st.just("tick"), st.integers(1, 100), st.just(False)),
    ),
    max_size=60,
)


class PropertyTests(SynchronousTestCase):
    def check_invariants(self, h: Harness, submitted: list[str]) -> None:
        pool = h.pool
        self.assertLessEqual(pool.busy, pool.size)
        running_by_backend: dict[str, int] = {}
        for r in pool.running.values():
            running_by_backend[r.job.spec.backend] = (
                running_by_backend.get(r.job.spec.backend, 0) + 1
            )
        for name, n in running_by_backend.items():
            self.assertLessEqual(n, CAPS.get(name, 4))
        queued_by_backend: dict[str, int] = {}
        for job_id in submitted:
            job = result_of(h.s.get(job_id))
            if job.state == "queued":
                queued_by_backend[job.spec.backend] = queued_by_backend.get(job.spec.backend, 0) + 1
            if job.state in ("running", "cleaning"):
                self.assertIn(job_id, pool.running)
        active = {b.name for b in h.s.status_now().backends if b.state == "active"}
        runnable = [
            name
            for name, q in queued_by_backend.items()
            if q and name in active and running_by_backend.get(name, 0) < CAPS.get(name, 4)
        ]
        if runnable:
            self.assertEqual(pool.busy, pool.size, (runnable, list(pool.running)))

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops)
    def test_random_sequences(self, sequence: list[tuple[str, Any, Any]]) -> None:
        h = Harness(
            size=SIZE,
            caps=CAPS,
            quarantine_after=2,
            health_check=lambda backend: succeed(True),
            health_interval=50,
        )
        submitted: list[str] = []
        with capturedLogs():
            for op, a, b in sequence:
                running = list(h.pool.running)
                if op == "submit":
                    submitted.append(result_of(h.s.submit(make_job_spec(a, priority=b, bound=150))).id)
                elif op == "finish" and running:
                    h.pool.finish(running[a % len(running)], passed=b)
                elif op == "kill" and running:
                    h.pool.die(running[a % len(running)])
                elif op == "cancel" and submitted:
                    h.s.cancel(submitted[a % len(submitted)])
                elif op == "cleanup" and running:
                    h.pool.step(running[a % len(running)], "cleanup instance i-1")
                elif op == "tick":
                    h.clock.advance(a)
                self.check_invariants(h, submitted)
            # Then the pool finishes everything; quarantines end at the
            # next health check.
            h.pool.cancel_at_once = True
            for _ in range(20):
                h.pool.finish_all()
                self.check_invariants(h, submitted)
                if all(result_of(h.s.get(j)).final for j in submitted):
                    break
                h.clock.advance(50)
        for job_id in submitted:
            job = result_of(h.s.get(job_id))
            self.assertIn(job.state, FINAL_STATES, job)
            self.assertEqual(h.store.sync.get(job_id), job)
            events = h.store.sync.events(job_id)
            self.assertEqual([e.seq for e in events], list(range(1, len(events) + 1)))
            self.assertEqual(events[-1].state, job.state)
        self.assertEqual(h.s.status_now().queue_depth, 0)
        self.assertEqual(h.s.status_now().running, 0)


def _raise(exc: BaseException) -> Deferred[tuple[str, ...]]:
    raise exc
