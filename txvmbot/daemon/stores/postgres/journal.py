"""The cleanup journal (:class:`~txvmbot.interfaces.IJournal`) in the shared
PostgreSQL database, so that a daemon taking over a check finds its undo
stack.

It behaves as :class:`txvmbot.journal.SQLiteJournal` does (same sequence
numbers, orders, pruning rules and errors), except that every method returns
a Deferred: the work runs in the :class:`~txvmbot.daemon.stores.postgres.db.Database`'s
threads, one transaction per call. Each entry also records the host of the
daemon that wrote it, because a local (QEMU) machine lives on that host
alone: :meth:`PostgresJournal.host_checks` tells a restarted daemon which
checks left machines behind on its host.

Two daemons may write entries of one check (after a takeover), so
:meth:`~PostgresJournal.intend` numbers entries under a transaction-scoped
advisory lock per check, and :meth:`~PostgresJournal.prune` takes the same
locks before it deletes, so it never forgets the history of a check that
gains a pending entry meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from txvmbot.daemon.stores.postgres.db import Database, DatabaseError, DatabaseUnavailable
from txvmbot.interfaces import IHostJournal
from txvmbot.journal import (
    PRUNE_BATCH,
    JournalError,
    _check_intend,
    _check_resource_id,
    _row_to_entry,
)
from txvmbot.model import JournalEntry

if TYPE_CHECKING:
    from psycopg import Connection

__all__ = ["JOURNAL_LOCK", "PostgresJournal"]

T = TypeVar("T")

#: First key of the two-key advisory locks that serialise the writers of one
#: check (the second is ``hashtext(check_id)``): "txjn" as an int. Two-key
#: locks never collide with single-key ones such as the migration lock.
JOURNAL_LOCK = 0x74786A6E

_COLUMNS = "check_id, seq, kind, name, endpoint, region, created, resource_id, parent_id, done"

# Check ids sort by code point, as SQLite's BINARY collation and Python do,
# whatever collation the database was created with.
_BY_ID = 'check_id COLLATE "C"'


@implementer(IHostJournal)
class PostgresJournal:
    """The journal in the shared database, written by the daemon on ``host``.

    :param db: the started database; its owner closes it.
    :param host: this daemon's host name, stored with every entry it intends.
    :param clock: returns epoch seconds; stamps every entry.

    Every method returns a Deferred that fires with what
    :class:`~txvmbot.journal.SQLiteJournal`'s returns, or fails with
    ValueError for bad arguments, JournalError (naming the database) when
    the database refused a statement or an entry does not exist, and
    DatabaseUnavailable, unchanged, when the database could not be reached
    for ``patience`` seconds.
    """

    def __init__(
        self,
        db: Database,
        host: str,
        clock: Callable[[], float] = time.time,
        *,
        patience: float = 120.0,
    ) -> None:
        if not isinstance(host, str) or not host:
            raise ValueError(f"journal host must be a non-empty string, not {host!r}")
        self.db = db
        self.host = host
        #: Where the journal is, for messages: the database without its password.
        self.path = db.where
        self._clock = clock
        self._patience = patience

    def __repr__(self) -> str:
        return f"<PostgresJournal {self.path} host={self.host!r}>"

    async def _run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in one transaction; DatabaseError becomes
        JournalError. While the database cannot be reached (a restart) the
        call is tried again with backoff for up to ``patience`` seconds, so
        a check waits (before a create, or while it cleans up) instead of
        failing and leaving what it made; after that DatabaseUnavailable
        goes through unchanged."""
        from twisted.internet.task import deferLater

        reactor = self.db.reactor
        start = reactor.seconds()
        delay = 0.5
        while True:
            try:
                return await self.db.run(fn, *args)
            except DatabaseUnavailable:
                if reactor.seconds() - start + delay > self._patience:
                    raise
            except DatabaseError as e:
                raise JournalError(self.path, f"cannot {what}: {e.message}") from e
            await deferLater(reactor, delay, lambda: None)
            delay = min(5.0, delay * 2)

    def intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> Deferred[JournalEntry]:
        """Record durably that ``kind`` ``name`` is about to be created."""

        async def go() -> JournalEntry:
            _check_intend(check_id, kind, name, endpoint, region, parent_id)
            now = float(self._clock())
            seq = await self._run(
                f"record the intent to create {kind} {name}",
                _intend,
                check_id,
                (kind, name, endpoint, region, now, now, parent_id, self.host),
            )
            return JournalEntry(
                check_id=check_id,
                seq=seq,
                kind=kind,
                name=name,
                endpoint=endpoint,
                region=region,
                created=now,
                parent_id=parent_id,
            )

        return _deferred(go())

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        """Record the id the cloud gave ``entry``'s resource."""

        async def go() -> JournalEntry:
            _check_resource_id(resource_id)
            found = await self._run(
                f"record {entry.kind} {resource_id}",
                _update,
                "resource_id = %s, updated = %s",
                (resource_id, float(self._clock())),
                entry,
            )
            if not found:
                raise JournalError(self.path, f"has no entry {entry.check_id}/{entry.seq}")
            return attrs.evolve(entry, resource_id=resource_id)

        return _deferred(go())

    def done(self, entry: JournalEntry) -> Deferred[None]:
        """Record that ``entry``'s resource is gone."""

        async def go() -> None:
            found = await self._run(
                f"mark {entry.kind} {entry.resource_id or entry.name} done",
                _update,
                "done = true, updated = %s",
                (float(self._clock()),),
                entry,
            )
            if not found:
                raise JournalError(self.path, f"has no entry {entry.check_id}/{entry.seq}")

        return _deferred(go())

    def pending(self, check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        """Entries not done, newest first.

        For one check, by ``seq`` (the undo order, whatever the wall clock
        did). Across checks, by ``created`` time, then check id, then seq.
        """
        if check_id is not None:
            sql = (
                f"SELECT {_COLUMNS} FROM journal WHERE NOT done AND check_id = %s ORDER BY seq DESC"
            )
            args: tuple[object, ...] = (check_id,)
        else:
            sql = (
                f"SELECT {_COLUMNS} FROM journal WHERE NOT done"
                f" ORDER BY created DESC, {_BY_ID} ASC, seq DESC"
            )
            args = ()

        async def go() -> Sequence[JournalEntry]:
            rows = await self._run("read", _select, sql, args)
            return [_row_to_entry(r) for r in rows]

        return _deferred(go())

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        """Ids of checks with pending entries, most recently active first.

        With ``older_than`` (epoch seconds), only checks whose last journal
        activity (any entry's intend, created or done, by any daemon) is
        strictly before it: a check still cleaning up is not stale.
        """
        having = "" if older_than is None else " HAVING MAX(updated) < %s"
        args: tuple[object, ...] = () if older_than is None else (float(older_than),)
        sql = (
            "SELECT check_id, MAX(updated) AS last FROM journal"
            " WHERE check_id IN (SELECT check_id FROM journal WHERE NOT done)"
            f" GROUP BY check_id{having}"
            f" ORDER BY last DESC, {_BY_ID} ASC"
        )

        async def go() -> Sequence[str]:
            rows = await self._run("read", _select, sql, args)
            return [str(r[0]) for r in rows]

        return _deferred(go())

    def host_checks(self, host: str) -> Deferred[Sequence[str]]:
        """Ids of checks with pending entries written by a daemon on
        ``host``, by id: a daemon restarted on that host stops the local
        machines such checks left there."""

        async def go() -> Sequence[str]:
            rows = await self._run(
                "read",
                _select,
                f"SELECT DISTINCT {_BY_ID} AS id FROM journal WHERE NOT done AND host = %s"
                " ORDER BY id",
                (host,),
            )
            return [str(r[0]) for r in rows]

        return _deferred(go())

    def prune(self, done_before: float, limit: int = PRUNE_BATCH) -> Deferred[int]:
        """Forget up to ``limit`` done entries last written strictly before
        ``done_before`` (epoch seconds), oldest first, in one transaction;
        fire with how many went.

        Pending entries are never touched, and neither are the done entries
        of a check that still has pending ones (cleanup and the reaper undo
        such a check from its whole record).
        """

        async def go() -> int:
            if limit < 1:
                raise ValueError(f"prune limit must be at least 1, not {limit!r}")
            return await self._run("prune done entries", _prune, float(done_before), int(limit))

        return _deferred(go())

    def close(self) -> None:
        """Nothing to do: the Database belongs to whoever made it."""


def _deferred(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


# --- in a database thread, inside Database.run's transaction ------------------


def _lock_check(conn: Connection[Any], check_id: str) -> None:
    conn.execute(f"SELECT pg_advisory_xact_lock({JOURNAL_LOCK}, hashtext(%s))", (check_id,))


def _intend(conn: Connection[Any], check_id: str, rest: tuple[object, ...]) -> int:
    """Insert ``check_id``'s entry (the other columns in ``rest``) with the
    check's next seq; return the seq."""
    # Held until commit: a second writer of this check waits here, then
    # (read committed: each statement sees what committed before it) reads
    # the MAX that includes our entry.
    _lock_check(conn, check_id)
    row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) FROM journal WHERE check_id = %s", (check_id,)
    ).fetchone()
    assert row is not None
    seq = int(row[0]) + 1
    conn.execute(
        "INSERT INTO journal (check_id, seq, kind, name, endpoint, region, created, updated,"
        " parent_id, host) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (check_id, seq, *rest),
    )
    return seq


def _update(
    conn: Connection[Any], assignments: str, values: tuple[object, ...], entry: JournalEntry
) -> bool:
    """Set ``assignments`` on ``entry``'s row; whether it exists."""
    cur = conn.execute(
        f"UPDATE journal SET {assignments} WHERE check_id = %s AND seq = %s",
        (*values, entry.check_id, entry.seq),
    )
    return cur.rowcount == 1


def _select(conn: Connection[Any], sql: str, args: tuple[object, ...]) -> list[tuple[Any, ...]]:
    return conn.execute(sql, args).fetchall()


def _prune(conn: Connection[Any], done_before: float, limit: int) -> int:
    candidates = conn.execute(
        "SELECT check_id, seq FROM journal WHERE done AND updated < %s"
        " AND check_id NOT IN (SELECT check_id FROM journal WHERE NOT done)"
        " ORDER BY updated LIMIT %s",
        (done_before, limit),
    ).fetchall()
    if not candidates:
        return 0
    ids = [str(c) for c, _ in candidates]
    seqs = [int(s) for _, s in candidates]
    # The locks intend takes, in one order (by hash: two ids may share one),
    # so that two pruning daemons do not deadlock. Then the delete looks
    # again: a check that gained a pending entry before we got its lock
    # keeps its record.
    conn.execute(
        f"SELECT pg_advisory_xact_lock({JOURNAL_LOCK}, h) FROM"
        " (SELECT DISTINCT hashtext(c) AS h FROM unnest(%s::text[]) AS c ORDER BY h) AS locks",
        (sorted(set(ids)),),
    )
    cur = conn.execute(
        "DELETE FROM journal AS j USING unnest(%s::text[], %s::integer[]) AS k (check_id, seq)"
        " WHERE j.check_id = k.check_id AND j.seq = k.seq AND j.done AND j.updated < %s"
        " AND NOT EXISTS (SELECT 1 FROM journal AS p WHERE p.check_id = j.check_id AND NOT p.done)",
        (ids, seqs, done_before),
    )
    return int(cur.rowcount)
