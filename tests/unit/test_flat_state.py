"""The daemon keeps nothing in memory for a job that is over (issue 16:
memory flat over months).

``bench/soak.py`` measures the real daemon over 10,000 jobs; these tests
pin down the per-job structures it found flat, so that one that starts
keeping finished jobs fails here rather than months into a deployment.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.scheduler_harness import Harness
from txvmbot.daemon.web.metrics import DaemonMetrics


class NothingKeptPerFinishedJobTests(SynchronousTestCase):
    def test_scheduler_and_metrics_forget_every_ending(self) -> None:
        """Jobs that pass, fail, lose their worker, are cancelled running
        and queued, with an observer and the metrics attached: once all are
        final, no per-job entry is left and the observers are as before."""
        h = Harness(size=4)
        metrics = DaemonMetrics()
        detach = metrics.attach(h.s)
        seen: list[str] = []
        stop = h.s.observe(lambda job, e: seen.append(job.id))
        observers = len(h.s.dispatcher._observers)
        rounds = 30
        for _ in range(rounds):
            ids = [h.submit().id for _ in range(6)]  # 4 run, 2 queue
            for job_id in ids[:4]:
                h.pool.step(job_id, "keypair", "running")
            h.pool.finish(ids[0])
            h.pool.finish(ids[1], passed=False, error="boom")
            h.pool.die(ids[2])
            h.s.cancel(ids[3])
            h.pool.get(ids[3]).finish_cancelled()
            h.s.cancel(ids[5])  # queued or just started
            h.pool.finish_all()
            self.assertTrue(all(h.store.sync.get(j).final for j in ids), [h.state(j) for j in ids])
        self.assertEqual(h.s.status_now().running, 0)
        self.assertEqual(
            (h.s.dispatcher._active, h.s.dispatcher._queued, h.s.dispatcher._in_pool, h.s.dispatcher._abandoned), ({}, {}, set(), set())
        )
        self.assertEqual(len(h.s.dispatcher._observers), observers)
        self.assertEqual((metrics._jobs, metrics._open_steps), ({}, {}))
        self.assertEqual(h.pool.running, {})
        self.assertEqual(len(set(seen)), 6 * rounds)
        stop()
        detach()
        self.assertEqual(len(h.s.dispatcher._observers), observers - 2)
