"""The jobs, events, claims, leases and backends of the shared database:
each operation is one function of a connection, run in one transaction by
:meth:`txvmbot.daemon.stores.postgres.db.Database.run` (in a database thread, never
on the reactor).

Every write of a job by the daemon running it is fenced by ``owner``: a
daemon whose lease expired and whose jobs another daemon took over writes
nothing more about them (:func:`write_batch` reports those jobs).

Notifications (``pg_notify``, delivered at commit):

- ``txvmbot_queue``: a job was queued or a backend's cap freed: try a claim;
- ``txvmbot_events``: job id: that job has new events;
- ``txvmbot_cancel``: job id: cancel it, if you hold it;
- ``txvmbot_backends``: backend: its drain state changed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs

from txvmbot.daemon.codec import dumps, event_to_dict, job_to_dict
from txvmbot.daemon.jobs import FINAL_STATES, Job, JobEvent
from txvmbot.daemon.stores.sql import POSTGRES, decode_event, decode_job
from txvmbot.qemu.model import LocalSpec

__all__ = [
    "CHANNELS",
    "Claimed",
    "Counts",
    "TakenOver",
    "add_many",
    "backends",
    "cancel_queued",
    "claim",
    "counts",
    "events",
    "get",
    "list_jobs",
    "prune",
    "register",
    "renew",
    "request_cancel",
    "set_draining",
    "take_over",
    "write_batch",
]

CHANNELS = ("txvmbot_queue", "txvmbot_events", "txvmbot_cancel", "txvmbot_backends")

UNFINISHED = ("queued", "running", "cleaning")

#: Names the shared database in a StoreError (a row that does not decode).
WHERE = "(shared PostgreSQL)"


def _data(job: Job) -> str:
    return dumps(job_to_dict(job)).decode("utf-8")


def _job(data: str) -> Job:
    return decode_job(data, WHERE)


def _event_data(event: JobEvent) -> str:
    return dumps(event_to_dict(event)).decode("utf-8")


# --- submits and reads -----------------------------------------------------------


def add_many(
    conn: Any, submits: Sequence[tuple[Job, JobEvent]], caps: dict[str, int], host: str
) -> None:
    """Store new queued jobs with their first events, and their backends
    (with ``caps[backend]``) if new; tell every daemon the queue grew.

    A local (QEMU) job belongs to ``host``, the submitting daemon's: its
    pool's image and run dirs are that host's, so only daemons of that host
    claim it."""
    if not submits:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO backends (name, cap) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            sorted({(job.spec.backend, caps[job.spec.backend]) for job, _ in submits}),
        )
        cur.executemany(
            "INSERT INTO jobs (id, state, backend, priority, submitted, updated, attempts,"
            " instances, is_local, host, data)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    job.id,
                    job.state,
                    job.spec.backend,
                    job.spec.priority,
                    float(job.submitted),
                    float(job.submitted),
                    job.attempts,
                    job.spec.instances,
                    isinstance(job.spec.machines, LocalSpec),
                    host if isinstance(job.spec.machines, LocalSpec) else None,
                    _data(job),
                )
                for job, _ in submits
            ],
        )
        cur.executemany(
            "INSERT INTO events (job_id, seq, at, data) VALUES (%s, %s, %s, %s)",
            [(e.job_id, e.seq, float(e.at), _event_data(e)) for _, e in submits],
        )
        cur.execute("SELECT pg_notify('txvmbot_queue', '')")


def get(conn: Any, job_id: str) -> Job | None:
    row = conn.execute(*POSTGRES.get(job_id)).fetchone()
    return None if row is None else _job(row[0])


def list_jobs(
    conn: Any,
    states: Collection[str] | None,
    backend: str | None,
    limit: int,
    before: str | None,
) -> list[Job]:
    """As :meth:`txvmbot.daemon.stores.sqlite.store.SQLiteJobs.list` (the
    same SQL: txvmbot.daemon.stores.sql)."""
    query = POSTGRES.list_jobs(states, backend, limit, before)
    return [] if query is None else [_job(r[0]) for r in conn.execute(*query)]


def events(conn: Any, job_id: str, after_seq: int) -> list[JobEvent]:
    rows = conn.execute(*POSTGRES.events(job_id, after_seq))
    return [decode_event(r[0], job_id, WHERE) for r in rows]


def last_event_seq(conn: Any, job_id: str) -> int:
    (seq,) = conn.execute(*POSTGRES.last_event_seq(job_id)).fetchone()
    return int(seq)


@attrs.frozen
class Counts:
    """The whole cluster's jobs, from the database: per backend, queued
    jobs, running (held) jobs and the instances they hold."""

    backends: tuple[tuple[str, int, bool, int, int, int], ...]  # name, cap, draining, queued, running, instances


def counts(conn: Any) -> Counts:
    rows = conn.execute(
        "SELECT b.name, b.cap, b.draining,"
        " (SELECT count(*) FROM jobs j WHERE j.backend = b.name AND j.state = 'queued'),"
        " (SELECT count(*) FROM jobs j WHERE j.backend = b.name AND j.owner IS NOT NULL"
        "   AND j.state IN ('running', 'cleaning')),"
        " (SELECT COALESCE(sum(instances), 0) FROM jobs j WHERE j.backend = b.name"
        "   AND j.owner IS NOT NULL AND j.state IN ('running', 'cleaning'))"
        " FROM backends b ORDER BY b.name"
    ).fetchall()
    return Counts(tuple((str(n), int(c), bool(d), int(q), int(r), int(i)) for n, c, d, q, r, i in rows))


def set_caps(conn: Any, caps: dict[str, int]) -> None:
    """Store the configured caps (a daemon's config, at its start): a cap
    changed in the config takes effect, on every daemon's claims."""
    conn.cursor().executemany(
        "INSERT INTO backends (name, cap) VALUES (%s, %s)"
        " ON CONFLICT (name) DO UPDATE SET cap = EXCLUDED.cap",
        sorted(caps.items()),
    )


def cancels(conn: Any, owner: str) -> list[tuple[str, str]]:
    """(job id, reason) of unfinished jobs ``owner`` holds that someone
    asked to cancel (read at each heartbeat: a notification may be lost)."""
    rows = conn.execute(
        "SELECT id, cancel FROM jobs WHERE owner = %s AND cancel IS NOT NULL"
        " AND state IN ('queued', 'running', 'cleaning')",
        (owner,),
    )
    return [(str(i), str(c)) for i, c in rows]


def backends(conn: Any) -> dict[str, bool]:
    """Backend name -> draining."""
    return {str(n): bool(d) for n, d in conn.execute("SELECT name, draining FROM backends")}


def set_draining(conn: Any, backend: str, cap: int, draining: bool) -> None:
    conn.execute(
        "INSERT INTO backends (name, cap, draining) VALUES (%s, %s, %s)"
        " ON CONFLICT (name) DO UPDATE SET draining = EXCLUDED.draining",
        (backend, cap, draining),
    )
    conn.execute("SELECT pg_notify('txvmbot_backends', %s)", (backend,))
    if not draining:
        conn.execute("SELECT pg_notify('txvmbot_queue', %s)", (backend,))


# --- the running daemon's writes --------------------------------------------------


def write_batch(
    conn: Any, owner: str, host: str, updates: Sequence[Job], new_events: Sequence[JobEvent],
    now: float,
) -> set[str]:
    """Write the newest value of each job in ``updates`` and ``new_events``,
    only for jobs ``owner`` still holds; return the ids of jobs it no longer
    holds (taken over), whose writes were dropped."""
    fenced: set[str] = set()
    freed = False
    latest: dict[str, Job] = {}
    for job in updates:
        latest[job.id] = job
    with conn.cursor() as cur:
        for job in latest.values():
            cur.execute(
                "UPDATE jobs SET state = %s, started = %s, finished = %s, updated = %s,"
                " attempts = %s, host = %s, data = %s WHERE id = %s AND owner = %s",
                (
                    job.state,
                    job.started,
                    job.finished,
                    now,
                    job.attempts,
                    host,
                    _data(job),
                    job.id,
                    owner,
                ),
            )
            if cur.rowcount != 1:
                fenced.add(job.id)
            elif job.state in FINAL_STATES:
                freed = True
        rows = [e for e in new_events if e.job_id not in fenced]
        if rows:
            ids = sorted({e.job_id for e in rows})
            held = {
                r[0]
                for r in cur.execute(
                    # Locked until commit: a takeover of these jobs waits,
                    # so it sees every event stored under this owner.
                    "SELECT id FROM jobs WHERE id = ANY(%s) AND owner = %s FOR SHARE",
                    (ids, owner),
                )
            }
            fenced.update(set(ids) - held)
            rows = [e for e in rows if e.job_id in held]
            cur.executemany(
                "INSERT INTO events (job_id, seq, at, data) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (job_id, seq) DO NOTHING",
                [(e.job_id, e.seq, float(e.at), _event_data(e)) for e in rows],
            )
            for job_id in sorted({e.job_id for e in rows}):
                cur.execute("SELECT pg_notify('txvmbot_events', %s)", (job_id,))
        if freed:
            cur.execute("SELECT pg_notify('txvmbot_queue', '')")
    return fenced


# --- claims -------------------------------------------------------------------------


@attrs.frozen
class Claimed:
    """A job this daemon now holds, with the seq of its last event and a
    cancel asked for before it was claimed."""

    job: Job
    last_seq: int
    cancel: str | None = None


def claim(
    conn: Any, owner: str, host: str, want: int, skip: Collection[str], now: float
) -> list[Claimed]:
    """Take up to ``want`` queued jobs from the shared queue for ``owner``:
    highest priority first, then oldest, from the backends that are not
    draining, not in ``skip``, and below their cap counted over every
    daemon's jobs; local (QEMU) jobs only if they belong to ``host``. The backend rows are locked (in name order) for the
    transaction: two daemons claiming from one backend take turns, so a cap
    of 4 is 4 in all. Job rows are taken FOR UPDATE SKIP LOCKED."""
    if want < 1:
        return []
    # Only for a live lease, held (FOR SHARE) until commit: a takeover of
    # this owner waits, so no job is claimed for a daemon being taken over.
    if conn.execute(
        "SELECT 1 FROM daemons WHERE owner = %s AND expires > now() FOR SHARE", (owner,)
    ).fetchone() is None:
        return []
    rows = conn.execute(
        "SELECT name, cap FROM backends WHERE NOT draining AND NOT (name = ANY(%s))"
        " AND EXISTS (SELECT 1 FROM jobs WHERE backend = name AND state = 'queued'"
        " AND owner IS NULL AND (NOT is_local OR host = %s)) ORDER BY name FOR UPDATE",
        (list(skip), host),
    ).fetchall()
    candidates: list[tuple[tuple[int, float, int], str, int, str]] = []
    room: dict[str, int] = {}
    for name, cap in rows:
        # A statement of its own, after the lock: under READ COMMITTED it
        # sees the claims another daemon committed while we waited for the
        # row (in the locking statement itself it would not).
        (held,) = conn.execute(
            "SELECT COALESCE(sum(instances), 0) FROM jobs WHERE backend = %s"
            " AND owner IS NOT NULL AND state IN ('queued', 'running', 'cleaning')",
            (name,),
        ).fetchone()
        room[name] = int(cap) - int(held)
        if room[name] < 1:
            continue
        for job_id, instances, priority, submitted, seq in conn.execute(
            "SELECT id, instances, priority, submitted, seq FROM jobs WHERE backend = %s"
            " AND state = 'queued' AND owner IS NULL AND (NOT is_local OR host = %s)"
            " ORDER BY priority DESC, submitted, seq LIMIT %s FOR UPDATE SKIP LOCKED",
            (name, host, min(want, room[name])),
        ):
            candidates.append(((-int(priority), float(submitted), int(seq)), job_id, int(instances), name))
    candidates.sort()
    blocked: set[str] = set()
    chosen: list[str] = []
    for _, job_id, instances, name in candidates:
        if len(chosen) >= want:
            break
        if name in blocked:
            continue
        if instances > room[name]:
            blocked.add(name)  # its head waits for room, as in one daemon
            continue
        room[name] -= instances
        chosen.append(job_id)
    if not chosen:
        return []
    taken = conn.execute(
        "UPDATE jobs SET owner = %s, host = %s, updated = %s WHERE id = ANY(%s)"
        " RETURNING data, cancel,"
        " (SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = id)",
        (owner, host, now, chosen),
    ).fetchall()
    out = [Claimed(_job(data), int(last), cancel) for data, cancel, last in taken]
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO claims (job_id, attempt, owner, at) VALUES (%s, %s, %s, %s)",
            [(c.job.id, c.job.attempts + 1, owner, now) for c in out],
        )
    out.sort(key=lambda c: (-c.job.spec.priority, c.job.submitted))
    return out


def release(conn: Any, owner: str, job_ids: Sequence[str]) -> None:
    """Give jobs ``owner`` claimed but will not run back to the queue."""
    conn.execute(
        "UPDATE jobs SET owner = NULL WHERE id = ANY(%s) AND owner = %s AND state = 'queued'",
        (list(job_ids), owner),
    )
    conn.execute("SELECT pg_notify('txvmbot_queue', '')")


def cancel_queued(conn: Any, job_id: str, reason: str, now: float) -> Job | None:
    """Cancel ``job_id`` if it waits in the shared queue (no daemon holds
    it); return the cancelled job, or None if it was not waiting there."""
    row = conn.execute(
        "SELECT data FROM jobs WHERE id = %s AND state = 'queued' AND owner IS NULL"
        " FOR UPDATE SKIP LOCKED",
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    job = attrs.evolve(_job(row[0]), state="cancelled", reason=reason, finished=now)
    _end(conn, job, now, "cancelled", reason)
    return job


def _end(conn: Any, job: Job, now: float, state: str, reason: str) -> None:
    """Write ``job`` (final) and its state event, and tell watchers."""
    conn.execute(
        "UPDATE jobs SET state = %s, finished = %s, updated = %s, data = %s WHERE id = %s",
        (job.state, job.finished, now, _data(job), job.id),
    )
    event = JobEvent(job_id=job.id, seq=last_event_seq(conn, job.id) + 1, at=now, kind="state",
                     state=state, detail=reason)
    conn.execute(
        "INSERT INTO events (job_id, seq, at, data) VALUES (%s, %s, %s, %s)",
        (job.id, event.seq, now, _event_data(event)),
    )
    conn.execute("SELECT pg_notify('txvmbot_events', %s)", (job.id,))


def request_cancel(conn: Any, job_id: str, reason: str) -> str | None:
    """Ask the daemon holding ``job_id`` to cancel it; return its state
    (None: no such job). The request stays on the row, so a daemon that
    claims the job later sees it too."""
    row = conn.execute(
        "UPDATE jobs SET cancel = COALESCE(cancel, %s) WHERE id = %s RETURNING state",
        (reason, job_id),
    ).fetchone()
    if row is None:
        return None
    conn.execute("SELECT pg_notify('txvmbot_cancel', %s)", (job_id,))
    return str(row[0])


# --- leases and takeover ----------------------------------------------------------


def register(conn: Any, owner: str, host: str, pid: int, lease: float, now: float) -> None:
    conn.execute(
        "INSERT INTO daemons (owner, host, pid, started, expires)"
        " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
        (owner, host, pid, now, lease),
    )


def renew(conn: Any, owner: str, lease: float) -> bool:
    """Extend ``owner``'s lease; False if it is gone (taken over)."""
    cur = conn.execute(
        "UPDATE daemons SET expires = now() + make_interval(secs => %s) WHERE owner = %s",
        (lease, owner),
    )
    return bool(cur.rowcount == 1)


def unregister(conn: Any, owner: str) -> None:
    """A clean stop: put the daemon's queued jobs back in the shared queue
    and drop its lease. Its interrupted running jobs stay held by the dead
    lease; the next takeover cleans them up (as a restart would)."""
    conn.execute(
        "UPDATE jobs SET owner = NULL WHERE owner = %s AND state = 'queued'", (owner,)
    )
    conn.execute("UPDATE daemons SET expires = now() WHERE owner = %s", (owner,))
    conn.execute("SELECT pg_notify('txvmbot_queue', '')")


@attrs.frozen
class TakenOver:
    """What one takeover of a dead daemon found."""

    dead: str
    dead_host: str
    requeued: tuple[str, ...]
    host_lost: tuple[str, ...]
    adopted: tuple[Claimed, ...]


def take_over(
    conn: Any, owner: str, host: str, now: float, grace: float = 0.0
) -> TakenOver | None:
    """Take over one daemon whose lease has expired, if any: its queued
    jobs go back to the shared queue; its running local (QEMU) jobs of
    another host fail ("host lost"); its other running jobs become
    ``owner``'s, for it to clean up and retry or end, as after a restart.
    Its lease row goes. None if no lease expired more than ``grace``
    seconds ago (the time a daemon cut off from the database has to notice
    on its own clock that its lease ran out, and let its jobs go).

    A queued job the dead daemon had already started an attempt of (its
    journal holds entries of that attempt's check, its start never
    reached the database) is cleaned up as a running one."""
    if conn.execute(
        "SELECT 1 FROM daemons WHERE owner = %s AND expires > now() FOR SHARE", (owner,)
    ).fetchone() is None:
        return None  # only a daemon with a live lease takes over
    row = conn.execute(
        "SELECT owner, host FROM daemons"
        " WHERE expires < now() - make_interval(secs => %s) AND owner <> %s"
        " ORDER BY expires LIMIT 1 FOR UPDATE SKIP LOCKED",
        (grace, owner),
    ).fetchone()
    if row is None:
        return None
    dead, dead_host = str(row[0]), str(row[1])
    jobs = conn.execute(
        "SELECT data, cancel, is_local, state, EXISTS (SELECT 1 FROM journal"
        "  WHERE check_id = jobs.id || '-' || (jobs.attempts + 1) AND NOT done)"
        " FROM jobs WHERE owner = %s"
        " AND state IN ('queued', 'running', 'cleaning') ORDER BY submitted, seq FOR UPDATE",
        (dead,),
    ).fetchall()
    requeued: list[str] = []
    lost: list[str] = []
    adopt: list[str] = []
    for data, _cancel, is_local, state, started in jobs:
        job = _job(data)
        if state == "queued" and started:
            # Its start was still on the way: it ran, as far as cleanup goes.
            job = attrs.evolve(job, state="running", attempts=job.attempts + 1)
            conn.execute(
                "UPDATE jobs SET state = %s, attempts = %s, data = %s WHERE id = %s",
                (job.state, job.attempts, _data(job), job.id),
            )
            state = "running"
        if state == "queued":
            requeued.append(job.id)
        elif is_local and dead_host != host:
            reason = f"host lost: the daemon on {dead_host} stopped renewing its lease"
            ended = attrs.evolve(job, state="failed", reason=reason, finished=now)
            _end(conn, ended, now, "failed", reason)
            lost.append(job.id)
        else:
            adopt.append(job.id)
    if requeued:
        conn.execute("UPDATE jobs SET owner = NULL WHERE id = ANY(%s)", (requeued,))
    adopted: list[Claimed] = []
    if adopt:
        for data, cancel, last in conn.execute(
            "UPDATE jobs SET owner = %s, host = %s WHERE id = ANY(%s) RETURNING data, cancel,"
            " (SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = id)",
            (owner, host, adopt),
        ).fetchall():
            adopted.append(Claimed(_job(data), int(last), cancel))
    conn.execute("DELETE FROM daemons WHERE owner = %s", (dead,))
    conn.execute("SELECT pg_notify('txvmbot_queue', '')")
    return TakenOver(dead, dead_host, tuple(requeued), tuple(lost), tuple(adopted))


def prune(conn: Any, finished_before: float, limit: int) -> int:
    """As :meth:`txvmbot.daemon.stores.sqlite.store.SQLiteJobs.prune` (the
    same choice of jobs: txvmbot.daemon.stores.sql; rows another daemon's
    prune holds are skipped)."""
    ids = [r[0] for r in conn.execute(*POSTGRES.prunable(finished_before, limit))]
    if not ids:
        return 0
    conn.execute("DELETE FROM events WHERE job_id = ANY(%s)", (ids,))
    conn.execute("DELETE FROM claims WHERE job_id = ANY(%s)", (ids,))
    return int(conn.execute("DELETE FROM jobs WHERE id = ANY(%s)", (ids,)).rowcount)


def claim_counts(conn: Any, job_ids: Iterable[str] | None = None) -> dict[str, int]:
    """Job id -> how many times a daemon claimed it (tests, the bench)."""
    if job_ids is None:
        rows = conn.execute("SELECT job_id, count(*) FROM claims GROUP BY job_id")
    else:
        rows = conn.execute(
            "SELECT job_id, count(*) FROM claims WHERE job_id = ANY(%s) GROUP BY job_id",
            (list(job_ids),),
        )
    return {str(j): int(n) for j, n in rows}
