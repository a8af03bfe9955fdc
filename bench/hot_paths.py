#!/usr/bin/env python
"""Benchmark: two hot paths, each with the way it was done before, in one
process, so the ratio is the figure to read.

  store commit     --jobs submits written to a fresh job store file (WAL,
                   synchronous=NORMAL) one commit each (SQLiteJobStore.add,
                   a submit before group commit) against --batch to a commit
                   (SQLiteJobStore.add_many, what the daemon does with the
                   submits of one read); the same jobs and events either way.
  timestamps       an EC2 answer's timestamp (2026-11-22T05:39:00.000Z)
                   parsed by botocore's default parser (dateutil) against
                   txvmbot.ec2._botocore.parse_timestamp, which the client's
                   parser uses; --parses each, same instants checked.

Timed with time.perf_counter; the median of --runs is printed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_parser, median, reproduce_line, table  # noqa: E402

STAMP = "2026-11-22T05:39:00.000Z"


def store_side(jobs: int, batch: int) -> float:
    """Seconds per submit, writing ``jobs`` submits ``batch`` to a commit
    (1: SQLiteJobStore.add) into a new store file."""
    from txvmbot.daemon.jobs import Job, JobEvent
    from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
    from txvmbot.testing import make_job_spec

    spec = make_job_spec("bench")
    submits = [
        (
            Job(id=f"job-{i:08d}", spec=spec, state="queued", submitted=1000.0 + i),
            JobEvent(job_id=f"job-{i:08d}", seq=1, at=1000.0 + i, kind="state", state="queued"),
        )
        for i in range(jobs)
    ]
    tmp = tempfile.mkdtemp(prefix="txvmbot-bench-store-")
    try:
        store = SQLiteJobStore(os.path.join(tmp, "jobs.sqlite"))
        t0 = time.perf_counter()
        if batch == 1:
            for job, event in submits:
                store.add(job, event)
        else:
            for k in range(0, jobs, batch):
                store.add_many(submits[k : k + batch])
        elapsed = time.perf_counter() - t0
        store.close()
    finally:
        shutil.rmtree(tmp)
    return elapsed / jobs


def stamp_side(parse: object, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        parse(STAMP)  # type: ignore[operator]
    return (time.perf_counter() - t0) / n


def main(argv: list[str]) -> int:
    p = bench_parser(__doc__, unit="side", warmup=False)
    p.add_argument("--jobs", type=int, default=5000, help="submits per store side (default: 5000)")
    p.add_argument("--batch", type=int, default=64, help="submits to a commit (default: 64)")
    p.add_argument("--parses", type=int, default=2000, help="timestamps per side (default: 2000)")
    args = p.parse_args(argv[1:])

    from botocore.utils import parse_timestamp as botocore_parse

    from txvmbot.ec2._botocore import parse_timestamp

    if parse_timestamp(STAMP) != botocore_parse(STAMP):
        raise SystemExit("the two timestamp parsers disagree")
    got: dict[str, list[float]] = {k: [] for k in ("one", "many", "dateutil", "stdlib")}
    for _ in range(args.runs):
        got["one"].append(store_side(args.jobs, 1))
        got["many"].append(store_side(args.jobs, args.batch))
        got["dateutil"].append(stamp_side(botocore_parse, args.parses))
        got["stdlib"].append(stamp_side(parse_timestamp, args.parses))
    us = {k: median(v) * 1e6 for k, v in got.items()}
    print(
        table(
            ["path", "before µs", "now µs", "before/now"],
            [
                [f"store, a commit per submit vs {args.batch} a commit", us["one"], us["many"],
                 us["one"] / us["many"]],
                ["EC2 timestamp, dateutil vs stdlib", us["dateutil"], us["stdlib"],
                 us["dateutil"] / us["stdlib"]],
            ],
        )
    )
    print(
        f"RESULT: group commit {us['one'] / us['many']:.1f}x cheaper per submit "
        f"({us['one']:.0f} -> {us['many']:.0f} µs); timestamps "
        f"{us['dateutil'] / us['stdlib']:.0f}x ({us['dateutil']:.1f} -> {us['stdlib']:.2f} µs)"
    )
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
