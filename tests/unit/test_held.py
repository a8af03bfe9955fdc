"""Tests for txvmbot.daemon.stores.sqlite.held: writes held through a full disk.

The disk fills for real, as far as SQLite can tell: ``PRAGMA
max_page_count`` at the file's size makes SQLite answer SQLITE_FULL
("database or disk is full") exactly as a full file system does, and
raising it again is the operator making room.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import tempfile
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.deferreds import result_of
from tests.support.metrics_scrape import scrape, value
from txvmbot._sqlite_errors import host_fault, is_lock_timeout
from txvmbot.daemon.interfaces import IJobStore
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.sqlite.held import (
    BACKOFF,
    DataDir,
    HeldJournal,
    HeldStore,
    SubmitsRefused,
    WriteQueue,
)
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore, StoreError
from txvmbot.daemon.web.metrics import DaemonMetrics
from txvmbot.daemon.web.pages import overview
from txvmbot.interfaces import IJournal
from txvmbot.journal import SQLiteJournal
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

T0 = 1_000_000.0
MB = 1024 * 1024


class FakeStatvfs:
    """``os.statvfs`` of a file system with ``free`` bytes free."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.paths: list[str] = []

    def __call__(self, path: str) -> Any:
        self.paths.append(path)
        if self.free < 0:
            raise PermissionError(13, "Permission denied", path)
        return os.statvfs_result((4096, 4096, 1000, 1000, self.free // 4096, 0, 0, 0, 0, 255))


def fill(conn: sqlite3.Connection) -> None:
    """No room for one more page in this file."""
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")


#: An error text that needs pages of its own (SQLite's pages are 4 KiB).
BIG = "step 'ssh' failed: " + "x" * 20_000


def make_room(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA max_page_count = 1073741823")


def sqlite_full_error() -> sqlite3.Error:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (a)")
    fill(conn)
    try:
        for _ in range(1000):
            conn.execute("INSERT INTO t VALUES (?)", ("x" * 4000,))
    except sqlite3.Error as e:
        return e
    finally:
        conn.close()
    raise AssertionError("SQLite never said the database was full")


class ErrorsTests(SynchronousTestCase):
    def test_full_is_a_host_fault_not_a_lock(self) -> None:
        e = sqlite_full_error()
        self.assertEqual(e.sqlite_errorname, "SQLITE_FULL")
        wrapped = StoreError("/x/jobs.sqlite", "cannot add event")
        wrapped.__cause__ = e
        self.assertTrue(host_fault(wrapped))
        self.assertFalse(is_lock_timeout(wrapped))

    def test_constraint_is_neither(self) -> None:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (a UNIQUE)")
        conn.execute("INSERT INTO t VALUES (1)")
        e = self.assertRaises(sqlite3.IntegrityError, conn.execute, "INSERT INTO t VALUES (1)")
        self.assertFalse(host_fault(e))
        self.assertFalse(is_lock_timeout(e))
        self.assertFalse(host_fault(ValueError("not SQLite")))


class Files:
    """A job store and journal in a temporary dir, a Clock, and the data
    dir that watches them."""

    def __init__(self, case: SynchronousTestCase, free: int = 500 * MB) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-held-")
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(T0)
        self.statvfs = FakeStatvfs(free)
        self.data = DataDir(self.dir, 50 * MB, statvfs=self.statvfs)
        self.raw = SQLiteJobStore(os.path.join(self.dir, "jobs.sqlite"), clock=self.clock.seconds)
        self.store = HeldStore(
            self.raw, WriteQueue(self.clock, self.data, f"job store {self.raw.path}"), self.data
        )
        case.addCleanup(self.store.close)
        self.raw_journal = SQLiteJournal(
            os.path.join(self.dir, "journal.sqlite"), clock=self.clock.seconds
        )
        self.journal = HeldJournal(
            self.raw_journal,
            WriteQueue(self.clock, self.data, f"journal {self.raw_journal.path}"),
        )
        case.addCleanup(self.journal.close)

    def store_conn(self) -> sqlite3.Connection:
        return self.raw.sync._db

    def journal_conn(self) -> sqlite3.Connection:
        return self.raw_journal._db

    def wait_out_backoff(self) -> None:
        for delay in BACKOFF:
            self.clock.advance(delay)


class HeldStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.f = Files(self)
        counter = itertools.count()
        self.pool = FakeWorkerPool(2)
        self.s = Scheduler(
            self.f.clock,
            self.f.store,
            self.pool,
            self.f.journal,
            cleaner=RecordingCleaner(),
            new_id=lambda: f"j{next(counter)}",
            wall=self.f.clock.seconds,
            storage=self.f.data.storage,
        )

    def stored_state(self, job_id: str) -> str:
        """The job's state in the file, past the held writes."""
        job = self.f.raw.sync.get(job_id)
        assert job is not None
        return job.state

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IJobStore, self.f.store))
        self.assertTrue(verifyObject(IJournal, self.f.journal))

    def test_running_jobs_end_through_a_full_disk(self) -> None:
        """The disk fills while two jobs run: both end as they would have
        (one passes, one fails), clients see the final states at once, new
        submits are refused with the reason, and once there is room the
        held writes reach the file in order and submits are taken again."""
        a = result_of(self.s.submit(make_job_spec("b")))
        b = result_of(self.s.submit(make_job_spec("b")))
        self.pool.step(a.id, "ssh")
        fill(self.f.store_conn())
        with capturedLogs() as events:
            self.pool.step(a.id, "ssh", "running", detail=BIG)  # the first write held
            self.pool.step(a.id, "ssh", "passed")
            self.pool.finish(a.id)
            self.pool.finish(b.id, passed=False, error="step 'ssh' failed: exit 1")
            self.f.clock.advance(BACKOFF[0])  # still full: held on
        self.assertEqual(result_of(self.s.get(a.id)).state, "passed")
        self.assertEqual(result_of(self.s.get(b.id)).state, "failed")
        # What the scheduler holds, clients read, from the held writes.
        self.assertEqual([e.state for e in self.f.store.sync.events(a.id)][-1], "passed")
        self.assertEqual(self.f.store.sync.last_event_seq(a.id), self.f.store.sync.events(a.id)[-1].seq)
        self.assertEqual(
            {j.id for j in result_of(self.s.list(states={"passed", "failed"}))}, {a.id, b.id}
        )
        # ... while the file still says running.
        self.assertEqual(self.stored_state(a.id), "running")
        errors = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertEqual(len(errors), 1, errors)  # logged once, not per write or retry
        self.assertIn("database or disk is full", errors[0])
        self.assertIn(self.f.raw.path, errors[0])
        self.assertNotIn("only writer", errors[0])

        status = self.s.status_now()
        self.assertIn("database or disk is full", status.writes_held)
        self.assertIn(f"cannot write to its data dir {self.f.dir}", status.refusing)
        refused = self.failureResultOf(self.s.submit(make_job_spec("b")), SubmitsRefused).value
        self.assertIn("new jobs are refused", str(refused))
        self.assertIn("held writes go through", str(refused))

        make_room(self.f.store_conn())
        with capturedLogs() as events:
            self.f.wait_out_backoff()
        self.assertIn("takes writes again", " ".join(formatEvent(e) for e in events))
        self.assertEqual(self.stored_state(a.id), "passed")
        self.assertEqual(self.stored_state(b.id), "failed")
        seqs = [e.seq for e in self.f.raw.sync.events(a.id)]
        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
        self.assertEqual(self.f.raw.sync.unfinished(), [])
        self.assertEqual((self.s.status_now().writes_held, self.s.status_now().refusing), ("", ""))
        c = result_of(self.s.submit(make_job_spec("b")))
        self.assertEqual(self.stored_state(c.id), "running")

    def test_free_space_and_held_writes_on_metrics_and_web_page(self) -> None:
        metrics = DaemonMetrics()
        self.addCleanup(metrics.attach(self.s))
        self.f.statvfs.free = 300 * MB
        m = scrape(metrics)
        self.assertEqual(value(m, "txvmbot_data_dir_free_bytes"), 300 * MB)
        self.assertEqual(value(m, "txvmbot_writes_held"), 0)
        html = overview(self.s.status_now(), [], [], T0, "csrf")
        self.assertIn("300 MB", html)
        self.assertNotIn("New jobs refused", html)
        a = result_of(self.s.submit(make_job_spec("b")))
        fill(self.f.store_conn())
        self.pool.finish(a.id, passed=False, error=BIG)
        self.assertEqual(value(scrape(metrics), "txvmbot_writes_held"), 1)
        html = overview(self.s.status_now(), [], [], T0, "csrf")
        self.assertIn("Writes held", html)
        self.assertIn("New jobs refused", html)
        make_room(self.f.store_conn())
        self.f.wait_out_backoff()

    def test_retries_back_off(self) -> None:
        a = result_of(self.s.submit(make_job_spec("b")))
        fill(self.f.store_conn())
        self.pool.finish(a.id, passed=False, error=BIG)
        tries = []
        real = self.f.raw.sync.update

        def counting(job: Any) -> None:
            tries.append(self.f.clock.seconds())
            real(job)

        self.f.raw.sync.update = counting  # type: ignore[method-assign]
        for _ in range(int((sum(BACKOFF) + 3 * BACKOFF[-1]) / 0.5)):
            self.f.clock.advance(0.5)
        gaps = [b - a for a, b in itertools.pairwise([T0, *tries])]
        self.assertEqual(gaps[: len(BACKOFF)], list(BACKOFF))
        self.assertEqual(gaps[len(BACKOFF) :], [BACKOFF[-1]] * (len(gaps) - len(BACKOFF)))
        self.assertEqual(len(self.f.clock.getDelayedCalls()), 1)  # one retry pending, not one a write

    def test_a_write_that_is_no_fault_of_the_host_raises_at_once(self) -> None:
        a = result_of(self.s.submit(make_job_spec("b")))
        ghost = attrs.evolve(result_of(self.s.get(a.id)), id="nope")
        self.assertRaises(StoreError, self.f.store.update, ghost)
        self.assertEqual(self.f.data.held(), "")

    def test_submits_refused_while_the_data_dir_is_low_then_taken(self) -> None:
        self.f.statvfs.free = int(0.9 * MB)
        refused = self.failureResultOf(self.s.submit(make_job_spec("b")), SubmitsRefused).value
        self.assertIn(f"the data dir {self.f.dir} has 0.9 MB free", str(refused))
        self.assertIn("daemon.min_free_mb", str(refused))
        self.assertEqual(self.f.raw.sync.list(), [])
        st = self.s.status_now()
        self.assertEqual((st.data_dir, st.data_dir_free), (self.f.dir, int(0.9 * MB) // 4096 * 4096))
        self.assertIn("0.9 MB free", st.refusing)
        self.f.statvfs.free = 400 * MB
        job = result_of(self.s.submit(make_job_spec("b")))
        self.assertEqual(self.stored_state(job.id), "running")
        self.assertEqual(self.s.status_now().refusing, "")

    def test_free_space_unknown_refuses_nothing(self) -> None:
        self.f.statvfs.free = -1
        self.assertEqual(self.f.data.storage().free, -1)
        result_of(self.s.submit(make_job_spec("b")))

    def test_held_writes_lost_at_close_are_logged(self) -> None:
        a = result_of(self.s.submit(make_job_spec("b")))
        fill(self.f.store_conn())
        self.pool.finish(a.id, passed=False, error=BIG)
        self.assertNotEqual(self.f.data.held(), "")
        with capturedLogs() as events:
            self.f.store.sync.close()
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("held writes to the job store", text)
        self.assertIn("lost at stop", text)
        self.assertEqual(self.f.clock.getDelayedCalls(), [])
        again = SQLiteJobStore(self.f.raw.path)
        self.addCleanup(again.sync.close)
        self.assertEqual([j.id for j in again.sync.unfinished()], [a.id])  # recovered at next start

    def test_prune_waits_for_held_writes(self) -> None:
        a = result_of(self.s.submit(make_job_spec("b")))
        self.pool.finish(a.id)
        b = result_of(self.s.submit(make_job_spec("b")))
        fill(self.f.store_conn())
        self.pool.finish(b.id, passed=False, error=BIG)
        self.assertNotEqual(self.f.data.held(), "")
        self.assertEqual(self.f.store.sync.prune(T0 + 10), 0)
        make_room(self.f.store_conn())
        self.f.wait_out_backoff()
        self.assertEqual(self.f.store.sync.prune(T0 + 10), 2)


class HeldJournalTests(SynchronousTestCase):
    def test_intend_waits_for_room(self) -> None:
        """The worker asking to record a resource waits for its answer
        (it never creates what the journal has not recorded)."""
        f = Files(self)
        first = self.successResultOf(f.journal.intend("c1", "keypair", "k1", "http://x", "r"))
        fill(f.journal_conn())
        d = f.journal.intend("c1", "instance", "i" * 20_000, "http://x", "r")
        done = f.journal.done(first)
        self.assertNoResult(d)
        self.assertNoResult(done)
        self.assertIn("journal", f.data.held())
        self.assertIn("cannot write to its data dir", f.data.refusal())
        make_room(f.journal_conn())
        f.wait_out_backoff()
        entry = self.successResultOf(d)
        self.assertEqual(entry.kind, "instance")
        self.successResultOf(done)
        self.assertEqual([e.seq for e in result_of(f.journal.pending("c1"))], [entry.seq])
        self.assertEqual(f.data.held(), "")
