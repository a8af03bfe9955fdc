"""The shared store's SQL (txvmbot.daemon.stores.postgres.store and schema) against a
real PostgreSQL server (fixture ``pg_dsn``: a fresh database per test).

Each store function takes a connection; the tests call them directly on a
plain psycopg connection (autocommit), one ``conn.transaction()`` each, as
:meth:`txvmbot.daemon.stores.postgres.db.Database.run` would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest

from txvmbot.daemon.codec import dumps, event_to_dict
from txvmbot.daemon.jobs import Job, JobEvent, JobSpec
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import DatabaseError
from txvmbot.daemon.stores.postgres.schema import SCHEMA_VERSION, migrate
from txvmbot.daemon.stores.sql import StoreError
from txvmbot.errors import TxvmbotError
from txvmbot.qemu.model import LocalPool, LocalSpec
from txvmbot.testing import make_job_spec

T = TypeVar("T")

#: Bound of every wait on a thread or a barrier, in seconds.
WAIT = 30.0


def connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def tx(conn: Any, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` in one transaction, as Database.run does."""
    with conn.transaction():
        return fn(conn, *args)


def rows(conn: Any, sql: str, *args: object) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in conn.execute(sql, args).fetchall()]


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[Any]:
    """A connection to a fresh, migrated database."""
    c = connect(pg_dsn)
    try:
        assert tx(c, migrate, "test") == 0
        yield c
    finally:
        c.close()


def local_spec(backend: str = "local") -> JobSpec:
    return JobSpec(check=LocalSpec(pool=LocalPool(name=backend)), backend=backend)


def job(
    job_id: str,
    submitted: float,
    backend: str = "b",
    *,
    priority: int = 0,
    parallel: int = 1,
    state: str = "queued",
    spec: JobSpec | None = None,
) -> Job:
    return Job(
        id=job_id,
        spec=spec or make_job_spec(backend, priority=priority, parallel=parallel),
        state=state,  # type: ignore[arg-type]
        submitted=submitted,
    )


def event(job_id: str, seq: int, at: float = 1.0, state: str = "queued", detail: str = "") -> JobEvent:
    return JobEvent(job_id=job_id, seq=seq, at=at, kind="state", state=state, detail=detail)


def add(conn: Any, *jobs: Job, caps: dict[str, int] | None = None, host: str = "h1") -> None:
    """Submit ``jobs`` (queued, first event seq 1) from a daemon on ``host``;
    backends with cap 4 unless given."""
    caps = dict(caps or {})
    for j in jobs:
        caps.setdefault(j.spec.backend, 4)
    tx(conn, store.add_many, [(j, event(j.id, 1, j.submitted)) for j in jobs], caps, host)


def put_event(conn: Any, e: JobEvent) -> None:
    """Store ``e`` as a daemon's write would."""
    conn.execute(
        "INSERT INTO events (job_id, seq, at, data) VALUES (%s, %s, %s, %s)",
        (e.job_id, e.seq, e.at, dumps(event_to_dict(e)).decode("utf-8")),
    )


def owners(conn: Any) -> dict[str, str | None]:
    return {str(i): o for i, o in rows(conn, "SELECT id, owner FROM jobs")}


def live(conn: Any, owner: str, host: str = "h1") -> None:
    """Give ``owner`` a lease if it has none: only a live daemon claims."""
    conn.execute(
        "INSERT INTO daemons (owner, host, pid, started, expires)"
        " VALUES (%s, %s, 1, 0, now() + interval '1 hour') ON CONFLICT (owner) DO NOTHING",
        (owner, host),
    )


def claim(conn: Any, owner: str, want: int, skip: frozenset[str] = frozenset(),
          host: str = "h1", now: float = 50.0) -> list[str]:
    live(conn, owner, host)
    return [c.job.id for c in tx(conn, store.claim, owner, host, want, skip, now)]


def start(j: Job, at: float = 60.0) -> Job:
    """``j`` as its daemon writes it when it starts an attempt."""
    return attrs.evolve(j, state="running", started=at, attempts=j.attempts + 1)


def expire(conn: Any, owner: str) -> None:
    """End ``owner``'s lease a second ago, as if it stopped renewing."""
    conn.execute(
        "UPDATE daemons SET expires = now() - interval '1 second' WHERE owner = %s", (owner,)
    )


def seqs(conn: Any, job_id: str) -> list[int]:
    return [e.seq for e in tx(conn, store.events, job_id, 0)]


# --- migrate --------------------------------------------------------------------------


def test_migrate_creates_version_1_then_changes_nothing(pg_dsn: str) -> None:
    c = connect(pg_dsn)
    try:
        assert SCHEMA_VERSION == 1
        assert tx(c, migrate, "test") == 0
        assert rows(c, "SELECT version FROM txvmbot_schema") == [(1,)]
        tables = rows(
            c,
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' ORDER BY table_name",
        )
        assert [t for (t,) in tables] == [
            "backends", "claims", "daemons", "events", "jobs", "journal", "txvmbot_schema"
        ]
        add(c, job("j1", 1.0))
        assert tx(c, migrate, "test") == 1
        assert rows(c, "SELECT version FROM txvmbot_schema") == [(1,)]
        assert rows(
            c,
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' ORDER BY table_name",
        ) == tables
        assert tx(c, store.get, "j1") == job("j1", 1.0)
    finally:
        c.close()


def test_migrate_refuses_a_newer_schema(pg_dsn: str) -> None:
    c = connect(pg_dsn)
    try:
        tx(c, migrate, "test")
        c.execute("UPDATE txvmbot_schema SET version = 99")
        with pytest.raises(DatabaseError) as e:
            tx(c, migrate, "the test db")
        assert isinstance(e.value, TxvmbotError)
        assert "99" in str(e.value)
        assert f"up to {SCHEMA_VERSION}" in str(e.value)
        assert "the test db" in str(e.value)
        assert rows(c, "SELECT version FROM txvmbot_schema") == [(99,)]
    finally:
        c.close()


# --- submits and reads ----------------------------------------------------------------


def test_add_many_get_and_events(conn: Any) -> None:
    a = job("a", 1.0, "b", priority=3, parallel=2)
    loc = job("l", 2.0, spec=local_spec())
    tx(conn, store.add_many, [(a, event("a", 1, 1.0)), (loc, event("l", 1, 2.0))],
       {"b": 5, "local": 2}, "h1")
    assert tx(conn, store.get, "a") == a
    assert tx(conn, store.get, "l") == loc
    assert tx(conn, store.get, "nope") is None
    # A local job belongs to the submitting daemon's host; a cloud job to none.
    assert rows(conn, "SELECT id, state, backend, priority, instances, is_local, owner,"
                " host, attempts FROM jobs ORDER BY id") == [
        ("a", "queued", "b", 3, 2, False, None, None, 0),
        ("l", "queued", "local", 0, 1, True, None, "h1", 0),
    ]
    assert rows(conn, "SELECT name, cap, draining FROM backends ORDER BY name") == [
        ("b", 5, False), ("local", 2, False)
    ]
    # A backend's cap is set by its first submit only.
    add(conn, job("c", 3.0, "b"), caps={"b": 9})
    assert rows(conn, "SELECT cap FROM backends WHERE name = 'b'") == [(5,)]
    assert tx(conn, store.backends) == {"b": False, "local": False}

    assert tx(conn, store.events, "a", 0) == [event("a", 1, 1.0)]
    assert tx(conn, store.events, "a", 1) == []
    # Nothing submitted: nothing happens.
    tx(conn, store.add_many, [], {}, "h")
    assert len(rows(conn, "SELECT id FROM jobs")) == 3


def test_list_jobs_newest_first_filters_and_paging(conn: Any) -> None:
    add(conn, job("j1", 1.0, "b"), job("j2", 2.0, "c"), job("j3", 3.0, "b"))
    # Two jobs submitted at the same time: the later insert is newer.
    add(conn, job("j4", 3.0, "c"), job("j5", 5.0, "b"))
    conn.execute("UPDATE jobs SET state = 'running' WHERE id IN ('j3', 'j4')")

    def ids(states: Any = None, backend: str | None = None, limit: int = 100,
            before: str | None = None) -> list[str]:
        return [j.id for j in tx(conn, store.list_jobs, states, backend, limit, before)]

    assert ids() == ["j5", "j4", "j3", "j2", "j1"]
    assert ids(states=["running"]) == ["j4", "j3"]
    assert ids(states={"queued", "running"}, backend="b") == ["j5", "j3", "j1"]
    assert ids(states=[]) == []
    assert ids(backend="c") == ["j4", "j2"]
    assert ids(backend="nope") == []
    assert ids(limit=0) == []

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = ids(limit=2, before=cursor)
        if not page:
            break
        seen += page
        cursor = page[-1]
    assert seen == ["j5", "j4", "j3", "j2", "j1"]
    assert ids(before="j4", backend="b", limit=1) == ["j3"]
    assert ids(before="unknown") == []


def test_counts(conn: Any) -> None:
    add(conn, job("q1", 1.0, "b"), job("q2", 2.0, "b", parallel=2), job("q3", 3.0, "b"),
        job("c1", 4.0, "c"), caps={"b": 6, "c": 2})
    tx(conn, store.set_draining, "d", 3, True)
    assert claim(conn, "A", 1) == ["q1"]
    # A claimed job is queued until its daemon writes its start.
    assert tx(conn, store.counts).backends == (
        ("b", 6, False, 3, 0, 0),
        ("c", 2, False, 1, 0, 0),
        ("d", 3, True, 0, 0, 0),
    )
    q1 = tx(conn, store.get, "q1")
    assert q1 is not None
    tx(conn, store.write_batch, "A", "h1", [start(q1)], [], 60.0)
    assert claim(conn, "B", 1) == ["q2"]
    q2 = tx(conn, store.get, "q2")
    assert q2 is not None
    tx(conn, store.write_batch, "B", "h2", [attrs.evolve(start(q2), state="cleaning")], [], 61.0)
    assert tx(conn, store.counts).backends == (
        ("b", 6, False, 1, 2, 3),
        ("c", 2, False, 1, 0, 0),
        ("d", 3, True, 0, 0, 0),
    )
    tx(conn, store.write_batch, "A", "h1", [attrs.evolve(start(q1), state="passed",
                                                         finished=70.0)], [], 70.0)
    assert tx(conn, store.counts).backends[0] == ("b", 6, False, 1, 1, 2)


# --- claims ---------------------------------------------------------------------------


def test_claim_priority_then_submit_order_and_want(conn: Any) -> None:
    add(
        conn,
        job("low-old", 1.0, "b", priority=0),
        job("high-new", 4.0, "b", priority=5),
        job("mid", 2.0, "c", priority=1),
        job("high-old", 3.0, "c", priority=5),
        caps={"b": 10, "c": 10},
    )
    assert claim(conn, "A", 0) == []
    assert claim(conn, "A", 3) == ["high-old", "high-new", "mid"]
    assert claim(conn, "A", 3) == ["low-old"]
    assert claim(conn, "A", 3) == []
    assert set(owners(conn).values()) == {"A"}
    assert rows(conn, "SELECT DISTINCT host, updated FROM jobs") == [("h1", 50.0)]


def test_claim_returns_last_seq_and_cancel(conn: Any) -> None:
    add(conn, job("j", 1.0))
    put_event(conn, event("j", 2, 2.0, detail="more"))
    assert tx(conn, store.request_cancel, "j", "no longer wanted") == "queued"
    live(conn, "A")
    (c,) = tx(conn, store.claim, "A", "h1", 1, (), 50.0)
    assert c == store.Claimed(job("j", 1.0), 2, "no longer wanted")


def test_claim_head_of_line_blocks_only_its_backend(conn: Any) -> None:
    add(
        conn,
        job("b1", 1.0, "b", parallel=3),
        job("b2", 2.0, "b", parallel=3),
        job("b3", 3.0, "b"),
        job("c1", 4.0, "c"),
        job("c2", 5.0, "c"),
        caps={"b": 4, "c": 4},
    )
    # b1 takes 3 of 4; b2 needs 3 and waits at the head, so b3 waits too;
    # backend c still gives jobs.
    assert claim(conn, "A", 10) == ["b1", "c1", "c2"]
    assert claim(conn, "A", 10) == []
    assert owners(conn) == {"b1": "A", "b2": None, "b3": None, "c1": "A", "c2": "A"}


def test_claim_local_jobs_only_on_their_host(conn: Any) -> None:
    add(conn, job("l1", 1.0, spec=local_spec()), job("c1", 2.0, "b"), host="h1")
    add(conn, job("l2", 3.0, spec=local_spec()), host="h2")
    assert claim(conn, "B", 10, host="h2") == ["c1", "l2"]
    assert claim(conn, "C", 10, host="h3") == []
    assert claim(conn, "A", 10, host="h1") == ["l1"]
    assert rows(conn, "SELECT id, owner, host FROM jobs ORDER BY id") == [
        ("c1", "B", "h2"), ("l1", "A", "h1"), ("l2", "B", "h2")
    ]


def test_claim_draining_and_skipped_backends_give_none(conn: Any) -> None:
    add(conn, job("b1", 1.0, "b"), job("c1", 2.0, "c"), job("d1", 3.0, "d"))
    tx(conn, store.set_draining, "b", 4, True)
    assert tx(conn, store.backends) == {"b": True, "c": False, "d": False}
    assert claim(conn, "A", 10, skip=frozenset({"c"})) == ["d1"]
    assert claim(conn, "A", 10, skip=frozenset({"c"})) == []
    tx(conn, store.set_draining, "b", 4, False)
    assert claim(conn, "A", 10) == ["b1", "c1"]


def test_claim_cap_counts_every_owner(conn: Any) -> None:
    add(conn, *[job(f"j{i}", float(i), "b") for i in range(1, 7)], caps={"b": 4})
    assert claim(conn, "A", 3) == ["j1", "j2", "j3"]
    assert claim(conn, "B", 10, host="h2") == ["j4"]
    assert claim(conn, "B", 10, host="h2") == []
    # A job that ends frees its place.
    j1 = tx(conn, store.get, "j1")
    assert j1 is not None
    tx(conn, store.write_batch, "A", "h1",
       [attrs.evolve(start(j1), state="passed", finished=70.0)], [], 70.0)
    assert claim(conn, "B", 10, host="h2") == ["j5"]


def test_claims_table_has_one_row_per_claim(conn: Any) -> None:
    add(conn, job("j1", 1.0), job("j2", 2.0), job("j3", 3.0))
    claim(conn, "A", 2, now=50.0)
    claim(conn, "B", 2, now=51.0)
    assert rows(conn, "SELECT job_id, attempt, owner, at FROM claims ORDER BY job_id") == [
        ("j1", 1, "A", 50.0),
        ("j2", 1, "A", 50.0),
        ("j3", 1, "B", 51.0),
    ]
    assert tx(conn, store.claim_counts) == {"j1": 1, "j2": 1, "j3": 1}
    assert tx(conn, store.claim_counts, ["j1", "x"]) == {"j1": 1}


@pytest.mark.parametrize("how", ["unregister", "take_over"])
def test_claim_again_after_an_unstarted_job_went_back(conn: Any, how: str) -> None:
    """A daemon that claimed a job and stopped (or died) before it wrote the
    job's start gives it back; another daemon's claim of it is a second
    claim: a second row in claims, not an error."""
    add(conn, job("j", 1.0))
    tx(conn, store.register, "A", "h1", 1, 30.0, 10.0)
    assert claim(conn, "A", 1) == ["j"]
    if how == "unregister":
        tx(conn, store.unregister, "A")
    else:
        expire(conn, "A")
        live(conn, "B", "h2")
        t = tx(conn, store.take_over, "B", "h2", 70.0)
        assert t is not None and t.requeued == ("j",)
    assert owners(conn) == {"j": None}
    assert claim(conn, "B", 1, host="h2", now=80.0) == ["j"]
    assert owners(conn) == {"j": "B"}
    assert tx(conn, store.claim_counts) == {"j": 2}


def test_two_daemons_claiming_at_once_respect_the_cap(pg_dsn: str, conn: Any) -> None:
    add(conn, *[job(f"j{i:02}", float(i), "b") for i in range(10)], caps={"b": 4})
    barrier = threading.Barrier(2, timeout=WAIT)
    got: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def daemon(owner: str) -> None:
        try:
            c = connect(pg_dsn)
            try:
                barrier.wait()
                got[owner] = claim(c, owner, 4)
            finally:
                c.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=daemon, args=(o,)) for o in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(got) == ["A", "B"]
    taken = got["A"] + got["B"]
    assert len(taken) == 4
    assert sorted(taken) == ["j00", "j01", "j02", "j03"]
    assert rows(conn, "SELECT count(*) FROM claims") == [(4,)]
    assert sorted(i for i, o in owners(conn).items() if o is not None) == sorted(taken)


# --- writes ---------------------------------------------------------------------------


def test_write_batch_fences_jobs_of_other_owners(conn: Any) -> None:
    add(conn, job("mine", 1.0), job("theirs", 2.0), job("nobody", 3.0))
    assert claim(conn, "A", 1) == ["mine"]
    assert claim(conn, "B", 1, host="h2") == ["theirs"]
    mine = start(job("mine", 1.0))
    theirs = start(job("theirs", 2.0))
    nobody = start(job("nobody", 3.0))
    fenced = tx(
        conn,
        store.write_batch,
        "A",
        "h1",
        [mine, theirs, nobody],
        [event("mine", 2, 60.0, "running"), event("theirs", 2, 60.0, "running"),
         event("nobody", 2, 60.0, "running")],
        60.0,
    )
    assert fenced == {"theirs", "nobody"}
    assert tx(conn, store.get, "mine") == mine
    assert tx(conn, store.get, "theirs") == job("theirs", 2.0)
    assert tx(conn, store.get, "nobody") == job("nobody", 3.0)
    assert rows(conn, "SELECT id, state, started, attempts, updated FROM jobs ORDER BY id") == [
        ("mine", "running", 60.0, 1, 60.0),
        ("nobody", "queued", None, 0, 3.0),
        ("theirs", "queued", None, 0, 50.0),
    ]
    assert seqs(conn, "mine") == [1, 2]
    assert seqs(conn, "theirs") == [1]
    assert seqs(conn, "nobody") == [1]

    # Events alone, for a job another daemon holds, are fenced as well.
    fenced = tx(conn, store.write_batch, "A", "h1", [], [event("theirs", 2, 61.0, "running")],
                61.0)
    assert fenced == {"theirs"}
    assert seqs(conn, "theirs") == [1]


def test_write_batch_newest_update_wins_and_events_are_idempotent(conn: Any) -> None:
    add(conn, job("j", 1.0))
    claim(conn, "A", 1)
    running = start(job("j", 1.0), 60.0)
    cleaning = attrs.evolve(running, state="cleaning")
    passed = attrs.evolve(running, state="passed", finished=80.0)
    ev2 = event("j", 2, 60.0, "running")
    ev3 = event("j", 3, 79.0, "cleaning")
    assert tx(conn, store.write_batch, "A", "h9", [running, cleaning, passed], [ev2, ev3],
              81.0) == set()
    assert tx(conn, store.get, "j") == passed
    assert rows(conn, "SELECT state, finished, updated, host, owner FROM jobs") == [
        ("passed", 80.0, 81.0, "h9", "A")
    ]
    # The same events again (a retried batch), and one of them twice in one batch.
    other = event("j", 2, 99.0, "error", detail="a different value")
    assert tx(conn, store.write_batch, "A", "h9", [], [ev2, other, ev3, ev3], 82.0) == set()
    assert tx(conn, store.events, "j", 0) == [event("j", 1, 1.0), ev2, ev3]
    assert rows(conn, "SELECT count(*) FROM events WHERE job_id = 'j' AND seq = 2") == [(1,)]


# --- cancels --------------------------------------------------------------------------


def test_cancel_queued(conn: Any) -> None:
    add(conn, job("held", 1.0), job("waiting", 2.0))
    put_event(conn, event("waiting", 2, 2.0))
    assert claim(conn, "A", 1) == ["held"]
    got = tx(conn, store.cancel_queued, "waiting", "by the user", 90.0)
    expected = attrs.evolve(job("waiting", 2.0), state="cancelled", reason="by the user",
                            finished=90.0)
    assert got == expected
    assert tx(conn, store.get, "waiting") == expected
    assert rows(conn, "SELECT state, finished, updated FROM jobs WHERE id = 'waiting'") == [
        ("cancelled", 90.0, 90.0)
    ]
    assert tx(conn, store.events, "waiting", 2) == [
        JobEvent(job_id="waiting", seq=3, at=90.0, kind="state", state="cancelled",
                 detail="by the user")
    ]
    # Once cancelled it no longer waits; a held job is its daemon's to cancel.
    assert tx(conn, store.cancel_queued, "waiting", "again", 91.0) is None
    assert tx(conn, store.cancel_queued, "held", "by the user", 90.0) is None
    assert tx(conn, store.get, "held") == job("held", 1.0)
    assert seqs(conn, "held") == [1]
    assert tx(conn, store.cancel_queued, "unknown", "x", 90.0) is None


def test_request_cancel_keeps_the_first_reason(conn: Any) -> None:
    add(conn, job("j", 1.0))
    claim(conn, "A", 1)
    tx(conn, store.write_batch, "A", "h1", [start(job("j", 1.0))], [], 60.0)
    assert tx(conn, store.request_cancel, "j", "first") == "running"
    assert tx(conn, store.request_cancel, "j", "second") == "running"
    assert rows(conn, "SELECT cancel, owner, state FROM jobs") == [("first", "A", "running")]
    assert tx(conn, store.request_cancel, "unknown", "x") is None


# --- leases and takeover --------------------------------------------------------------


def test_take_over_an_expired_lease(conn: Any) -> None:
    add(
        conn,
        job("queued", 1.0, "b"),
        job("cloud", 2.0, "b"),
        job("local", 3.0, spec=local_spec()),
        job("done", 4.0, "b"),
        job("other", 5.0, "b"),
        caps={"b": 10, "local": 10},
        host="hostD",
    )
    tx(conn, store.register, "dead", "hostD", 111, 3.0, 10.0)
    tx(conn, store.register, "taker", "hostT", 222, 30.0, 10.0)
    tx(conn, store.register, "alive", "hostA", 333, 30.0, 10.0)
    assert claim(conn, "dead", 4, host="hostD") == ["queued", "cloud", "local", "done"]
    assert claim(conn, "alive", 1, host="hostA") == ["other"]
    cloud = start(job("cloud", 2.0))
    local = start(job("local", 3.0, spec=local_spec()))
    done = attrs.evolve(start(job("done", 4.0)), state="passed", finished=70.0)
    other = start(job("other", 5.0))
    assert tx(conn, store.write_batch, "dead", "hostD", [cloud, local, done],
              [event("cloud", 2, 60.0, "running"), event("local", 2, 60.0, "running")],
              60.0) == set()
    assert tx(conn, store.write_batch, "alive", "hostA", [other], [], 60.0) == set()

    # Nobody's lease has expired yet.
    assert tx(conn, store.take_over, "taker", "hostT", 100.0) is None
    expire(conn, "dead")

    t = tx(conn, store.take_over, "taker", "hostT", 100.0)
    assert t is not None
    assert (t.dead, t.dead_host) == ("dead", "hostD")
    assert t.requeued == ("queued",)
    assert t.host_lost == ("local",)
    assert t.adopted == (store.Claimed(cloud, 2, None),)

    assert owners(conn) == {
        "queued": None, "cloud": "taker", "local": "dead", "done": "dead", "other": "alive"
    }
    assert rows(conn, "SELECT host FROM jobs WHERE id = 'cloud'") == [("hostT",)]
    reason = "host lost: the daemon on hostD stopped renewing its lease"
    assert tx(conn, store.get, "local") == attrs.evolve(local, state="failed", reason=reason,
                                                         finished=100.0)
    assert rows(conn, "SELECT state, finished FROM jobs WHERE id = 'local'") == [
        ("failed", 100.0)
    ]
    assert tx(conn, store.events, "local", 2) == [
        JobEvent(job_id="local", seq=3, at=100.0, kind="state", state="failed", detail=reason)
    ]
    # The final job and the live daemon's job are untouched.
    assert tx(conn, store.get, "done") == done
    assert tx(conn, store.get, "other") == other
    assert [o for (o,) in rows(conn, "SELECT owner FROM daemons ORDER BY owner")] == [
        "alive", "taker"
    ]
    assert tx(conn, store.renew, "dead", 30.0) is False
    assert tx(conn, store.renew, "taker", 30.0) is True
    assert tx(conn, store.take_over, "taker", "hostT", 101.0) is None
    # The requeued job waits in the queue again (claiming it again:
    # test_claim_again_after_an_unstarted_job_went_back).
    assert rows(conn, "SELECT state, owner FROM jobs WHERE id = 'queued'") == [
        ("queued", None)
    ]


def test_take_over_passes_over_live_leases_and_itself(conn: Any) -> None:
    tx(conn, store.register, "alive", "hostA", 1, 30.0, 10.0)
    tx(conn, store.register, "me", "hostT", 2, 3.0, 10.0)
    expire(conn, "me")
    assert tx(conn, store.take_over, "me", "hostT", 100.0) is None
    # Only a daemon with a live lease takes over.
    assert tx(conn, store.take_over, "other", "hostO", 100.0) is None
    live(conn, "other", "hostO")
    assert tx(conn, store.take_over, "other", "hostO", 100.0) is not None
    assert tx(conn, store.take_over, "other", "hostO", 100.0) is None
    assert sorted(o for (o,) in rows(conn, "SELECT owner FROM daemons")) == ["alive", "other"]


def test_take_over_adopts_a_local_job_of_the_takers_own_host(conn: Any) -> None:
    add(conn, job("here", 1.0, spec=local_spec()), job("there", 2.0, spec=local_spec()),
        host="hostT")
    tx(conn, store.register, "dead", "hostT", 111, 3.0, 10.0)
    assert claim(conn, "dead", 2, host="hostT") == ["here", "there"]
    here = start(job("here", 1.0, spec=local_spec()))
    there = start(job("there", 2.0, spec=local_spec()))
    tx(conn, store.write_batch, "dead", "hostT", [here, there], [], 60.0)
    expire(conn, "dead")
    live(conn, "taker", "hostT")
    t = tx(conn, store.take_over, "taker", "hostT", 100.0)
    assert t == store.TakenOver(
        "dead", "hostT", (), (), (store.Claimed(here, 1, None), store.Claimed(there, 1, None))
    )
    assert owners(conn) == {"here": "taker", "there": "taker"}


def test_register_renew_and_unregister(conn: Any) -> None:
    add(conn, job("q1", 1.0), job("q2", 2.0), job("r", 3.0), job("other", 4.0))
    tx(conn, store.register, "A", "h1", 4242, 30.0, 10.0)
    tx(conn, store.register, "B", "h2", 4343, 30.0, 10.0)
    assert rows(
        conn,
        "SELECT owner, host, pid, started, expires > now() + interval '20 seconds'"
        " FROM daemons ORDER BY owner",
    ) == [("A", "h1", 4242, 10.0, True), ("B", "h2", 4343, 10.0, True)]
    assert tx(conn, store.renew, "A", 3600.0) is True
    assert rows(conn, "SELECT expires > now() + interval '50 minutes' FROM daemons"
                " WHERE owner = 'A'") == [(True,)]
    assert tx(conn, store.renew, "nobody", 30.0) is False

    assert claim(conn, "A", 3) == ["q1", "q2", "r"]
    assert claim(conn, "B", 1, host="h2") == ["other"]
    tx(conn, store.write_batch, "A", "h1", [start(job("r", 3.0))], [], 60.0)
    tx(conn, store.unregister, "A")
    # Its queued jobs wait in the shared queue again; its running job stays
    # held by the (now expired) lease until a takeover.
    assert owners(conn) == {"q1": None, "q2": None, "r": "A", "other": "B"}
    assert rows(conn, "SELECT owner, expires <= now() FROM daemons ORDER BY owner") == [
        ("A", True), ("B", False)
    ]
    t = tx(conn, store.take_over, "B", "h2", 100.0)
    assert t is not None
    assert (t.dead, t.requeued, t.host_lost) == ("A", (), ())
    assert [c.job.id for c in t.adopted] == ["r"]


def test_prune_final_jobs_before_the_cutoff(conn: Any) -> None:
    add(conn, *[job(f"j{i}", float(i)) for i in range(1, 7)], caps={"b": 10})
    assert claim(conn, "A", 6) == ["j1", "j2", "j3", "j4", "j5", "j6"]
    ends = {"j1": ("passed", 10.0), "j2": ("failed", 20.0), "j3": ("cancelled", 30.0),
            "j4": ("error", 40.0), "j5": ("passed", 200.0)}
    updates = [start(job("j6", 6.0))]
    new_events = [event("j6", 2, 60.0, "running")]
    for job_id, (state, at) in ends.items():
        j = job(job_id, float(job_id[1:]))
        updates.append(attrs.evolve(start(j), state=state, finished=at))  # type: ignore[arg-type]
        new_events.append(event(job_id, 2, at, state))
    assert tx(conn, store.write_batch, "A", "h1", updates, new_events, 300.0) == set()
    # j6 runs: not final even with an old start; j5 ended after the cutoff.
    conn.execute("UPDATE jobs SET finished = 1.0 WHERE id = 'j6'")

    assert tx(conn, store.prune, 100.0, 3) == 3
    left = sorted(owners(conn))
    assert left == ["j4", "j5", "j6"]
    assert sorted({i for (i,) in rows(conn, "SELECT job_id FROM events")}) == left
    assert sorted({i for (i,) in rows(conn, "SELECT job_id FROM claims")}) == left
    assert tx(conn, store.prune, 100.0, 3) == 1
    assert sorted(owners(conn)) == ["j5", "j6"]
    assert tx(conn, store.prune, 100.0, 3) == 0
    assert seqs(conn, "j5") == [1, 2]
    assert seqs(conn, "j6") == [1, 2]
    assert tx(conn, store.claim_counts) == {"j5": 1, "j6": 1}


def test_a_row_that_does_not_decode_is_a_store_error(conn: Any) -> None:
    """As in the SQLite store (tests/unit/test_store.py): the same
    StoreError from the same decoding (txvmbot.daemon.stores.sql)."""
    add(conn, job("a", 1.0), job("b", 2.0), caps={"b": 10})
    conn.execute("UPDATE jobs SET data = '{\"not\": \"a job\"}' WHERE id = 'a'")
    conn.execute("UPDATE events SET data = 'not json' WHERE job_id = 'b'")
    for fn, args in ((store.get, ("a",)), (store.list_jobs, (None, None, 10, None))):
        with pytest.raises(StoreError, match="holds a job it cannot read"):
            tx(conn, fn, *args)
    with pytest.raises(StoreError, match="holds an event of job b it cannot read"):
        tx(conn, store.events, "b", 0)
    assert tx(conn, store.get, "b") == job("b", 2.0)
    assert tx(conn, store.last_event_seq, "b") == 1
