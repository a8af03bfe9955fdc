"""Helpers of the scale-out benchmark: a real PostgreSQL (tests.support.pgserver) in
a temp dir on a unix socket, real daemons (``twistd -n txvmbot``) on the
SQLite store or on one shared database, CPU seconds of process trees, and
a submit client that runs in a process of its own.

Everything here is on loopback or unix sockets; every server and process
is stopped by its pid; every wait is bounded.

The client loop is this module run as a script::

    python -m bench._pg '{"connect": "unix:path=...", "spec": {...}, ...}'

It connects, prints ``ready``, waits for a line on stdin, submits
``jobs`` specs pipelined (``window`` in flight on each of ``connections``
connections), and prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: The variable that hands the shared store's DSN to the daemons.
DSN_ENV = "TXVMBOT_BENCH_DSN"


# --- PostgreSQL -------------------------------------------------------------------


@contextmanager
def pg_server() -> Iterator[Any]:
    """A PostgreSQL server (tests.support.pgserver.PostgresServer: unix socket only,
    fsync=off) in a new temp dir; stopped by its pid, the dir removed."""
    from tests.support.pgserver import running_server

    with running_server(tempfile.mkdtemp(prefix="txpgb", dir="/tmp"), True) as server:
        yield server


def query(dsn: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return list(conn.execute(sql, args).fetchall())


def pg_counts(dsn: str) -> dict[tuple[str, str], int]:
    """(backend, state) -> jobs stored in the shared database."""
    rows = query(dsn, "SELECT backend, state, count(*) FROM jobs GROUP BY backend, state")
    return {(str(b), str(s)): int(n) for b, s, n in rows}


# --- CPU ------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """The direct children of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None and int(st[1]) == pid:
                out.append(int(entry))
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its live children and the children it has
    reaped (PostgreSQL: the postmaster and its backends, gone ones too)."""
    ticks = os.sysconf("SC_CLK_TCK")
    st = _stat(pid)
    if st is None:
        return 0.0
    # fields after ')': state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    total = sum(int(st[i]) for i in (11, 12, 13, 14))
    for c in children(pid):
        cs = _stat(c)
        if cs is not None:
            total += int(cs[11]) + int(cs[12])
    return total / ticks


# --- daemons ----------------------------------------------------------------------------


class BenchDaemon:
    """One ``twistd -n txvmbot`` with its own data dir and config; on the
    shared store when ``shared`` (the DSN comes from :data:`DSN_ENV`)."""

    def __init__(
        self, base: str, name: str, *, workers: int, default_cap: int,
        shared: bool, lease: float = 6.0, profile: bool = False,
    ) -> None:
        self.name = name
        self.host = f"bench-{name}"
        self.shared = shared
        self.dir = os.path.join(base, name)
        self.data_dir = os.path.join(self.dir, "data")
        self.config = os.path.join(self.dir, "txvmbot.toml")
        self.log_path = os.path.join(self.dir, "twistd.log")
        self.workers = workers
        #: twistd's own cProfile of the reactor thread (not the database
        #: threads), written at a clean stop.
        self.profile = os.path.join(self.dir, "twistd.prof") if profile else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.worker_pids: list[int] = []
        os.makedirs(self.data_dir, exist_ok=True)
        lines = [
            "[daemon]",
            f"workers = {workers}",
            f"default_cap = {default_cap}",
            "quarantine_after = 1000",
        ]
        if shared:
            lines += [f'store_dsn_env = "{DSN_ENV}"', f'host = "{self.host}"', f"lease = {lease}"]
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> str:
        return os.path.join(self.data_dir, "txvmbot.sock")

    @property
    def connect(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def sqlite_path(self) -> str:
        return os.path.join(self.data_dir, "jobs.sqlite")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, env: dict[str, str]) -> float:
        """Start it; wait (bounded) until it listens; seconds it took."""
        from tests.support import real_daemon as D

        t0 = time.perf_counter()
        prof = [] if self.profile is None else [
            f"--profile={self.profile}", "--profiler=cprofile", "--savestats"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [D.TWISTD, "-n", "--pidfile=", "--logfile=-", *prof, "txvmbot",
                 "--config", self.config, "--data-dir", self.data_dir],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir,
            )
        # Every worker answers its Hello before the daemon listens.
        D.wait_for_socket(self.socket, self.proc, self.log_path, timeout=60 + 3 * self.workers)
        self.worker_pids = D.worker_pids(self.proc.pid)
        return time.perf_counter() - t0

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM by pid (SIGKILL after ``timeout``); then any worker left
        is killed by its pid."""
        from tests.support import real_daemon as D

        if self.proc is not None:
            D.stop(self.proc, timeout=timeout)
        self.kill_workers()

    def kill(self) -> None:
        """SIGKILL the daemon and its workers, by pid."""
        assert self.proc is not None
        pids = self.worker_pids or []
        if self.proc.poll() is None:
            from tests.support import real_daemon as D

            pids = sorted(set(pids) | set(D.worker_pids(self.proc.pid)))
            os.kill(self.proc.pid, signal.SIGKILL)
        for w in pids:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self.worker_pids = pids

    def kill_workers(self) -> list[int]:
        """SIGKILL workers still alive (their daemon gone); the ones found."""
        left = [w for w in self.worker_pids if os.path.exists(f"/proc/{w}")]
        for w in left:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left

    def profile_top(self, n: int = 12) -> str:
        """The ``n`` functions of most own time in the profile, or ''."""
        if self.profile is None or not os.path.exists(self.profile):
            return ""
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(self.profile, stream=buf).sort_stats("tottime").print_stats(n)
        return buf.getvalue()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


# --- a submit client in a process of its own --------------------------------------------


class ClientProc:
    """This module's client loop in a subprocess (see the module docstring)."""

    def __init__(self, env: dict[str, str], args: dict[str, Any], stderr_path: str) -> None:
        self._err = open(stderr_path, "wb")  # noqa: SIM115
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench._pg", json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env, cwd=ROOT,
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def readline(self, timeout: float) -> str:
        """The next line it prints, waiting at most ``timeout`` s."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"client process {self.pid} printed no line in {timeout}s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(
                        f"client process {self.pid} exited ({self.proc.wait(10)}): "
                        f"{self.stderr_tail()}"
                    )
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def stderr_tail(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()[-3000:]

    def close(self) -> None:
        """Wait for it to exit; kill it by its pid if it does not."""
        if self.proc.poll() is None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()
        self._err.close()


async def _client_loop(reactor: Any, args: dict[str, Any]) -> None:
    from twisted.internet.defer import ensureDeferred, gatherResults

    from txvmbot.daemon.api.client import connect

    clients = [await connect(reactor, args["connect"], timeout=30)
               for _ in range(args["connections"])]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":  # blocks the reactor: nothing runs yet
        raise SystemExit("no go")
    spec = args["spec"]
    todo = iter(range(args["jobs"]))
    rtts: list[float] = []
    ids: list[str] = []
    states: dict[str, int] = {}
    errors: list[str] = []
    last = [0.0]

    async def lane(client: Any) -> None:
        for _ in todo:  # shared by every lane: ``jobs`` submits in all
            t = time.monotonic()
            try:
                job = await client.submit(spec)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            last[0] = time.monotonic()
            rtts.append(last[0] - t)
            ids.append(job.id)
            states[job.state] = states.get(job.state, 0) + 1

    cpu0 = time.process_time()
    t0 = time.monotonic()
    await gatherResults(
        [ensureDeferred(lane(c)) for c in clients for _ in range(args["window"])],
        consumeErrors=True,
    )
    cpu = time.process_time() - cpu0
    rtts.sort()

    def pct(q: int) -> float:  # nearest rank, ms
        return rtts[max(0, math.ceil(len(rtts) * q / 100) - 1)] * 1000 if rtts else float("nan")

    print(json.dumps({
        "t0": t0, "t1": last[0], "cpu": cpu, "ids": ids, "states": states,
        "errors": len(errors), "first_error": errors[0] if errors else "",
        "rtt_p50": pct(50), "rtt_p99": pct(99),
    }), flush=True)
    for c in clients:
        await c.close()


def client_main(argv: list[str]) -> None:
    """The client loop's process (the global reactor is its own)."""
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    args = json.loads(argv[1])
    task.react(lambda reactor: ensureDeferred(_client_loop(reactor, args)))


if __name__ == "__main__":
    client_main(sys.argv)
