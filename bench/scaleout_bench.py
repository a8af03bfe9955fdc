#!/usr/bin/env python
"""Benchmark: several daemons on one PostgreSQL (issue 9) against one daemon
on SQLite and one on PostgreSQL, in one run.

Started here, on loopback or unix sockets only, and stopped by their pids:
moto (127.0.0.1), a PostgreSQL server (tests.support.pgserver: a temp dir, a unix
socket, fsync=off as the tests run it) and, per configuration, the real
daemons (``twistd -n txvmbot``, --workers each). The configurations:

  sqlite   one daemon on its SQLite store (jobs.sqlite in its data dir)
  pg-1     one daemon on a fresh PostgreSQL database
  pg-2     two daemons on one fresh PostgreSQL database

For each, with a fresh store and moto reset:

  submit throughput   backend bench-A is drained (nothing of it runs).
                      --jobs submits, split round-robin over the daemons,
                      each daemon driven by a client process of its own
                      (python -m bench._pg: txvmbot.daemon.api.client over
                      --connections connections, --window submits in flight
                      on each), all started together. Rate = all answers /
                      wall time from the first send to the last answer (one
                      clock: CLOCK_MONOTONIC). Checked: distinct ids, all
                      answered queued, the stored count (jobs.sqlite opened
                      read-only / SELECT count(*) FROM jobs), and status.
                      CPU seconds of each daemon (/proc), each client
                      process, PostgreSQL (postmaster and backends) and the
                      whole machine over the window, so a saturated side
                      shows.
  queued->running     bench-A keeps its --jobs queued. Quick --no-ssh moto
                      jobs on bench-B, submitted one at a time (to the
                      daemons in turn), each only while fewer than
                      --inflight are unfinished, so a worker is idle: the
                      'running' state event's `at` minus the 'queued' state
                      event's `at`, from the job's events (the daemons'
                      clocks, one host). --latency-jobs of them.

Then takeover: two PostgreSQL daemons with --lease L on a fresh database.
Daemon A alone runs --workers cloud jobs that hang in wait-ssh (ssh to the
closed port 127.0.0.1:9, --timeout-ssh 600, max_attempts 1); then B starts;
A and its workers are SIGKILLed. Measured from the kill: until B logged
"Took over daemon", and until every job A held is final in the database
(B cleaned up after them; they end 'error'). moto must hold nothing of
txvmbot's afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import suppress
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    ReactorThread,
    bench_env,
    pick_image,
    proc_cpu,
    reproduce_line,
    set_test_credentials,
    table,
)
from bench._pg import (  # noqa: E402
    DSN_ENV,
    BenchDaemon,
    ClientProc,
    pg_counts,
    pg_server,
    query,
    tree_cpu,
)
from bench.daemon_bench import (  # noqa: E402
    hold_running,
    latency,
    pct,
    spec_dict,
    stored_counts,
    system_busy,
)
from tests.support import checkrun  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402

GOAL_RATIO = 1.6  # two PostgreSQL daemons / one, submits/s
GOAL_P99_MS = 50.0  # queued -> running, 10,000 queued
TAKEOVER_SLACK = 10.0  # takeover <= lease + this

BACKEND_A = "bench-A"  # drained: its jobs stay queued
BACKEND_B = "bench-B"  # quick --no-ssh jobs: dispatch latency
BACKEND_C = "bench-C"  # hanging jobs: takeover
FINAL = ("passed", "failed", "cancelled", "error")
CONFIGS = (("sqlite", 1, False), ("pg-1", 1, True), ("pg-2", 2, True))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=10_000, help="submits, kept queued (default: 10000)")
    p.add_argument(
        "--connections", type=int, default=4,
        help="AMP connections of each daemon's client process (default: 4)",
    )
    p.add_argument(
        "--window", type=int, default=64, help="submits in flight per connection (default: 64)"
    )
    p.add_argument(
        "--latency-jobs", type=int, default=200,
        help="queued->running samples per configuration (default: 200)",
    )
    p.add_argument(
        "--inflight", type=int, default=2,
        help="most unfinished latency jobs at a submit; below --workers (default: 2)",
    )
    p.add_argument("--lease", type=float, default=6.0, help="the daemons' lease, s (default: 6)")
    p.add_argument(
        "--workers", type=int, default=4,
        help="workers of each daemon, and hanging jobs on A for the takeover (default: 4)",
    )
    p.add_argument(
        "--profile", action="store_true",
        help="run the daemons under twistd's cProfile (reactor thread only) and print "
        "each one's top functions; slows them down, so not for the figures",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs)")
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 100_000:
        p.error("--jobs must be 1..100000")
    if not 1 <= args.connections <= 32 or not 1 <= args.window <= 1000:
        p.error("--connections must be 1..32 and --window 1..1000")
    if not 1 <= args.latency_jobs <= 5000:
        p.error("--latency-jobs must be 1..5000")
    if not 2 <= args.workers <= 64:
        p.error("--workers must be 2..64")
    if not 1 <= args.inflight < args.workers:
        p.error("--inflight must be at least 1 and below --workers")
    if not 3 <= args.lease <= 120:
        p.error("--lease must be 3..120 s")
    return args


# --- main -------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    tmp = tempfile.mkdtemp(prefix="txvmbot-scaleout-")
    key, _ = checkrun.ssh_keypair(tmp)
    out: dict[str, Any] = {"configs": []}
    rt: ReactorThread | None = None
    try:
        with moto_server() as moto, pg_server() as pg:
            version = query(pg.dsn(), "SHOW server_version")[0][0]
            print(
                f"load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs shared by moto, "
                f"PostgreSQL, the daemons, their workers and the clients; moto {moto.url} "
                f"(pid {moto.pid}); PostgreSQL {version} (pid {pg.pid}, unix socket, fsync=off); "
                f"--workers {args.workers} per daemon, --lease {args.lease:g}s",
                flush=True,
            )
            rt = ReactorThread()
            rt.start()
            for label, n, shared in CONFIGS:
                out["configs"].append(
                    run_config(rt, args, moto, pg, tmp, label, n, shared)
                )
            out["takeover"] = run_takeover(rt, args, moto, pg, tmp, key)
            out["leftovers"] = checkrun.leftovers(moto.url)
    finally:
        if rt is not None:
            rt.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, argv, out)


def _connect(rt: ReactorThread, where: str) -> Any:
    from twisted.internet.defer import ensureDeferred

    from txvmbot.daemon.api.client import connect

    async def go() -> Any:
        return await connect(rt.reactor, where, timeout=30)

    return rt.call(lambda: ensureDeferred(go()), timeout=60)


def _close(rt: ReactorThread, client: Any) -> None:
    with suppress(Exception):
        rt.call(client.close, timeout=30)


def run_config(
    rt: ReactorThread, args: argparse.Namespace, moto: Any, pg: Any, tmp: str,
    label: str, n: int, shared: bool,
) -> dict[str, Any]:
    """One configuration: its daemons on a fresh store, submit throughput,
    then queued->running latency with the submitted jobs still queued."""
    moto.reset()
    image = pick_image(moto)
    env = bench_env()
    res: dict[str, Any] = {"label": label, "daemons": n, "shared": shared}
    dbname = "bench_" + label.replace("-", "_")
    dsn = ""
    if shared:
        dsn = pg.create_database(dbname)
        env[DSN_ENV] = dsn
    base = os.path.join(tmp, label)
    daemons = [
        BenchDaemon(base, "ab"[i], workers=args.workers, default_cap=2 * args.workers,
                    shared=shared, lease=args.lease, profile=args.profile)
        for i in range(n)
    ]
    procs: list[ClientProc] = []
    clients: list[Any] = []
    try:
        res["start_s"] = [d.start(env) for d in daemons]
        clients = [_connect(rt, d.connect) for d in daemons]
        rt.call(clients[0].drain, BACKEND_A)
        if shared:
            # Every daemon follows the drain (a notification): wait until
            # each says so, bounded.
            _wait(lambda: all(
                any(b.name == BACKEND_A and b.state == "draining" for b in rt.call(c.status).backends)
                for c in clients
            ), 10)

        # --- 1. submit throughput ------------------------------------------------------------
        spec_a = spec_dict(moto.url, image, BACKEND_A)
        shares = [args.jobs // n + (i < args.jobs % n) for i in range(n)]
        for i, d in enumerate(daemons):
            procs.append(ClientProc(env, {
                "connect": d.connect, "spec": spec_a, "jobs": shares[i],
                "connections": args.connections, "window": args.window,
            }, os.path.join(base, f"client-{d.name}.err")))
        for p in procs:
            if p.readline(120) != "ready":
                raise RuntimeError(f"client process {p.pid} did not say ready")
        d0 = [proc_cpu(d.pid) for d in daemons]
        pg0 = tree_cpu(pg.pid)
        s0 = system_busy()
        w0 = time.perf_counter()
        for p in procs:
            p.go()
        results = [json.loads(p.readline(900)) for p in procs]
        res["window_wall"] = time.perf_counter() - w0
        res["busy"] = system_busy() - s0
        res["daemon_cpu"] = [proc_cpu(d.pid) - c for d, c in zip(daemons, d0, strict=True)]
        res["pg_cpu"] = tree_cpu(pg.pid) - pg0
        res["client_cpu"] = [r["cpu"] for r in results]
        res["others"] = res["busy"] - sum(res["daemon_cpu"]) - sum(res["client_cpu"]) - res["pg_cpu"]
        res["client_pids"] = [p.pid for p in procs]
        for p in procs:
            p.close()
        procs = []
        ids = [i for r in results for i in r["ids"]]
        res["answered"] = len(ids)
        res["distinct"] = len(set(ids))
        res["queued"] = sum(r["states"].get("queued", 0) for r in results)
        res["errors"] = sum(r["errors"] for r in results)
        res["first_error"] = next((r["first_error"] for r in results if r["first_error"]), "")
        res["wall"] = max(r["t1"] for r in results) - min(r["t0"] for r in results)
        res["rate"] = len(ids) / res["wall"] if res["wall"] > 0 else 0.0
        res["per_daemon_rate"] = [
            len(r["ids"]) / (r["t1"] - r["t0"]) if r["t1"] > r["t0"] else 0.0 for r in results
        ]
        res["rtt_p50"] = max(r["rtt_p50"] for r in results)
        res["rtt_p99"] = max(r["rtt_p99"] for r in results)
        counts = pg_counts(dsn) if shared else stored_counts(daemons[0].sqlite_path)
        res["stored"] = counts.get((BACKEND_A, "queued"), 0)
        res["stored_all"] = sum(v for (b, _), v in counts.items() if b == BACKEND_A)
        res["status_depth"] = [rt.call(c.status).queue_depth for c in clients]
        res["stored_ok"] = (
            res["answered"] == res["distinct"] == res["queued"] == res["stored"]
            == res["stored_all"] == args.jobs and set(res["status_depth"]) == {args.jobs}
        )
        print(
            f"[{label}] {len(ids)} submits in {res['wall']:.2f}s = {res['rate']:.0f}/s; "
            f"stored queued {res['stored']}; status queue depth {res['status_depth']}",
            flush=True,
        )
        _alive(daemons)

        # --- 2. queued->running with the queue deep ---------------------------------------
        spec_b = spec_dict(moto.url, image, BACKEND_B)
        d0 = [proc_cpu(d.pid) for d in daemons]
        samples, seen, wall = rt.call(
            lambda: _deferred(latency(rt.reactor, clients, spec_b, args.latency_jobs,
                                      args.inflight, bound=900)),
            timeout=1000,
        )
        res["lat_daemon_cpu"] = [proc_cpu(d.pid) - c for d, c in zip(daemons, d0, strict=True)]
        res["lat_wall"] = wall
        res["lat_n"] = len(samples)
        res["lat_ms"] = [
            (r - q) * 1000 for s in samples
            if (q := s.at("state", "queued")) is not None and (r := s.at("state", "running")) is not None
        ]
        res["seen_ms"] = [x * 1000 for x in seen]
        res["lat_passed"] = sum(1 for s in samples if s.final is not None and s.final.state == "passed")
        if shared:
            res["lat_hosts"] = dict(query(
                dsn, "SELECT host, count(*) FROM jobs WHERE backend = %s GROUP BY host",
                (BACKEND_B,)))
        res["depth_after"] = rt.call(clients[0].status).queue_depth
        print(
            f"[{label}] {len(samples)} latency jobs in {wall:.1f}s: queued->running p50 "
            f"{pct(res['lat_ms'], 50):.1f} ms, p99 {pct(res['lat_ms'], 99):.1f} ms",
            flush=True,
        )
        _alive(daemons)
    finally:
        for p in procs:
            with suppress(Exception):
                p.close()
        for c in clients:
            _close(rt, c)
        t = time.perf_counter()
        for d in daemons:
            d.stop()
        res["stop_s"] = time.perf_counter() - t
        res["exit"] = [d.proc.returncode if d.proc is not None else None for d in daemons]
        res["workers_left"] = [w for d in daemons for w in d.kill_workers()]
        for d in daemons:
            top = d.profile_top()
            if top:
                print(f"[{label}] profile of daemon {d.name} (reactor thread, whole run):\n{top}")
        if shared:
            with suppress(Exception):
                pg.drop_database(dbname)
    return res


def _deferred(coro: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(coro)


def _alive(daemons: list[BenchDaemon]) -> None:
    for d in daemons:
        if not d.alive():
            raise SystemExit(f"daemon {d.name} exited ({d.proc and d.proc.returncode}); log: {d.log_path}")


def _wait(probe: Any, timeout: float, interval: float = 0.1) -> float:
    """Poll ``probe`` until true, at most ``timeout`` s; seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if probe():
            return time.monotonic() - t0
        time.sleep(interval)
    raise TimeoutError(f"not reached within {timeout}s")


# --- takeover -------------------------------------------------------------------------


def run_takeover(
    rt: ReactorThread, args: argparse.Namespace, moto: Any, pg: Any, tmp: str, key: str
) -> dict[str, Any]:
    moto.reset()
    image = pick_image(moto)
    env = bench_env()
    dbname = "bench_takeover"
    dsn = pg.create_database(dbname)
    env[DSN_ENV] = dsn
    base = os.path.join(tmp, "takeover")
    a, b = (
        BenchDaemon(base, name, workers=args.workers, default_cap=2 * args.workers,
                    shared=True, lease=args.lease)
        for name in ("a", "b")
    )
    res: dict[str, Any] = {"n": args.workers}
    client = None
    try:
        a.start(env)
        client = _connect(rt, a.connect)
        spec = spec_dict(moto.url, image, BACKEND_C, key=key)
        ids, _events, took = rt.call(
            lambda: _deferred(hold_running(rt.reactor, [client], spec, args.workers, 300)),
            timeout=400,
        )
        res["hold_s"] = took
        b.start(env)  # after A holds them all: none is B's from the start
        on_a = [r[0] for r in query(
            dsn, "SELECT id FROM jobs WHERE owner LIKE %s AND state = 'running'", (f"{a.host}/%",))]
        res["on_a"] = len(on_a)
        res["resources_before"] = len(checkrun.leftovers(moto.url))
        a.kill()
        killed = time.monotonic()
        res["killed_workers"] = len(a.worker_pids)
        _close(rt, client)
        client = None
        took_over = final = None
        states: dict[str, str] = {}
        bound = args.lease + 120
        while time.monotonic() - killed < bound:
            now = time.monotonic() - killed
            if took_over is None and "Took over daemon" in b.log():
                took_over = now
            if final is None:
                states = dict(query(dsn, "SELECT id, state FROM jobs WHERE id = ANY(%s)", (on_a,)))
                if len(states) == len(on_a) and all(s in FINAL for s in states.values()):
                    final = now
            if took_over is not None and final is not None:
                break
            time.sleep(0.1)
        res["took_over_s"] = took_over
        res["final_s"] = final
        res["states"] = sorted(states.values())
        reasons = [r[0] for r in query(dsn, "SELECT data FROM jobs WHERE id = ANY(%s)", (on_a,))]
        res["reasons_ok"] = bool(on_a) and all("lost (its lease expired)" in r for r in reasons)
        res["claims_once"] = query(
            dsn, "SELECT count(*) FROM claims WHERE job_id = ANY(%s) GROUP BY job_id"
            " HAVING count(*) <> 1", (on_a,)) == []
        left: list[str] = []
        t = time.monotonic()
        while time.monotonic() - t < 60:
            left = checkrun.leftovers(moto.url)
            if not left:
                break
            time.sleep(0.5)
        res["leftovers"] = left
        res["leftovers_wait_s"] = time.monotonic() - t
        res["b_alive"] = b.alive()
        res["all_ids"] = len(ids)
    finally:
        if client is not None:
            _close(rt, client)
        a.kill_workers()
        if a.alive():
            a.stop()
        b.stop()
        with suppress(Exception):
            pg.drop_database(dbname)
    return res


# --- the report ------------------------------------------------------------------------


def report(args: argparse.Namespace, argv: list[str], out: dict[str, Any]) -> int:
    ok = True
    configs = {c["label"]: c for c in out["configs"]}
    print()
    print(
        f"submit throughput: {args.jobs} submits to a drained backend, split round-robin over "
        f"the daemons; each daemon driven by its own client process (python -m bench._pg, "
        f"{args.connections} connections x {args.window} in flight); rate = all answers / "
        f"wall from first send to last answer. CPU seconds over the window: each daemon "
        f"(/proc), each client process (its own), PostgreSQL (postmaster and backends), and "
        f"the rest of the machine ({os.cpu_count()} CPUs; other agents' work included)"
    )
    rows = []
    for c in out["configs"]:
        win = max(c["window_wall"], 1e-9)
        rows.append([
            c["label"], c["daemons"], c["answered"], c["wall"], round(c["rate"]),
            " ".join(f"{r:.0f}" for r in c["per_daemon_rate"]),
            c["rtt_p50"], c["rtt_p99"],
            " ".join(f"{x:.2f}" for x in c["daemon_cpu"]),
            " ".join(f"{x:.2f}" for x in c["client_cpu"]),
            c["pg_cpu"], c["others"], c["busy"] / win,
            f"{c['stored']} {'ok' if c['stored_ok'] else 'MISMATCH'}",
        ])
        if not c["stored_ok"]:
            ok = False
    print(table(
        ["config", "daemons", "answered", "wall s", "submits/s", "per client /s", "rtt p50 ms",
         "rtt p99 ms", "daemon CPU s", "client CPU s", "postgres CPU s", "others CPU s",
         "busy cores", "stored queued"],
        rows,
    ))
    for c in out["configs"]:
        if c["errors"]:
            print(f"  {c['label']}: {c['errors']} submits failed, first: {c['first_error']}")
        n = max(c["answered"], 1)
        ours = sum(c["daemon_cpu"]) + sum(c["client_cpu"]) + c["pg_cpu"]
        per = ours / n * 1000
        cores = [x / c["wall"] for x in c["daemon_cpu"]]
        ccores = [x / c["wall"] for x in c["client_cpu"]]
        print(
            f"  {c['label']}: cores used: daemon(s) {' '.join(f'{x:.2f}' for x in cores)}, "
            f"client process(es) {' '.join(f'{x:.2f}' for x in ccores)}, postgres "
            f"{c['pg_cpu'] / c['wall']:.2f}, the rest of the machine {c['others'] / c['wall']:.2f}. "
            f"CPU per submit: daemons {sum(c['daemon_cpu']) / n * 1000:.3f} ms, clients "
            f"{sum(c['client_cpu']) / n * 1000:.3f} ms, postgres {c['pg_cpu'] / n * 1000:.3f} ms; "
            f"all of it {per:.3f} ms, so {os.cpu_count()} idle CPUs bound this configuration "
            f"at ~{(os.cpu_count() or 1) / per * 1000:.0f}/s"
        )
        print(
            f"    status queue depth {c['status_depth']}; {c['distinct']} distinct ids, "
            f"{c['queued']} answered queued, {c['stored_all']} {BACKEND_A} rows stored"
        )
    rate = {k: v["rate"] for k, v in configs.items()}
    ratio = rate.get("pg-2", 0) / rate["pg-1"] if rate.get("pg-1") else float("nan")
    pg_vs_sqlite = rate.get("pg-1", 0) / rate["sqlite"] if rate.get("sqlite") else float("nan")
    print(f"  two-PG / one-PG: {ratio:.2f}x (goal >= {GOAL_RATIO}x); one-PG / SQLite: {pg_vs_sqlite:.2f}x")
    if "pg-1" in configs and "pg-2" in configs:
        c1, c2 = configs["pg-1"], configs["pg-2"]
        per2 = (sum(c2["daemon_cpu"]) + sum(c2["client_cpu"]) + c2["pg_cpu"]) / max(c2["answered"], 1)
        ceiling = (os.cpu_count() or 1) / per2 if per2 > 0 else float("nan")
        print(
            f"  on this host two-PG cannot pass ~{ceiling:.0f}/s (all {os.cpu_count()} CPUs "
            f"for its daemons, clients and PostgreSQL), so two-PG / one-PG is at most "
            f"~{ceiling / max(c1['rate'], 1e-9):.2f}x here; one-PG's daemon used "
            f"{sum(c1['daemon_cpu']) / c1['wall']:.2f} of a core and the rest of the machine "
            f"{c1['others'] / c1['wall']:.2f} cores during its window (two-PG: "
            f"{c2['others'] / c2['wall']:.2f})"
        )

    print()
    print(
        f"queued->running ('running' state event `at` - 'queued' `at`): --latency-jobs "
        f"{args.latency_jobs} quick --no-ssh moto jobs on {BACKEND_B}, one at a time (<= "
        f"{args.inflight} unfinished, {args.workers} workers per daemon; to the daemons in turn) "
        f"while {BACKEND_A} holds the submitted jobs queued"
    )
    rows = []
    for c in out["configs"]:
        xs, seen = c["lat_ms"], c["seen_ms"]
        rows.append([
            c["label"], c["depth_after"], len(xs), pct(xs, 50), pct(xs, 90), pct(xs, 99),
            max(xs, default=float("nan")), pct(seen, 50), pct(seen, 99),
            f"{c['lat_passed']}/{c['lat_n']}",
            " ".join(f"{x / c['lat_wall']:.2f}" for x in c["lat_daemon_cpu"]),
        ])
        if len(xs) < args.latency_jobs or c["lat_passed"] < c["lat_n"]:
            ok = False
    print(table(
        ["config", "queued", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "client seen p50",
         "client seen p99", "passed", "daemon cores"],
        rows,
    ))
    for c in out["configs"]:
        if c["workers_left"] or any(e not in (0, -15, None) for e in c["exit"]):
            print(f"  {c['label']}: daemon exits {c['exit']}, workers left {c['workers_left']}")
        hosts = c.get("lat_hosts")
        print(
            f"  {c['label']}: daemons stopped by pid in {c['stop_s']:.1f}s, exit {c['exit']}"
            + (f"; latency jobs run per daemon host: {hosts}" if hosts else "")
        )

    t = out.get("takeover", {})
    print()
    goal_takeover = args.lease + TAKEOVER_SLACK
    if t:
        print(
            f"takeover: daemon A held {t['on_a']}/{t['n']} hanging jobs (in wait-ssh after "
            f"{t['hold_s']:.1f}s; {t['resources_before']} resources in moto); A and its "
            f"{t['killed_workers']} workers SIGKILLed; B logged \"Took over daemon\" after "
            f"{_s(t['took_over_s'])}; every job A held final after {_s(t['final_s'])} "
            f"(states {sorted(set(t['states']))}, reasons say the lease expired: "
            f"{t['reasons_ok']}, claimed once each: {t['claims_once']}); moto leftovers "
            f"{t['leftovers'] or 'none'} (checked {t['leftovers_wait_s']:.1f}s after)"
        )
        if (t["on_a"] != t["n"] or set(t["states"]) != {"error"} or not t["reasons_ok"]
                or t["leftovers"] or not t["claims_once"] or not t["b_alive"]):
            ok = False
    print(f"moto leftovers at the end: {out.get('leftovers') or 'none'}")
    if out.get("leftovers"):
        ok = False

    print()
    final_rows: list[list[object]] = [
        ["submit two-PG / one-PG", f"{ratio:.2f}x", f">= {GOAL_RATIO}x", _met(ratio >= GOAL_RATIO)],
    ]
    for label in ("sqlite", "pg-1", "pg-2"):
        final_rows.append([f"submit/s {label}", f"{rate.get(label, 0):.0f}", "-", "-"])
    final_rows.append(["submit one-PG / SQLite", f"{pg_vs_sqlite:.2f}x", "-", "-"])
    for c in out["configs"]:
        p99 = pct(c["lat_ms"], 99)
        final_rows.append([
            f"queued->running p99 {c['label']} ({c['depth_after']} queued)",
            f"{p99:.1f} ms (p50 {pct(c['lat_ms'], 50):.1f})", f"<= {GOAL_P99_MS:.0f} ms",
            _met(p99 <= GOAL_P99_MS),
        ])
    if t:
        for name, key in (("takeover: 'Took over daemon' logged", "took_over_s"),
                          ("takeover: A's jobs all final", "final_s")):
            v = t[key]
            final_rows.append([name, _s(v), f"<= {goal_takeover:g} s",
                               _met(v is not None and v <= goal_takeover)])
        final_rows.append(["moto leftovers after takeover", str(len(t["leftovers"])), "0",
                           _met(not t["leftovers"])])
    print(table(["figure", "measured", "goal", "met"], final_rows))
    if not ok:
        print("CHECKS FAILED (see above)")
    print(reproduce_line(argv))
    return 0 if ok else 1


def _s(v: float | None) -> str:
    return "never (bound reached)" if v is None else f"{v:.1f} s"


def _met(flag: bool) -> str:
    return "met" if flag else "NOT MET"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
