"""The worker pool with real worker processes, against moto on loopback.

Each test starts its own pool (real ``python -c`` workers) and stops it; the
moto server is the session's. ssh, when a test needs a job to hang, points
at a closed port on 127.0.0.1: nothing here connects to an address moto
hands out.
"""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent

from tests.support import paths
from tests.support.deferreds import result_of, sleep
from tests.support.pool_case import PoolTestBase
from txvmbot.daemon.interfaces import IWorkerPool
from txvmbot.daemon.jobs import check_id_for
from txvmbot.daemon.workers.pool import (
    AmpoulePool,
    PoolFull,
    PoolNotRunning,
    WorkerStartFailed,
)
from txvmbot.ec2 import resources as R
from txvmbot.errors import WorkerDied
from txvmbot.model import CheckResult

FOREIGN = os.path.join(paths.ROOT, "tests", "support", "foreign_plugins")
EVIL_DIR = os.path.join(FOREIGN, "twisted", "plugins")


def drop_plugin_cache() -> None:
    try:
        os.remove(os.path.join(EVIL_DIR, "dropin.cache"))
    except FileNotFoundError:
        pass


class PoolJobTests(PoolTestBase):
    async def _pass(self, pool: AmpoulePool) -> CheckResult:
        job = self.job()
        result = await pool.run(job, self.on_event(job), self.journal)
        check_id = check_id_for(job)
        self.assertTrue(result.passed, result.error)
        self.assertEqual(result.check_id, check_id)
        # Step events arrived, in order: each step's "running" before its end,
        # the ends in the order of the result's steps.
        events = self.events[job.id]
        self.assertEqual((events[0].name, events[0].state), ("keypair", "running"))
        ends = [(e.name, e.state) for e in events if e.state != "running"]
        self.assertEqual(ends, [(s.name, s.outcome) for s in result.steps])
        for name in {e.name for e in events}:
            states = [e.state for e in events if e.name == name]
            self.assertEqual(states[0], "running")
        # The journal: intent before create for every entry; every entry got
        # its resource id; all done at the end; nothing left in moto.
        self.assert_journalled_before_created(check_id)
        rows = self.journal.rows(check_id)
        self.assertEqual(
            {kind for _, kind, _, _ in rows}, {R.KEYPAIR, R.GROUP, R.RULE, R.INSTANCES}
        )
        for seq, kind, rid, done in rows:
            self.assertTrue(rid, f"entry {seq} {kind} has no resource id")
            self.assertEqual(done, 1, f"entry {seq} {kind} not done")
        self.assert_clean(check_id)
        return result

    async def _job_passes(self) -> None:
        pool = self.pool()
        self.assertTrue(IWorkerPool.providedBy(pool))
        await pool.start()
        self.assertEqual((pool.size, pool.busy), (1, 0))
        await self._pass(pool)
        self.assertEqual(pool.busy, 0)

    def test_job_passes_with_events_and_journal_in_order(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._job_passes())

    async def _recycled(self) -> None:
        pool = self.pool(recycle_after=1)
        await pool.start()
        (first,) = pool.workers()
        await self._pass(pool)
        # The worker that ran a job is replaced by a fresh process.
        for _ in range(100):
            ready = [w for w in pool.workers() if w.state == "ready"]
            if ready and ready[0].pid != first.pid:
                break
            await sleep(0.1)
        else:
            self.fail(f"no fresh worker after recycling: {pool.workers()}")
        await self._pass(pool)

    def test_worker_recycled_after_recycle_after_jobs(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._recycled())

    def test_run_before_start_is_refused(self) -> None:
        pool = self.pool()
        job = self.job()
        self.assertRaises(PoolNotRunning, pool.run, job, self.on_event(job), self.journal)


class ForeignPluginTests(PoolTestBase):
    """Seed 001: a third-party plugin that imports the reactor at import
    time, with no dropin.cache, on the workers' path."""

    def setUp(self) -> None:
        super().setUp()
        drop_plugin_cache()
        self.addCleanup(drop_plugin_cache)
        self.env = {"PYTHONPATH": FOREIGN}

    async def _jobs_pass(self) -> None:
        pool = self.pool(size=2, env=self.env)
        await pool.start()
        jobs = [self.job(), self.job()]
        results = [await d for d in [pool.run(j, self.on_event(j), self.journal) for j in jobs]]
        for job, result in zip(jobs, results, strict=True):
            self.assertTrue(result.passed, result.error)
            self.assert_clean(check_id_for(job))
        # Our bootstrap never asked the plugin system: nothing wrote a cache.
        self.assertFalse(os.path.exists(os.path.join(EVIL_DIR, "dropin.cache")))

    def test_jobs_pass_with_a_reactor_importing_plugin(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._jobs_pass())

    async def _ampoule_bootstrap_dies(self) -> None:
        from ampoule.main import BOOTSTRAP

        # Control: ampoule's bootstrap starts our worker without the plugin.
        control = self.pool(bootstrap=BOOTSTRAP)
        await control.start()
        await control.stop()

        pool = self.pool(bootstrap=BOOTSTRAP, env=self.env)
        try:
            await pool.start()
        except WorkerStartFailed as e:
            self.assertIn("ReactorAlreadyInstalledError", e.stderr_tail)
            self.assertEqual(e.status, "exit status 1")
        else:
            self.fail("a worker with ampoule's bootstrap started despite the plugin")
        errors = [
            e
            for e in self.log_events
            if e.get("log_level") == LogLevel.error and e.get("doing") == "starting"
        ]
        self.assertTrue(errors)
        self.assertIn("ReactorAlreadyInstalledError", errors[0]["stderr_tail"])

    def test_ampoule_default_bootstrap_dies_with_that_plugin(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ampoule_bootstrap_dies())


class WorkerDeathAndCancelTests(PoolTestBase):
    async def _killed(self) -> None:
        pool = self.pool()
        await pool.start()
        job = self.hanging_job()
        d = pool.run(job, self.on_event(job), self.journal)
        await self.wait_event(job, "wait-ssh")
        pid = pool.pid_of(job.id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        try:
            await d
        except WorkerDied as e:
            self.assertEqual(e.job_id, job.id)
            self.assertEqual(e.status, "killed by signal 9 (SIGKILL)")
        else:
            self.fail("run() did not fail with WorkerDied")
        errors = [
            e
            for e in self.log_events
            if e.get("log_level") == LogLevel.error and e.get("job_id") == job.id
        ]
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(errors[0]["status"], "killed by signal 9 (SIGKILL)")
        self.assertEqual(errors[0]["pid"], pid)
        self.assertIn("stderr_tail", errors[0])
        self.assertIn(f"Running job {job.id}", errors[0]["stderr_tail"])
        # The journal still holds what the dead worker created (for cleanup
        # or the reaper); the pool has a new worker that runs the next job.
        self.assertTrue(result_of(self.journal.pending(check_id_for(job))))
        self.assertEqual(pool.busy, 0)
        for _ in range(100):
            if any(w.state == "ready" and w.pid != pid for w in pool.workers()):
                break
            await sleep(0.1)
        else:
            self.fail(f"no new worker: {pool.workers()}")
        nxt = self.job()
        result = await pool.run(nxt, self.on_event(nxt), self.journal)
        self.assertTrue(result.passed, result.error)

    def test_worker_killed_mid_job(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._killed())

    async def _idle_killed(self) -> None:
        pool = self.pool()
        await pool.start()
        (worker,) = pool.workers()
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        for _ in range(100):
            errors = [e for e in self.log_events if e.get("doing") == "idle"]
            if errors:
                break
            await sleep(0.1)
        else:
            self.fail("no error logged for the killed idle worker")
        self.assertEqual(len(errors), 1, errors)
        # The line names the pid that was killed, as "Worker w1 started"
        # did (Twisted's transport has forgotten it by then).
        self.assertEqual(errors[0]["pid"], worker.pid)
        text = formatEvent(errors[0])
        self.assertIn(f"Worker {worker.name} (pid {worker.pid}) died while idle", text)
        self.assertIn("killed by signal 9 (SIGKILL)", text)

    def test_idle_worker_killed_is_logged_with_its_pid(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._idle_killed())

    async def _cancelled(self) -> None:
        pool = self.pool()
        await pool.start()
        job = self.hanging_job()
        d = pool.run(job, self.on_event(job), self.journal)
        other = self.job()
        self.assertRaises(PoolFull, pool.run, other, self.on_event(other), self.journal)
        await self.wait_event(job, "wait-ssh")
        pool.cancel(job.id, "operator asked")
        result = await d
        check_id = check_id_for(job)
        self.assertFalse(result.passed)
        self.assertIn("cancelled: operator asked", result.error)
        outcomes = {s.name: s.outcome for s in result.steps}
        self.assertEqual(outcomes["wait-ssh"], "cancelled")
        self.assertTrue(any(n.startswith("cleanup instance") for n in outcomes))
        self.assert_journalled_before_created(check_id)
        self.assert_clean(check_id)
        pool.cancel(job.id, "again")  # finished: a no-op

    def test_cancel_running_job_cleans_up(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._cancelled())

    async def _timed_out(self) -> None:
        pool = self.pool(job_timeout=3.0)
        await pool.start()
        job = self.hanging_job()
        try:
            await pool.run(job, self.on_event(job), self.journal)
        except WorkerDied as e:
            self.assertEqual(
                e.status, "killed by signal 9 (SIGKILL): the pool's job timeout of 3s passed"
            )
        else:
            self.fail("run() did not fail with WorkerDied")

    def test_job_timeout_kills_the_worker(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._timed_out())
