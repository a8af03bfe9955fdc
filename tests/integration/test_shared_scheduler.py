"""The Scheduler over a SharedQueue against a real PostgreSQL server (fixture pg_dsn): a
local Dispatcher with a fake pool writing through a real JobWriter, and
"another daemon" played by the test with store.claim and a JobWriter of
its own owner."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from txvmbot.daemon.cluster.listener import Listener
from txvmbot.daemon.interfaces import IScheduler
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.scheduling.dispatch import Dispatcher
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.scheduling.sharedqueue import SharedQueue
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import Database
from txvmbot.daemon.stores.postgres.schema import migrate
from txvmbot.daemon.stores.postgres.store import CHANNELS
from txvmbot.daemon.stores.postgres.writer import JobWriter
from txvmbot.errors import ConfigError, UnknownJob
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

#: Owner of this daemon's (the SharedQueue's) lease, and of the other one.
ME = "B"
OTHER = "A"


class Ticker:
    """A wall clock that moves on a second at each reading: submit times
    differ, so list order is the order of submits."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class SharedSchedulerTests(TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _pg(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def setUp(self) -> None:  # type: ignore[override]  # trial awaits it
        from twisted.internet import reactor

        self.reactor = reactor
        self.db = Database(reactor, self.dsn)
        self.db.start()
        self.addCleanup(self.db.stop)
        await self.db.run(migrate, self.db.where)
        self.wall = Ticker()
        self.pool = FakeWorkerPool(2)
        self.writer = self.writer_of(ME)
        self.local = Dispatcher(
            reactor,
            self.writer,  # type: ignore[arg-type]  # IJobWriter: the engine writes only
            self.pool,
            object(),
            cleaner=RecordingCleaner(),
            caps={"b": 2},
            wall=self.wall,
        )
        self.addCleanup(self.local.stop)
        jobs = itertools.count()
        self.queue = SharedQueue(reactor, self.db, self.local, self.writer, wall=self.wall)
        self.shared = Scheduler.over(
            reactor, self.queue, self.local, wall=self.wall, new_id=lambda: f"j{next(jobs)}"
        )

    def writer_of(self, owner: str) -> JobWriter:
        """A JobWriter of lease ``owner``: this daemon's, or another's."""
        w = JobWriter(self.reactor, self.db, lambda: owner, f"host-{owner}", wall=self.wall)
        self.addCleanup(w.close)
        return w

    def sql(self, statement: str, *args: object) -> Deferred[list[tuple[Any, ...]]]:
        def query(conn: Any) -> list[tuple[Any, ...]]:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else []

        return self.db.run(query)

    async def until(self, what: str, cond: Callable[[], bool], seconds: float = 10.0) -> None:
        """Wait (on the real reactor) until ``cond()``; fail after ``seconds``."""
        for _ in range(int(seconds / 0.02)):
            if cond():
                return
            await deferLater(self.reactor, 0.02, lambda: None)
        self.fail(f"waited {seconds:g}s for {what}")

    async def submit(self, n: int = 1, backend: str = "b") -> list[Job]:
        out = await self.shared.submit_many([make_job_spec(backend) for _ in range(n)])
        jobs = [j for j in out if isinstance(j, Job)]
        self.assertEqual(len(jobs), n)
        return jobs

    async def claim(self, owner: str, want: int = 1) -> list[store.Claimed]:
        def live(conn: Any) -> None:  # only a daemon with a lease claims
            conn.execute(
                "INSERT INTO daemons (owner, host, pid, started, expires) VALUES"
                " (%s, %s, 1, 0, now() + interval '1 hour') ON CONFLICT (owner) DO NOTHING",
                (owner, f"host-{owner}"),
            )

        await self.db.run(live)
        claimed: list[store.Claimed] = await self.db.run(
            store.claim, owner, f"host-{owner}", want, [], self.wall()
        )
        return claimed

    async def other_runs(
        self, writer: JobWriter, job: Job, events: list[JobEvent], **changes: Any
    ) -> Job:
        """The other daemon writes ``job`` with ``changes`` and ``events``."""
        new = attrs.evolve(job, **changes)
        writer.update(new)
        for e in events:
            writer.add_event(e)
        await writer.flushed()
        return new

    def event(
        self, job_id: str, seq: int, state: str, kind: Any = "state", step: str = ""
    ) -> JobEvent:
        return JobEvent(job_id=job_id, seq=seq, at=self.wall(), kind=kind, state=state, step=step)

    # --- submits and reads ----------------------------------------------------------

    async def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IScheduler, self.shared))

    async def test_submit_many_stores_queued_jobs_and_refuses_one_alone(self) -> None:
        out = await self.shared.submit_many(
            [make_job_spec("b"), make_job_spec("b", parallel=3), make_job_spec("c", priority=5)]
        )
        a, refused, c = out
        assert isinstance(a, Job) and isinstance(c, Job)
        assert isinstance(refused, ConfigError)
        self.assertEqual(refused.where, "job.parallel")
        self.assertIn("at most 2 instances", refused.message)
        self.assertEqual((a.id, a.state, c.id, c.state), ("j0", "queued", "j1", "queued"))
        self.assertEqual(await self.shared.get("j0"), a)
        self.assertEqual(await self.shared.get("j1"), c)
        self.assertEqual([j.id for j in await self.shared.list()], ["j1", "j0"])
        self.assertEqual(
            await self.sql("SELECT id, state, backend, owner, priority FROM jobs ORDER BY id"),
            [("j0", "queued", "b", None, 0), ("j1", "queued", "c", None, 5)],
        )
        self.assertEqual(
            await self.sql("SELECT name, cap, draining FROM backends ORDER BY name"),
            [("b", 2, False), ("c", 4, False)],
        )
        events = await self.db.run(store.events, "j0", 0)
        self.assertEqual([(e.seq, e.state) for e in events], [(1, "queued")])
        # Stored only: nothing runs here until this daemon claims it.
        self.assertEqual(self.pool.running, {})
        self.assertFalse(self.local.holds("j0"))
        await self.assertFailure(self.shared.get("nope"), UnknownJob)

    async def test_submit_one_refused(self) -> None:
        await self.assertFailure(self.shared.submit(make_job_spec("b", parallel=3)), ConfigError)
        job = await self.shared.submit(make_job_spec("b"))
        self.assertEqual((job.id, job.state), ("j0", "queued"))  # a refusal takes no id
        self.assertEqual([j.id for j in await self.shared.list()], ["j0"])

    async def test_submits_during_a_commit_go_together_in_the_next(self) -> None:
        """Group commit: at most two insert transactions at a time; the
        submits made meanwhile (from any connection) share the next one."""
        calls: list[int] = []
        run = self.db.run

        def counting(fn: Any, *args: Any) -> Any:
            if fn is store.add_many:
                calls.append(len(args[0]))
            return run(fn, *args)

        self.db.run = counting  # type: ignore[method-assign]
        waits = [self.shared.submit_many([make_job_spec("b")]) for _ in range(4)]
        results = [await d for d in waits]
        self.assertEqual(calls, [1, 1, 2])  # two transactions in flight at most
        ids = sorted(j.id for (j,) in results if isinstance(j, Job))
        self.assertEqual(ids, ["j0", "j1", "j2", "j3"])
        self.assertEqual(sorted(j.id for j in await self.shared.list()), ids)

    async def test_list_pages(self) -> None:
        jobs = await self.submit(3)
        jobs += await self.submit(2, backend="c")
        ids = [j.id for j in jobs]
        self.assertEqual(ids, ["j0", "j1", "j2", "j3", "j4"])
        page1 = await self.shared.list(limit=2)
        self.assertEqual([j.id for j in page1], ["j4", "j3"])
        page2 = await self.shared.list(limit=2, before=page1[-1].id)
        self.assertEqual([j.id for j in page2], ["j2", "j1"])
        page3 = await self.shared.list(limit=2, before=page2[-1].id)
        self.assertEqual([j.id for j in page3], ["j0"])
        self.assertEqual(await self.shared.list(before="j0"), [])
        self.assertEqual([j.id for j in await self.shared.list(backend="c")], ["j4", "j3"])
        self.assertEqual(
            [j.id for j in await self.shared.list(backend="b", before="j2")], ["j1", "j0"]
        )
        self.assertEqual(await self.shared.list(states=()), [])
        await self.assertFailure(self.shared.list(before="nope"), UnknownJob)
        # A job this daemon runs is listed as it is here now.
        (c,) = await self.claim(ME)
        self.local.adopt(c.job, c.last_seq, c.cancel)
        here = self.local.holding(c.job.id)
        assert here is not None
        self.assertEqual(here.state, "running")
        listed = {j.id: j for j in await self.shared.list(states={"queued", "running"})}
        self.assertEqual(listed[c.job.id], here)

    async def test_status_counts_queued_and_running_across_owners(self) -> None:
        await self.submit(4)
        await self.submit(1, backend="c")
        (theirs,) = await self.claim(OTHER)
        other = self.writer_of(OTHER)
        await self.other_runs(
            other,
            theirs.job,
            [self.event(theirs.job.id, 2, "running")],
            state="running",
            attempts=1,
            started=self.wall(),
        )
        (mine,) = await self.claim(ME)
        self.local.adopt(mine.job, mine.last_seq, mine.cancel)
        self.assertIn(mine.job.id, self.pool.running)
        await self.writer.flushed()
        status = await self.shared.status()
        self.assertEqual((status.queue_depth, status.running), (3, 2))
        self.assertEqual((status.workers, status.busy_workers), (2, 1))
        b, c = status.backends
        self.assertEqual(
            (b.name, b.capacity, b.queued, b.running, b.instances, b.state),
            ("b", 2, 2, 2, 2, "active"),
        )
        self.assertEqual((c.name, c.queued, c.running, c.state), ("c", 1, 0, "active"))

    # --- watch ------------------------------------------------------------------------

    async def test_watch_follows_another_daemons_job_until_final(self) -> None:
        (job,) = await self.submit()
        (c,) = await self.claim(OTHER)
        self.assertEqual((c.job.id, c.last_seq), (job.id, 1))
        other = self.writer_of(OTHER)
        running = await self.other_runs(
            other, c.job, [self.event(job.id, 2, "running")], state="running", attempts=1
        )
        seen: list[JobEvent] = []
        stop = await self.shared.watch(job.id, 0, seen.append)
        self.assertEqual([(e.seq, e.state) for e in seen], [(1, "queued"), (2, "running")])
        await self.other_runs(
            other, running, [self.event(job.id, 3, "passed", "step", "create keypair")]
        )
        self.assertEqual(len(seen), 2)  # until told
        self.queue.job_events(job.id)  # as the txvmbot_events notification does
        await self.until("step event", lambda: len(seen) == 3)
        self.assertEqual((seen[2].kind, seen[2].step), ("step", "create keypair"))
        await self.other_runs(
            other,
            running,
            [self.event(job.id, 4, "passed")],
            state="passed",
            finished=self.wall(),
        )
        self.queue.job_events(job.id)
        await self.until("final event", lambda: len(seen) == 4)
        self.assertEqual([e.seq for e in seen], [1, 2, 3, 4])
        self.assertEqual((await self.shared.get(job.id)).state, "passed")
        # It stopped after the final state event: nothing more is followed.
        self.assertEqual(self.queue._watches, {})
        stop()

    async def test_watch_after_seq_and_unknown(self) -> None:
        (job,) = await self.submit()
        seen: list[JobEvent] = []
        stop = await self.shared.watch(job.id, 1, seen.append)
        self.assertEqual(seen, [])
        stop()
        self.assertEqual(self.queue._watches, {})
        await self.assertFailure(self.shared.watch("nope", 0, seen.append), UnknownJob)
        self.assertEqual(self.queue._watches, {})

    async def test_watch_of_a_job_ending_in_the_queue(self) -> None:
        (job,) = await self.submit()
        seen: list[JobEvent] = []
        await self.shared.watch(job.id, 0, seen.append)
        cancelled = await self.shared.cancel(job.id)
        self.assertEqual(cancelled.state, "cancelled")
        self.queue.job_events(job.id)
        await self.until("cancelled event", lambda: len(seen) == 2)
        self.assertEqual([(e.seq, e.state) for e in seen], [(1, "queued"), (2, "cancelled")])

    async def listen(self) -> None:
        """A real Listener handing txvmbot_events notifications to the
        SharedQueue, as the daemon's cluster does; once it listens."""
        up: list[bool] = []

        def notified(channel: str, payload: str) -> None:
            if channel == "txvmbot_events":
                self.queue.job_events(payload)

        listener = Listener(
            self.reactor, self.db, CHANNELS, notified, lambda ok, why: up.append(ok)
        )
        listener.start()
        self.addCleanup(listener.stop)
        await self.until("LISTEN", lambda: True in up)

    async def test_watch_of_a_job_running_here_with_a_real_listener(self) -> None:
        await self.listen()
        (job,) = await self.submit()
        (c,) = await self.claim(ME)
        self.local.adopt(c.job, c.last_seq, c.cancel)
        run = self.pool.running[job.id]
        seen: list[JobEvent] = []
        await self.shared.watch(job.id, 0, seen.append)
        # Its writes were flushed before the read: the running event is there.
        self.assertEqual([(e.seq, e.state) for e in seen], [(1, "queued"), (2, "running")])
        run.step("create keypair", "passed")
        await self.until("step event", lambda: len(seen) == 3)
        run.finish(passed=True)
        await self.until("final event", lambda: len(seen) == 4)
        self.assertEqual(
            [(e.seq, e.kind, e.state, e.step) for e in seen],
            [
                (1, "state", "queued", ""),
                (2, "state", "running", ""),
                (3, "step", "passed", "create keypair"),
                (4, "state", "passed", ""),
            ],
        )
        await self.until("the watch to end", lambda: self.queue._watches == {})
        self.assertEqual((await self.shared.get(job.id)).state, "passed")

    async def test_watch_fires_after_the_stored_events_even_if_a_notification_read_first(
        self,
    ) -> None:
        """A notification that starts a read before the watch's own: the
        watch still fires only once every stored event reached the
        listener (the web page stops its watch right then)."""
        (job,) = await self.submit()
        (c,) = await self.claim(ME)
        self.local.adopt(c.job, c.last_seq, c.cancel)
        run = self.db.run

        def slow_reads(fn: Any, *args: Any) -> Any:
            if fn is store.events:  # the notification's read is still on its way
                return deferLater(self.reactor, 0.2, run, fn, *args)
            return run(fn, *args)

        self.db.run = slow_reads  # type: ignore[method-assign]
        for _ in range(3):
            seen: list[JobEvent] = []
            d = self.shared.watch(job.id, 0, seen.append)
            self.queue.job_events(job.id)  # before the watch's own read
            stop = await d
            self.assertEqual([(e.seq, e.state) for e in seen], [(1, "queued"), (2, "running")])
            stop()
        self.assertEqual(self.queue._watches, {})

    async def test_watch_follows_notifications_of_a_real_listener(self) -> None:
        await self.listen()
        (job,) = await self.submit()
        (c,) = await self.claim(OTHER)
        seen: list[JobEvent] = []
        ended: Deferred[None] = Deferred()

        def listen(e: JobEvent) -> None:
            seen.append(e)
            if e.state == "failed" and not ended.called:
                ended.callback(None)

        await self.shared.watch(job.id, 0, listen)
        self.assertEqual([e.seq for e in seen], [1])
        other = self.writer_of(OTHER)
        running = await self.other_runs(
            other, c.job, [self.event(job.id, 2, "running")], state="running", attempts=1
        )
        await self.until("running event", lambda: len(seen) == 2)
        await self.other_runs(
            other,
            running,
            [
                self.event(job.id, 3, "running", "step", "ssh"),
                self.event(job.id, 4, "failed", "step", "ssh"),
                self.event(job.id, 5, "failed"),
            ],
            state="failed",
            finished=self.wall(),
            reason="step 'ssh' failed",
        )
        await ended
        await self.until("the watch to end", lambda: self.queue._watches == {})
        self.assertEqual(
            [(e.seq, e.kind, e.state) for e in seen],
            [
                (1, "state", "queued"),
                (2, "state", "running"),
                (3, "step", "running"),
                (4, "step", "failed"),
                (5, "state", "failed"),
            ],
        )

    # --- cancel ---------------------------------------------------------------------

    async def test_cancel_of_a_queued_job_in_the_shared_queue(self) -> None:
        (job,) = await self.submit()
        cancelled = await self.shared.cancel(job.id, "not wanted")
        self.assertEqual((cancelled.state, cancelled.reason), ("cancelled", "not wanted"))
        self.assertEqual(await self.shared.get(job.id), cancelled)
        self.assertEqual(
            await self.sql("SELECT state, owner, cancel FROM jobs WHERE id = %s", job.id),
            [("cancelled", None, None)],
        )
        events = await self.db.run(store.events, job.id, 0)
        self.assertEqual(
            [(e.seq, e.state, e.detail) for e in events],
            [(1, "queued", ""), (2, "cancelled", "not wanted")],
        )
        # Nobody claims it any more.
        self.assertEqual(await self.claim(OTHER), [])
        # A second cancel fires with the final job.
        self.assertEqual((await self.shared.cancel(job.id)).state, "cancelled")

    async def test_cancel_of_a_finished_job_answers_it_as_it_is(self) -> None:
        (job,) = await self.submit()
        (c,) = await self.claim(OTHER)
        other = self.writer_of(OTHER)
        await self.other_runs(
            other,
            c.job,
            [self.event(job.id, 2, "running"), self.event(job.id, 3, "passed")],
            state="passed",
            attempts=1,
            finished=self.wall(),
        )
        answered = await self.shared.cancel(job.id)
        self.assertEqual((answered.id, answered.state), (job.id, "passed"))
        await self.until("the watch to end", lambda: self.queue._watches == {})

    async def test_cancel_of_an_unknown_job(self) -> None:
        await self.assertFailure(self.shared.cancel("nope"), UnknownJob)
        self.assertEqual(self.queue._watches, {})

    async def test_cancel_of_a_job_another_daemon_holds(self) -> None:
        (job,) = await self.submit()
        (c,) = await self.claim(OTHER)
        other = self.writer_of(OTHER)
        running = await self.other_runs(
            other, c.job, [self.event(job.id, 2, "running")], state="running", attempts=1
        )
        d = self.shared.cancel(job.id, "stop it")

        async def asked() -> bool:
            rows = await self.sql("SELECT cancel FROM jobs WHERE id = %s", job.id)
            return rows == [("stop it",)]

        got: list[bool] = []
        for _ in range(500):
            if await asked():
                got.append(True)
                break
            await deferLater(self.reactor, 0.02, lambda: None)
        self.assertEqual(got, [True], "the cancel request never reached the job's row")
        self.assertFalse(d.called)
        self.assertEqual((await self.shared.get(job.id)).state, "running")
        # The other daemon sees the request and ends the job.
        await self.other_runs(
            other,
            running,
            [self.event(job.id, 3, "cancelled")],
            state="cancelled",
            finished=self.wall(),
            reason="stop it",
        )
        self.queue.job_events(job.id)
        ended = await d
        self.assertEqual((ended.id, ended.state, ended.reason), (job.id, "cancelled", "stop it"))
        await self.until("the watch to end", lambda: self.queue._watches == {})

    async def test_cancel_of_a_job_held_here(self) -> None:
        (job,) = await self.submit()
        (c,) = await self.claim(ME)
        self.local.adopt(c.job, c.last_seq, c.cancel)
        self.assertIn(job.id, self.pool.running)
        d = self.shared.cancel(job.id, "stop it")
        self.assertEqual(self.pool.cancels, [(job.id, "stop it")])
        self.pool.running[job.id].finish_cancelled()
        ended = await d
        self.assertEqual((ended.state, ended.reason), ("cancelled", "stop it"))
        await self.writer.flushed()
        self.assertEqual(
            await self.sql("SELECT state, owner FROM jobs WHERE id = %s", job.id),
            [("cancelled", ME)],
        )

    # --- drain ----------------------------------------------------------------------

    async def test_drain_is_shared_and_drains_here(self) -> None:
        await self.submit(2)
        status = await self.shared.drain("b")
        self.assertEqual((status.name, status.state, status.queued), ("b", "draining", 2))
        self.assertEqual(await self.db.run(store.backends), {"b": True})
        self.assertEqual(self.local.status_now().backends[0].state, "draining")
        # No daemon claims from it; a job held here waits.
        self.assertEqual(await self.claim(OTHER), [])
        await self.sql("UPDATE backends SET draining = false")
        (c,) = await self.claim(ME)
        await self.sql("UPDATE backends SET draining = true")
        self.local.adopt(c.job, c.last_seq, c.cancel)
        self.assertEqual(self.pool.running, {})
        status = await self.shared.resume("b")
        self.assertEqual(status.state, "active")
        self.assertEqual(await self.db.run(store.backends), {"b": False})
        self.assertEqual(list(self.pool.running), [c.job.id])
