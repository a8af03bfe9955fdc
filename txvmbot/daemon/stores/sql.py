"""The SQL the two job stores share, written once: the job list (newest
first, filtered by states and backend, paged by ``before``), a job by id,
a job's events after a seq, its last event's seq, and the choice of
finished jobs to prune; and the decoding of stored rows.

Both stores keep a job as its filter and sort columns plus the whole job
as JSON in ``data``, and an event as ``(job_id, seq, at, data)``: one
query text fits both but for what :class:`Dialect` names (the placeholder,
SQLite's index hint, PostgreSQL's row locks). Each query is a function of
its arguments that returns ``(sql, args)``; the store runs it on its own
connection (``sqlite3`` on the reactor thread,
:mod:`txvmbot.daemon.stores.postgres.store` in a database thread).

A row that does not decode is a :class:`StoreError` in either store.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from attrs import frozen

from txvmbot.daemon.codec import event_from_dict, job_from_dict, loads
from txvmbot.daemon.jobs import FINAL_STATES, Job, JobEvent
from txvmbot.errors import ConfigError, TxvmbotError

__all__ = [
    "POSTGRES",
    "SQLITE",
    "Dialect",
    "Query",
    "StoreError",
    "decode_event",
    "decode_job",
]

Query = tuple[str, tuple[object, ...]]

_FINAL = tuple(sorted(FINAL_STATES))
_UNFINISHED = ("queued", "running", "cleaning")


class StoreError(TxvmbotError):
    """The job store cannot be opened, read or written.

    ``path`` names the store: its file (``":memory:"`` for an in-memory
    store), or where the shared database is.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"job store {path}: {message}")
        self.path = path
        self.message = message


@frozen
class Dialect:
    """What differs between the stores' SQL.

    :param mark: the placeholder of an argument (``?``, ``%s``).
    :param finished_index: what follows ``FROM jobs`` when choosing jobs
        to prune by ``finished`` (SQLite, without statistics, would scan
        every final job through the queue index instead).
    :param lock: what ends the choice of jobs to prune (PostgreSQL: lock
        them, and skip those another daemon's prune has locked).
    """

    mark: str
    finished_index: str = ""
    lock: str = ""

    def marks(self, n: int) -> str:
        return ", ".join([self.mark] * n)

    # --- reads ----------------------------------------------------------------------

    def get(self, job_id: str) -> Query:
        """A job's ``data`` by id."""
        return f"SELECT data FROM jobs WHERE id = {self.mark}", (job_id,)

    def list_jobs(
        self,
        states: Collection[str] | None,
        backend: str | None,
        limit: int,
        before: str | None,
    ) -> Query | None:
        """The ``data`` of jobs newest first (by submitted time as a number,
        then order of submission), optionally only in ``states``, on
        ``backend``, or listed after the job with id ``before`` (the cursor
        of the next page: jobs with the same submitted time are neither
        skipped nor repeated; a ``before`` that names no job gives none).
        None when no job can match (no states)."""
        m = self.mark
        where: list[str] = []
        args: list[object] = []
        if states is not None:
            wanted = tuple(states)
            if not wanted:
                return None
            where.append(f"state IN ({self.marks(len(wanted))})")
            args.extend(wanted)
        if backend is not None:
            where.append(f"backend = {m}")
            args.append(backend)
        if before is not None:
            where.append(f"(submitted, seq) < (SELECT submitted, seq FROM jobs WHERE id = {m})")
            args.append(before)
        sql = "SELECT data FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY submitted DESC, seq DESC LIMIT {m}"
        args.append(max(0, int(limit)))
        return sql, tuple(args)

    def events(self, job_id: str, after_seq: int) -> Query:
        """A job's events' ``data`` with seq > ``after_seq``, in order."""
        m = self.mark
        return (
            f"SELECT data FROM events WHERE job_id = {m} AND seq > {m} ORDER BY seq",
            (job_id, int(after_seq)),
        )

    def last_event_seq(self, job_id: str) -> Query:
        """The seq of a job's newest event, 0 if it has none."""
        return f"SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = {self.mark}", (job_id,)

    def unfinished(self) -> Query:
        """The ``data`` of jobs not in a final state, oldest first (by
        submitted time, then order of submission): the order to put them
        back in the queue."""
        return (
            f"SELECT data FROM jobs WHERE state IN ({self.marks(len(_UNFINISHED))})"
            " ORDER BY submitted, seq",
            _UNFINISHED,
        )

    # --- retention ------------------------------------------------------------------

    def prunable(self, finished_before: float, limit: int) -> Query:
        """The ids of up to ``limit`` jobs in a final state that finished
        strictly before ``finished_before``, oldest first."""
        m = self.mark
        return (
            f"SELECT id FROM jobs{self.finished_index}"
            f" WHERE finished < {m} AND state IN ({self.marks(len(_FINAL))})"
            f" ORDER BY finished LIMIT {m}{self.lock}",
            (float(finished_before), *_FINAL, int(limit)),
        )


#: The daemon's own SQLite file (txvmbot.daemon.stores.sqlite.store).
SQLITE = Dialect(mark="?", finished_index=" INDEXED BY jobs_finished")

#: The shared PostgreSQL database (txvmbot.daemon.stores.postgres.store).
POSTGRES = Dialect(mark="%s", lock=" FOR UPDATE SKIP LOCKED")


def decode_job(data: str, where: str) -> Job:
    """The Job stored as ``data``; StoreError naming ``where`` if it does
    not decode."""
    try:
        return job_from_dict(loads(data.encode("utf-8"), "job"))
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(where, f"holds a job it cannot read: {e}") from e


def decode_jobs(rows: Sequence[Sequence[object]], where: str) -> list[Job]:
    """The Jobs of rows whose first column is ``data``."""
    return [decode_job(str(r[0]), where) for r in rows]


def decode_event(data: str, job_id: str, where: str) -> JobEvent:
    """The JobEvent of ``job_id`` stored as ``data``; StoreError naming
    ``where`` if it does not decode."""
    try:
        return event_from_dict(loads(data.encode("utf-8"), "event"))
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreError(where, f"holds an event of job {job_id} it cannot read: {e}") from e
