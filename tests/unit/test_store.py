"""Tests for txvmbot.daemon.stores.sqlite.store: the daemon's SQLite job store
(its SQL through :class:`SQLiteJobs`, which answers at once; its seam,
:class:`SQLiteJobStore`, which answers with Deferreds)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from typing import TYPE_CHECKING

import attrs
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support import paths
from tests.support.sqlite_plans import query_plan
from txvmbot.daemon.codec import dumps, job_to_dict
from txvmbot.daemon.interfaces import IJobStore, IJobWriter
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.stores.sqlite.store import (
    APPLICATION_ID,
    MIGRATIONS,
    PRUNE_BATCH,
    SCHEMA_VERSION,
    SQLiteJobs,
    SQLiteJobStore,
    StoreError,
    migrate,
)
from txvmbot.errors import TxvmbotError
from txvmbot.testing import make_job_spec, make_result

REPO = paths.ROOT


class FakeTime:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def job(
    job_id: str,
    submitted: float,
    state: str = "queued",
    backend: str = "b",
    priority: int = 0,
    finished: float | None = None,
) -> Job:
    return Job(
        id=job_id,
        spec=make_job_spec(backend, priority=priority),
        state=state,  # type: ignore[arg-type]
        submitted=submitted,
        finished=finished,
    )


def event(job_id: str, seq: int, at: float = 1.0, state: str = "queued") -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, at=at, kind="state", state=state)


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class SeamTests(SynchronousTestCase):
    """SQLiteJobStore answers IJobStore with Deferreds that have fired;
    the scheduler's own writes (IJobWriter) at once."""

    def test_provides_interfaces(self) -> None:
        s = SQLiteJobStore.memory(clock=FakeTime())
        self.assertTrue(verifyObject(IJobStore, s))
        self.assertTrue(verifyObject(IJobWriter, s))

    def test_answers_with_deferreds(self) -> None:
        s = SQLiteJobStore.memory(clock=FakeTime())
        a = job("a", 1.0)
        self.assertIsNone(self.successResultOf(s.add_many([(a, event("a", 1))])))
        self.assertEqual(self.successResultOf(s.get("a")), a)
        self.assertIsNone(self.successResultOf(s.get("nope")))
        self.assertEqual(self.successResultOf(s.list()), [a])
        self.assertEqual(self.successResultOf(s.unfinished()), [a])
        self.assertEqual(self.successResultOf(s.events("a")), [event("a", 1)])
        self.assertEqual(self.successResultOf(s.last_event_seq("a")), 1)
        s.update(attrs.evolve(a, state="passed", finished=5.0))
        s.add_event(event("a", 2, state="passed"))
        self.assertEqual(self.successResultOf(s.prune(10.0)), 1)
        self.assertIsNone(self.successResultOf(s.close()))

    def test_errors_fail_the_deferred(self) -> None:
        s = SQLiteJobStore.memory(clock=FakeTime())
        self.successResultOf(s.add(job("a", 1.0)))
        self.failureResultOf(s.add(job("a", 1.0)), StoreError)
        self.assertRaises(StoreError, s.update, job("nope", 1.0))


class StoreBehaviour(_Base):
    """What every store does, in a file or in memory."""

    def make(self) -> SQLiteJobs:
        raise NotImplementedError

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IJobWriter, self.make()))

    def test_round_trip(self) -> None:
        s = self.make()
        j = job("a", 10.0)
        s.add(j)
        self.assertEqual(s.get("a"), j)
        done = attrs.evolve(
            j,
            state="failed",
            started=11.0,
            finished=12.5,
            attempts=1,
            reason="boom",
            result=make_result(j, False, "boom"),
        )
        s.update(done)
        self.assertEqual(s.get("a"), done)
        self.assertIsNone(s.get("nope"))

    def test_add_twice_and_update_unknown(self) -> None:
        s = self.make()
        s.add(job("a", 1.0))
        err = self.assertRaises(StoreError, s.add, job("a", 2.0))
        self.assertIn(s.path, str(err))
        self.assertIn("add job a", str(err))
        err = self.assertRaises(StoreError, s.update, job("b", 2.0))
        self.assertIn("no such job", str(err))

    def test_add_many_is_all_or_nothing(self) -> None:
        s = self.make()
        s.add_many([(job("a", 1.0), event("a", 1)), (job("b", 2.0), event("b", 1))])
        self.assertEqual([j.id for j in s.unfinished()], ["a", "b"])
        self.assertEqual(s.last_event_seq("b"), 1)
        # "a" again in the middle of a batch: none of the batch is stored.
        err = self.assertRaises(
            StoreError,
            s.add_many,
            [(job("c", 3.0), event("c", 1)), (job("a", 4.0), event("a", 1)),
             (job("d", 5.0), event("d", 1))],
        )
        self.assertIn("cannot add job a: UNIQUE", str(err))
        self.assertEqual([j.id for j in s.unfinished()], ["a", "b"])
        self.assertEqual((s.get("c"), s.events("c")), (None, []))
        # The store goes on: the failed batch left no transaction open.
        s.add_many([(job("c", 3.0), event("c", 1))])
        self.assertEqual(s.get("c"), job("c", 3.0))
        s.add_many([])

    def test_ordering_is_by_time_as_a_number(self) -> None:
        """Seed 004: times that sort one way as text and another as numbers.
        They are added out of order, so neither text nor insertion order
        gives the right answer."""
        times = [10.0, 9.5, 1000000000.0, 999999999.0]
        self.assertNotEqual(sorted(times), sorted(times, key=str))
        s = self.make()
        for i, t in enumerate(times):
            s.add(job(f"j{i}", t))
        newest_first = [j.submitted for j in s.list()]
        self.assertEqual(newest_first, [1000000000.0, 999999999.0, 10.0, 9.5])
        self.assertEqual([j.submitted for j in s.unfinished()], [9.5, 10.0, 999999999.0, 1e9])
        # j2 (1e9) and j0 (10.0) as cursors: what comes after them, by number.
        self.assertEqual([j.submitted for j in s.list(before="j2")], [999999999.0, 10.0, 9.5])
        self.assertEqual([j.submitted for j in s.list(before="j0")], [9.5])

    def test_same_time_keeps_submission_order(self) -> None:
        s = self.make()
        for name in ("c", "a", "b"):
            s.add(job(name, 5.0))
        self.assertEqual([j.id for j in s.unfinished()], ["c", "a", "b"])
        self.assertEqual([j.id for j in s.list()], ["b", "a", "c"])

    def test_pages_with_the_same_submitted_time(self) -> None:
        """Paging by cursor (the last job of the previous page) neither
        skips nor repeats jobs submitted at the same instant."""
        s = self.make()
        ids = [f"j{i:02d}" for i in range(25)]
        for i, job_id in enumerate(ids):
            s.add(job(job_id, 100.0 + i // 10, backend="a" if i % 3 else "b"))
        newest_first = sorted(ids, key=lambda j: (100.0 + int(j[1:]) // 10, int(j[1:])), reverse=True)
        seen: list[str] = []
        before = None
        for _ in range(10):
            page = [j.id for j in s.list(limit=4, before=before)]
            seen += page
            if len(page) < 4:
                break
            before = page[-1]
        self.assertEqual(seen, newest_first)
        # With a filter, the cursor is a job of the filtered listing.
        page = [j.id for j in s.list(backend="a", limit=3)]
        rest = [j.id for j in s.list(backend="a", before=page[-1])]
        self.assertEqual(page + rest, [j for j in newest_first if int(j[1:]) % 3])
        self.assertEqual(s.list(before="no-such-job"), [])

    def test_list_filters(self) -> None:
        s = self.make()
        s.add(job("q1", 1.0, backend="x"))
        s.add(job("r1", 2.0, state="running", backend="x"))
        s.add(job("p1", 3.0, state="passed", backend="y"))
        s.add(job("e1", 4.0, state="error", backend="x"))
        self.assertEqual([j.id for j in s.list(states={"passed", "error"})], ["e1", "p1"])
        self.assertEqual([j.id for j in s.list(backend="x")], ["e1", "r1", "q1"])
        self.assertEqual([j.id for j in s.list(states=["queued"], backend="y")], [])
        self.assertEqual(s.list(states=()), [])
        self.assertEqual([j.id for j in s.list(limit=2)], ["e1", "p1"])
        self.assertEqual([j.id for j in s.unfinished()], ["q1", "r1"])

    def test_update_moves_job_between_filters(self) -> None:
        s = self.make()
        j = job("a", 1.0)
        s.add(j)
        s.update(attrs.evolve(j, state="running", started=2.0, attempts=1))
        self.assertEqual([x.id for x in s.list(states={"running"})], ["a"])
        self.assertEqual(s.list(states={"queued"}), [])

    def test_events_in_order_after_seq(self) -> None:
        s = self.make()
        for seq in (1, 2, 10, 11):
            s.add_event(event("a", seq, at=float(seq)))
        s.add_event(event("b", 1))
        self.assertEqual([e.seq for e in s.events("a")], [1, 2, 10, 11])
        self.assertEqual([e.seq for e in s.events("a", 2)], [10, 11])
        self.assertEqual(s.events("a", 11), [])
        self.assertEqual(s.events("nope"), [])
        self.assertEqual(s.events("b"), [event("b", 1)])
        self.assertEqual(s.last_event_seq("a"), 11)
        self.assertEqual(s.last_event_seq("nope"), 0)
        e = JobEvent("b", 2, 3.5, "step", "passed", step="create keypair", detail="kp-1")
        s.add_event(e)
        self.assertEqual(s.events("b", 1), [e])

    def test_event_seq_once(self) -> None:
        s = self.make()
        s.add_event(event("a", 1))
        err = self.assertRaises(StoreError, s.add_event, event("a", 1))
        self.assertIn("event 1 of job a", str(err))

    def test_prune_forgets_old_final_jobs_with_their_events(self) -> None:
        """Every final state finished before the cutoff goes, with its
        events; unfinished jobs (even with a stale ``finished``), newer
        final jobs and their events stay."""
        s = self.make()
        old = [
            job(f"old-{st}", 1.0, st, finished=99.5)
            for st in ("passed", "failed", "cancelled", "error")
        ]
        kept = [
            job("queued", 1.0),
            job("running", 1.0, "running"),
            # Not final, whatever its finished says: never pruned.
            job("cleaning", 1.0, "cleaning", finished=5.0),
            job("new", 1.0, "passed", finished=100.0),
            job("newer", 1.0, "failed", finished=1e9),
        ]
        for j in old + kept:
            s.add(j, event(j.id, 1))
            s.add_event(event(j.id, 2, state=j.state))
        self.assertEqual(s.prune(100.0), 4)  # strictly before: 100.0 stays
        for j in old:
            self.assertIsNone(s.get(j.id))
            self.assertEqual(s.events(j.id), [])
            self.assertEqual(s.last_event_seq(j.id), 0)
        self.assertEqual(sorted(j.id for j in s.list()), sorted(j.id for j in kept))
        for j in kept:
            self.assertEqual(s.get(j.id), j)
            self.assertEqual(s.last_event_seq(j.id), 2)
        self.assertEqual([j.id for j in s.unfinished()], ["queued", "running", "cleaning"])
        self.assertEqual(s.prune(100.0), 0)
        # Compared as numbers: 1e9 is after 999999999.5.
        self.assertEqual(s.prune(999999999.5), 1)
        self.assertIsNotNone(s.get("newer"))
        self.assertEqual(s.prune(1e12), 1)
        self.assertEqual([j.id for j in s.list()], ["cleaning", "running", "queued"])

    def test_prune_batch_is_bounded_oldest_first(self) -> None:
        s = self.make()
        s.add_many(
            [
                (job(f"j{i}", float(i), "passed", finished=1000.0 - i), event(f"j{i}", 1))
                for i in range(PRUNE_BATCH + 3)
            ]
        )
        self.assertEqual(s.prune(2000.0, limit=2), 2)
        # The two that finished first (the last submitted) went first.
        gone = {f"j{PRUNE_BATCH + 2}", f"j{PRUNE_BATCH + 1}"}
        self.assertEqual({j.id for j in s.list(limit=10)} & gone, set())
        self.assertEqual(s.prune(2000.0), PRUNE_BATCH)
        self.assertEqual(s.prune(2000.0), 1)
        self.assertEqual(s.prune(2000.0), 0)
        self.assertEqual(s.list(), [])
        self.assertRaises(ValueError, s.prune, 2000.0, 0)

    def test_closed(self) -> None:
        s = self.make()
        s.close()
        s.close()
        err = self.assertRaises(StoreError, s.get, "a")
        self.assertIn("is closed", str(err))
        self.assertRaises(StoreError, s.add, job("a", 1.0))
        self.assertRaises(StoreError, s.prune, 1e9)

    def test_a_row_that_does_not_decode_is_a_store_error(self) -> None:
        """As in the shared PostgreSQL store
        (tests/integration/test_shared_store.py): the same StoreError from
        the same decoding (txvmbot.daemon.stores.sql)."""
        s = self.make()
        s.add(job("a", 1.0), event("a", 1))
        s.add(job("b", 2.0), event("b", 1))
        s._db.execute("UPDATE jobs SET data = '{\"not\": \"a job\"}' WHERE id = 'a'")
        s._db.execute("UPDATE events SET data = 'not json' WHERE job_id = 'b'")
        for read in (lambda: s.get("a"), s.list, s.unfinished):
            e = self.assertRaises(StoreError, read)
            self.assertIn("holds a job it cannot read", str(e))
        e = self.assertRaises(StoreError, s.events, "b")
        self.assertIn("holds an event of job b it cannot read", str(e))
        self.assertEqual(s.get("b"), job("b", 2.0))
        self.assertEqual(s.last_event_seq("b"), 1)

    def test_times_are_real(self) -> None:
        s = self.make()
        j = job("a", 10)  # an int on the way in
        s.add(j)
        s.update(attrs.evolve(j, state="running", started=11, attempts=1))
        s.add_event(event("a", 1, at=12))
        db = s._db
        self.assertEqual(
            db.execute(
                "SELECT typeof(submitted), typeof(started), typeof(finished), typeof(updated)"
                " FROM jobs"
            ).fetchall(),
            [("real", "real", "null", "real")],
        )
        self.assertEqual(db.execute("SELECT typeof(at) FROM events").fetchall(), [("real",)])
        self.assertRaises(
            sqlite3.IntegrityError,
            db.execute,
            "INSERT INTO jobs (id, state, backend, priority, submitted, updated, attempts, data)"
            " VALUES ('x', 'queued', 'b', 0, '2011-01-01 10:00', 1.0, 0, '{}')",
        )


class MemoryStoreTests(StoreBehaviour, SynchronousTestCase):
    def make(self) -> SQLiteJobs:
        s = SQLiteJobs.memory(clock=FakeTime())
        self.addCleanup(s.close)
        return s

    def test_path(self) -> None:
        self.assertEqual(self.make().path, ":memory:")


class FileStoreTests(StoreBehaviour, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.dir)
        self.path = os.path.join(self.dir, "jobs.sqlite")

    def make(self, path: str | None = None, **kw: object) -> SQLiteJobs:
        s = SQLiteJobs(path or self.path, clock=FakeTime(), **kw)  # type: ignore[arg-type]
        self.addCleanup(s.close)
        return s

    def raw(self, path: str | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(path or self.path, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def test_durable_across_reopen(self) -> None:
        s = self.make()
        a = job("a", 1.0)
        s.add(a)
        s.add_event(event("a", 1))
        running = attrs.evolve(a, state="running", started=2.0, attempts=1)
        s.update(running)
        # Another handle sees every committed write at once.
        self.assertEqual(self.make().get("a"), running)
        s.close()
        again = self.make()
        self.assertEqual(again.unfinished(), [running])
        self.assertEqual(again.events("a"), [event("a", 1)])
        # Submission order carries on after a reopen.
        again.add(job("b", 1.0))
        self.assertEqual([j.id for j in again.unfinished()], ["a", "b"])

    def test_wal_and_synchronous(self) -> None:
        s = self.make()
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone()[0], "wal")
        # synchronous is per connection: NORMAL == 1, FULL == 2.
        self.assertEqual(s._db.execute("PRAGMA synchronous").fetchone()[0], 1)
        full = self.make(synchronous="FULL")
        self.assertEqual(full._db.execute("PRAGMA synchronous").fetchone()[0], 2)
        self.assertRaises(ValueError, SQLiteJobs, self.path, synchronous="OFF")

    def test_schema_and_indexes(self) -> None:
        self.make()
        conn = self.raw()
        self.assertEqual(SCHEMA_VERSION, 2)
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), [(2,)])
        self.assertEqual(conn.execute("PRAGMA application_id").fetchone()[0], APPLICATION_ID)
        indexes = {
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        self.assertTrue(
            {"jobs_queue", "jobs_submitted", "jobs_backend", "jobs_finished"} <= indexes, indexes
        )
        # Pruning range-scans the jobs that finished before the cutoff,
        # oldest first, instead of reading every final job.
        plan = query_plan(
            conn,
            "SELECT id FROM jobs INDEXED BY jobs_finished"
            " WHERE finished < 5.0 AND state IN ('passed', 'failed') ORDER BY finished LIMIT 3"
        )
        self.assertIn("jobs_finished (finished<?)", plan)
        self.assertNotIn("TEMP B-TREE", plan)
        # The queue in dispatch order is read from the index, not sorted.
        plan = query_plan(
            conn,
            "SELECT id FROM jobs WHERE state = 'queued'"
            " ORDER BY priority DESC, submitted, seq"
        )
        self.assertIn("jobs_queue", plan)
        self.assertNotIn("TEMP B-TREE", plan)
        plan = query_plan(
            conn,
            "SELECT data FROM jobs ORDER BY submitted DESC, seq DESC LIMIT 5"
        )
        self.assertIn("jobs_submitted", plan)

    def test_new_file_logs_migration(self) -> None:
        with capturedLogs() as events:
            self.make()
        self.assertIn(
            f"Job store {self.path} migrated from schema 0 to {SCHEMA_VERSION}",
            [formatEvent(e) for e in events],
        )

    def test_v1_file_made_by_hand_opens_and_migrates(self) -> None:
        """A file laid out as v1 shipped (written here without the store's
        code) opens and is migrated to v2 (the index retention reads),
        keeping every job, and prunes; and the migration path takes it on
        to a v3 that adds a column, after which this code refuses it."""
        conn = self.raw()
        for statement in V1_SCHEMA:
            conn.execute(statement)
        old = job("old", 99.5, state="running")
        done = job("done", 50.0, state="passed", finished=60.0)
        for j, state, finished in ((old, "running", None), (done, "passed", 60.0)):
            conn.execute(
                "INSERT INTO jobs (id, state, backend, priority, submitted, started, finished,"
                " updated, attempts, data) VALUES (?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
                (
                    *(j.id, state, "b", 0, j.submitted, finished, 100.0, 0),
                    dumps(job_to_dict(j)).decode(),
                ),
            )
            conn.execute(
                "INSERT INTO events (job_id, seq, at, data) VALUES (?, 1, ?, ?)",
                (j.id, j.submitted, dumps(attrs.asdict(event(j.id, 1, at=j.submitted))).decode()),
            )
        with capturedLogs() as logged:
            s = self.make()
        self.assertIn(
            f"Job store {self.path} migrated from schema 1 to 2",
            [formatEvent(e) for e in logged],
        )
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), [(2,)])
        self.assertEqual(s.unfinished(), [old])
        self.assertEqual(s.get("done"), done)
        self.assertEqual(s.events("old"), [event("old", 1, at=99.5)])
        self.assertEqual(s.prune(100.0), 1)
        self.assertEqual((s.get("done"), s.events("done")), (None, []))
        s.add(job("new", 100.0))
        s.close()

        def v2_to_v3(c: sqlite3.Connection) -> None:
            c.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")
            c.execute("CREATE INDEX jobs_worker ON jobs (worker)")

        self.assertEqual(migrate(conn, self.path, (*MIGRATIONS, v2_to_v3)), 2)
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), [(3,)])
        self.assertEqual(
            conn.execute("SELECT id, worker FROM jobs ORDER BY seq").fetchall(),
            [("old", None), ("new", None)],
        )
        # Idempotent at v3.
        self.assertEqual(migrate(conn, self.path, (*MIGRATIONS, v2_to_v3)), 3)
        err = self.assertRaises(StoreError, SQLiteJobs, self.path)
        self.assertIn("schema version 3", str(err))

    def test_prune_on_a_file_survives_reopen(self) -> None:
        s = self.make()
        s.add_many(
            [
                (job(f"j{i}", float(i), "passed", finished=10.0 + i), event(f"j{i}", 1))
                for i in range(5)
            ]
        )
        s.add(job("q", 1.0), event("q", 1))
        self.assertEqual(s.prune(13.0, limit=2), 2)
        s.close()
        again = self.make()
        self.assertEqual(
            self.raw().execute("SELECT job_id FROM events ORDER BY job_id").fetchall(),
            [("j2",), ("j3",), ("j4",), ("q",)],
        )
        self.assertEqual(again.prune(13.0), 1)
        self.assertEqual([j.id for j in again.list()], ["j4", "j3", "q"])
        self.assertEqual([j.id for j in again.unfinished()], ["q"])

    def test_prune_locked_is_a_store_error_and_deletes_nothing(self) -> None:
        s = self.make(busy_timeout=0.05)
        s.add(job("a", 1.0, "passed", finished=2.0), event("a", 1))
        other = self.raw()
        other.execute("BEGIN IMMEDIATE")
        err = self.assertRaises(StoreError, s.prune, 10.0)
        self.assertIn(self.path, str(err))
        self.assertIn("cannot prune finished jobs", str(err))
        self.assertIn("only writer", str(err))
        other.execute("ROLLBACK")
        self.assertFalse(s._db.in_transaction)
        self.assertEqual(s.last_event_seq("a"), 1)
        self.assertEqual(s.prune(10.0), 1)

    def test_migration_failure_rolls_back(self) -> None:
        self.make().close()
        conn = self.raw()

        def broken(c: sqlite3.Connection) -> None:
            c.execute("ALTER TABLE jobs ADD COLUMN worker TEXT")
            raise RuntimeError("half way")

        self.assertRaises(RuntimeError, migrate, conn, self.path, (*MIGRATIONS, broken))
        self.assertEqual(
            conn.execute("SELECT version FROM schema_version").fetchall(), [(SCHEMA_VERSION,)]
        )
        columns = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
        self.assertNotIn("worker", columns)

    def test_newer_schema_refused(self) -> None:
        self.make().close()
        self.raw().execute("UPDATE schema_version SET version = 7")
        err = self.assertRaises(StoreError, SQLiteJobs, self.path)
        self.assertIn(self.path, str(err))
        self.assertIn("schema version 7", str(err))
        self.assertIn("upgrade txvmbot", str(err))

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite at all\n" * 200)
        err = self.assertRaises(StoreError, SQLiteJobs, self.path)
        self.assertIn(self.path, str(err))
        self.assertIsInstance(err, TxvmbotError)

    def test_other_database_refused_and_untouched(self) -> None:
        conn = self.raw()
        conn.execute("CREATE TABLE instances (id TEXT)")
        err = self.assertRaises(StoreError, SQLiteJobs, self.path)
        self.assertIn(self.path, str(err))
        self.assertIn("not a txvmbot job store", str(err))
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "delete")

    def test_journal_file_refused(self) -> None:
        from txvmbot.journal import SQLiteJournal

        SQLiteJournal(self.path).close()
        err = self.assertRaises(StoreError, SQLiteJobs, self.path)
        self.assertIn("not a txvmbot job store", str(err))

    def test_cannot_open(self) -> None:
        path = os.path.join(self.dir, "no", "such", "dir", "jobs.sqlite")
        err = self.assertRaises(StoreError, SQLiteJobs, path)
        self.assertIn(path, str(err))

    def test_unreadable_job(self) -> None:
        s = self.make()
        s.add(job("a", 1.0))
        self.raw().execute('UPDATE jobs SET data = \'{"id": "a"}\'')
        err = self.assertRaises(StoreError, s.get, "a")
        self.assertIn(self.path, str(err))
        self.assertIn("cannot read", str(err))

    def test_submits_survive_sigkill(self) -> None:
        """NORMAL in WAL mode: every committed submit survives the process
        being killed with no chance to close the file."""
        code = f"""
            import time
            from txvmbot.daemon.stores.sqlite.store import SQLiteJobs
            from txvmbot.daemon.jobs import Job, JobEvent
            from txvmbot.testing import make_job_spec
            s = SQLiteJobs({self.path!r})
            spec = make_job_spec("b")
            for i in range(500):
                s.add(Job(id=f"j{{i}}", spec=spec, state="queued", submitted=1000.0 + i))
                s.add_event(JobEvent(f"j{{i}}", 1, 1000.0 + i, "state", "queued"))
            print("submitted", flush=True)
            time.sleep(60)
            """
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "submitted":
                proc.kill()
                self.fail(f"child did not submit: {proc.communicate(timeout=10)}")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        s = self.make()
        jobs = s.unfinished()
        self.assertEqual(len(jobs), 500)
        self.assertEqual([j.id for j in jobs[:3]], ["j0", "j1", "j2"])
        self.assertEqual(s.last_event_seq("j499"), 1)


# The v1 schema exactly as it shipped. Never change this: files in the field
# look like this, and the store must keep opening them.
V1_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version (version) VALUES (1)",
    """CREATE TABLE jobs (
        seq       INTEGER PRIMARY KEY AUTOINCREMENT,
        id        TEXT    NOT NULL UNIQUE,
        state     TEXT    NOT NULL,
        backend   TEXT    NOT NULL,
        priority  INTEGER NOT NULL,
        submitted REAL NOT NULL CHECK (typeof(submitted) = 'real'),
        started   REAL CHECK (started IS NULL OR typeof(started) = 'real'),
        finished  REAL CHECK (finished IS NULL OR typeof(finished) = 'real'),
        updated   REAL NOT NULL CHECK (typeof(updated) = 'real'),
        attempts  INTEGER NOT NULL,
        data      TEXT    NOT NULL
    )""",
    "CREATE INDEX jobs_queue ON jobs (state, priority DESC, submitted, seq)",
    "CREATE INDEX jobs_submitted ON jobs (submitted, seq)",
    "CREATE INDEX jobs_backend ON jobs (backend, submitted, seq)",
    """CREATE TABLE events (
        job_id TEXT    NOT NULL,
        seq    INTEGER NOT NULL CHECK (seq >= 1),
        at     REAL NOT NULL CHECK (typeof(at) = 'real'),
        data   TEXT    NOT NULL,
        PRIMARY KEY (job_id, seq)
    ) WITHOUT ROWID""",
    f"PRAGMA application_id = {APPLICATION_ID}",
)


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
