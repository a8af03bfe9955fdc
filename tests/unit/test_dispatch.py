"""The dispatcher as its own part: what the front ends and the cluster drive
(IDispatcher), and the SQLite front end put over a dispatcher built
elsewhere (as the daemon wires them: txvmbot.daemon.parts)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.deferreds import result_of
from txvmbot.daemon.interfaces import IDispatcher, IJobQueue, IScheduler
from txvmbot.daemon.jobs import JobEvent
from txvmbot.daemon.scheduling.dispatch import Dispatcher
from txvmbot.daemon.scheduling.localqueue import LocalQueue
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.errors import UnknownJob
from txvmbot.journal import MemoryJournal
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SQLiteJobStore.memory(clock=self.clock.seconds)
        self.pool = FakeWorkerPool(1)
        self.d = Dispatcher(
            self.clock, self.store, self.pool, MemoryJournal(self.clock.seconds),
            cleaner=RecordingCleaner(), wall=self.clock.seconds,
        )
        ids = iter(f"j{i}" for i in range(100))
        self.front = Scheduler.over(
            self.clock, LocalQueue(self.store, self.d), self.d, new_id=lambda: next(ids),
            wall=self.clock.seconds,
        )

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(IDispatcher, self.d))
        self.assertTrue(verifyObject(IScheduler, self.front))
        self.assertTrue(verifyObject(IJobQueue, self.front.queue))
        self.assertIs(self.front.dispatcher, self.d)

    def test_a_submit_through_the_front_end_is_held_and_run_by_the_dispatcher(self) -> None:
        job = result_of(self.front.submit(make_job_spec("b")))
        self.assertTrue(self.d.holds(job.id))
        self.assertEqual(list(self.pool.running), [job.id])
        held = self.d.holding(job.id)
        assert held is not None
        self.assertEqual(held.state, "running")
        self.assertEqual(result_of(self.front.get(job.id)), held)

    def test_follow_tells_new_events_of_held_jobs_only(self) -> None:
        self.assertIsNone(self.d.follow("nope", lambda e: None))
        job = result_of(self.front.submit(make_job_spec("b")))
        seen: list[JobEvent] = []
        stop = self.d.follow(job.id, seen.append)
        assert stop is not None
        self.pool.step(job.id, "keypair")
        self.assertEqual([(e.kind, e.step) for e in seen], [("step", "keypair")])
        stop()
        self.pool.finish(job.id)
        self.assertEqual(len(seen), 1)

    def test_cancel_of_a_job_not_held_fails_in_the_dispatcher_not_the_front(self) -> None:
        self.failureResultOf(self.d.cancel("nope"), UnknownJob)
        job = result_of(self.front.submit(make_job_spec("b")))
        self.pool.finish(job.id)
        self.failureResultOf(self.d.cancel(job.id), UnknownJob)
        self.assertEqual(result_of(self.front.cancel(job.id)).state, "passed")
