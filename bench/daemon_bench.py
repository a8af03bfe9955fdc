#!/usr/bin/env python
"""Benchmark: the real daemon (``twistd -n txvmbot``) under a deep queue.

One run, three measurements against one daemon with --workers N (default
50) and moto, both started here on loopback (moto on 127.0.0.1, the daemon
on a unix socket in a temp data dir), both stopped by their pid:

  submit throughput   backend bench-A is drained (nothing of it runs); first
                      --seq-jobs submits one at a time (one round trip each,
                      for context; then cancelled), then --jobs submits over
                      --connections AMP connections with --window submits in
                      flight on each, from txvmbot.daemon.api.client in this
                      process. Rate = jobs answered / wall time from the
                      first send to the last answer. Then checked: every
                      answer is a distinct queued job, the daemon's status
                      says queue depth == --jobs, and jobs.sqlite (opened
                      read-only) holds --jobs queued rows of bench-A.
  dispatch latency    bench-A keeps its --jobs queued. On backend bench-B
                      (same moto, another backend name) quick --no-ssh jobs
                      are submitted one at a time, each only while fewer
                      than --inflight B jobs are unfinished, so a worker is
                      idle at every submit. Each job is watched; from its
                      events:
                        daemon  queued->running  `at` of the job's 'running'
                                state event minus `at` of its 'queued' state
                                event (both the daemon's clock): the job
                                state change the target is about
                        worker  queued->first step  `at` of the job's first
                                step event ('keypair' running, stamped by the
                                worker process) minus the 'queued' `at`: when
                                a worker really began the job
                        client  submit sent->'running' seen  this process's
                                clock, from sending Submit to the 'running'
                                event arriving over the Watch started when
                                Submit answered (two round trips included)
  RSS                 on backend bench-C, N jobs that stay running: ssh to
                      the closed loopback port 127.0.0.1:9 with
                      --timeout-ssh 600, so each hangs in wait-ssh holding
                      a worker. With --jobs queued and N at wait-ssh, the
                      daemon's VmRSS (/proc/PID/status; the daemon process
                      alone) is sampled; the workers' RSS and PSS summed for
                      context. Then the N are cancelled (they clean up), the
                      daemon is stopped by its pid, and moto is asked for
                      anything txvmbot left behind.

The machine's cores are shared by moto, the daemon, its workers and this
client; the daemon's and the client's CPU seconds per phase are printed so
a saturated side shows.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    REGION,
    ReactorThread,
    bench_env,
    median,
    pick_image,
    proc_cpu,
    reproduce_line,
    self_cpu,
    set_test_credentials,
    table,
)
from tests.support import checkrun  # noqa: E402
from tests.support import real_daemon as D  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402

TARGET_RATE = 2000.0  # submits/s, accepted and stored
TARGET_P99_MS = 20.0  # queued -> running on an idle worker, 10,000 queued
TARGET_RSS_MB = 200.0  # daemon RSS with 10,000 queued and 50 running

BACKEND_A = "bench-A"
BACKEND_B = "bench-B"
BACKEND_C = "bench-C"
CLOSED = "tcp:host=127.0.0.1:port=9"  # discard port: nothing listens, refused at once
WATCHES_PER_CONNECTION = 90  # the daemon allows 100


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=10_000, help="jobs kept queued (default: 10000)")
    p.add_argument(
        "--seq-jobs", type=int, default=500, help="one-at-a-time submits for context (default: 500)"
    )
    p.add_argument("--connections", type=int, default=4, help="AMP connections (default: 4)")
    p.add_argument(
        "--window", type=int, default=64, help="submits in flight per connection (default: 64)"
    )
    p.add_argument(
        "--samples", type=int, default=250, help="dispatch latency samples (default: 250)"
    )
    p.add_argument(
        "--inflight",
        type=int,
        default=8,
        help="most unfinished bench-B jobs while sampling; below --workers (default: 8)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=50,
        help="daemon workers, and jobs kept running for the RSS figure (default: 50)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir (daemon log, jobs.sqlite)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 100_000 or not 0 <= args.seq_jobs <= 10_000:
        p.error("--jobs must be 1..100000 and --seq-jobs 0..10000")
    if not 1 <= args.connections <= 32 or not 1 <= args.window <= 1000:
        p.error("--connections must be 1..32 and --window 1..1000")
    if not 1 <= args.samples <= 5000:
        p.error("--samples must be 1..5000")
    if not 2 <= args.workers <= 256:
        p.error("--workers must be 2..256")
    if not 1 <= args.inflight < args.workers:
        p.error("--inflight must be at least 1 and below --workers")
    return args


# --- measuring --------------------------------------------------------------------


def proc_status_kb(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size (shared pages split among their users), 0 if
    unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(daemon_pid: int) -> dict[str, float]:
    """The daemon's VmRSS and VmHWM, its workers' summed RSS and PSS, MB."""
    workers = D.worker_pids(daemon_pid)
    return {
        "rss": proc_status_kb(daemon_pid, "VmRSS") / 1024,
        "hwm": proc_status_kb(daemon_pid, "VmHWM") / 1024,
        "pss": pss_kb(daemon_pid) / 1024,
        "workers": len(workers),
        "workers_rss": sum(proc_status_kb(w, "VmRSS") for w in workers) / 1024,
        "workers_pss": sum(pss_kb(w) for w in workers) / 1024,
    }


def system_busy() -> float:
    """CPU seconds all cores spent busy so far (/proc/stat: everything but
    idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def stored_counts(path: str) -> dict[tuple[str, str], int]:
    """(backend, state) -> jobs in the daemon's jobs.sqlite, read-only (the
    daemon stays its only writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT backend, state, COUNT(*) FROM jobs GROUP BY backend, state")
        return {(b, s): int(n) for b, s, n in rows.fetchall()}
    finally:
        conn.close()


def cold_jobs(log: str) -> set[str]:
    """Jobs that were the first of their worker process, from the pool's
    "Job J (check C) runs on worker W (pid P)" log lines."""
    seen: set[str] = set()
    cold: set[str] = set()
    for m in re.finditer(r"Job (\S+) \(check \S+\) runs on worker \S+ \(pid (\d+)\)", log):
        if m.group(2) not in seen:
            seen.add(m.group(2))
            cold.add(m.group(1))
    return cold


# --- the daemon ---------------------------------------------------------------------


def start_daemon(tmp: str, workers: int) -> tuple[subprocess.Popen[bytes], D.Daemon, float]:
    """``twistd -n txvmbot`` with its own data dir and a config whose
    default cap lets every worker run one backend's jobs; (process, daemon,
    seconds until it listened)."""
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    config = os.path.join(tmp, "daemon.toml")
    with open(config, "w") as f:
        f.write(f"[daemon]\ndefault_cap = {workers}\n")
    log_path = os.path.join(tmp, "twistd.log")
    env = bench_env()
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [D.TWISTD, "-n", "--pidfile=", "--logfile=-", "txvmbot", "--config", config,
             "--data-dir", data, "--workers", str(workers)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data,
        )
    d = D.Daemon(pid=proc.pid, data_dir=data, log_path=log_path, env=env)
    try:
        # Every worker answers its Hello before the daemon listens.
        D.wait_for_socket(d.socket, proc, log_path, timeout=60 + 3 * workers)
    except BaseException:
        D.stop(proc)
        raise
    return proc, d, time.perf_counter() - t0


# --- job specs -----------------------------------------------------------------------


def spec_dict(url: str, image: str, backend: str, *, key: str | None = None) -> dict[str, Any]:
    """A job as `txvmbot submit` sends it: --no-ssh, quick polls; with
    ``key``, ssh to the closed port with a 600 s wait (it hangs)."""
    from txvmbot.daemon import codec
    from txvmbot.daemon.jobs import JobSpec
    from txvmbot.model import CheckSpec, Cloud, Timeouts

    cloud = Cloud(endpoint=url, region=REGION)
    if key is None:
        check = CheckSpec(
            cloud=cloud, image=image, ssh=False,
            timeouts=Timeouts(poll_interval=0.2, poll_max_interval=0.5),
        )
        job = JobSpec(check=check, backend=backend)
    else:
        check = CheckSpec(
            cloud=cloud, image=image, ssh=True, ssh_key=key, ssh_endpoint=CLOSED,
            timeouts=Timeouts(ssh=600.0, poll_interval=0.2, poll_max_interval=0.5),
        )
        job = JobSpec(check=check, backend=backend, bound=900.0, max_attempts=1)
    doc = codec.spec_to_dict(job)
    codec.spec_from_dict(doc)  # the daemon's own check
    return doc


# --- the phases (coroutines on the reactor thread) ---------------------------------------


async def connect_all(reactor: Any, where: str, n: int) -> list[Any]:
    from txvmbot.daemon.api.client import connect

    return [await connect(reactor, where, timeout=30) for _ in range(n)]


async def sequential(client: Any, spec: dict[str, Any], n: int) -> tuple[float, list[float], list[str]]:
    """``n`` submits one after the other: (wall s, round trips s, ids)."""
    rtts: list[float] = []
    ids: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        job = await client.submit(spec)
        rtts.append(time.perf_counter() - t)
        ids.append(job.id)
    return time.perf_counter() - t0, rtts, ids


async def pipelined(
    clients: list[Any], spec: dict[str, Any], n: int, window: int
) -> tuple[float, list[float], list[Any], list[float]]:
    """``n`` submits, ``window`` in flight on each client: (wall s, round
    trips s, jobs answered, perf_counter of each answer)."""
    from twisted.internet.defer import ensureDeferred, gatherResults

    todo = iter(range(n))
    rtts: list[float] = []
    jobs: list[Any] = []
    done: list[float] = []

    async def lane(client: Any) -> None:
        for _ in todo:  # shared by every lane: n submits in all
            t = time.perf_counter()
            job = await client.submit(spec)
            done.append(time.perf_counter())
            rtts.append(done[-1] - t)
            jobs.append(job)

    t0 = time.perf_counter()
    await gatherResults(
        [ensureDeferred(lane(c)) for c in clients for _ in range(window)], consumeErrors=True
    )
    return time.perf_counter() - t0, rtts, jobs, done


async def cancel_all(clients: list[Any], ids: list[str]) -> list[Any]:
    from twisted.internet.defer import gatherResults

    return list(
        await gatherResults(
            [clients[i % len(clients)].cancel(j) for i, j in enumerate(ids)], consumeErrors=True
        )
    )


class Sample:
    """One bench-B job: what this process saw and when."""

    def __init__(self) -> None:
        from twisted.internet.defer import Deferred

        self.sent = 0.0  # time.time() when Submit was sent
        self.answered = 0.0
        self.running_seen: Deferred[float] = Deferred()
        self.events: list[Any] = []
        self.final: Any = None

    def on_event(self, ev: Any) -> None:
        self.events.append(ev)
        if ev.kind == "state" and ev.state == "running" and not self.running_seen.called:
            self.running_seen.callback(time.time())

    def at(self, kind: str, state: str, step: str | None = None) -> float | None:
        for ev in self.events:
            if ev.kind == kind and ev.state == state and (step is None or ev.step == step):
                return float(ev.at)
        return None

    def first_step(self) -> float | None:
        for ev in self.events:
            if ev.kind == "step":
                return float(ev.at)
        return None


async def latency(
    reactor: Any, client: Any, spec: dict[str, Any], samples: int, inflight: int, bound: float
) -> tuple[list[Sample], list[float], float]:
    """Submit ``samples`` bench-B jobs one at a time, each while fewer than
    ``inflight`` are unfinished; watch each to its end. ``client`` may be a
    list of clients (several daemons): job i goes to client i mod n and is
    watched there. (samples, client seconds from send to 'running' seen,
    wall s)."""
    clients = client if isinstance(client, list) else [client]
    from twisted.internet.defer import DeferredSemaphore, gatherResults

    sem = DeferredSemaphore(inflight)
    got: list[Sample] = []
    seen: list[float] = []
    watches = []
    t0 = time.perf_counter()
    deadline = time.monotonic() + bound
    for i in range(samples):
        if time.monotonic() > deadline:
            break
        await sem.acquire().addTimeout(max(1.0, deadline - time.monotonic()), reactor)
        client = clients[i % len(clients)]
        s = Sample()
        s.sent = time.time()
        job = await client.submit(spec)
        s.answered = time.time()
        w = client.watch(job.id, s.on_event)

        def ended(final: Any, s: Sample = s) -> Any:
            s.final = final
            return final

        w.addCallback(ended)
        w.addBoth(lambda r: (sem.release(), r)[1])
        watches.append(w)
        when = await s.running_seen.addTimeout(60, reactor)
        seen.append(when - s.sent)
        got.append(s)
    wall = time.perf_counter() - t0
    d = gatherResults(watches, consumeErrors=True)
    await d.addTimeout(max(60.0, deadline - time.monotonic()), reactor)
    return got, seen, wall


async def hold_running(
    reactor: Any, clients: list[Any], spec: dict[str, Any], n: int, bound: float
) -> tuple[list[str], dict[str, list[Any]], float]:
    """Submit ``n`` hanging jobs and wait (at most ``bound`` s) until each
    is in wait-ssh: (ids, events by id, seconds it took)."""
    from twisted.internet.defer import Deferred, gatherResults

    t0 = time.perf_counter()
    ids: list[str] = []
    events: dict[str, list[Any]] = {}
    ready: list[Deferred[None]] = []
    for i in range(n):
        client = clients[i // WATCHES_PER_CONNECTION]
        job = await client.submit(spec)
        ids.append(job.id)
        evs: list[Any] = []
        events[job.id] = evs
        at_ssh: Deferred[None] = Deferred()
        ready.append(at_ssh)

        def on_event(ev: Any, evs: list[Any] = evs, at_ssh: Deferred[None] = at_ssh) -> None:
            evs.append(ev)
            if at_ssh.called:
                return
            if ev.kind == "step" and ev.step == "wait-ssh" and ev.state == "running":
                at_ssh.callback(None)
            elif ev.kind == "state" and ev.state not in ("queued", "running"):
                at_ssh.errback(RuntimeError(f"job {ev.job_id} went {ev.state}: {ev.detail}"))

        client.watch(job.id, on_event).addErrback(lambda _: None)
    await gatherResults(ready, consumeErrors=True).addTimeout(bound, reactor)
    return ids, events, time.perf_counter() - t0


# --- main ------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    import txvmbot

    tmp = tempfile.mkdtemp(prefix="txvmbot-daemon-bench-")
    key, _ = checkrun.ssh_keypair(tmp)
    out: dict[str, Any] = {}
    proc = None
    try:
        with moto_server() as moto:
            image = pick_image(moto)
            proc, d, started = start_daemon(tmp, args.workers)
            print(
                f"load average {os.getloadavg()[0]:.2f}; moto {moto.url} (pid {moto.pid}); daemon pid {d.pid}, --workers {args.workers}, "
                f"listening {started:.1f}s after start; data {d.data_dir}; {os.cpu_count()} CPUs "
                "shared by moto, the daemon, its workers and this client; txvmbot from "
                f"{os.path.dirname(os.path.dirname(os.path.abspath(txvmbot.__file__)))}",
                flush=True,
            )
            rt = ReactorThread()
            rt.start()
            try:
                run(rt, args, moto, image, key, proc, d, out)
            finally:
                rt.stop()
                t = time.perf_counter()
                D.stop(proc, timeout=120)
                out["stop_s"] = time.perf_counter() - t
                out["exit"] = proc.returncode
                gone = [w for w in out.get("worker_pids", []) if os.path.exists(f"/proc/{w}")]
                out["workers_left"] = gone
            out["leftovers"] = checkrun.leftovers(moto.url)
    finally:
        if proc is not None and proc.poll() is None:
            D.stop(proc)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return report(args, argv, out)


def run(
    rt: ReactorThread, args: argparse.Namespace, moto: Any, image: str, key: str,
    proc: subprocess.Popen[bytes], d: D.Daemon, out: dict[str, Any],
) -> None:
    from twisted.internet.defer import ensureDeferred

    reactor = rt.reactor

    def call(coro: Any, timeout: float) -> Any:
        return rt.call(lambda: ensureDeferred(coro), timeout=timeout)

    def alive() -> None:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode}; log: {d.log_path}")

    n_watch = math.ceil(args.workers / WATCHES_PER_CONNECTION)
    clients = call(connect_all(reactor, d.connect, args.connections + 1 + n_watch), 60)
    submitters, lat_client, watchers = (
        clients[: args.connections],
        clients[args.connections],
        clients[args.connections + 1 :],
    )
    spec_a = spec_dict(moto.url, image, BACKEND_A)
    spec_b = spec_dict(moto.url, image, BACKEND_B)
    spec_c = spec_dict(moto.url, image, BACKEND_C, key=key)
    out["worker_pids"] = D.worker_pids(d.pid)
    out["mem_idle"] = memory(d.pid)

    # --- 1. submit throughput -------------------------------------------------------
    rt.call(submitters[0].drain, BACKEND_A)
    if args.seq_jobs:
        c0 = proc_cpu(d.pid)
        wall, rtts, ids = call(sequential(submitters[0], spec_a, args.seq_jobs), 600)
        out["seq"] = {"n": len(ids), "wall": wall, "rtts": rtts, "daemon_cpu": proc_cpu(d.pid) - c0}
        t = time.perf_counter()
        cancelled = call(cancel_all(submitters, ids), 600)
        out["seq"]["cancel_wall"] = time.perf_counter() - t
        assert all(j.state == "cancelled" for j in cancelled), "a queued job did not cancel"
        print(f"  sequential: {len(ids)} submits in {wall:.2f}s, then cancelled", flush=True)
    alive()
    c0, o0, m0, s0 = proc_cpu(d.pid), self_cpu(), proc_cpu(moto.pid), system_busy()
    wall, rtts, jobs, done = call(pipelined(submitters, spec_a, args.jobs, args.window), 900)
    ours = proc_cpu(d.pid) - c0 + self_cpu() - o0 + proc_cpu(moto.pid) - m0
    out["pipe_other_cpu"] = system_busy() - s0 - ours
    out["pipe"] = {
        "n": len(jobs), "wall": wall, "rtts": rtts, "done": done,
        "daemon_cpu": proc_cpu(d.pid) - c0, "client_cpu": self_cpu() - o0,
        "distinct": len({j.id for j in jobs}),
        "queued": sum(1 for j in jobs if j.state == "queued"),
    }
    status = rt.call(submitters[0].status)
    out["pipe"]["status_depth"] = status.queue_depth
    out["pipe"]["status_a"] = next((b.queued for b in status.backends if b.name == BACKEND_A), -1)
    counts = stored_counts(os.path.join(d.data_dir, "jobs.sqlite"))
    out["pipe"]["stored"] = counts.get((BACKEND_A, "queued"), 0)
    out["mem_queued"] = memory(d.pid)
    print(
        f"  pipelined: {len(jobs)} submits in {wall:.2f}s; status queue depth "
        f"{status.queue_depth}; stored queued {out['pipe']['stored']}",
        flush=True,
    )
    alive()

    # --- 2. dispatch latency with the queue deep -------------------------------------------
    c0 = proc_cpu(d.pid)
    samples, seen, wall = call(
        latency(reactor, lat_client, spec_b, args.samples, args.inflight, bound=600), 900
    )
    out["lat"] = {"samples": samples, "seen": seen, "wall": wall, "daemon_cpu": proc_cpu(d.pid) - c0}
    status = rt.call(submitters[0].status)
    out["lat"]["depth_after"] = status.queue_depth
    out["lat"]["cold"] = cold_jobs(d.log())
    print(f"  latency: {len(samples)} jobs on {BACKEND_B} in {wall:.1f}s", flush=True)
    alive()

    # --- 3. RSS with the queue deep and every worker busy ---------------------------------
    ids, _events, took = call(hold_running(reactor, watchers, spec_c, args.workers, 300), 400)
    status = rt.call(submitters[0].status)
    mems = []
    for _ in range(5):
        time.sleep(0.5)
        mems.append(memory(d.pid))
    out["rss"] = {
        "held": len(ids), "took": took, "mems": mems,
        "depth": status.queue_depth, "running": status.running, "busy": status.busy_workers,
    }
    print(f"  RSS: {len(ids)} jobs in wait-ssh after {took:.1f}s", flush=True)
    alive()
    t = time.perf_counter()
    finals = call(cancel_all(watchers, ids), 600)
    out["rss"]["cancel_wall"] = time.perf_counter() - t
    out["rss"]["cancelled"] = sum(1 for j in finals if j.state == "cancelled")
    out["mem_end"] = memory(d.pid)
    for c in clients:
        call(_close(c), 30)


async def _close(client: Any) -> None:
    await client.close()


def report(args: argparse.Namespace, argv: list[str], out: dict[str, Any]) -> int:
    print()
    ok = True
    if "seq" in out:
        s = out["seq"]
        rtt = [x * 1000 for x in s["rtts"]]
        print(
            f"sequential submit (one round trip at a time, {s['n']} jobs): "
            f"{s['n'] / s['wall']:.0f}/s; round trip p50 {pct(rtt, 50):.2f} ms, "
            f"p99 {pct(rtt, 99):.2f} ms; daemon CPU {s['daemon_cpu'] / s['n'] * 1000:.3f} ms/submit; "
            f"their {s['n']} cancels {s['cancel_wall']:.2f}s"
        )
    rate = 0.0
    if "pipe" in out:
        p = out["pipe"]
        rate = p["n"] / p["wall"]
        rtt = [x * 1000 for x in p["rtts"]]
        stored_ok = p["stored"] == args.jobs and p["status_depth"] == args.jobs
        stored_ok = stored_ok and p["distinct"] == args.jobs == p["queued"]
        print(
            f"pipelined submit ({args.connections} connections x {args.window} in flight): "
            f"{p['n']} in {p['wall']:.2f}s = {rate:.0f}/s; round trip p50 {pct(rtt, 50):.1f} ms, "
            f"p99 {pct(rtt, 99):.1f} ms; daemon CPU {p['daemon_cpu']:.2f}s "
            f"({p['daemon_cpu'] / p['wall']:.2f} of a core, {p['daemon_cpu'] / p['n'] * 1000:.3f} ms/submit), "
            f"client CPU {p['client_cpu']:.2f}s ({p['client_cpu'] / p['wall']:.2f} of a core)"
        )
        print(
            f"  stored: {p['distinct']} distinct ids answered, {p['queued']} answered queued; "
            f"status queue depth {p['status_depth']} ({BACKEND_A}: {p['status_a']}); "
            f"jobs.sqlite queued rows of {BACKEND_A}: {p['stored']} -> "
            f"{'all accepted and stored' if stored_ok else 'MISMATCH'}"
        )
        if not stored_ok:
            ok = False
        chunk = 1000
        windows = [
            chunk / (p["done"][i + chunk - 1] - p["done"][i])
            for i in range(0, len(p["done"]) - chunk + 1, chunk)
            if p["done"][i + chunk - 1] > p["done"][i]
        ]
        if windows:
            print(
                f"  rate per {chunk} answers: min {min(windows):.0f}/s, median "
                f"{median(windows):.0f}/s, max {max(windows):.0f}/s; CPU used by other "
                f"processes of the machine meanwhile: {out['pipe_other_cpu'] / p['wall']:.2f} "
                f"of {os.cpu_count()} cores"
            )
    p99 = worker_p99 = float("nan")
    if "lat" in out:
        lat = out["lat"]
        daemon_ms, worker_ms, answer_ms = [], [], []
        cold_ms, warm_ms = [], []
        passed = 0
        for s in lat["samples"]:
            q, r, first = s.at("state", "queued"), s.at("state", "running"), s.first_step()
            if q is not None and r is not None:
                daemon_ms.append((r - q) * 1000)
            if q is not None and first is not None:
                worker_ms.append((first - q) * 1000)
                is_cold = s.final is not None and s.final.id in lat["cold"]
                (cold_ms if is_cold else warm_ms).append((first - q) * 1000)
            answer_ms.append((s.answered - s.sent) * 1000)
            passed += s.final is not None and s.final.state == "passed"
        seen_ms = [x * 1000 for x in lat["seen"]]
        rows = []
        for name, xs in (
            ("daemon: queued->running state events", daemon_ms),
            ("worker: queued->first step event", worker_ms),
            ("  of which a worker process's 1st job", cold_ms),
            ("  of which a later job of its worker", warm_ms),
            ("client: Submit sent->answered", answer_ms),
            ("client: Submit sent->'running' seen", seen_ms),
        ):
            rows.append([name, len(xs), pct(xs, 50), pct(xs, 90), pct(xs, 99), max(xs, default=float("nan"))])
        print()
        print(
            f"dispatch latency, {BACKEND_B} jobs one at a time (<= {args.inflight} unfinished, "
            f"{args.workers} workers) while {BACKEND_A} holds {lat['depth_after']} queued; "
            f"{passed}/{len(lat['samples'])} passed; {len(lat['samples']) / lat['wall']:.1f} jobs/s; "
            f"daemon CPU {lat['daemon_cpu'] / lat['wall']:.2f} of a core; {len(cold_ms)} were the "
            f"first job of a worker process (the pool takes the first free worker; a worker is "
            f"replaced after recycle_after jobs, 50 by default)"
        )
        print(table(["ms", "n", "p50", "p90", "p99", "max"], rows))
        p99 = pct(daemon_ms, 99)
        worker_p99 = pct(worker_ms, 99)
        if len(daemon_ms) < min(args.samples, 200):
            ok = False
    rss = float("nan")
    print()
    for label, key in (("idle", "mem_idle"), (f"{args.jobs} queued", "mem_queued")):
        if key in out:
            m = out[key]
            print(
                f"memory, {label}: daemon RSS {m['rss']:.1f} MB (PSS {m['pss']:.1f}, peak {m['hwm']:.1f}); "
                f"{m['workers']} workers RSS {m['workers_rss']:.0f} MB, PSS {m['workers_pss']:.0f} MB"
            )
    if "mem_idle" in out and "mem_queued" in out:
        per = (out["mem_queued"]["rss"] - out["mem_idle"]["rss"]) * 1024 / max(args.jobs, 1)
        print(f"  daemon RSS per queued job: {per:.2f} kB")
    if "rss" in out:
        r = out["rss"]
        last = r["mems"][-1]
        rss = max(m["rss"] for m in r["mems"])
        print(
            f"memory, {r['depth']} queued + {r['held']} running in wait-ssh (status: running "
            f"{r['running']}, busy workers {r['busy']}; reached in {r['took']:.1f}s): daemon RSS "
            f"max {rss:.1f} MB over {len(r['mems'])} samples (PSS {last['pss']:.1f}, peak "
            f"{last['hwm']:.1f}); {last['workers']} workers RSS {last['workers_rss']:.0f} MB, "
            f"PSS {last['workers_pss']:.0f} MB"
        )
        print(f"  cancelled {r['cancelled']}/{r['held']} running jobs in {r['cancel_wall']:.1f}s (cleanup included)")
        if r["held"] != args.workers or r["running"] < args.workers:
            ok = False
    print(
        f"shutdown: daemon stopped by pid in {out.get('stop_s', float('nan')):.1f}s, exit {out.get('exit')}; "
        f"worker processes left: {out.get('workers_left')}; moto leftovers: {out.get('leftovers')}"
    )
    if out.get("leftovers") or out.get("workers_left"):
        ok = False
    verdict = {
        "rate": rate >= TARGET_RATE,
        "p99": p99 <= TARGET_P99_MS,
        "rss": rss <= TARGET_RSS_MB,
    }
    print()
    print(
        f"RESULT: submit {rate:.0f}/s (target >= {TARGET_RATE:.0f}: {'MET' if verdict['rate'] else 'MISSED'}); "
        f"queued->running p99 {p99:.2f} ms with {args.jobs} queued (target <= {TARGET_P99_MS:.0f}: "
        f"{'MET' if verdict['p99'] else 'MISSED'}; to the worker's first step p99 {worker_p99:.1f} ms); "
        f"daemon RSS {rss:.1f} MB with {args.jobs} queued + {args.workers} running (target <= "
        f"{TARGET_RSS_MB:.0f}: {'MET' if verdict['rss'] else 'MISSED'})"
        + ("" if ok else "; CHECKS FAILED (see above)")
    )
    print(reproduce_line(argv))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
