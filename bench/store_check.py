#!/usr/bin/env python
"""Benchmark: what the damage check at every daemon start costs on a big
data dir.

Builds a job store of --jobs finished jobs with --events events each (the
daemon's own encoding: jobs through SQLiteJobStore.add_many, the further
events as the store writes them) and a journal of --entries entries, then
times txvmbot._sqlite.quick_check (``PRAGMA quick_check``, what the daemon
and ``txvmbot doctor`` run) on each file, warm (the file in the page cache)
and cold (evicted with posix_fadvise(DONTNEED) first: a host that just
booted); for comparison the bare ``PRAGMA quick_check`` cold (without the
read-through in order that quick_check does first) and ``PRAGMA
integrity_check`` warm.

Timed with time.perf_counter; the median of --runs is printed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_parser, median, reproduce_line, table  # noqa: E402

BATCH = 1000


def build_store(path: str, jobs: int, events: int) -> None:
    from txvmbot.daemon.codec import dumps, event_to_dict
    from txvmbot.daemon.jobs import Job, JobEvent
    from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
    from txvmbot.testing import make_job_spec

    spec = make_job_spec("bench")
    store = SQLiteJobStore(path)
    for k in range(0, jobs, BATCH):
        store.add_many([
            (
                Job(id=f"job-{i:08d}", spec=spec, state="passed", submitted=1000.0 + i,
                    started=1001.0 + i, finished=1060.0 + i, attempts=1),
                JobEvent(job_id=f"job-{i:08d}", seq=1, at=1000.0 + i, kind="state",
                         state="queued"),
            )
            for i in range(k, min(k + BATCH, jobs))
        ])
    store.close()
    # The further events in big transactions: add_event commits each, which
    # would take an hour for millions of events.
    conn = sqlite3.connect(path, isolation_level=None)
    for k in range(0, jobs, BATCH):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO events (job_id, seq, at, data) VALUES (?, ?, ?, ?)",
            (
                (e.job_id, e.seq, e.at, dumps(event_to_dict(e)).decode())
                for i in range(k, min(k + BATCH, jobs))
                for e in (
                    JobEvent(job_id=f"job-{i:08d}", seq=s, at=1000.0 + i + s, kind="step",
                             state="passed", step=f"step-{s % 8}",
                             detail=f"i-{i:08x} answered on 10.0.{s}.7 after {s}.2 s")
                    for s in range(2, events + 1)
                )
            ),
        )
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def build_journal(path: str, entries: int) -> None:
    from txvmbot.journal import SQLiteJournal

    SQLiteJournal(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO entries (check_id, seq, kind, name, endpoint, region, created, updated,"
        " resource_id, parent_id, done) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (f"chk-{i // 4:08d}", i % 4 + 1, "instance", f"txvmbot-{i:08d}",
             "http://127.0.0.1:5000", "us-east-1", 1000.0 + i, 1100.0 + i, f"i-{i:08x}", None,
             1)
            for i in range(entries)
        ),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_quick_check(path: str, cold: bool) -> float:
    from txvmbot._sqlite import quick_check

    if cold:
        evict(path)
    t0 = time.perf_counter()
    said = quick_check(path)
    elapsed = time.perf_counter() - t0
    if said is not None:
        raise SystemExit(f"{path} failed its quick_check: {said}")
    return elapsed


def timed_pragma(path: str, pragma: str, cold: bool) -> float:
    """The bare PRAGMA, without quick_check's read-through."""
    if cold:
        evict(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    t0 = time.perf_counter()
    ((said,),) = conn.execute(f"PRAGMA {pragma}").fetchall()
    elapsed = time.perf_counter() - t0
    conn.close()
    if said != "ok":
        raise SystemExit(f"{path} failed its {pragma}: {said}")
    return elapsed


def main(argv: list[str]) -> int:
    p = bench_parser(__doc__, unit="check", warmup=False)
    p.add_argument("--jobs", type=int, default=100_000, help="jobs in the store (default: 100000)")
    p.add_argument("--events", type=int, default=30,
                   help="events per job (default: 30, as PRUNE_BATCH was measured with)")
    p.add_argument("--entries", type=int, default=400_000,
                   help="journal entries (default: 400000, four per job)")
    args = p.parse_args(argv[1:])

    tmp = tempfile.mkdtemp(prefix="txvmbot-bench-check-")
    try:
        store = os.path.join(tmp, "jobs.sqlite")
        journal = os.path.join(tmp, "journal.sqlite")
        t0 = time.perf_counter()
        build_store(store, args.jobs, args.events)
        build_journal(journal, args.entries)
        print(f"built in {time.perf_counter() - t0:.0f}s: jobs.sqlite "
              f"{os.path.getsize(store) / 2**20:.0f} MiB, journal.sqlite "
              f"{os.path.getsize(journal) / 2**20:.0f} MiB")
        rows = []
        for name, path in (("jobs.sqlite", store), ("journal.sqlite", journal)):
            warm = median([timed_quick_check(path, cold=False) for _ in range(args.runs)])
            cold = median([timed_quick_check(path, cold=True) for _ in range(args.runs)])
            bare = median([timed_pragma(path, "quick_check", True) for _ in range(args.runs)])
            full = median([timed_pragma(path, "integrity_check", False) for _ in range(args.runs)])
            rows.append([name, os.path.getsize(path) / 2**20, warm, cold, bare, full])
        print(table(["file", "MiB", "check warm s", "check cold s",
                     "bare quick_check cold s", "integrity_check warm s"], rows))
        total_warm = sum(r[2] for r in rows)
        total_cold = sum(r[3] for r in rows)
        print(f"RESULT: the start-up check of {args.jobs} jobs x {args.events} events and "
              f"{args.entries} journal entries takes {total_warm:.2f}s warm, "
              f"{total_cold:.2f}s cold")
        print(reproduce_line(argv))
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
