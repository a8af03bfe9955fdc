"""The real daemon, ``twistd -n txvmbot``, started by a test and stopped by
its pid; and the ``txvmbot`` client commands run against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

from tests.support import checkrun

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


@attrs.frozen
class Daemon:
    pid: int
    data_dir: str
    log_path: str
    env: dict[str, str]

    @property
    def socket(self) -> str:
        return os.path.join(self.data_dir, "txvmbot.sock")

    @property
    def connect(self) -> str:
        return f"unix:path={self.socket}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``txvmbot ARGS --connect <this daemon>``."""
        return subprocess.run(
            checkrun.txvmbot_cmd(*args, "--connect", self.connect),
            capture_output=True, text=True, timeout=timeout, env=self.env,
        )

    def client_json(self, *args: str, timeout: float = 120) -> Any:
        p = self.client(*args, "--json", "-", timeout=timeout)
        assert p.returncode in (0, 1), (p.returncode, p.stdout, p.stderr)
        return json.loads(p.stdout)


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], log_path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"twistd exited with {proc.returncode}:\n{f.read()}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.1)
    with open(log_path, errors="replace") as f:
        raise RuntimeError(f"the daemon did not listen on {path} within {timeout}s:\n{f.read()}")


def start(
    data_dir: str, args: Sequence[str] = (), env: dict[str, str] | None = None, log_name: str = "twistd.log"
) -> tuple[subprocess.Popen[bytes], Daemon]:
    env = dict(env or checkrun.env())
    log_path = os.path.join(os.path.dirname(data_dir.rstrip("/")) or ".", log_name)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile=-", "txvmbot", "--data-dir", data_dir, *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir if os.path.isdir(data_dir) else None,
        )
    d = Daemon(pid=proc.pid, data_dir=data_dir, log_path=log_path, env=env)
    wait_for_socket(d.socket, proc, log_path)
    return proc, d


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextmanager
def daemon(data_dir: str, args: Sequence[str] = (), env: dict[str, str] | None = None) -> Iterator[Daemon]:
    os.makedirs(data_dir, exist_ok=True)
    proc, d = start(data_dir, args, env)
    try:
        yield d
    finally:
        stop(proc)


def worker_pids(daemon_pid: int) -> list[int]:
    """The daemon's child processes (its workers), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon_pid:
            pids.append(int(entry))
    return pids
