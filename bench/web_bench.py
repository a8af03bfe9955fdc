#!/usr/bin/env python
"""Benchmark: the daemon's web status page under load.

One run against one real daemon (``twistd -n txvmbot``, its web page on
tcp:PORT:interface=127.0.0.1 with web_insecure_loopback) and moto, both
started here on loopback and stopped by their pid:

  set-up        --running jobs (default 50) on backend bench-C stay running:
                ssh to the closed loopback port 127.0.0.1:9 with
                --timeout-ssh 600, so each hangs in wait-ssh holding a
                worker (as bench/daemon_bench.py's RSS phase). Then
                --finished jobs (default 10,000) fill the store: submitted
                (pipelined) to the drained backend bench-A and cancelled
                while queued, so they end ``cancelled``. The overview shows
                state, backend, times and reason of a job, never its result,
                so a cancelled job costs it what a passed one would.
  page latency  with those 50 running and 10,000 finished and no page
                open: --requests sequential GETs each of ``/`` (the
                overview), ``/metrics`` and, for context, ``/?fragment=1``
                (what a live page fetches on each change), over one
                keep-alive http.client connection in this process; p50, p99,
                max of send -> whole body read.
  submit rate   pipelined submits as daemon_bench does (--connections AMP
                connections, --window in flight on each) of --submits jobs
                to the drained bench-A, under three conditions, each
                --runs times, in rotating order (drift cancels out), every
                phase's jobs cancelled (untimed) after it so each starts
                with an empty queue:
                  none     no page open
                  streams  --pages open ``/events`` streams, each read by a
                           raw socket in a separate page-client process
                           (the brief's "20 live pages")
                  live     the same streams, and each page, like app.js,
                           fetches ``/?fragment=1`` 150 ms after a change
                           message (one fetch at a time per page): what 20
                           browsers showing the overview really cost
                Rate = jobs answered / wall time from first send to last
                answer; a condition's rate is the median of its runs.

The page clients run in a child process so that their reading does not
compete with the AMP client for this process's GIL; the machine's cores are
still shared by moto, the daemon, its workers, this client and the page
client, and each side's CPU seconds are printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_OVERVIEW_P99_MS = 50.0
TARGET_METRICS_P99_MS = 20.0
TARGET_RATIO = 0.9  # submit rate with the pages open / with none

BACKEND_A = "bench-A"  # drained: submitted jobs stay queued
BACKEND_C = "bench-C"  # the jobs kept running
CONDITIONS = ("none", "streams", "live")
CHANGED = b"data: changed"
REFRESH_DELAY = 0.15  # app.js: setTimeout(refresh, 150) after a message


def parse_args(argv: list[str]) -> argparse.Namespace:
    from bench._common import bench_parser

    p = bench_parser(__doc__, unit="submit phase per condition", timeout=120.0)
    p.add_argument("--running", type=int, default=50, help="jobs kept running (default: 50)")
    p.add_argument(
        "--finished", type=int, default=10_000, help="finished jobs in the store (default: 10000)"
    )
    p.add_argument(
        "--requests", type=int, default=300, help="sequential GETs of each page (default: 300)"
    )
    p.add_argument(
        "--submits", type=int, default=5000, help="jobs submitted in each phase (default: 5000)"
    )
    p.add_argument("--pages", type=int, default=20, help="live pages open (default: 20)")
    p.add_argument("--connections", type=int, default=4, help="AMP connections (default: 4)")
    p.add_argument(
        "--window", type=int, default=64, help="submits in flight per connection (default: 64)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir (daemon log, jobs.sqlite)"
    )
    p.add_argument(
        "--profile",
        metavar="PATH",
        help="run the daemon under twistd's cProfile, its pstats saved to PATH (slows it down)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 20 or not 0 <= args.warmup <= 20:
        p.error("--runs must be 1..20 and --warmup 0..20")
    if not 1 <= args.running <= 200 or not 0 <= args.finished <= 100_000:
        p.error("--running must be 1..200 and --finished 0..100000")
    if not 10 <= args.requests <= 10_000 or not 100 <= args.submits <= 50_000:
        p.error("--requests must be 10..10000 and --submits 100..50000")
    if not 1 <= args.pages <= 100:
        p.error("--pages must be 1..100 (the daemon allows 200 streams)")
    if not 1 <= args.connections <= 32 or not 1 <= args.window <= 1000:
        p.error("--connections must be 1..32 and --window 1..1000")
    return args


# --- the page client (a child process) ---------------------------------------------


def page_client(port: int, pages: int, mode: str, bound: float) -> int:
    """Open ``pages`` event streams to 127.0.0.1:``port``; print "ready";
    read them until a line arrives on stdin (or ``bound`` s pass); print
    what was read as one JSON line. In ``live`` mode each page also fetches
    ``/?fragment=1`` 150 ms after a change message, as app.js does."""
    t_end = time.monotonic() + bound
    host = f"127.0.0.1:{port}"
    socks: list[socket.socket] = []
    for _ in range(pages):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(
            f"GET /events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n".encode()
        )
        socks.append(s)
    for s in socks:  # the status line and headers, then the first "retry:"
        head = b""
        while b"retry:" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit(f"an event stream closed before it began: {head!r}")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"GET /events answered {head[:200]!r}")
        s.setblocking(False)
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(pages)]
    messages = [0] * pages
    tails = [b""] * pages
    due: list[float | None] = [None] * pages
    fetch_ms: list[float] = []
    nbytes = errors = 0
    print("ready", flush=True)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    stdin = sys.stdin.fileno()
    while time.monotonic() < t_end:
        now = time.monotonic()
        waits = [d - now for d in due if d is not None]
        timeout = max(0.0, min(waits)) if waits else 0.5
        readable, _, _ = select.select([stdin, *index], [], [], min(timeout, 0.5))
        if stdin in readable:
            break
        for fd in readable:
            i = index[fd]
            try:
                data = socks[i].recv(65536)
            except BlockingIOError:
                continue
            if not data:
                errors += 1
                del index[fd]
                continue
            nbytes += len(data)
            buf = tails[i] + data
            k = buf.count(CHANGED)
            if k:
                messages[i] += k
                buf = buf[buf.rfind(CHANGED) + len(CHANGED) :]
                if mode == "live" and due[i] is None:
                    due[i] = time.monotonic() + REFRESH_DELAY
            tails[i] = buf[-len(CHANGED) :]
        now = time.monotonic()
        for i, d in enumerate(due):
            if d is not None and d <= now:
                due[i] = None
                t = time.perf_counter()
                try:
                    conns[i].request("GET", "/?fragment=1", headers={"Host": host})
                    r = conns[i].getresponse()
                    r.read()
                    if r.status != 200:
                        errors += 1
                except (OSError, http.client.HTTPException):
                    errors += 1
                    conns[i].close()
                fetch_ms.append((time.perf_counter() - t) * 1000)
    for s in socks:
        s.close()
    for c in conns:
        c.close()
    print(
        json.dumps(
            {
                "messages": sum(messages), "min_messages": min(messages), "bytes": nbytes,
                "fetch_ms": fetch_ms, "errors": errors, "open": len(index),
                "cpu": time.process_time(),
            }
        ),
        flush=True,
    )
    return 0


class Pages:
    """A page-client child process, started by this script and stopped by
    its pid."""

    def __init__(self, port: int, pages: int, mode: str, bound: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--page-client", str(port), str(pages),
             mode, str(bound)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.stats: dict[str, Any] = {}
        line = self._line(30)
        if line != "ready":
            self.close()
            raise RuntimeError(f"the page client did not get ready: {line!r}")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return ""
        return self.proc.stdout.readline().decode().strip()

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        line = self._line(30)
        self.close()
        self.stats = json.loads(line) if line.startswith("{") else {"errors": -1}
        return self.stats

    def close(self) -> None:
        from tests.support.servers import stop

        stop(self.proc, timeout=10)


# --- the daemon ---------------------------------------------------------------------


def start_daemon(
    tmp: str, workers: int, web_port: int, profile: str | None = None
) -> tuple[subprocess.Popen[bytes], Any, float]:
    """``twistd -n txvmbot`` with its own data dir, every worker allowed on
    one backend, and the web page on 127.0.0.1:``web_port`` (with
    ``profile``, under cProfile, pstats saved there); (process, daemon,
    seconds until the web page answered)."""
    from bench._common import bench_env
    from tests.support import real_daemon as D

    data = os.path.join(tmp, "data")
    os.makedirs(data)
    config = os.path.join(tmp, "daemon.toml")
    with open(config, "w") as f:
        f.write(
            f"[daemon]\ndefault_cap = {workers}\n"
            f'web = ["tcp:{web_port}:interface=127.0.0.1"]\nweb_insecure_loopback = true\n'
        )
    log_path = os.path.join(tmp, "twistd.log")
    env = bench_env()
    prof = ["--profile", os.path.abspath(profile), "--savestats"] if profile else []
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [D.TWISTD, "-n", "--pidfile=", "--logfile=-", *prof, "txvmbot", "--config", config,
             "--data-dir", data, "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data,
        )
    d = D.Daemon(pid=proc.pid, data_dir=data, log_path=log_path, env=env)
    try:
        D.wait_for_socket(d.socket, proc, log_path, timeout=60 + 3 * workers)
        from tests.support.servers import wait_for_port

        wait_for_port(web_port, proc, timeout=30)
    except BaseException:
        D.stop(proc)
        raise
    return proc, d, time.perf_counter() - t0


# --- measuring ------------------------------------------------------------------------


def get_latency(port: int, path: str, n: int, warmup: int) -> dict[str, Any]:
    """``n`` sequential GETs of ``path`` over one keep-alive connection,
    after ``warmup`` untimed ones: times in ms, status and body size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    ms: list[float] = []
    status = size = 0
    try:
        for i in range(warmup + n):
            t = time.perf_counter()
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            dt = (time.perf_counter() - t) * 1000
            status, size = r.status, len(body)
            if status != 200:
                break
            if i >= warmup:
                ms.append(dt)
    finally:
        conn.close()
    return {"ms": ms, "status": status, "bytes": size}


async def cancel_windowed(clients: list[Any], ids: list[str], window: int) -> int:
    """Cancel ``ids`` with ``window`` cancels in flight on each client; how
    many ended cancelled."""
    from twisted.internet.defer import ensureDeferred, gatherResults

    todo = iter(ids)
    cancelled = [0]

    async def lane(client: Any) -> None:
        for job_id in todo:
            job = await client.cancel(job_id)
            cancelled[0] += job.state == "cancelled"

    await gatherResults(
        [ensureDeferred(lane(c)) for c in clients for _ in range(window)], consumeErrors=True
    )
    return cancelled[0]


def git_head() -> str:
    """The commit the daemon's code is at, and whether the work tree
    differs from it under txvmbot/ (the daemon runs the work tree)."""
    from bench._common import ROOT

    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "log", "--format=%h %s", "-1"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", ROOT, "status", "--porcelain", "--", "txvmbot"],
            capture_output=True, text=True, timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "?"
    if dirty:
        head += f" + uncommitted changes to {len(dirty)} files under txvmbot/"
    return head


# --- main -------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    if len(argv) > 1 and argv[1] == "--page-client":
        port, pages, mode, bound = argv[2:6]
        return page_client(int(port), int(pages), mode, float(bound))
    args = parse_args(argv[1:])
    from bench._common import ReactorThread, pick_image, set_test_credentials
    from tests.support import checkrun
    from tests.support import real_daemon as D
    from tests.support.servers import free_port, moto_server

    set_test_credentials()
    tmp = tempfile.mkdtemp(prefix="txvmbot-web-bench-")
    key, _ = checkrun.ssh_keypair(tmp)
    out: dict[str, Any] = {"head": git_head()}
    proc = None
    t_start = time.perf_counter()
    try:
        with moto_server() as moto:
            image = pick_image(moto)
            web_port = free_port()
            proc, d, started = start_daemon(tmp, args.running, web_port, args.profile)
            print(
                f"load average {os.getloadavg()[0]:.2f}; moto {moto.url} (pid {moto.pid}); daemon "
                f"pid {d.pid}, --workers {args.running}, web page http://127.0.0.1:{web_port}/ "
                f"answering {started:.1f}s after start; {os.cpu_count()} CPUs shared by moto, the "
                f"daemon, its workers, this client and the page client; code at {out['head']}",
                flush=True,
            )
            rt = ReactorThread()
            rt.start()
            try:
                run(rt, args, moto, image, key, proc, d, web_port, out)
            finally:
                rt.stop()
                t = time.perf_counter()
                D.stop(proc, timeout=120)
                out["stop_s"] = time.perf_counter() - t
                out["exit"] = proc.returncode
            out["leftovers"] = checkrun.leftovers(moto.url)
    finally:
        if proc is not None and proc.poll() is None:
            D.stop(proc)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["total_s"] = time.perf_counter() - t_start
    return report(args, argv, out)


def run(
    rt: Any, args: argparse.Namespace, moto: Any, image: str, key: str,
    proc: subprocess.Popen[bytes], d: Any, web_port: int, out: dict[str, Any],
) -> None:
    from twisted.internet.defer import ensureDeferred

    from bench._common import proc_cpu, self_cpu
    from bench.daemon_bench import (
        WATCHES_PER_CONNECTION,
        _close,
        connect_all,
        hold_running,
        pipelined,
        spec_dict,
        stored_counts,
    )

    reactor = rt.reactor

    def call(coro: Any, timeout: float) -> Any:
        return rt.call(lambda: ensureDeferred(coro), timeout=timeout)

    def alive() -> None:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}; log: {d.log_path}")

    n_watch = -(-args.running // WATCHES_PER_CONNECTION)
    clients = call(connect_all(reactor, d.connect, args.connections + n_watch), 60)
    submitters, watchers = clients[: args.connections], clients[args.connections :]
    spec_a = spec_dict(moto.url, image, BACKEND_A)
    spec_c = spec_dict(moto.url, image, BACKEND_C, key=key)
    rt.call(submitters[0].drain, BACKEND_A)

    # --- set-up: jobs running, jobs finished ------------------------------------------
    held, _events, took = call(hold_running(reactor, watchers, spec_c, args.running, 300), 400)
    out["held"] = {"n": len(held), "took": took}
    print(f"  {len(held)} jobs in wait-ssh after {took:.1f}s", flush=True)
    alive()
    t = time.perf_counter()
    if args.finished:
        _wall, _rtts, jobs, _done = call(
            pipelined(submitters, spec_a, args.finished, args.window), 600
        )
        n = call(cancel_windowed(submitters, [j.id for j in jobs], args.window), 600)
        out["filled"] = n
    counts = stored_counts(os.path.join(d.data_dir, "jobs.sqlite"))
    out["stored"] = counts
    print(
        f"  store filled in {time.perf_counter() - t:.1f}s: "
        + ", ".join(f"{b} {s} {n}" for (b, s), n in sorted(counts.items())),
        flush=True,
    )
    status = rt.call(submitters[0].status)
    out["status_at_get"] = {"running": status.running, "queued": status.queue_depth}
    alive()

    # --- page latency ---------------------------------------------------------------------
    out["get"] = {}
    for path in ("/", "/metrics", "/?fragment=1"):
        c0 = proc_cpu(d.pid)
        r = get_latency(web_port, path, args.requests, warmup=10)
        r["daemon_cpu_ms"] = (proc_cpu(d.pid) - c0) * 1000 / (args.requests + 10)
        out["get"][path] = r
        print(f"  GET {path}: status {r['status']}, {len(r['ms'])} timed", flush=True)
    alive()

    # --- submit rate with and without pages -------------------------------------------------
    order = ["none"] * args.warmup + [
        CONDITIONS[(i + r) % len(CONDITIONS)] for r in range(args.runs) for i in range(len(CONDITIONS))
    ]
    out["phases"] = []
    for n_phase, cond in enumerate(order):
        pages = None
        if cond != "none":
            pages = Pages(web_port, args.pages, cond, bound=args.timeout + 60)
        try:
            c0, o0 = proc_cpu(d.pid), self_cpu()
            wall, rtts, jobs, _done = call(
                pipelined(submitters, spec_a, args.submits, args.window), args.timeout
            )
            daemon_cpu, client_cpu = proc_cpu(d.pid) - c0, self_cpu() - o0
        finally:
            stats = pages.stop() if pages is not None else {}
        phase = {
            "cond": cond, "warmup": n_phase < args.warmup, "n": len(jobs), "wall": wall,
            "daemon_cpu": daemon_cpu, "client_cpu": client_cpu, "pages": stats,
            "queued": sum(1 for j in jobs if j.state == "queued"),
        }
        out["phases"].append(phase)
        print(
            f"  phase {n_phase + 1}/{len(order)} {cond}{' (warm-up)' if phase['warmup'] else ''}: "
            f"{len(jobs)} submits in {wall:.2f}s = {len(jobs) / wall:.0f}/s",
            flush=True,
        )
        call(cancel_windowed(submitters, [j.id for j in jobs], args.window), 600)
        alive()
    out["status_end"] = rt.call(submitters[0].status)
    t = time.perf_counter()
    finals = call(cancel_windowed(watchers, held, WATCHES_PER_CONNECTION), 600)
    out["held"]["cancel_wall"] = time.perf_counter() - t
    out["held"]["cancelled"] = finals
    for c in clients:
        call(_close(c), 30)


# --- the report ----------------------------------------------------------------------------


def report(args: argparse.Namespace, argv: list[str], out: dict[str, Any]) -> int:
    from bench._common import median, reproduce_line, table
    from bench.daemon_bench import pct

    print()
    ok = True
    held = out.get("held", {})
    if held.get("n") != args.running:
        ok = False
    finished = sum(n for (_b, s), n in out.get("stored", {}).items() if s not in ("queued", "running", "cleaning"))
    st = out.get("status_at_get", {})
    print(
        f"store while measuring pages: {finished} finished jobs, daemon status: running "
        f"{st.get('running')}, queued {st.get('queued')}"
    )
    if finished < args.finished or st.get("running", 0) < args.running:
        ok = False
    p99 = {"/": float("nan"), "/metrics": float("nan")}
    rows = []
    for path, r in out.get("get", {}).items():
        ms = r["ms"]
        rows.append(
            [f"GET {path}", r["status"], len(ms), r["bytes"], pct(ms, 50), pct(ms, 90), pct(ms, 99),
             max(ms, default=float("nan")), r["daemon_cpu_ms"]]
        )
        if path in p99 and r["status"] == 200:
            p99[path] = pct(ms, 99)
    if rows:
        print(
            f"page latency, sequential GETs over one keep-alive connection, no page open, "
            f"{args.running} running + {finished} finished (ms):"
        )
        print(table(["request", "status", "n", "bytes", "p50", "p90", "p99", "max", "daemon CPU/req"], rows))
    metrics_served = out.get("get", {}).get("/metrics", {}).get("status") == 200

    print()
    rates: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    cpu_ms: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    rows = []
    for i, ph in enumerate(out.get("phases", [])):
        rate = ph["n"] / ph["wall"]
        if not ph["warmup"]:
            rates[ph["cond"]].append(rate)
            cpu_ms[ph["cond"]].append(ph["daemon_cpu"] * 1000 / ph["n"])
        s = ph["pages"]
        fetch = s.get("fetch_ms", [])
        rows.append(
            [f"{i + 1} {ph['cond']}{' (warm-up)' if ph['warmup'] else ''}", ph["n"], ph["wall"], rate,
             ph["daemon_cpu"] / ph["wall"], ph["daemon_cpu"] * 1000 / ph["n"], ph["client_cpu"] / ph["wall"],
             s.get("messages", "-"), s.get("min_messages", "-"), len(fetch) if s else "-",
             pct(fetch, 50), pct(fetch, 99), s.get("cpu", float("nan")), s.get("errors", "-")]
        )
        if ph["queued"] != ph["n"] or ph["n"] != args.submits or s.get("errors", 0) != 0:
            ok = False
        if ph["cond"] != "none" and s.get("min_messages", 0) < 1:
            ok = False  # a stream that saw no change message did not measure anything
    if rows:
        print(
            f"submit rate, {args.connections} AMP connections x {args.window} in flight, "
            f"{args.submits} jobs a phase to drained {BACKEND_A} (cancelled after each phase), "
            f"{args.running} jobs running throughout; pages: {args.pages} /events streams in a "
            f"child process (live: + GET /?fragment=1 {REFRESH_DELAY * 1000:.0f} ms after each "
            "change message, as app.js)"
        )
        print(
            table(
                ["phase", "jobs", "wall s", "submits/s", "daemon cores", "daemon ms/submit",
                 "client cores", "SSE msgs",
                 "min/page", "fetches", "fetch p50", "fetch p99", "page CPU s", "errors"],
                rows,
            )
        )
    med = {c: median(rates[c]) for c in CONDITIONS}
    ratio_streams = med["streams"] / med["none"] if med["none"] else float("nan")
    ratio_live = med["live"] / med["none"] if med["none"] else float("nan")
    print(
        "median submits/s: "
        + ", ".join(f"{c} {med[c]:.0f} (runs: {', '.join(f'{x:.0f}' for x in rates[c])})" for c in CONDITIONS)
    )
    cpu = {c: median(cpu_ms[c]) for c in CONDITIONS}
    print(
        "median daemon CPU per submit (pages' cost included; steadier than the rate when other "
        "processes take the cores): "
        + ", ".join(f"{c} {cpu[c]:.3f} ms" for c in CONDITIONS)
        + f"; as a rate ratio if the daemon had a core to itself: streams "
        f"{cpu['none'] / cpu['streams']:.2f}x, live {cpu['none'] / cpu['live']:.2f}x"
    )
    print()
    print(
        f"held jobs cancelled at the end: {held.get('cancelled')}/{held.get('n')} in "
        f"{held.get('cancel_wall', float('nan')):.1f}s; daemon stopped by pid in "
        f"{out.get('stop_s', float('nan')):.1f}s, exit {out.get('exit')}; moto leftovers: "
        f"{out.get('leftovers')}; whole run {out.get('total_s', float('nan')):.0f}s"
    )
    if out.get("leftovers"):
        ok = False

    def verdict(good: bool) -> str:
        return "MET" if good else "MISSED"

    metrics = (
        f"/metrics p99 {p99['/metrics']:.2f} ms (target <= {TARGET_METRICS_P99_MS:.0f}: "
        f"{verdict(p99['/metrics'] <= TARGET_METRICS_P99_MS)})"
        if metrics_served
        else f"/metrics NOT SERVED by this daemon (status {out.get('get', {}).get('/metrics', {}).get('status')}; "
        f"code at {out.get('head')}): not measured"
    )
    print()
    print(
        f"RESULT: overview p99 {p99['/']:.2f} ms with {args.running} running + {finished} finished "
        f"(target <= {TARGET_OVERVIEW_P99_MS:.0f}: {verdict(p99['/'] <= TARGET_OVERVIEW_P99_MS)}); "
        + metrics
    )
    print(
        f"RESULT: submit rate with {args.pages} open /events streams {ratio_streams:.2f}x of none "
        f"({med['streams']:.0f} vs {med['none']:.0f}/s; target >= {TARGET_RATIO}: "
        f"{verdict(ratio_streams >= TARGET_RATIO)}); with {args.pages} live pages refetching as "
        f"app.js does {ratio_live:.2f}x ({med['live']:.0f}/s; target >= {TARGET_RATIO}: "
        f"{verdict(ratio_live >= TARGET_RATIO)})"
        + ("" if ok else "; CHECKS FAILED (see above)")
    )
    print(reproduce_line(argv))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
