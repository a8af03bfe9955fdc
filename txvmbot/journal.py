"""The durable cleanup journal: the undo stack of every check.

A check calls :meth:`~IJournal.intend` *before* it asks the cloud to create a
resource, :meth:`~IJournal.created` once the cloud answered with an id, and
:meth:`~IJournal.done` once the resource is gone. Whatever is not done is
pending: cleanup undoes it newest first, and after a crash (even a SIGKILL
between ``intend`` and ``created``) the next run or the reaper finds it.

:class:`SQLiteJournal` keeps the journal in an SQLite file: WAL mode,
``synchronous=NORMAL`` and one committed transaction per write, so a write
survives the process being killed the moment the method returns (SQLite's WAL
guarantee). It may not survive a power cut or kernel crash; that case is
covered by the tag every resource carries, which cleanup and ``txvmbot reap``
search by. FULL cost an fsync per write on the reactor thread: 0.5-1 ms
idle, up to 40 ms on a busy disk, twelve times per check (measured with
bench/parallel_vs_boto3.py's profiling). Times are stored as REAL epoch
seconds, never as text, so they compare as numbers (seed 004: timestamps
compared as strings broke a scheduler for a day and a half).

:class:`MemoryJournal` behaves the same without a file, for tests and for
users who drive txvmbot from their own code.

Done entries are history; :meth:`~IJournal.prune` forgets old ones (the
daemon does, on its retention schedule) so the file does not grow forever.

Both work synchronously and block briefly on every write (a check writes a
handful of entries, so that is cheaper than a thread hop), but answer as
every journal does, with a Deferred: one that has fired already
(``succeed()``/``fail()``, as klein's memory session store answers), so
callers never ask whether they got one. The synchronous calls stay behind
them, private (``_intend``, ``_created``, ``_done``, ``_pending``,
``_checks``, ``_prune``), for the few parts that must have the answer now:
the daemon's held journal, which retries a write itself, and the CLI before
its reactor runs.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from txvmbot._sqlite import FileKind, Migration
from txvmbot._sqlite_errors import is_lock_timeout
from txvmbot.errors import TxvmbotError
from txvmbot.interfaces import IJournal
from txvmbot.model import JournalEntry

__all__ = [
    "APPLICATION_ID",
    "PRUNE_BATCH",
    "SCHEMA_VERSION",
    "JournalError",
    "MemoryJournal",
    "SQLiteJournal",
    "migrate",
]

#: Marks an SQLite file as a txvmbot journal (``PRAGMA application_id``): "txjn".
APPLICATION_ID = 0x74786A6E

#: The most entries one :meth:`SQLiteJournal.prune` call deletes, so that
#: one transaction stays short (the caller calls again for the rest): 500
#: took 45 ms in a journal of a million entries (1,000: 85 ms, build
#: machine, 2026-11-22).
PRUNE_BATCH = 500


class JournalError(TxvmbotError):
    """The journal cannot be opened, read or written.

    ``path`` names the file (``":memory:"`` for a :class:`MemoryJournal`).
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"journal {path}: {message}")
        self.path = path
        self.message = message


# --- schema -----------------------------------------------------------------
#
# _MIGRATIONS[i] takes a database at schema version i to version i + 1, inside
# the caller's transaction. To add v3: write ``_v2_to_v3(conn)`` (ALTER TABLE,
# new indexes, data fixes), append it here, and teach _row_to_entry and the
# writers the new columns. Never edit a released migration.


def _create_v1(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    # ``created`` and ``updated`` are REAL epoch seconds; the CHECKs refuse
    # anything that is not a number, so no writer can slip text in.
    conn.execute(
        """
        CREATE TABLE entries (
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
        )
        """
    )
    conn.execute("CREATE INDEX entries_pending ON entries (done, check_id)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    # Pruning reads the done entries older than a cutoff from this index,
    # oldest first, instead of every done entry. Partial: an entry enters it
    # only when it is marked done, so intend and created pay nothing for it.
    conn.execute("CREATE INDEX entries_done ON entries (updated) WHERE done = 1")


_MIGRATIONS: tuple[Migration, ...] = (_create_v1, _v1_to_v2)

#: The schema version this code writes.
SCHEMA_VERSION = len(_MIGRATIONS)


_KIND = FileKind(
    what="journal",
    application_id=APPLICATION_ID,
    migrations=_MIGRATIONS,
    error=JournalError,
)


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the journal in ``conn`` up to :data:`SCHEMA_VERSION`.

    Runs in one ``BEGIN IMMEDIATE`` transaction, so two processes opening a
    new file at once create the schema once. Returns the version found
    before migrating. Refuses a newer schema, which this code would
    misread, with a JournalError that says what to do.
    """
    return _KIND.migrate(conn, path)


# --- SQLite -------------------------------------------------------------------

_COLUMNS = "check_id, seq, kind, name, endpoint, region, created, resource_id, parent_id, done"


def _row_to_entry(row: Sequence[Any]) -> JournalEntry:
    check_id, seq, kind, name, endpoint, region, created, rid, parent, done = row
    return JournalEntry(
        check_id=str(check_id),
        seq=int(seq),
        kind=str(kind),
        name=str(name),
        endpoint=str(endpoint),
        region=str(region),
        created=float(created),
        resource_id=None if rid is None else str(rid),
        parent_id=None if parent is None else str(parent),
        done=bool(done),
    )


def _check_intend(
    check_id: str, kind: str, name: str, endpoint: str, region: str, parent_id: str | None
) -> None:
    for label, value in (("check_id", check_id), ("kind", kind), ("name", name)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"journal entry {label} must be a non-empty string, not {value!r}")
    for label, value in (("endpoint", endpoint), ("region", region)):
        if not isinstance(value, str):
            raise ValueError(f"journal entry {label} must be a string, not {value!r}")
    if parent_id is not None and not isinstance(parent_id, str):
        raise ValueError(f"journal entry parent_id must be a string or None, not {parent_id!r}")


def _check_resource_id(resource_id: str) -> None:
    if not isinstance(resource_id, str) or not resource_id:
        raise ValueError(f"resource id must be a non-empty string, not {resource_id!r}")


_T = TypeVar("_T")


def _answer(call: Callable[..., _T], *args: Any) -> Deferred[_T]:
    """``call``'s answer as a Deferred that has fired (or failed) already."""
    try:
        return succeed(call(*args))
    except Exception:
        return fail()


class _AnsweredJournal:
    """IJournal answered with Deferreds that have fired already, from the
    synchronous private calls a subclass defines."""

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
        return _answer(self._intend, check_id, kind, name, endpoint, region, parent_id)

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        """Record the id the cloud gave ``entry``'s resource."""
        return _answer(self._created, entry, resource_id)

    def done(self, entry: JournalEntry) -> Deferred[None]:
        """Record that ``entry``'s resource is gone."""
        return _answer(self._done, entry)

    def pending(self, check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        """Entries not done, newest first (see :meth:`SQLiteJournal._pending`)."""
        return _answer(self._pending, check_id)

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        """Ids of checks with pending entries, most recently active first
        (see :meth:`SQLiteJournal._checks`)."""
        return _answer(self._checks, older_than)

    def prune(self, done_before: float, limit: int = PRUNE_BATCH) -> Deferred[int]:
        """Forget up to ``limit`` old done entries; fire with how many went
        (see :meth:`SQLiteJournal._prune`)."""
        return _answer(self._prune, done_before, limit)

    # The synchronous calls behind the answers.

    def _intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> JournalEntry:
        raise NotImplementedError

    def _created(self, entry: JournalEntry, resource_id: str) -> JournalEntry:
        raise NotImplementedError

    def _done(self, entry: JournalEntry) -> None:
        raise NotImplementedError

    def _pending(self, check_id: str | None = None) -> list[JournalEntry]:
        raise NotImplementedError

    def _checks(self, older_than: float | None = None) -> list[str]:
        raise NotImplementedError

    def _prune(self, done_before: float, limit: int = PRUNE_BATCH) -> int:
        raise NotImplementedError


@implementer(IJournal)
class SQLiteJournal(_AnsweredJournal):
    """A journal in an SQLite file, safe against crashes and shared by processes.

    :param path: the file; created with its schema if missing or empty.
    :param clock: returns epoch seconds; stamps every entry.
    :param busy_timeout: seconds to wait for another process's write lock
        before a write fails with JournalError.

    Every write is its own committed transaction (WAL, ``synchronous=NORMAL``
    by default: it survives the process being killed; ``synchronous="FULL"``
    also survives power loss, at an fsync per write). Raises JournalError naming the
    path when the file cannot be opened, is not a journal, or has a newer
    schema.

    Every IJournal method answers with a Deferred that has fired already;
    ``close`` closes at once.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: Callable[[], float] = time.time,
        *,
        busy_timeout: float = 10.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
    ) -> None:
        self.path = path
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = _KIND.open(
            path, busy_timeout=busy_timeout, synchronous=synchronous, log=self.log
        )

    def __repr__(self) -> str:
        return f"<SQLiteJournal {self.path!r}>"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise JournalError(self.path, "is closed")
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One committed write transaction; SQLite errors become JournalError."""
        conn = self._db
        try:
            # IMMEDIATE takes the write lock now (waiting up to busy_timeout
            # for another process), so the seq we read stays ours.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            if not is_lock_timeout(e):
                raise JournalError(self.path, f"cannot {what}: {e}") from e
            raise JournalError(
                self.path,
                f"cannot {what}: {e} (another process held the write lock for more "
                f"than {self._busy_timeout:g}s)",
            ) from e
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise JournalError(self.path, f"cannot {what}: {e}") from e
            raise

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise JournalError(self.path, f"cannot read: {e}") from e

    def _intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> JournalEntry:
        """Record durably that ``kind`` ``name`` is about to be created."""
        _check_intend(check_id, kind, name, endpoint, region, parent_id)
        now = float(self._clock())
        with self._write(f"record the intent to create {kind} {name}") as conn:
            (last,) = conn.execute(
                "SELECT COALESCE(MAX(seq), 0) FROM entries WHERE check_id = ?", (check_id,)
            ).fetchone()
            entry = JournalEntry(
                check_id=check_id,
                seq=int(last) + 1,
                kind=kind,
                name=name,
                endpoint=endpoint,
                region=region,
                created=now,
                parent_id=parent_id,
            )
            conn.execute(
                "INSERT INTO entries (check_id, seq, kind, name, endpoint, region, created,"
                " updated, parent_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (check_id, entry.seq, kind, name, endpoint, region, now, now, parent_id),
            )
        return entry

    def _created(self, entry: JournalEntry, resource_id: str) -> JournalEntry:
        """Record the id the cloud gave ``entry``'s resource."""
        _check_resource_id(resource_id)
        now = float(self._clock())
        with self._write(f"record {entry.kind} {resource_id}") as conn:
            cur = conn.execute(
                "UPDATE entries SET resource_id = ?, updated = ? WHERE check_id = ? AND seq = ?",
                (resource_id, now, entry.check_id, entry.seq),
            )
            if cur.rowcount != 1:
                raise JournalError(self.path, f"has no entry {entry.check_id}/{entry.seq}")
        return attrs.evolve(entry, resource_id=resource_id)

    def _done(self, entry: JournalEntry) -> None:
        """Record that ``entry``'s resource is gone."""
        now = float(self._clock())
        with self._write(f"mark {entry.kind} {entry.resource_id or entry.name} done") as conn:
            cur = conn.execute(
                "UPDATE entries SET done = 1, updated = ? WHERE check_id = ? AND seq = ?",
                (now, entry.check_id, entry.seq),
            )
            if cur.rowcount != 1:
                raise JournalError(self.path, f"has no entry {entry.check_id}/{entry.seq}")

    def _pending(self, check_id: str | None = None) -> list[JournalEntry]:
        """Entries not done, newest first.

        For one check, by ``seq`` (the undo order, whatever the wall clock
        did). Across checks, by ``created`` time, then check id, then seq.
        """
        if check_id is not None:
            rows = self._read(
                f"SELECT {_COLUMNS} FROM entries WHERE done = 0 AND check_id = ? ORDER BY seq DESC",
                (check_id,),
            )
        else:
            rows = self._read(
                f"SELECT {_COLUMNS} FROM entries WHERE done = 0"
                " ORDER BY created DESC, check_id ASC, seq DESC"
            )
        return [_row_to_entry(r) for r in rows]

    def _checks(self, older_than: float | None = None) -> list[str]:
        """Ids of checks with pending entries, most recently active first.

        With ``older_than`` (epoch seconds), only checks whose last journal
        activity (any entry's intend, created or done) is strictly before it:
        a check still cleaning up is not stale, so a reaper leaves it alone.
        """
        rows = self._read(
            "SELECT check_id, MAX(updated) AS last FROM entries"
            " WHERE check_id IN (SELECT check_id FROM entries WHERE done = 0)"
            " GROUP BY check_id"
            " HAVING ? IS NULL OR last < ?"
            " ORDER BY last DESC, check_id ASC",
            (older_than, None if older_than is None else float(older_than)),
        )
        return [str(r[0]) for r in rows]

    def _prune(self, done_before: float, limit: int = PRUNE_BATCH) -> int:
        """Forget up to ``limit`` done entries last written strictly before
        ``done_before`` (epoch seconds), oldest first, in one transaction;
        return how many went.

        Pending entries are never touched, and neither are the done entries
        of a check that still has pending ones: cleanup and ``txvmbot reap``
        undo such a check from its whole record, and its last activity
        (:meth:`checks`) must not seem older than it is.
        """
        if limit < 1:
            raise ValueError(f"prune limit must be at least 1, not {limit!r}")
        with self._write("prune done entries") as conn:
            # INDEXED BY: without statistics the planner would rather walk
            # every done entry through entries_pending.
            cur = conn.execute(
                "DELETE FROM entries WHERE rowid IN ("
                " SELECT rowid FROM entries INDEXED BY entries_done"
                " WHERE done = 1 AND updated < ?"
                " AND check_id NOT IN (SELECT check_id FROM entries WHERE done = 0)"
                " ORDER BY updated LIMIT ?)",
                (float(done_before), int(limit)),
            )
        return int(cur.rowcount)

    def close(self) -> None:
        """Close the file, at once. Idempotent; any later call fails with JournalError."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --- memory ---------------------------------------------------------------------


@frozen
class _Record:
    entry: JournalEntry
    updated: float


@implementer(IJournal)
class MemoryJournal(_AnsweredJournal):
    """An in-memory journal that behaves like :class:`SQLiteJournal`.

    For tests of code that drives a journal. ``entries`` shows every entry,
    done or not, in the order intended.
    """

    path = ":memory:"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[tuple[str, int], _Record] = {}
        self._closed = False

    def __repr__(self) -> str:
        live = sum(1 for r in self._records.values() if not r.entry.done)
        return f"<MemoryJournal {live} pending{' closed' if self._closed else ''}>"

    @property
    def entries(self) -> tuple[JournalEntry, ...]:
        return tuple(r.entry for r in self._records.values())

    def _get(self, entry: JournalEntry) -> _Record:
        if self._closed:
            raise JournalError(self.path, "is closed")
        try:
            return self._records[(entry.check_id, entry.seq)]
        except KeyError:
            raise JournalError(self.path, f"has no entry {entry.check_id}/{entry.seq}") from None

    def _intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> JournalEntry:
        if self._closed:
            raise JournalError(self.path, "is closed")
        _check_intend(check_id, kind, name, endpoint, region, parent_id)
        now = float(self._clock())
        seq = 1 + max((s for (c, s) in self._records if c == check_id), default=0)
        entry = JournalEntry(
            check_id=check_id,
            seq=seq,
            kind=kind,
            name=name,
            endpoint=endpoint,
            region=region,
            created=now,
            parent_id=parent_id,
        )
        self._records[(check_id, seq)] = _Record(entry, now)
        return entry

    def _created(self, entry: JournalEntry, resource_id: str) -> JournalEntry:
        _check_resource_id(resource_id)
        record = self._get(entry)
        new = attrs.evolve(record.entry, resource_id=resource_id)
        self._records[(entry.check_id, entry.seq)] = _Record(new, float(self._clock()))
        return attrs.evolve(entry, resource_id=resource_id)

    def _done(self, entry: JournalEntry) -> None:
        record = self._get(entry)
        new = attrs.evolve(record.entry, done=True)
        self._records[(entry.check_id, entry.seq)] = _Record(new, float(self._clock()))

    def _pending(self, check_id: str | None = None) -> list[JournalEntry]:
        if self._closed:
            raise JournalError(self.path, "is closed")
        live = [r.entry for r in self._records.values() if not r.entry.done]
        if check_id is not None:
            return sorted((e for e in live if e.check_id == check_id), key=lambda e: -e.seq)
        # created DESC, check_id ASC, seq DESC, as the SQL does.
        live.sort(key=lambda e: e.seq, reverse=True)
        live.sort(key=lambda e: e.check_id)
        live.sort(key=lambda e: e.created, reverse=True)
        return live

    def _checks(self, older_than: float | None = None) -> list[str]:
        if self._closed:
            raise JournalError(self.path, "is closed")
        last: dict[str, float] = {}
        with_pending: set[str] = set()
        for r in self._records.values():
            c = r.entry.check_id
            last[c] = max(last.get(c, r.updated), r.updated)
            if not r.entry.done:
                with_pending.add(c)
        found = [c for c in with_pending if older_than is None or last[c] < float(older_than)]
        found.sort()
        found.sort(key=lambda c: last[c], reverse=True)
        return found

    def _prune(self, done_before: float, limit: int = PRUNE_BATCH) -> int:
        if self._closed:
            raise JournalError(self.path, "is closed")
        if limit < 1:
            raise ValueError(f"prune limit must be at least 1, not {limit!r}")
        with_pending = {r.entry.check_id for r in self._records.values() if not r.entry.done}
        old = [
            (r.updated, key)
            for key, r in self._records.items()
            if r.entry.done and r.updated < float(done_before) and key[0] not in with_pending
        ]
        old.sort(key=lambda o: o[0])
        for _, key in old[:limit]:
            del self._records[key]
        return min(len(old), limit)

    def close(self) -> None:
        self._closed = True
