#!/usr/bin/env python
"""Soak: the real daemon's memory and open files over many jobs.

The real daemon (``twistd -n txvmbot``, --workers 4 by default, its web
page on 127.0.0.1) and moto are started here, moto on 127.0.0.1, the
daemon's AMP API on a unix socket in a temp data dir; both are stopped by
their pid. The daemon then runs --jobs ``--no-ssh`` jobs in waves of
--wave jobs, each wave in chunks of --chunk jobs. In a chunk, one AMP
connection (opened for the chunk, closed after it, as a CLI client would)
submits jobs and watches each to its end, with at most --inflight
unfinished at a time; then moto is asked for leftovers and reset (``POST
/moto-api/reset``: moto keeps every terminated instance, and its CPU per
job grew from about 0.15 s to 0.6 s over 500 of them here). After a wave,
the web page's overview, failures and /metrics are read once, and over AMP
the status, the newest 100 jobs and the failure report (as before the
first wave); and the daemon is measured after --settle seconds:

  daemon   VmRSS and VmHWM (/proc/PID/status), Pss (smaps_rollup) and open
           fds (/proc/PID/fd), the daemon process alone
  workers  its child processes (recycled after recycle_after jobs, 50 by
           default): how many, their summed RSS, their most open fds

At the end, the least-squares slope of the daemon's RSS over jobs done,
taken over the waves from --skip jobs on (allocator warm-up, SQLite's
page cache and the first worker recycles come before that), in MB per
1,000 jobs. Goal: at most 0.2 MB per 1,000 jobs, and the daemon's and each
worker's fds flat (within 2 of their first measure after --skip).

--probe and --trace are for finding what grows. With --probe, a
``sitecustomize`` in a temp dir on the daemon's PYTHONPATH (the workers do
not probe) answers SIGUSR2 after each wave's measure: Python's allocated
blocks, gc object counts by type, SQLite's own heap and glibc malloc's
totals, printed per wave, and the types that grew most from --skip on.
--trace FRAMES adds tracemalloc (FRAMES deep) and prints the lines whose
memory grew most; it slows the daemon several times over (its RSS then
is tracemalloc's too: those figures are not comparable).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    ReactorThread,
    pick_image,
    proc_cpu,
    reproduce_line,
    set_test_credentials,
    table,
)
from bench.daemon_bench import proc_status_kb, pss_kb, spec_dict  # noqa: E402
from bench.web_bench import start_daemon  # noqa: E402
from tests.support import checkrun  # noqa: E402
from tests.support import real_daemon as D  # noqa: E402
from tests.support.servers import free_port, moto_server  # noqa: E402

TARGET_SLOPE = 0.2  # MB of daemon RSS per 1,000 jobs, after --skip jobs
FDS_SLACK = 2  # fds may differ by this much from their first measure
BACKEND = "soak"

#: Loaded by the daemon (and only the daemon: it removes the variables that
#: turn it on before the daemon copies its environment for the workers). On
#: SIGUSR2 it writes what the daemon holds: Python's allocated blocks, gc
#: object counts by type, SQLite's own heap, glibc malloc's totals, and with
#: tracemalloc on, a snapshot.
SITECUSTOMIZE = '''\
import os
if os.environ.pop("TXVMBOT_SOAK_PROBE", None):
    import ctypes, gc, json, signal, sys, tracemalloc
    from collections import Counter
    _frames = int(os.environ.pop("TXVMBOT_SOAK_FRAMES", "0"))
    if _frames:
        tracemalloc.start(_frames)
    _out = os.environ.pop("TXVMBOT_SOAK_OUT")
    _n = [0]

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    def _dump(signum, frame):
        _n[0] += 1
        gc.collect()
        base = os.path.join(_out, "snap-%d" % _n[0])
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
        mi = libc.mallinfo2()
        lite = ctypes.CDLL("libsqlite3.so.0")
        lite.sqlite3_memory_used.restype = ctypes.c_int64
        lite.sqlite3_memory_highwater.restype = ctypes.c_int64
        lite.sqlite3_memory_highwater.argtypes = [ctypes.c_int]
        cache, high = ctypes.c_int64(), ctypes.c_int64()
        # SQLITE_STATUS_PAGECACHE_OVERFLOW: every page cache allocation,
        # as SQLite is built here (no SQLITE_CONFIG_PAGECACHE buffer).
        lite.sqlite3_status64(2, ctypes.byref(cache), ctypes.byref(high), 0)
        doc = {
            "blocks": sys.getallocatedblocks(),
            "sqlite": lite.sqlite3_memory_used(),
            "sqlite_high": lite.sqlite3_memory_highwater(0),
            "pagecache": cache.value,
            "malloc": {f: getattr(mi, f) for f, _ in _Mallinfo2._fields_},
            "traced": tracemalloc.get_traced_memory()[0] if _frames else None,
            "types": Counter(type(o).__qualname__ for o in gc.get_objects()),
        }
        if _frames:
            tracemalloc.take_snapshot().dump(base + ".pickle")
        with open(base + ".tmp", "w") as f:
            json.dump(doc, f)
        os.rename(base + ".tmp", base + ".json")

    signal.signal(signal.SIGUSR2, _dump)
'''


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=10_000, help="jobs in all (default: 10000)")
    p.add_argument(
        "--wave", type=int, default=500, help="jobs between two measures (default: 500)"
    )
    p.add_argument(
        "--chunk", type=int, default=100,
        help="jobs between two moto resets, at most --wave (default: 100)",
    )
    p.add_argument(
        "--skip", type=int, default=2000,
        help="jobs before the slope is taken (default: 2000)",
    )
    p.add_argument("--workers", type=int, default=4, help="daemon workers (default: 4)")
    p.add_argument(
        "--inflight", type=int, default=24,
        help="most unfinished jobs at a time, all watched (default: 24)",
    )
    p.add_argument(
        "--poll", type=float, default=0.05,
        help="the jobs' instance poll interval, s (default: 0.05; moto answers at once)",
    )
    p.add_argument(
        "--settle", type=float, default=1.0,
        help="seconds between a wave's end and its measure (default: 1)",
    )
    p.add_argument(
        "--wave-timeout", type=float, default=600.0,
        help="bound of one chunk, s (default: 600)",
    )
    p.add_argument("--probe", action="store_true", help="probe the daemon's heaps (see above)")
    p.add_argument(
        "--trace", type=int, default=0, metavar="FRAMES",
        help="tracemalloc in the daemon, FRAMES deep; implies --probe (see above)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, stores)")
    args = p.parse_args(argv)
    if not 1 <= args.wave <= args.jobs <= 1_000_000:
        p.error("--wave must be 1..--jobs, --jobs at most 1000000")
    if not 1 <= args.chunk <= args.wave:
        p.error("--chunk must be 1..--wave")
    if not 0 <= args.skip < args.jobs:
        p.error("--skip must be 0..--jobs-1")
    if not 0 <= args.trace <= 100:
        p.error("--trace must be 0..100 frames")
    args.probe = args.probe or args.trace > 0
    if not 1 <= args.workers <= 64 or not 1 <= args.inflight <= 90:
        p.error("--workers must be 1..64 and --inflight 1..90 (watches on one connection)")
    return args


# --- measuring ---------------------------------------------------------------------


def fds(pid: int) -> int:
    """Open file descriptors of ``pid``, -1 if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def measure(daemon_pid: int) -> dict[str, Any]:
    workers = D.worker_pids(daemon_pid)
    return {
        "rss": proc_status_kb(daemon_pid, "VmRSS") / 1024,
        "hwm": proc_status_kb(daemon_pid, "VmHWM") / 1024,
        "pss": pss_kb(daemon_pid) / 1024,
        "anon": proc_status_kb(daemon_pid, "RssAnon") / 1024,
        "file": proc_status_kb(daemon_pid, "RssFile") / 1024,
        "fds": fds(daemon_pid),
        "workers": len(workers),
        "workers_rss": sum(proc_status_kb(w, "VmRSS") for w in workers) / 1024,
        "worker_fds": max((fds(w) for w in workers), default=-1),
    }


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (nan with fewer than 2 points)."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


# --- a wave (a coroutine on the reactor thread) --------------------------------------


async def wave(reactor: Any, where: str, spec: dict[str, Any], n: int, inflight: int) -> dict[str, int]:
    """Submit ``n`` jobs on one new connection, each watched to its end,
    at most ``inflight`` unfinished; close the connection. Final states
    counted."""
    from twisted.internet.defer import DeferredSemaphore, gatherResults

    from txvmbot.daemon.api.client import connect

    client = await connect(reactor, where, timeout=30)
    sem = DeferredSemaphore(inflight)
    finals: dict[str, int] = {}
    watches = []

    def ended(job: Any) -> None:
        finals[job.state] = finals.get(job.state, 0) + 1

    def release(result: object) -> object:
        sem.release()
        return result

    try:
        for _ in range(n):
            await sem.acquire()
            job = await client.submit(spec)
            watches.append(
                client.watch(job.id, lambda ev: None).addCallback(ended).addBoth(release)
            )
        await gatherResults(watches, consumeErrors=True)
    finally:
        await client.close()
    return finals


async def reports(reactor: Any, where: str) -> None:
    """What an operator reads now and then over AMP: status, the newest
    jobs, the failure report."""
    from txvmbot.daemon.api.client import connect

    client = await connect(reactor, where, timeout=30)
    try:
        await client.status()
        await client.list(limit=100)
        await client.failures()
    finally:
        await client.close()


def read_pages(port: int) -> dict[str, int]:
    """GET the web page's overview, failures and metrics, as a browser and
    Prometheus would now and then: path -> bytes answered (checked 200)."""
    import http.client

    sizes: dict[str, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for path in ("/", "/failures", "/metrics"):
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"GET {path} answered {r.status}: {body[:200]!r}")
            sizes[path] = len(body)
    finally:
        conn.close()
    return sizes


# --- probing -----------------------------------------------------------------------------


def probe_env(tmp: str, frames: int) -> tuple[dict[str, str], str]:
    """The extra environment of a probed daemon, and where it dumps."""
    site = os.path.join(tmp, "probe-site")
    out = os.path.join(tmp, "probe")
    os.makedirs(site)
    os.makedirs(out)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    return {
        "PYTHONPATH": site + (os.pathsep + path if path else ""),
        "TXVMBOT_SOAK_PROBE": "1",
        "TXVMBOT_SOAK_FRAMES": str(frames),
        "TXVMBOT_SOAK_OUT": out,
    }, out


def probe(pid: int, out: str, n: int, bound: float = 120.0) -> dict[str, Any]:
    """Ask the probed daemon for dump ``n``; what it wrote (with
    ``path``, its base name)."""
    base = os.path.join(out, f"snap-{n}")
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + bound
    while not os.path.exists(base + ".json"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon wrote no {base}.json within {bound:g}s")
        time.sleep(0.2)
    with open(base + ".json") as f:
        doc: dict[str, Any] = json.load(f)
    doc["path"] = base
    return doc


def probe_line(doc: dict[str, Any]) -> str:
    mi = doc["malloc"]
    mb = 1024 * 1024
    traced = "" if doc["traced"] is None else f", tracemalloc {doc['traced'] / mb:.2f} MB"
    return (
        f"  probe: Python blocks {doc['blocks']}, gc objects {sum(doc['types'].values())}, "
        f"SQLite heap {doc['sqlite'] / mb:.2f} MB (high {doc['sqlite_high'] / mb:.2f}; page "
        f"caches {doc['pagecache'] / mb:.2f}), "
        f"malloc arena {mi['arena'] / mb:.2f} MB (in use {mi['uordblks'] / mb:.2f}, free "
        f"{mi['fordblks'] / mb:.2f}, {mi['ordblks']} free chunks), mmapped "
        f"{mi['hblkhd'] / mb:.2f} MB{traced}"
    )


def probe_report(a: dict[str, Any], b: dict[str, Any], jobs: int, top: int = 15) -> None:
    ta, tb = a["types"], b["types"]
    grown = sorted(((tb.get(k, 0) - ta.get(k, 0), k) for k in set(ta) | set(tb)), reverse=True)
    print(
        f"\nprobe, {jobs} jobs from {os.path.basename(a['path'])} to {os.path.basename(b['path'])}: "
        f"Python blocks {b['blocks'] - a['blocks']:+d}, SQLite heap "
        f"{(b['sqlite'] - a['sqlite']) / 1024:+.1f} kB (page caches "
        f"{(b['pagecache'] - a['pagecache']) / 1024:+.1f} kB), malloc in use "
        f"{(b['malloc']['uordblks'] - a['malloc']['uordblks']) / 1024:+.1f} kB, arena "
        f"{(b['malloc']['arena'] - a['malloc']['arena']) / 1024:+.1f} kB"
    )
    print("  gc objects that grew most, by type: " + (", ".join(
        f"{k} {d:+d}" for d, k in grown[:top] if d > 0
    ) or "none"))
    if b["traced"] is None:
        return
    import tracemalloc

    def load(base: str) -> tracemalloc.Snapshot:
        with open(base + ".pickle", "rb") as f:
            snap: tracemalloc.Snapshot = pickle.load(f)
        return snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])

    sa, sb = load(a["path"]), load(b["path"])
    total = sum(s.size_diff for s in sb.compare_to(sa, "filename"))
    print(f"  tracemalloc: traced memory grew {total / 1024:.1f} kB ({total / jobs:.0f} B a job)")
    for s in sb.compare_to(sa, "traceback")[:top]:
        if s.size_diff <= 0:
            continue
        print(f"  {s.size_diff / 1024:+9.1f} kB {s.count_diff:+7d} blocks")
        for line in s.traceback.format(limit=6, most_recent_first=True)[:12]:
            print("      " + line.strip())


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    tmp = tempfile.mkdtemp(prefix="txvmbot-soak-")
    rows: list[dict[str, Any]] = []
    out: dict[str, Any] = {"rows": rows}
    proc = None
    probe_out = None
    saved = {k: os.environ.get(k) for k in (
        "PYTHONPATH", "TXVMBOT_SOAK_PROBE", "TXVMBOT_SOAK_FRAMES", "TXVMBOT_SOAK_OUT")}
    try:
        with moto_server() as moto:
            image = pick_image(moto)
            if args.probe:
                extra, probe_out = probe_env(tmp, args.trace)
                os.environ.update(extra)  # bench_env() copies os.environ
            try:
                web_port = free_port()
                proc, d, started = start_daemon(tmp, args.workers, web_port)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            print(
                f"load average {os.getloadavg()[0]:.2f}; moto {moto.url} (pid {moto.pid}); "
                f"daemon pid {d.pid}, --workers {args.workers}, listening {started:.1f}s after "
                f"start; data {d.data_dir}; {os.cpu_count()} CPUs shared"
                + ("; TRACING (figures not comparable)" if args.trace else "")
                + ("; probed" if args.probe else ""),
                flush=True,
            )
            rt = ReactorThread()
            rt.start()
            try:
                run(rt, args, moto, image, proc, d, web_port, out, probe_out)
            finally:
                rt.stop()
                D.stop(proc, timeout=120)
                out["exit"] = proc.returncode
    finally:
        if proc is not None and proc.poll() is None:
            D.stop(proc)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, argv, out)


def run(
    rt: ReactorThread, args: argparse.Namespace, moto: Any, image: str, proc: Any,
    d: D.Daemon, web_port: int, out: dict[str, Any], probe_out: str | None,
) -> None:
    from twisted.internet.defer import ensureDeferred

    from txvmbot.daemon import codec

    spec = spec_dict(moto.url, image, BACKEND)
    spec["timeouts"] = {"poll_interval": args.poll, "poll_max_interval": max(args.poll, 0.5)}
    codec.spec_from_dict(spec)  # the daemon's own check
    rows: list[dict[str, Any]] = out["rows"]
    read_pages(web_port)
    rt.call(lambda: ensureDeferred(reports(rt.reactor, d.connect)), timeout=120)
    time.sleep(args.settle)
    first = measure(d.pid)
    rows.append({"wave": 0, "done": 0, "wall": 0.0, "finals": {}, "cpu": 0.0, **first})
    snaps: list[tuple[int, dict[str, Any]]] = []
    if probe_out is not None:
        snaps.append((0, probe(d.pid, probe_out, 1)))
        print(probe_line(snaps[-1][1]), flush=True)
    print(table(["wave", "jobs", "RSS MB", "fds"], [[0, 0, first["rss"], first["fds"]]]), flush=True)
    done = 0
    n_wave = 0
    t_all = time.perf_counter()
    while done < args.jobs:
        n = min(args.wave, args.jobs - done)
        n_wave += 1
        c0 = proc_cpu(d.pid)
        t0 = time.perf_counter()
        finals: dict[str, int] = {}
        left: list[str] = []
        for start in range(0, n, args.chunk):
            k = min(args.chunk, n - start)
            got = rt.call(
                lambda k=k: ensureDeferred(wave(rt.reactor, d.connect, spec, k, args.inflight)),
                timeout=args.wave_timeout,
            )
            for state, count in got.items():
                finals[state] = finals.get(state, 0) + count
            if proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {proc.returncode}; log: {d.log_path}")
            left += checkrun.leftovers(moto.url)
            moto.reset()
        wall = time.perf_counter() - t0
        cpu = proc_cpu(d.pid) - c0
        done += n
        pages = read_pages(web_port)
        rt.call(lambda: ensureDeferred(reports(rt.reactor, d.connect)), timeout=120)
        time.sleep(args.settle)
        m = measure(d.pid)
        row = {"wave": n_wave, "done": done, "wall": wall, "finals": finals, "cpu": cpu,
               "left": len(left), **m}
        rows.append(row)
        print(
            f"wave {n_wave}: {done} jobs, {n / wall:.1f} jobs/s, {finals}, moto leftovers "
            f"{len(left)}; pages {pages}; daemon RSS {m['rss']:.1f} MB, fds {m['fds']}; {m['workers']} "
            f"workers RSS {m['workers_rss']:.0f} MB, most fds {m['worker_fds']}",
            flush=True,
        )
        if probe_out is not None:
            snaps.append((done, probe(d.pid, probe_out, len(snaps) + 1)))
            print(probe_line(snaps[-1][1]), flush=True)
    out["wall"] = time.perf_counter() - t_all
    if len(snaps) >= 2:
        snap_a = next(((j, p) for j, p in snaps if j >= args.skip), snaps[0])
        snap_b = snaps[-1]
        if snap_b[0] > snap_a[0]:
            probe_report(snap_a[1], snap_b[1], snap_b[0] - snap_a[0])


def report(args: argparse.Namespace, argv: list[str], out: dict[str, Any]) -> int:
    rows = out["rows"]
    print()
    print(table(
        ["wave", "jobs", "s", "jobs/s", "passed", "other", "daemon CPU ms/job", "RSS MB",
         "anon MB", "file MB", "PSS MB", "HWM MB", "fds", "workers", "workers RSS MB", "worker fds max"],
        [[r["wave"], r["done"], r["wall"], r["done"] and (r["done"] - p["done"]) / r["wall"],
          r["finals"].get("passed", 0), sum(v for k, v in r["finals"].items() if k != "passed"),
          r["done"] and r["cpu"] / (r["done"] - p["done"]) * 1000,
          r["rss"], r["anon"], r["file"], r["pss"], r["hwm"], r["fds"], r["workers"], r["workers_rss"], r["worker_fds"]]
         for p, r in zip([rows[0], *rows], rows, strict=False)],
    ))
    ok = True
    bad = [r for r in rows[1:] if r["finals"].get("passed", 0) != r["done"] - rows[r["wave"] - 1]["done"]]
    left = sum(r.get("left", 0) for r in rows)
    if bad or left:
        ok = False
        print(f"CHECKS FAILED: {len(bad)} waves with jobs that did not pass; moto leftovers {left}")
    tail = [r for r in rows if r["done"] >= args.skip]
    xs = [r["done"] / 1000 for r in tail]
    s = slope(xs, [r["rss"] for r in tail])
    s_all = slope([r["done"] / 1000 for r in rows[1:]], [r["rss"] for r in rows[1:]])
    fds_flat = bool(tail) and all(abs(r["fds"] - tail[0]["fds"]) <= FDS_SLACK for r in tail)
    wfds_flat = bool(tail) and all(abs(r["worker_fds"] - tail[0]["worker_fds"]) <= FDS_SLACK for r in tail)
    total = rows[-1]["done"]
    print(
        f"\n{total} jobs in {out.get('wall', float('nan')):.0f}s; daemon RSS "
        f"{rows[0]['rss']:.1f} MB at start, {rows[-1]['rss']:.1f} MB at the end; slope from "
        f"{args.skip} jobs ({len(tail)} waves): {s:+.3f} MB per 1,000 jobs (over all waves "
        f"but the start: {s_all:+.3f}); daemon fds {[r['fds'] for r in rows]}; daemon exit "
        f"{out.get('exit')}"
    )
    met = s <= TARGET_SLOPE and fds_flat and wfds_flat
    print(
        f"RESULT: daemon RSS slope {s:+.3f} MB per 1,000 jobs after {args.skip} jobs, {total} "
        f"jobs in all (target <= {TARGET_SLOPE}: {'MET' if s <= TARGET_SLOPE else 'MISSED'}); "
        f"fds flat: daemon {'yes' if fds_flat else 'NO'}, workers {'yes' if wfds_flat else 'NO'} "
        f"-> {'MET' if met else 'MISSED'}" + ("" if ok else "; CHECKS FAILED (see above)")
    )
    print(reproduce_line(argv))
    return 0 if ok and met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
