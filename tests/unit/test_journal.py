"""Tests for txvmbot.journal: the SQLite journal and its in-memory twin."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support import paths
from tests.support.deferreds import result_of
from tests.support.sqlite_plans import query_plan
from txvmbot.errors import TxvmbotError
from txvmbot.interfaces import IJournal
from txvmbot.journal import (
    APPLICATION_ID,
    PRUNE_BATCH,
    SCHEMA_VERSION,
    JournalError,
    MemoryJournal,
    SQLiteJournal,
    migrate,
)
from txvmbot.model import JournalEntry

REPO = paths.ROOT

Journal = SQLiteJournal | MemoryJournal


class FakeTime:
    """A wall clock the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class JournalBehaviour(_Base):
    """What every journal does; mixed into a test case per implementation."""

    def make(self, clock: Callable[[], float]) -> Journal:
        raise NotImplementedError

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IJournal, self.make(FakeTime())))

    def test_round_trip(self) -> None:
        t = FakeTime(1000.0)
        j = self.make(t)
        e = result_of(j.intend("chk", "keypair", "txvmbot-chk", "http://ec2/", "us-east-1"))
        self.assertEqual(
            e,
            JournalEntry(
                check_id="chk",
                seq=1,
                kind="keypair",
                name="txvmbot-chk",
                endpoint="http://ec2/",
                region="us-east-1",
                created=1000.0,
            ),
        )
        self.assertEqual(result_of(j.pending("chk")), [e])
        t.now = 1001.0
        e2 = result_of(j.created(e, "kp-1"))
        self.assertEqual(e2.resource_id, "kp-1")
        self.assertEqual(result_of(j.pending("chk")), [e2])
        g = result_of(j.intend("chk", "rule", "tcp/22", "http://ec2/", "us-east-1", parent_id="sg-1"))
        self.assertEqual(g.parent_id, "sg-1")
        self.assertEqual(result_of(j.pending()), [g, e2])
        result_of(j.done(e2))
        self.assertEqual(result_of(j.pending("chk")), [g])
        result_of(j.done(g))
        self.assertEqual(result_of(j.pending("chk")), [])
        self.assertEqual(result_of(j.pending()), [])
        self.assertEqual(result_of(j.checks()), [])

    def test_seq_per_check(self) -> None:
        j = self.make(FakeTime())
        a1 = result_of(j.intend("a", "k", "n1", "e", "r"))
        b1 = result_of(j.intend("b", "k", "n1", "e", "r"))
        a2 = result_of(j.intend("a", "k", "n2", "e", "r"))
        result_of(j.done(a2))
        a3 = result_of(j.intend("a", "k", "n3", "e", "r"))
        self.assertEqual((a1.seq, a2.seq, a3.seq, b1.seq), (1, 2, 3, 1))

    def test_pending_newest_first_by_seq_within_a_check(self) -> None:
        # Even if the wall clock steps back, the undo order is the seq order.
        t = FakeTime(50.0)
        j = self.make(t)
        first = result_of(j.intend("c", "group", "g", "e", "r"))
        t.now = 10.0
        second = result_of(j.intend("c", "instance", "i", "e", "r"))
        self.assertEqual(result_of(j.pending("c")), [second, first])

    def test_pending_across_checks_by_time_as_number(self) -> None:
        # As text "10.0" < "9.5" and "1000000000.0" < "999999999.0".
        t = FakeTime()
        j = self.make(t)
        made = {}
        for check, when in [("old", 9.5), ("new", 10.0), ("older", 999999999.0), ("newer", 1e9)]:
            t.now = when
            made[check] = result_of(j.intend(check, "k", "n", "e", "r"))
        self.assertEqual([e.check_id for e in result_of(j.pending())], ["newer", "older", "new", "old"])
        self.assertEqual(result_of(j.checks()), ["newer", "older", "new", "old"])

    def test_checks_older_than_compares_numbers(self) -> None:
        t = FakeTime()
        j = self.make(t)
        t.now = 9.5
        result_of(j.intend("nine", "k", "n", "e", "r"))
        t.now = 10.0
        result_of(j.intend("ten", "k", "n", "e", "r"))
        t.now = 999999999.0
        result_of(j.intend("nines", "k", "n", "e", "r"))
        t.now = 1000000000.0
        result_of(j.intend("billion", "k", "n", "e", "r"))
        self.assertEqual(result_of(j.checks(older_than=10.0)), ["nine"])
        self.assertEqual(result_of(j.checks(older_than=10.5)), ["ten", "nine"])
        self.assertEqual(result_of(j.checks(older_than=1000000000.0)), ["nines", "ten", "nine"])
        self.assertEqual(result_of(j.checks(older_than=1e12)), ["billion", "nines", "ten", "nine"])
        self.assertEqual(result_of(j.checks(older_than=9.5)), [])

    def test_checks_only_with_pending_and_by_last_activity(self) -> None:
        t = FakeTime(100.0)
        j = self.make(t)
        a = result_of(j.intend("a", "k", "n", "e", "r"))
        result_of(j.intend("b", "k", "n", "e", "r"))
        t.now = 200.0
        result_of(j.done(a))
        self.assertEqual(result_of(j.checks()), ["b"])
        # A check still working (its last write is recent) is not stale.
        t.now = 100.0
        c = result_of(j.intend("c", "k", "n", "e", "r"))
        result_of(j.intend("c", "k", "n2", "e", "r"))
        t.now = 300.0
        result_of(j.created(c, "i-1"))
        self.assertEqual(result_of(j.checks(older_than=250.0)), ["b"])
        self.assertEqual(result_of(j.checks()), ["c", "b"])

    def test_every_method_answers_with_a_deferred(self) -> None:
        """Every IJournal method but close returns a Deferred, one that has
        fired already, with an answer or with the error."""
        j = self.make(FakeTime(1000.0))
        self.assertTrue(verifyObject(IJournal, j))
        ghost = JournalEntry("nope", 7, "k", "n", "e", "r", 1.0)
        intended = j.intend("c", "k", "n", "e", "r")
        self.assertIsInstance(intended, Deferred)
        e = result_of(intended)
        answers: list[Deferred[Any]] = [
            j.created(e, "i-1"),
            j.pending(),
            j.pending("c"),
            j.checks(),
            j.checks(older_than=2000.0),
            j.done(e),
            j.prune(2000.0),
            j.prune(2000.0, 1),
        ]
        failures: list[tuple[Deferred[Any], type[Exception]]] = [
            (j.intend("", "k", "n", "e", "r"), ValueError),
            (j.created(ghost, "i-1"), JournalError),
            (j.created(e, ""), ValueError),
            (j.done(ghost), JournalError),
            (j.prune(2000.0, 0), ValueError),
        ]
        for d in answers:
            self.assertIsInstance(d, Deferred)
            result_of(d)
        for d, kind in failures:
            self.assertIsInstance(d, Deferred)
            self.failureResultOf(d, kind)
        self.assertIsNone(j.close())
        for d in (j.intend("c", "k", "n", "e", "r"), j.pending(), j.checks(), j.prune(1.0)):
            self.assertIsInstance(d, Deferred)
            self.failureResultOf(d, JournalError)

    def test_unknown_entry(self) -> None:
        j = self.make(FakeTime())
        ghost = JournalEntry("nope", 7, "k", "n", "e", "r", 1.0)
        self.failureResultOf(j.created(ghost, "i-1"), JournalError)
        self.failureResultOf(j.done(ghost), JournalError)

    def test_bad_arguments(self) -> None:
        j = self.make(FakeTime())
        self.failureResultOf(j.intend("", "k", "n", "e", "r"), ValueError)
        self.failureResultOf(j.intend("c", "k", "", "e", "r"), ValueError)
        e = result_of(j.intend("c", "k", "n", "e", "r"))
        self.failureResultOf(j.created(e, ""), ValueError)
        self.failureResultOf(j.created(e, None), ValueError)
        self.assertEqual(result_of(j.pending("c")), [e])

    def test_closed(self) -> None:
        j = self.make(FakeTime())
        j.close()
        j.close()
        err = self.failureResultOf(j.intend("c", "k", "n", "e", "r"), JournalError).value
        self.assertTrue(isinstance(err, TxvmbotError))
        self.failureResultOf(j.pending(), JournalError)
        self.failureResultOf(j.prune(1e9), JournalError)

    def test_prune_forgets_old_done_entries_only(self) -> None:
        """Done entries last written before the cutoff go; pending ones,
        newer done ones and the done entries of a check that still has
        pending ones stay, so what cleanup and the reaper read is the same."""
        t = FakeTime(100.0)
        j = self.make(t)
        for i in range(3):
            result_of(j.done(result_of(j.intend("old", "k", f"n{i}", "e", "r"))))
        result_of(j.done(result_of(j.intend("stuck", "k", "a", "e", "r"))))
        stuck = result_of(j.created(result_of(j.intend("stuck", "k", "b", "e", "r")), "i-1"))
        late = result_of(j.intend("late", "k", "n", "e", "r"))
        t.now = 200.0
        result_of(j.done(result_of(j.intend("recent", "k", "n", "e", "r"))))
        result_of(j.done(late))  # intended at 100, done at 200: last written at 200
        pending, checks = result_of(j.pending()), result_of(j.checks())
        self.assertEqual(pending, [stuck])

        self.assertEqual(result_of(j.prune(150.0)), 3)
        self.assertEqual(result_of(j.prune(150.0)), 0)
        self.assertEqual(result_of(j.pending()), pending)
        self.assertEqual(result_of(j.checks()), checks)
        self.assertEqual(result_of(j.checks(older_than=150.0)), ["stuck"])
        # The cutoff is strict.
        self.assertEqual(result_of(j.prune(200.0)), 0)
        self.assertEqual(result_of(j.prune(200.5)), 2)  # recent and late
        self.assertEqual(result_of(j.pending()), pending)
        # Once the stuck check is cleaned up, its whole record can go.
        result_of(j.done(stuck))
        self.assertEqual(result_of(j.prune(1e12)), 2)
        self.assertEqual(result_of(j.pending()), [])
        # A new check starts from seq 1 as before.
        self.assertEqual(result_of(j.intend("old", "k", "n", "e", "r")).seq, 1)

    def test_prune_is_bounded_and_oldest_first(self) -> None:
        t = FakeTime()
        j = self.make(t)
        for i in range(7):
            t.now = 1000.0 - i  # intended newest first, done at 1000 - i
            result_of(j.done(result_of(j.intend(f"c{i}", "k", "n", "e", "r"))))
        self.assertEqual(result_of(j.prune(2000.0, limit=3)), 3)
        t.now = 5000.0
        result_of(j.intend("c0", "k", "again", "e", "r"))  # c0 (the newest) now has a pending entry
        self.assertEqual(result_of(j.prune(2000.0, limit=3)), 3)
        self.assertEqual(result_of(j.prune(2000.0, limit=3)), 0)  # c0 kept: it has pending work
        self.assertEqual([e.check_id for e in result_of(j.pending())], ["c0"])
        self.failureResultOf(j.prune(2000.0, 0), ValueError)


class MemoryJournalTests(JournalBehaviour, SynchronousTestCase):
    def make(self, clock: Callable[[], float]) -> Journal:
        return MemoryJournal(clock)

    def test_entries_keeps_done(self) -> None:
        j = MemoryJournal(FakeTime())
        e = result_of(j.intend("c", "k", "n", "e", "r"))
        result_of(j.done(e))
        self.assertEqual([x.done for x in j.entries], [True])

    def test_prune_removes_from_entries(self) -> None:
        t = FakeTime(1.0)
        j = MemoryJournal(t)
        result_of(j.done(result_of(j.intend("c", "k", "n", "e", "r"))))
        kept = result_of(j.intend("d", "k", "n", "e", "r"))
        self.assertEqual(result_of(j.prune(2.0)), 1)
        self.assertEqual(j.entries, (kept,))


class SQLiteJournalTests(JournalBehaviour, SynchronousTestCase):
    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that litters the working directory.
        self.dir = tempfile.mkdtemp(prefix="txvmbot-journal-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "journal.sqlite")

    def make(self, clock: Callable[[], float], path: str | None = None) -> SQLiteJournal:
        j = SQLiteJournal(path or self.path, clock)
        self.addCleanup(j.close)
        return j

    def raw(self, path: str | None = None) -> sqlite3.Connection:
        conn = sqlite3.connect(path or self.path, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def test_durable_across_reopen(self) -> None:
        t = FakeTime(5.0)
        j = self.make(t)
        a = result_of(j.created(result_of(j.intend("c", "instance", "n", "e", "r")), "i-1"))
        b = result_of(j.intend("c", "address", "m", "e", "r", parent_id="i-1"))
        result_of(j.done(result_of(j.intend("c", "keypair", "kp", "e", "r"))))
        # A second handle on the same file sees every committed write at once.
        self.assertEqual(result_of(self.make(t).pending("c")), [b, a])
        j.close()
        again = self.make(t)
        self.assertEqual(result_of(again.pending("c")), [b, a])
        self.assertEqual(result_of(again.intend("c", "k", "n", "e", "r")).seq, 4)

    def test_wal_and_synchronous_normal_by_default(self) -> None:
        j = self.make(FakeTime())
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone()[0], "wal")
        # synchronous is per connection: NORMAL == 1 (survives a killed
        # process in WAL mode), FULL == 2 (also survives power loss).
        self.assertEqual(j._db.execute("PRAGMA synchronous").fetchone()[0], 1)

    def test_synchronous_full_on_request(self) -> None:
        j = SQLiteJournal(self.path, synchronous="FULL")
        self.addCleanup(j.close)
        self.assertEqual(j._db.execute("PRAGMA synchronous").fetchone()[0], 2)
        with self.assertRaises(ValueError):
            SQLiteJournal(self.path, synchronous="OFF")  # type: ignore[arg-type]

    def test_schema_version(self) -> None:
        self.make(FakeTime())
        conn = self.raw()
        self.assertEqual(SCHEMA_VERSION, 2)
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), [(2,)])
        self.assertEqual(conn.execute("PRAGMA application_id").fetchone()[0], APPLICATION_ID)
        # Pruning finds old done entries through their own index, not by
        # reading every done entry.
        plan = query_plan(
            conn,
            "SELECT rowid FROM entries INDEXED BY entries_done"
            " WHERE done = 1 AND updated < 5.0 ORDER BY updated LIMIT 10"
        )
        self.assertIn("entries_done (updated<?)", plan)
        self.assertNotIn("TEMP B-TREE", plan)

    def test_v1_file_made_by_hand_opens_and_migrates(self) -> None:
        """A journal laid out as v1 shipped (written here without the
        journal's code) opens, is migrated to the current schema keeping
        every entry, and prunes."""
        conn = self.raw()
        for statement in V1_SCHEMA:
            conn.execute(statement)
        insert = (
            "INSERT INTO entries (check_id, seq, kind, name, endpoint, region, created,"
            " updated, resource_id, parent_id, done) VALUES (?, ?, 'k', 'n', 'e', 'r', ?, ?, ?,"
            " NULL, ?)"
        )
        conn.execute(insert, ("gone", 1, 10.0, 20.0, "i-1", 1))
        conn.execute(insert, ("live", 1, 10.0, 10.0, "i-2", 0))
        j = self.make(FakeTime(30.0))
        self.assertEqual(conn.execute("SELECT version FROM schema_version").fetchall(), [(2,)])
        self.assertEqual([e.resource_id for e in result_of(j.pending())], ["i-2"])
        self.assertEqual(result_of(j.prune(25.0)), 1)
        self.assertEqual(conn.execute("SELECT check_id FROM entries").fetchall(), [("live",)])

    def test_prune_is_one_transaction_and_survives_reopen(self) -> None:
        t = FakeTime(1.0)
        j = self.make(t)
        for i in range(PRUNE_BATCH + 2):
            result_of(j.done(result_of(j.intend(f"c{i}", "k", "n", "e", "r"))))
        self.assertEqual(result_of(j.prune(2.0)), PRUNE_BATCH)
        j.close()
        again = self.make(t)
        self.assertEqual(self.raw().execute("SELECT COUNT(*) FROM entries").fetchone(), (2,))
        self.assertEqual(result_of(again.prune(2.0)), 2)
        # Another process holding the write lock: JournalError, nothing lost.
        result_of(again.done(result_of(again.intend("x", "k", "n", "e", "r"))))
        slow = SQLiteJournal(self.path, t, busy_timeout=0.05)
        self.addCleanup(slow.close)
        other = self.raw()
        other.execute("BEGIN IMMEDIATE")
        err = self.failureResultOf(slow.prune(2.0), JournalError).value
        self.assertIn("prune done entries", str(err))
        other.execute("ROLLBACK")
        self.assertEqual(result_of(slow.prune(2.0)), 1)

    def test_migrate_empty_and_idempotent(self) -> None:
        conn = self.raw()
        self.assertEqual(migrate(conn, self.path), 0)
        self.assertEqual(migrate(conn, self.path), SCHEMA_VERSION)

    def test_newer_schema_refused(self) -> None:
        self.make(FakeTime()).close()
        self.raw().execute(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
        err = self.assertRaises(JournalError, SQLiteJournal, self.path)
        self.assertIn(self.path, str(err))
        self.assertIn(f"schema version {SCHEMA_VERSION + 1}", str(err))
        self.assertIn("upgrade txvmbot", str(err))

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not sqlite at all\n" * 200)
        err = self.assertRaises(JournalError, SQLiteJournal, self.path)
        self.assertIn(self.path, str(err))

    def test_other_database_refused_and_untouched(self) -> None:
        conn = self.raw()
        conn.execute("CREATE TABLE instances (id TEXT)")
        err = self.assertRaises(JournalError, SQLiteJournal, self.path)
        self.assertIn(self.path, str(err))
        self.assertIn("not a txvmbot journal", str(err))
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "delete")

    def test_cannot_open(self) -> None:
        path = os.path.join(self.dir, "no", "such", "dir", "journal.sqlite")
        err = self.assertRaises(JournalError, SQLiteJournal, path)
        self.assertIn(path, str(err))
        self.assertTrue(isinstance(err, TxvmbotError))

    def test_times_are_stored_as_real(self) -> None:
        t = FakeTime(10)
        j = self.make(t)
        e = result_of(j.intend("c", "k", "n", "e", "r"))
        result_of(j.created(e, "x"))
        self.assertEqual(
            self.raw().execute("SELECT typeof(created), typeof(updated) FROM entries").fetchall(),
            [("real", "real")],
        )
        # And the schema refuses text times from any writer.
        self.assertRaises(
            sqlite3.IntegrityError,
            self.raw().execute,
            "INSERT INTO entries (check_id, seq, kind, name, endpoint, region, created, updated)"
            " VALUES ('c', 9, 'k', 'n', 'e', 'r', '2011-01-01 10:00', 1.0)",
        )

    def test_locked_beyond_busy_timeout(self) -> None:
        j = SQLiteJournal(self.path, FakeTime(), busy_timeout=0.05)
        self.addCleanup(j.close)
        holder = self.raw()
        holder.execute("BEGIN IMMEDIATE")
        err = self.failureResultOf(j.intend("c", "k", "n", "e", "r"), JournalError).value
        self.assertIn(self.path, str(err))
        self.assertIn("write lock", str(err))
        holder.execute("ROLLBACK")
        self.assertEqual(result_of(j.intend("c", "k", "n", "e", "r")).seq, 1)

    def run_python(self, code: str) -> subprocess.Popen[str]:
        env = dict(os.environ, PYTHONPATH=REPO)
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def test_sigkill_between_intend_and_created(self) -> None:
        """A process killed after intend() and before created() leaves a
        pending entry with no resource id."""
        proc = self.run_python(
            f"""
            import sys, time
            from txvmbot.journal import SQLiteJournal
            j = SQLiteJournal({self.path!r})
            # No reactor here: the journal's synchronous calls.
            j._created(j._intend("chk", "keypair", "kp", "e", "r"), "kp-1")
            j._intend("chk", "instance", "txvmbot-chk", "e", "r")
            print("intended", flush=True)
            time.sleep(60)  # "RunInstances in flight"
            """
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "intended":
                proc.kill()
                self.fail(f"child did not get to intend(): {proc.communicate(timeout=10)}")
            # The WAL of a killed writer is still there for the next opener.
            self.assertTrue(os.path.exists(self.path + "-wal"), (self.path, os.listdir(self.dir)))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
        self.assertEqual(proc.returncode, -signal.SIGKILL)
        pending = result_of(self.make(FakeTime()).pending("chk"))
        self.assertEqual(
            [(e.seq, e.kind, e.name, e.resource_id) for e in pending],
            [(2, "instance", "txvmbot-chk", None), (1, "keypair", "kp", "kp-1")],
        )
        self.assertEqual(result_of(self.make(FakeTime()).checks()), ["chk"])

    def test_two_processes_write_at_once(self) -> None:
        """Two processes appending to one check get distinct seqs: the write
        lock is taken before the seq is read, and busy_timeout waits."""
        code = f"""
            import sys
            from txvmbot.journal import SQLiteJournal
            j = SQLiteJournal({self.path!r})
            sys.stdin.readline()
            for i in range(100):
                j._intend("shared", "k", sys.argv[0] + str(i), "e", "r")
            """
        self.make(FakeTime()).close()  # create the schema once, up front
        env = dict(os.environ, PYTHONPATH=REPO)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code)],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
            assert p.stderr is not None
            err = p.stderr.read()
            p.stderr.close()
            self.assertEqual(p.returncode, 0, err)
        seqs = sorted(e.seq for e in result_of(self.make(FakeTime()).pending("shared")))
        self.assertEqual(seqs, list(range(1, 201)))


# --- property: pending == intended minus done, newest first ---------------------


CHECKS = ("a", "b", "c")
op = st.one_of(
    st.tuples(st.just("intend"), st.sampled_from(CHECKS), st.sampled_from([9.5, 10.0, 99.0, 1e9])),
    st.tuples(st.just("created"), st.integers(0, 30), st.just(0.0)),
    st.tuples(st.just("done"), st.integers(0, 30), st.just(0.0)),
)


# The v1 schema exactly as it shipped. Never change this: journals in the
# field look like this, and txvmbot must keep opening them.
V1_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version (version) VALUES (1)",
    """CREATE TABLE entries (
        check_id    TEXT    NOT NULL,
        seq         INTEGER NOT NULL CHECK (seq >= 1),
        kind        TEXT    NOT NULL,
        name        TEXT    NOT NULL,
        endpoint    TEXT    NOT NULL,
        region      TEXT    NOT NULL,
        created     REAL    NOT NULL CHECK (typeof(created) = 'real'),
        updated     REAL    NOT NULL CHECK (typeof(updated) = 'real'),
        resource_id TEXT,
        parent_id   TEXT,
        done        INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
        PRIMARY KEY (check_id, seq)
    )""",
    "CREATE INDEX entries_pending ON entries (done, check_id)",
    f"PRAGMA application_id = {APPLICATION_ID}",
)


def _expected_order(entries: list[JournalEntry]) -> list[JournalEntry]:
    out = sorted(entries, key=lambda e: -e.seq)
    out.sort(key=lambda e: e.check_id)
    out.sort(key=lambda e: -e.created)
    return out


class JournalPropertyTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(op, max_size=25))
    def test_pending_is_intended_minus_done(self, ops: list[tuple[str, object, float]]) -> None:
        with tempfile.TemporaryDirectory() as d:
            t = FakeTime()
            sql = SQLiteJournal(os.path.join(d, "j.sqlite"), t)
            mem = MemoryJournal(t)
            try:
                model: dict[tuple[str, int], JournalEntry] = {}
                done: set[tuple[str, int]] = set()
                order: list[tuple[str, int]] = []
                for kind, arg, when in ops:
                    if kind == "intend":
                        assert isinstance(arg, str)
                        t.now = when
                        e = result_of(sql.intend(arg, "k", f"n{len(order)}", "e", "r"))
                        self.assertEqual(result_of(mem.intend(arg, "k", f"n{len(order)}", "e", "r")), e)
                        model[(e.check_id, e.seq)] = e
                        order.append((e.check_id, e.seq))
                    elif order:
                        assert isinstance(arg, int)
                        key = order[arg % len(order)]
                        e = model[key]
                        if kind == "created":
                            new = result_of(sql.created(e, f"id-{key[0]}-{key[1]}"))
                            self.assertEqual(result_of(mem.created(e, f"id-{key[0]}-{key[1]}")), new)
                            model[key] = new
                        else:
                            result_of(sql.done(e))
                            result_of(mem.done(e))
                            done.add(key)
                    live = [e for k, e in model.items() if k not in done]
                    expected = _expected_order(live)
                    self.assertEqual(result_of(sql.pending()), expected)
                    self.assertEqual(result_of(mem.pending()), expected)
                    for c in CHECKS:
                        mine = sorted((e for e in live if e.check_id == c), key=lambda e: -e.seq)
                        self.assertEqual(result_of(sql.pending(c)), mine)
                        self.assertEqual(result_of(mem.pending(c)), mine)
                    self.assertEqual(result_of(sql.checks()), result_of(mem.checks()))
                    self.assertEqual(set(result_of(sql.checks())), {e.check_id for e in live})
                    # seq is 1..n per check, in intend order
                    for c in CHECKS:
                        seqs = [s for (cc, s) in order if cc == c]
                        self.assertEqual(seqs, list(range(1, len(seqs) + 1)))
            finally:
                sql.close()

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.lists(op, max_size=25),
        st.sampled_from([9.5, 9.75, 10.0, 50.0, 1e10]),
        st.integers(1, 8),
    )
    def test_prune_forgets_exactly_old_finished_history(
        self, ops: list[tuple[str, object, float]], cutoff: float, limit: int
    ) -> None:
        """Both journals prune the same number of entries: the done ones
        last written before the cutoff, of checks with nothing pending, at
        most ``limit``; what is pending and which checks need work stay."""
        with tempfile.TemporaryDirectory() as d:
            t = FakeTime()
            sql = SQLiteJournal(os.path.join(d, "j.sqlite"), t)
            mem = MemoryJournal(t)
            try:
                entries: dict[tuple[str, int], JournalEntry] = {}
                updated: dict[tuple[str, int], float] = {}
                done: set[tuple[str, int]] = set()
                for kind, arg, when in ops:
                    if kind == "intend":
                        assert isinstance(arg, str)
                        t.now = when
                        e = result_of(sql.intend(arg, "k", "n", "e", "r"))
                        result_of(mem.intend(arg, "k", "n", "e", "r"))
                        entries[(e.check_id, e.seq)] = e
                        updated[(e.check_id, e.seq)] = when
                    elif entries:
                        assert isinstance(arg, int)
                        key = sorted(entries)[arg % len(entries)]
                        if kind == "created":
                            result_of(sql.created(entries[key], "i-1"))
                            result_of(mem.created(entries[key], "i-1"))
                        else:
                            result_of(sql.done(entries[key]))
                            result_of(mem.done(entries[key]))
                            done.add(key)
                        updated[key] = t.now
                busy = {c for (c, s) in entries if (c, s) not in done}
                old = {k for k in done if updated[k] < cutoff and k[0] not in busy}
                pending, checks = result_of(sql.pending()), result_of(sql.checks())

                n = result_of(sql.prune(cutoff, limit))
                self.assertEqual(n, min(len(old), limit))
                self.assertEqual(result_of(mem.prune(cutoff, limit)), n)
                for j in (sql, mem):
                    self.assertEqual(result_of(j.pending()), pending)
                    self.assertEqual(result_of(j.checks()), checks)
                left = set(sql._db.execute("SELECT check_id, seq FROM entries").fetchall())
                self.assertEqual(len(left), len(entries) - n)
                self.assertEqual(len(mem.entries), len(entries) - n)
                if len(old) <= limit:
                    self.assertEqual(left, set(entries) - old)
                    self.assertEqual({(e.check_id, e.seq) for e in mem.entries}, left)
            finally:
                sql.close()
