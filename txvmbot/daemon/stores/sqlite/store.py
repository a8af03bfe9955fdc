"""The daemon's durable job store: every job and every event of every job,
until retention prunes finished ones (:meth:`SQLiteJobStore.prune`).

:class:`SQLiteJobStore` keeps them in one SQLite file that the daemon
process alone opens and writes (seed 004: several writers on one SQLite file
meant lock timeouts and retry loops that hid real errors). Writes are plain
synchronous ``sqlite3`` calls on the reactor thread: one statement, one
committed transaction, except :meth:`SQLiteJobStore.add_many`, which stores
a batch of submits with one commit (see the class docstring for the numbers
and the durability trade-off), and :meth:`SQLiteJobStore.prune`, which
deletes a bounded batch of old jobs with their events in one.

Times are REAL epoch seconds, never text, so ``submitted`` 9.5 sorts before
10.0 and 999999999.0 before 1000000000.0 (seed 004: timestamps compared as
strings recycled addresses too early). The schema CHECKs refuse anything
else from any writer.

A job is stored as the columns the daemon filters and sorts on (state,
backend, priority, submitted, ...) plus the whole job as JSON
(:func:`txvmbot.daemon.codec.job_to_dict`), so new fields need no migration until
someone wants to filter on them.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from txvmbot._sqlite import FileKind, Migration
from txvmbot._sqlite_errors import is_lock_timeout
from txvmbot.daemon.codec import dumps, event_to_dict, job_to_dict
from txvmbot.daemon.interfaces import IJobStore, IJobWriter
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.stores.sql import SQLITE, StoreError, decode_event, decode_job

__all__ = [
    "APPLICATION_ID",
    "AnsweredStore",
    "MIGRATIONS",
    "PRUNE_BATCH",
    "SCHEMA_VERSION",
    "SQLiteJobStore",
    "SQLiteJobs",
    "StoreError",
    "SyncJobs",
    "migrate",
]

#: Marks an SQLite file as a txvmbot job store (``PRAGMA application_id``): "txjs".
APPLICATION_ID = 0x74786A73

#: The most jobs one :meth:`SQLiteJobStore.prune` call deletes, so that one
#: transaction stays short on the reactor thread; the caller calls again for
#: the rest. 500 jobs with 30 events each took 15-40 ms (1,000: about 40 ms,
#: build machine, 50,000 jobs, 1.5 million events, 2026-11-22).
PRUNE_BATCH = 500


# --- schema -----------------------------------------------------------------
#
# MIGRATIONS[i] takes a database at schema version i to version i + 1, inside
# the caller's transaction. To add v3: write ``_v2_to_v3(conn)`` (ALTER TABLE
# ... ADD COLUMN, new indexes, backfill from the JSON ``data``), append it
# here, and teach the writers the new column. Readers select columns by name,
# so a column they do not know is harmless. Never edit a released migration;
# tests/unit/test_store.py keeps a hand-made copy of the v1 file to prove it.


def _real(column: str, nullable: bool = False) -> str:
    check = f"typeof({column}) = 'real'"
    if nullable:
        return f"{column} REAL CHECK ({column} IS NULL OR {check})"
    return f"{column} REAL NOT NULL CHECK ({check})"


def _create_v1(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (0)")
    # ``seq`` is the order of submission (never reused: AUTOINCREMENT), the
    # tie-break after ``submitted`` for FIFO within one priority.
    conn.execute(
        f"""
        CREATE TABLE jobs (
            seq       INTEGER PRIMARY KEY AUTOINCREMENT,
            id        TEXT    NOT NULL UNIQUE,
            state     TEXT    NOT NULL,
            backend   TEXT    NOT NULL,
            priority  INTEGER NOT NULL,
            {_real("submitted")},
            {_real("started", nullable=True)},
            {_real("finished", nullable=True)},
            {_real("updated")},
            attempts  INTEGER NOT NULL,
            data      TEXT    NOT NULL
        )
        """
    )
    # The queue in dispatch order (recovery, "what is waiting"), the newest
    # first listing, and the per-backend listing.
    conn.execute("CREATE INDEX jobs_queue ON jobs (state, priority DESC, submitted, seq)")
    conn.execute("CREATE INDEX jobs_submitted ON jobs (submitted, seq)")
    conn.execute("CREATE INDEX jobs_backend ON jobs (backend, submitted, seq)")
    conn.execute(
        f"""
        CREATE TABLE events (
            job_id TEXT    NOT NULL,
            seq    INTEGER NOT NULL CHECK (seq >= 1),
            {_real("at")},
            data   TEXT    NOT NULL,
            PRIMARY KEY (job_id, seq)
        ) WITHOUT ROWID
        """
    )
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    # Retention (SQLiteJobStore.prune) reads the jobs that finished before a
    # cutoff from this index, oldest first, without touching the others.
    # Partial: a job enters it only when it finishes (queued and running
    # jobs have no ``finished``), so a submit pays nothing for it.
    conn.execute("CREATE INDEX jobs_finished ON jobs (finished) WHERE finished IS NOT NULL")


#: The migrations this code knows, oldest first.
MIGRATIONS: tuple[Migration, ...] = (_create_v1, _v1_to_v2)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


_KIND = FileKind(
    what="job store",
    application_id=APPLICATION_ID,
    migrations=MIGRATIONS,
    error=StoreError,
)


def migrate(
    conn: sqlite3.Connection,
    path: str,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> int:
    """Bring the store in ``conn`` up to ``len(migrations)``.

    Runs in one ``BEGIN IMMEDIATE`` transaction: a crash half-way leaves the
    old version. Returns the version found before migrating. Refuses a newer
    schema, which this code would misread, with a StoreError that says what
    to do.
    """
    return attrs.evolve(_KIND, migrations=tuple(migrations)).migrate(conn, path)


# --- the store ------------------------------------------------------------------
#
# The reads and the choice of jobs to prune are txvmbot.daemon.stores.sql's,
# shared with the PostgreSQL store; the writes are this file's own.


@implementer(IJobWriter)
class SQLiteJobs:
    """Jobs and their events in an SQLite file, written by the daemon alone,
    answering at once: the synchronous SQL under :class:`SQLiteJobStore`
    (and :class:`~txvmbot.daemon.stores.sqlite.held.HeldStore`), which are
    what the daemon's parts call.

    :param path: the file, created with its schema if missing or empty;
        ``":memory:"`` (or :meth:`memory`) for a store that dies with the
        process, for tests.
    :param clock: returns epoch seconds; stamps each row's ``updated``.
    :param synchronous: ``"NORMAL"`` (the default) or ``"FULL"``.

    Durability: the file is in WAL mode and each write is one committed
    transaction. With ``synchronous=NORMAL`` a commit appends to the WAL
    without an fsync (the WAL is fsynced at checkpoints): a committed write
    survives the daemon being SIGKILLed or crashing at any instant, because
    the WAL is in the OS page cache and the next opener replays it, but the
    last commits before an *OS* crash or power loss may be lost (the database
    stays consistent). With ``"FULL"`` every commit fsyncs the WAL and
    survives power loss too, at the cost of one fsync per write.

    Measured on the build machine (virtio disk, JSON encoding included): a
    submit (``add`` + ``add_event``, two commits) costs 0.16 ms mean (p99
    0.4 ms) with NORMAL, about 6,000 submits/s; with FULL 0.63 ms (p99
    1.3 ms), about 1,600/s, below the 2,000 submits/s the daemon must take
    while it also records every step event. Hence NORMAL. The commit is most
    of a submit's cost, so the AMP server hands the submits of one read to
    :meth:`add_many`: in batches of 64 a submit costs about a third of one
    committed alone (bench/hot_paths.py prints both).

    What is lost in a power cut is the last instant of queue changes, which
    clients see as a lost connection and resubmit; the cloud resources
    themselves carry the check's tag, which cleanup and ``txvmbot reap``
    search by whatever the journal lost.

    Raises StoreError naming the path when the file cannot be opened, is not
    a job store, or has a newer schema.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self._clock = clock
        self._conn: sqlite3.Connection | None = _KIND.open(
            path, busy_timeout=busy_timeout, synchronous=synchronous, log=self.log, memory_ok=True
        )

    @classmethod
    def memory(cls, *, clock: Callable[[], float] = time.time) -> SQLiteJobs:
        """A store in memory: the same SQL, no file. For tests."""
        return cls(":memory:", clock=clock)

    def __repr__(self) -> str:
        return f"<SQLiteJobs {self.path!r}>"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(self.path, "is closed")
        return self._conn

    def _write(self, what: str, sql: str, args: Sequence[object]) -> int:
        """Run one statement as its own committed transaction; return the
        number of rows it changed."""
        try:
            return self._db.execute(sql, args).rowcount
        except sqlite3.Error as e:
            raise self._error(what, e) from e

    def _error(self, what: str, e: sqlite3.Error) -> StoreError:
        """What SQLite said; the "only writer" hint only for a lock timeout,
        which is the one error another writer causes."""
        if is_lock_timeout(e):
            return StoreError(
                self.path,
                f"cannot {what}: {e} (another process held its write lock past the busy "
                "timeout; the daemon must be its only writer)",
            )
        return StoreError(self.path, f"cannot {what}: {e}")

    def _read(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(self.path, f"cannot read: {e}") from e

    def _jobs(self, rows: Iterable[tuple[Any, ...]]) -> list[Job]:
        return [decode_job(r[0], self.path) for r in rows]

    # --- the jobs, synchronously ---------------------------------------------------

    def add(self, job: Job, event: JobEvent | None = None) -> None:
        """Store a new job, and with it its first event, in one transaction
        (a submit is one commit, not two). Raises StoreError if its id is
        taken."""
        if event is None:
            self._add(job)
            return
        self.add_many([(job, event)])

    def add_many(self, submits: Sequence[tuple[Job, JobEvent]]) -> None:
        """Store new jobs, each with its first event, in one transaction:
        all of them or, on any error (StoreError), none. One commit for
        many submits is what lets the daemon take thousands a second (a
        commit costs several times an insert)."""
        if not submits:
            return
        what = f"add job {submits[0][0].id}" if len(submits) == 1 else f"add {len(submits)} jobs"
        self._write(what, "BEGIN IMMEDIATE", ())
        try:
            for job, event in submits:
                self._add(job)
                self.add_event(event)
            self._write(what, "COMMIT", ())
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT may leave it open
                self._db.execute("ROLLBACK")
            raise

    def _add(self, job: Job) -> None:
        self._write(
            f"add job {job.id}",
            "INSERT INTO jobs (id, state, backend, priority, submitted, started, finished,"
            " updated, attempts, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.state,
                job.spec.backend,
                job.spec.priority,
                float(job.submitted),
                _opt_float(job.started),
                _opt_float(job.finished),
                float(self._clock()),
                job.attempts,
                dumps(job_to_dict(job)).decode("utf-8"),
            ),
        )

    def update(self, job: Job) -> None:
        """Replace the stored job with ``job``. Raises StoreError if there is
        no job with its id."""
        changed = self._write(
            f"update job {job.id}",
            "UPDATE jobs SET state = ?, backend = ?, priority = ?, submitted = ?,"
            " started = ?, finished = ?, updated = ?, attempts = ?, data = ? WHERE id = ?",
            (
                job.state,
                job.spec.backend,
                job.spec.priority,
                float(job.submitted),
                _opt_float(job.started),
                _opt_float(job.finished),
                float(self._clock()),
                job.attempts,
                dumps(job_to_dict(job)).decode("utf-8"),
                job.id,
            ),
        )
        if changed != 1:
            raise StoreError(self.path, f"cannot update job {job.id}: no such job")

    def get(self, job_id: str) -> Job | None:
        rows = self._read(*SQLITE.get(job_id))
        return decode_job(rows[0][0], self.path) if rows else None

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Job]:
        """Jobs, newest first (by submitted time as a number, then order of
        submission), optionally only in ``states``, on ``backend``, or
        listed after the job with id ``before`` (the cursor of the next
        page: jobs with the same submitted time are neither skipped nor
        repeated). A ``before`` that names no job gives no jobs."""
        query = SQLITE.list_jobs(states, backend, limit, before)
        return [] if query is None else self._jobs(self._read(*query))

    def unfinished(self) -> builtins.list[Job]:
        """Jobs not in a final state, oldest first (by submitted time, then
        order of submission): the order to put them back in the queue."""
        return self._jobs(self._read(*SQLITE.unfinished()))

    def add_event(self, event: JobEvent) -> None:
        """Append ``event``. Raises StoreError if the job already has an
        event with its seq."""
        self._write(
            f"add event {event.seq} of job {event.job_id}",
            "INSERT INTO events (job_id, seq, at, data) VALUES (?, ?, ?, ?)",
            (event.job_id, event.seq, float(event.at), dumps(event_to_dict(event)).decode()),
        )

    def events(self, job_id: str, after_seq: int = 0) -> builtins.list[JobEvent]:
        rows = self._read(*SQLITE.events(job_id, after_seq))
        return [decode_event(data, job_id, self.path) for (data,) in rows]

    def last_event_seq(self, job_id: str) -> int:
        """The seq of the job's newest event, 0 if it has none."""
        ((seq,),) = self._read(*SQLITE.last_event_seq(job_id))
        return int(seq)

    def prune(self, finished_before: float, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` jobs in a final state that finished
        strictly before ``finished_before`` (epoch seconds), oldest first,
        with all their events, in one transaction; return how many jobs
        went. Unfinished jobs are never touched.

        One call is one bounded transaction, short enough for the reactor
        thread; a caller that got ``limit`` back calls again for the rest.
        Raises StoreError (nothing deleted) when the file cannot be written.
        """
        if limit < 1:
            raise ValueError(f"prune limit must be at least 1, not {limit!r}")
        what = "prune finished jobs"
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                ids = [(r[0],) for r in db.execute(*SQLITE.prunable(finished_before, limit))]
                jobs = 0
                if ids:
                    db.executemany("DELETE FROM events WHERE job_id = ?", ids)
                    jobs = db.executemany("DELETE FROM jobs WHERE id = ?", ids).rowcount
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise self._error(what, e) from e
        return jobs

    def close(self) -> None:
        """Close the file. Idempotent; any later call raises StoreError."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_T = TypeVar("_T")


def _answer(call: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:
    """``call``'s answer as a Deferred that has fired (or failed) already."""
    try:
        return succeed(call(*args, **kwargs))
    except Exception:
        return fail()


class SyncJobs(Protocol):
    """What :class:`AnsweredStore` answers from: the store's calls made at
    once on the reactor thread (:class:`SQLiteJobs`, or
    :class:`~txvmbot.daemon.stores.sqlite.held.HeldJobs` over it)."""

    @property
    def path(self) -> str: ...

    def add(self, job: Job, event: JobEvent | None = None) -> None: ...

    def add_many(self, submits: Sequence[tuple[Job, JobEvent]]) -> None: ...

    def update(self, job: Job) -> None: ...

    def add_event(self, event: JobEvent) -> None: ...

    def get(self, job_id: str) -> Job | None: ...

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> builtins.list[Job]: ...

    def unfinished(self) -> builtins.list[Job]: ...

    def events(self, job_id: str, after_seq: int = 0) -> builtins.list[JobEvent]: ...

    def last_event_seq(self, job_id: str) -> int: ...

    def prune(self, finished_before: float, limit: int = PRUNE_BATCH) -> int: ...

    def close(self) -> None: ...


@implementer(IJobStore, IJobWriter)
class AnsweredStore:
    """An IJobStore answering from a store on the reactor thread: every
    answer a Deferred that has fired already (as klein's memory session
    store answers), so callers treat it as any other store. ``update`` and
    ``add_event`` (IJobWriter, the scheduler's own writes) return nothing
    and raise at once.

    :attr:`sync` is the store it answers from, for a part that cannot
    wait (the metrics' seed of unfinished jobs) and for tests of its SQL.
    """

    def __init__(self, sync: SyncJobs) -> None:
        self.sync = sync

    @property
    def path(self) -> str:
        return self.sync.path

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sync!r}>"

    # --- IJobWriter -------------------------------------------------------------------

    def update(self, job: Job) -> None:
        self.sync.update(job)

    def add_event(self, event: JobEvent) -> None:
        self.sync.add_event(event)

    # --- IJobStore --------------------------------------------------------------------

    def add(self, job: Job, event: JobEvent | None = None) -> Deferred[None]:
        return _answer(self.sync.add, job, event)

    def add_many(self, submits: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        return _answer(self.sync.add_many, submits)

    def get(self, job_id: str) -> Deferred[Job | None]:
        return _answer(self.sync.get, job_id)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        return _answer(self.sync.list, states, backend, limit, before)

    def unfinished(self) -> Deferred[Sequence[Job]]:
        return _answer(self.sync.unfinished)

    def events(self, job_id: str, after_seq: int = 0) -> Deferred[Sequence[JobEvent]]:
        return _answer(self.sync.events, job_id, after_seq)

    def last_event_seq(self, job_id: str) -> Deferred[int]:
        return _answer(self.sync.last_event_seq, job_id)

    def prune(self, finished_before: float, limit: int = PRUNE_BATCH) -> Deferred[int]:
        return _answer(self.sync.prune, finished_before, limit)

    def close(self) -> Deferred[None]:
        return _answer(self.sync.close)


class SQLiteJobStore(AnsweredStore):
    """The daemon's IJobStore in an SQLite file: :class:`SQLiteJobs` (the
    file, its durability, the numbers) answered with Deferreds.

    Raises StoreError naming the path when the file cannot be opened, is
    not a job store, or has a newer schema.
    """

    sync: SQLiteJobs

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            SQLiteJobs(path, clock=clock, synchronous=synchronous, busy_timeout=busy_timeout)
        )

    @classmethod
    def memory(cls, *, clock: Callable[[], float] = time.time) -> SQLiteJobStore:
        """A store in memory: the same SQL, no file. For tests."""
        return cls(":memory:", clock=clock)

    def __repr__(self) -> str:
        return f"<SQLiteJobStore {self.path!r}>"


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)
