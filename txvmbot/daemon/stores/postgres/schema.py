"""The shared database's schema, versioned, with migrations.

``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``, inside
the caller's transaction, as SQL statements. To add a version, append a
tuple; never edit a released one. :func:`migrate` runs under a
transaction-scoped advisory lock, so daemons starting together migrate
once.

Times are ``double precision`` epoch seconds written by the daemons, like
the SQLite store's; lease expiry alone is the database's own clock
(``now()``), so daemons on hosts whose clocks disagree still agree on
which lease has expired.
"""

from __future__ import annotations

from typing import Any

from txvmbot.daemon.stores.postgres.db import DatabaseError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

#: pg_advisory_xact_lock key of migrations: "txvm" as an int.
_MIGRATE_LOCK = 0x7478766D

_UNFINISHED = "('queued', 'running', 'cleaning')"

_V1 = (
    "CREATE TABLE txvmbot_schema (version integer NOT NULL)",
    "INSERT INTO txvmbot_schema (version) VALUES (0)",
    # A job: the columns claims, listings and takeover filter on, plus the
    # whole job as JSON (txvmbot.daemon.codec.job_to_dict), as in the SQLite store.
    # ``owner`` is the daemon (its lease) that holds the job: NULL while it
    # waits in the shared queue. ``host`` is where it last ran; a local
    # (QEMU) job's machines exist on that host alone.
    """
    CREATE TABLE jobs (
        seq        bigserial        UNIQUE,
        id         text             PRIMARY KEY,
        state      text             NOT NULL,
        backend    text             NOT NULL,
        priority   integer          NOT NULL,
        submitted  double precision NOT NULL,
        started    double precision,
        finished   double precision,
        updated    double precision NOT NULL,
        attempts   integer          NOT NULL,
        instances  integer          NOT NULL CHECK (instances >= 1),
        is_local   boolean          NOT NULL,
        owner      text,
        host       text,
        cancel     text,
        data       text             NOT NULL
    )
    """,
    # The shared queue in claim order, per backend: only unowned queued jobs.
    "CREATE INDEX jobs_queue ON jobs (backend, priority DESC, submitted, seq)"
    " WHERE state = 'queued' AND owner IS NULL",
    # What holds a backend's cap: owned, unfinished jobs.
    f"CREATE INDEX jobs_held ON jobs (backend) WHERE owner IS NOT NULL AND state IN {_UNFINISHED}",
    f"CREATE INDEX jobs_unfinished ON jobs (owner) WHERE state IN {_UNFINISHED}",
    "CREATE INDEX jobs_submitted ON jobs (submitted, seq)",
    "CREATE INDEX jobs_backend ON jobs (backend, submitted, seq)",
    "CREATE INDEX jobs_finished ON jobs (finished) WHERE finished IS NOT NULL",
    """
    CREATE TABLE events (
        job_id text             NOT NULL,
        seq    integer          NOT NULL CHECK (seq >= 1),
        at     double precision NOT NULL,
        data   text             NOT NULL,
        PRIMARY KEY (job_id, seq)
    )
    """,
    # One row per claim of a job by a daemon: the audit of "never run twice".
    # A claimed job may go back to the queue before it starts (its daemon
    # stopped or died), so one attempt may be claimed more than once.
    """
    CREATE TABLE claims (
        id      bigserial        PRIMARY KEY,
        job_id  text             NOT NULL,
        attempt integer          NOT NULL,
        owner   text             NOT NULL,
        at      double precision NOT NULL
    )
    """,
    "CREATE INDEX claims_job ON claims (job_id)",
    # A running daemon and its lease. ``expires`` is the database's clock.
    """
    CREATE TABLE daemons (
        owner   text             PRIMARY KEY,
        host    text             NOT NULL,
        pid     integer          NOT NULL,
        started double precision NOT NULL,
        expires timestamptz      NOT NULL
    )
    """,
    # Every backend jobs were submitted to; claims lock its row, so caps
    # hold across daemons; ``draining`` is shared.
    """
    CREATE TABLE backends (
        name     text    PRIMARY KEY,
        cap      integer NOT NULL CHECK (cap >= 1),
        draining boolean NOT NULL DEFAULT false
    )
    """,
    # The cleanup journal (txvmbot.interfaces.IJournal), as in SQLite, plus
    # the host whose daemon wrote the entry (a local VM lives there).
    """
    CREATE TABLE journal (
        check_id    text             NOT NULL,
        seq         integer          NOT NULL CHECK (seq >= 1),
        kind        text             NOT NULL,
        name        text             NOT NULL,
        endpoint    text             NOT NULL,
        region      text             NOT NULL,
        created     double precision NOT NULL,
        updated     double precision NOT NULL,
        resource_id text,
        parent_id   text,
        done        boolean          NOT NULL DEFAULT false,
        host        text             NOT NULL,
        PRIMARY KEY (check_id, seq)
    )
    """,
    "CREATE INDEX journal_pending ON journal (check_id) WHERE NOT done",
    "CREATE INDEX journal_done ON journal (updated) WHERE done",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: Any, where: str) -> int:
    """Bring the database up to :data:`SCHEMA_VERSION` in the caller's
    transaction; return the version found. Refuses a newer schema, and a
    database that holds other tables of the same names but no version."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
    row = conn.execute("SELECT to_regclass('txvmbot_schema')").fetchone()
    if row[0] is None:
        found = 0
    else:
        got = conn.execute("SELECT MAX(version) FROM txvmbot_schema").fetchone()
        if got is None or got[0] is None:
            raise DatabaseError(where, "has a txvmbot_schema table with no version; damaged")
        found = int(got[0])
    if found > SCHEMA_VERSION:
        raise DatabaseError(
            where,
            f"has schema version {found} but this txvmbot understands up to "
            f"{SCHEMA_VERSION}; upgrade txvmbot on this host",
        )
    for version in range(found, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute("UPDATE txvmbot_schema SET version = %s", (version + 1,))
    return found
