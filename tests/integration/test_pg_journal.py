"""PostgresJournal against a real PostgreSQL server (unix socket, fixture
pg_dsn): the SQLite journal's semantics, plus hosts and several daemons."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from txvmbot.daemon.stores.postgres.db import Database, DatabaseError, DatabaseUnavailable
from txvmbot.daemon.stores.postgres.journal import PostgresJournal
from txvmbot.daemon.stores.postgres.schema import migrate
from txvmbot.engine import Cleanup, StepRunner
from txvmbot.errors import TxvmbotError
from txvmbot.interfaces import IJournal
from txvmbot.journal import JournalError
from txvmbot.model import JournalEntry


class FakeTime:
    """A wall clock the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class PostgresJournalTests(TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _pg(self, pg_dsn: str) -> None:
        self.dsn = pg_dsn

    async def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor = reactor
        self.db = self.database()
        await self.db.run(migrate, self.db.where)

    def database(self) -> Database:
        """A started Database on the test's database: one per "daemon"."""
        db = Database(self.reactor, self.dsn)
        db.start()
        self.addCleanup(db.stop)
        return db

    def journal(
        self, clock: Callable[[], float] | None = None, host: str = "a", db: Database | None = None
    ) -> PostgresJournal:
        return PostgresJournal(db or self.db, host, clock or FakeTime())

    def sql(self, statement: str, *args: object) -> Deferred[list[tuple[Any, ...]]]:
        def query(conn: Any) -> list[tuple[Any, ...]]:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else []

        return self.db.run(query)

    # --- the SQLite journal's behaviour -------------------------------------

    async def test_provides_interface(self) -> None:
        j = self.journal()
        self.assertTrue(verifyObject(IJournal, j))
        self.assertEqual(j.path, self.db.where)
        self.assertIsNone(j.close())
        # close() leaves the database to its owner.
        self.assertEqual(await j.pending(), [])

    async def test_round_trip(self) -> None:
        t = FakeTime(1000.0)
        j = self.journal(t, host="h1")
        e = await j.intend("chk", "keypair", "txvmbot-chk", "http://ec2/", "us-east-1")
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
        self.assertEqual(await j.pending("chk"), [e])
        t.now = 1001.0
        e2 = await j.created(e, "kp-1")
        self.assertEqual(e2.resource_id, "kp-1")
        self.assertEqual(await j.pending("chk"), [e2])
        g = await j.intend("chk", "rule", "tcp/22", "http://ec2/", "us-east-1", parent_id="sg-1")
        self.assertEqual(g.parent_id, "sg-1")
        self.assertEqual(await j.pending(), [g, e2])
        self.assertEqual(
            await self.sql("SELECT seq, host, created, updated FROM journal ORDER BY seq"),
            [(1, "h1", 1000.0, 1001.0), (2, "h1", 1001.0, 1001.0)],
        )
        t.now = 1002.0
        self.assertIsNone(await j.done(e2))
        self.assertEqual(await j.pending("chk"), [g])
        await j.done(g)
        self.assertEqual(await j.pending("chk"), [])
        self.assertEqual(await j.pending(), [])
        self.assertEqual(await j.checks(), [])
        self.assertEqual(
            await self.sql("SELECT seq, done, updated FROM journal ORDER BY seq"),
            [(1, True, 1002.0), (2, True, 1002.0)],
        )

    async def test_seq_per_check(self) -> None:
        j = self.journal()
        a1 = await j.intend("a", "k", "n1", "e", "r")
        b1 = await j.intend("b", "k", "n1", "e", "r")
        a2 = await j.intend("a", "k", "n2", "e", "r")
        await j.done(a2)
        a3 = await j.intend("a", "k", "n3", "e", "r")
        self.assertEqual((a1.seq, a2.seq, a3.seq, b1.seq), (1, 2, 3, 1))

    async def test_pending_orders(self) -> None:
        t = FakeTime(50.0)
        j = self.journal(t)
        # Within a check: seq descending, even when the wall clock steps back.
        first = await j.intend("c", "group", "g", "e", "r")
        t.now = 10.0
        second = await j.intend("c", "instance", "i", "e", "r")
        self.assertEqual(await j.pending("c"), [second, first])
        # Across checks: created descending (as numbers: as text "10.0" <
        # "9.5"), then check id ascending by code point, then seq descending.
        made = []
        for check, when in [("old", 9.5), ("newer", 1e9), ("older", 999999999.0)]:
            t.now = when
            made.append(await j.intend(check, "k", "n", "e", "r"))
        t.now = 20.0
        tied = [await j.intend(c, "k", "n", "e", "r") for c in ("b", "B", "a", "b")]
        got = [(e.check_id, e.seq) for e in await j.pending()]
        self.assertEqual(
            got,
            [
                ("newer", 1),
                ("older", 1),
                ("c", 1),
                ("B", 1),
                ("a", 1),
                ("b", 2),
                ("b", 1),
                ("c", 2),
                ("old", 1),
            ],
        )
        self.assertEqual(len(made) + len(tied) + 2, len(got))

    async def test_check_ids_sort_by_code_point_whatever_the_collation(self) -> None:
        """SQLite and Python order ids by code point; a database made with
        a natural-language collation (ICU's root: a < b < B) must not
        change the order of pending() and checks()."""
        (found,) = await self.sql("SELECT count(*) FROM pg_collation WHERE collname = 'und-x-icu'")
        self.assertEqual(found, (1,), "this PostgreSQL was built without ICU")
        await self.sql('ALTER TABLE journal ALTER COLUMN check_id TYPE text COLLATE "und-x-icu"')
        self.assertEqual(
            await self.sql(
                "SELECT x FROM unnest(ARRAY['b', 'B', 'a']) AS x ORDER BY x COLLATE \"und-x-icu\""
            ),
            [("a",), ("b",), ("B",)],
        )
        j = self.journal(FakeTime(5.0))
        for c in ("b", "B", "a"):
            await j.intend(c, "k", "n", "e", "r")
        self.assertEqual([e.check_id for e in await j.pending()], ["B", "a", "b"])
        self.assertEqual(await j.checks(), ["B", "a", "b"])
        self.assertEqual(await j.host_checks("a"), ["B", "a", "b"])

    async def test_checks_older_than_compares_numbers(self) -> None:
        t = FakeTime()
        j = self.journal(t)
        for check, when in [("nine", 9.5), ("ten", 10.0), ("nines", 999999999.0), ("billion", 1e9)]:
            t.now = when
            await j.intend(check, "k", "n", "e", "r")
        self.assertEqual(await j.checks(older_than=10.0), ["nine"])
        self.assertEqual(await j.checks(older_than=10.5), ["ten", "nine"])
        self.assertEqual(await j.checks(older_than=1000000000.0), ["nines", "ten", "nine"])
        self.assertEqual(await j.checks(older_than=1e12), ["billion", "nines", "ten", "nine"])
        self.assertEqual(await j.checks(older_than=9.5), [])

    async def test_checks_exclude_active_ones(self) -> None:
        t = FakeTime(100.0)
        j = self.journal(t)
        a = await j.intend("a", "k", "n", "e", "r")
        await j.intend("b", "k", "n", "e", "r")
        t.now = 200.0
        await j.done(a)
        self.assertEqual(await j.checks(), ["b"])
        # A check still working (its last write is recent) is not stale,
        # whichever daemon wrote last.
        t.now = 100.0
        c = await j.intend("c", "k", "n", "e", "r")
        await j.intend("c", "k", "n2", "e", "r")
        other = self.journal(FakeTime(300.0), host="b")
        await other.created(c, "i-1")
        self.assertEqual(await j.checks(older_than=250.0), ["b"])
        self.assertEqual(await j.checks(), ["c", "b"])

    async def test_unknown_entry(self) -> None:
        j = self.journal()
        ghost = JournalEntry("nope", 7, "k", "n", "e", "r", 1.0)
        err = await self.assertFailure(j.created(ghost, "i-1"), JournalError)
        self.assertEqual(str(err), f"journal {self.db.where}: has no entry nope/7")
        self.assertIsInstance(err, TxvmbotError)
        err = await self.assertFailure(j.done(ghost), JournalError)
        self.assertEqual(err.path, self.db.where)
        self.assertEqual(await self.sql("SELECT count(*) FROM journal"), [(0,)])

    async def test_bad_arguments(self) -> None:
        j = self.journal()
        # Refused before anything is written, as a failed Deferred.
        await self.assertFailure(j.intend("", "k", "n", "e", "r"), ValueError)
        await self.assertFailure(j.intend("c", "k", "", "e", "r"), ValueError)
        await self.assertFailure(j.intend("c", "k", "n", None, "r"), ValueError)  # type: ignore[arg-type]
        e = await j.intend("c", "k", "n", "e", "r")
        await self.assertFailure(j.created(e, ""), ValueError)
        await self.assertFailure(j.created(e, None), ValueError)  # type: ignore[arg-type]
        await self.assertFailure(j.prune(2000.0, 0), ValueError)
        self.assertEqual(await j.pending("c"), [e])
        self.assertRaises(ValueError, PostgresJournal, self.db, "")

    async def test_prune_forgets_old_done_entries_only(self) -> None:
        t = FakeTime(100.0)
        j = self.journal(t)
        for i in range(3):
            await j.done(await j.intend("old", "k", f"n{i}", "e", "r"))
        await j.done(await j.intend("stuck", "k", "a", "e", "r"))
        stuck = await j.created(await j.intend("stuck", "k", "b", "e", "r"), "i-1")
        late = await j.intend("late", "k", "n", "e", "r")
        t.now = 200.0
        await j.done(await j.intend("recent", "k", "n", "e", "r"))
        await j.done(late)  # intended at 100, done at 200: last written at 200
        pending, checks = await j.pending(), await j.checks()
        self.assertEqual(pending, [stuck])

        self.assertEqual(await j.prune(150.0), 3)
        self.assertEqual(await j.prune(150.0), 0)
        self.assertEqual(await j.pending(), pending)
        self.assertEqual(await j.checks(), checks)
        self.assertEqual(await j.checks(older_than=150.0), ["stuck"])
        # The cutoff is strict.
        self.assertEqual(await j.prune(200.0), 0)
        self.assertEqual(await j.prune(200.5), 2)  # recent and late
        self.assertEqual(await j.pending(), pending)
        # Once the stuck check is cleaned up, its whole record can go.
        await j.done(stuck)
        self.assertEqual(await j.prune(1e12), 2)
        self.assertEqual(await self.sql("SELECT count(*) FROM journal"), [(0,)])
        # A new check starts from seq 1 as before.
        self.assertEqual((await j.intend("old", "k", "n", "e", "r")).seq, 1)

    async def test_prune_is_bounded_and_oldest_first(self) -> None:
        t = FakeTime()
        j = self.journal(t)
        for i in range(7):
            t.now = 1000.0 - i  # intended newest first, done at 1000 - i
            await j.done(await j.intend(f"c{i}", "k", "n", "e", "r"))
        self.assertEqual(await j.prune(2000.0, limit=3), 3)
        self.assertEqual(
            await self.sql("SELECT check_id FROM journal ORDER BY check_id"),
            [("c0",), ("c1",), ("c2",), ("c3",)],
        )
        t.now = 5000.0
        await j.intend("c0", "k", "again", "e", "r")  # c0 now has a pending entry
        self.assertEqual(await j.prune(2000.0, limit=3), 3)
        self.assertEqual(await j.prune(2000.0, limit=3), 0)  # c0 kept: it has pending work
        self.assertEqual([e.check_id for e in await j.pending()], ["c0"])
        self.assertEqual(await self.sql("SELECT count(*) FROM journal"), [(2,)])

    async def test_prune_waits_for_an_intend_in_progress(self) -> None:
        """A daemon intending an entry for a check whose old entries are all
        done holds the check's lock until it commits; prune waits for it and
        then keeps the check's record, which now has pending work."""
        import psycopg

        t = FakeTime(100.0)
        j = self.journal(t)
        await j.done(await j.intend("c", "k", "n", "e", "r"))
        await j.done(await j.intend("d", "k", "n", "e", "r"))

        # Another daemon, in the middle of intend (lock taken, row inserted,
        # not committed). Blocking calls on the reactor thread: each is quick.
        other = psycopg.connect(self.dsn)
        self.addCleanup(other.close)
        other.execute("SELECT pg_advisory_xact_lock(%s, hashtext('c'))", (0x74786A6E,))
        other.execute(
            "INSERT INTO journal (check_id, seq, kind, name, endpoint, region, created,"
            " updated, host) VALUES ('c', 2, 'k', 'm', 'e', 'r', 150.0, 150.0, 'b')"
        )
        pruned = j.prune(1e9)
        for _ in range(200):
            waiting = await self.sql(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            if waiting == [(1,)]:
                break
            await deferLater(self.reactor, 0.02)
        else:
            self.fail("prune never waited for the intend's lock")
        self.assertNoResult(pruned)
        other.commit()
        self.assertEqual(await pruned, 1)  # d's entry only
        self.assertEqual(
            await self.sql("SELECT check_id, seq, done FROM journal ORDER BY seq"),
            [("c", 1, True), ("c", 2, False)],
        )
        self.assertEqual([(e.check_id, e.seq) for e in await j.pending()], [("c", 2)])

    # --- several daemons ----------------------------------------------------------

    async def test_host_checks(self) -> None:
        a = self.journal(host="a")
        b = self.journal(host="b", db=self.database())
        await a.intend("c2", "vm", "n", "local", "")
        await a.intend("c1", "vm", "n", "local", "")
        await a.done(await a.intend("gone", "vm", "n", "local", ""))
        await b.intend("theirs", "vm", "n", "local", "")
        # Taken over: the entry a wrote is done by b, b's own stays pending.
        moved = await a.intend("moved", "vm", "n", "local", "")
        await b.intend("moved", "vm", "m", "local", "")
        await b.done(moved)
        self.assertEqual(await a.host_checks("a"), ["c1", "c2"])
        self.assertEqual(await a.host_checks("b"), ["moved", "theirs"])
        self.assertEqual(await b.host_checks("a"), ["c1", "c2"])
        self.assertEqual(await a.host_checks("elsewhere"), [])
        self.assertEqual(
            await self.sql(
                "SELECT seq, host, done FROM journal WHERE check_id = 'moved' ORDER BY seq"
            ),
            [(1, "a", True), (2, "b", False)],
        )

    async def test_two_daemons_intending_one_check_get_distinct_seqs(self) -> None:
        a = self.journal(host="a")
        b = self.journal(host="b", db=self.database())
        entries = await gatherResults(
            [(a if i % 2 else b).intend("shared", "k", f"n{i}", "e", "r") for i in range(20)],
            consumeErrors=True,
        )
        self.assertEqual(sorted(e.seq for e in entries), list(range(1, 21)))
        self.assertEqual([e.seq for e in await a.pending("shared")], list(range(20, 0, -1)))
        self.assertEqual(
            await self.sql("SELECT host, count(*) FROM journal GROUP BY host ORDER BY host"),
            [("a", 10), ("b", 10)],
        )
        # Each entry is the one its caller was told about.
        stored = {(e.seq, e.name) for e in await b.pending("shared")}
        self.assertEqual(stored, {(e.seq, e.name) for e in entries})

    # --- errors -------------------------------------------------------------

    async def test_refused_statement_is_a_journal_error(self) -> None:
        j = self.journal()
        await self.sql("DROP TABLE journal")
        err = await self.assertFailure(j.intend("c", "k", "n", "e", "r"), JournalError)
        self.assertIn(f"journal {self.db.where}: cannot record the intent to create k n", str(err))
        self.assertIn("UndefinedTable", str(err))
        self.assertIsInstance(err.__cause__, DatabaseError)
        err = await self.assertFailure(j.checks(), JournalError)
        self.assertIn("cannot read", str(err))

    async def test_unreachable_database_is_not_translated(self) -> None:
        j = PostgresJournal(StubDatabase(DatabaseUnavailable("db here", "down")), "a",  # type: ignore[arg-type]
                            patience=0)
        for d in (j.intend("c", "k", "n", "e", "r"), j.pending(), j.prune(1.0), j.host_checks("a")):
            err = await self.assertFailure(d, DatabaseUnavailable)
            self.assertEqual(str(err), "job store db here: down")
        refused = PostgresJournal(StubDatabase(DatabaseError("db here", "no")), "a")  # type: ignore[arg-type]
        err = await self.assertFailure(refused.pending(), JournalError)
        self.assertEqual(str(err), "journal db here: cannot read: no")

    def test_an_outage_is_waited_out_within_patience(self) -> None:
        """A database restart: the call is tried again with backoff (0.5 s,
        1 s, ...) and answers once the database does; past ``patience`` it
        fails with DatabaseUnavailable."""
        stub = StubDatabase(DatabaseUnavailable("db here", "down"), failures=2, answer=[])
        j = PostgresJournal(stub, "a", patience=10)  # type: ignore[arg-type]
        d = j.pending()
        self.assertNoResult(d)
        stub.reactor.advance(0.5)
        self.assertNoResult(d)
        stub.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(stub.calls, 3)
        stub = StubDatabase(DatabaseUnavailable("db here", "down"))
        j = PostgresJournal(stub, "a", patience=3)  # type: ignore[arg-type]
        d = j.pending()
        stub.reactor.pump([0.5, 1.0, 2.0])
        self.failureResultOf(d, DatabaseUnavailable)
        self.assertEqual(stub.calls, 3)

    # --- what make_cleaner's Cleanup needs ------------------------------------

    async def test_cleanup_undoes_newest_first(self) -> None:
        j = self.journal(host="a")
        await j.created(await j.intend("c1", "keypair", "kp", "e", "r"), "kp-1")
        await j.created(await j.intend("c1", "group", "sg", "e", "r"), "sg-1")
        await j.intend("c1", "instance", "txvmbot-c1", "e", "r")
        await j.intend("c2", "keypair", "other", "e", "r")
        undone: list[str] = []

        def undo(entry: JournalEntry) -> Deferred[bool]:
            undone.append(entry.resource_id or entry.name)
            return succeed(True)

        runner = StepRunner(self.reactor)
        errors = await Cleanup(j, undo, runner, 30).run("c1")
        self.assertEqual(errors, ())
        self.assertEqual(undone, ["txvmbot-c1", "sg-1", "kp-1"])
        self.assertEqual(await j.pending("c1"), [])
        self.assertEqual([e.name for e in await j.pending()], ["other"])
        self.assertEqual(
            [(r.name, r.outcome) for r in runner.results],
            [
                ("cleanup instance txvmbot-c1", "passed"),
                ("cleanup group sg-1", "passed"),
                ("cleanup keypair kp-1", "passed"),
            ],
        )


class StubDatabase:
    """A Database whose every transaction fails with ``error``."""

    where = "db here"

    def __init__(self, error: Exception, failures: int = 10**6, answer: Any = None) -> None:
        from twisted.internet.task import Clock

        self.error = error
        self.failures = failures
        self.answer = answer
        self.calls = 0
        self.reactor = Clock()

    def run(self, fn: Callable[..., object], *args: object) -> Deferred[Any]:
        self.calls += 1
        if self.calls > self.failures:
            return succeed(self.answer)
        return fail(self.error)
