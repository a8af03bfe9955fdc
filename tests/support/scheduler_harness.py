"""A scheduler on a Clock with an SQLite store in memory and a fake worker
pool: what the scheduler's, the web page's and the metrics' unit tests
drive."""

from __future__ import annotations

import itertools
from typing import Any

from twisted.internet.task import Clock

from tests.support.deferreds import result_of
from txvmbot.daemon.jobs import Job
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.journal import MemoryJournal
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0


class Harness:
    """A scheduler on a Clock, a memory (or file) store and a fake pool."""

    def __init__(
        self,
        size: int = 4,
        *,
        store: SQLiteJobStore | None = None,
        cleaner: RecordingCleaner | None = None,
        ids: str = "j",
        **kw: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = store or SQLiteJobStore.memory(clock=self.clock.seconds)
        self.pool = FakeWorkerPool(size)
        self.journal = MemoryJournal(self.clock.seconds)
        self.cleaner = cleaner or RecordingCleaner()
        counter = itertools.count()
        self.s = Scheduler(
            self.clock,
            self.store,
            self.pool,
            self.journal,
            cleaner=self.cleaner,
            new_id=lambda: f"{ids}{next(counter)}",
            wall=self.clock.seconds,
            **kw,
        )

    def submit(self, backend: str = "b", **kw: Any) -> Job:
        return result_of(self.s.submit(make_job_spec(backend, **kw)))

    def state(self, job_id: str) -> str:
        return result_of(self.s.get(job_id)).state

    def running(self) -> list[str]:
        return list(self.pool.running)

    def events(self, job_id: str) -> list[tuple[str, str, str]]:
        return [(e.kind, e.state, e.step) for e in self.store.sync.events(job_id)]
