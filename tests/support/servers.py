"""Real servers started by the tests on loopback, and stopped by their pid.

Every server here listens on 127.0.0.1 only, on a port picked free at start,
and every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

VENV_BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait until 127.0.0.1:port accepts, the process dies, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop a server by its pid: SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


@attrs.frozen
class Moto:
    """A running moto server."""

    url: str
    port: int
    pid: int

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()


def moto_command(port: int) -> list[str]:
    exe = os.path.join(VENV_BIN, "moto_server")
    if not os.path.exists(exe):
        exe = shutil.which("moto_server") or "moto_server"
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


@contextmanager
def moto_server() -> Iterator[Moto]:
    """Start ``moto_server`` on a free loopback port; stop it by pid."""
    port = free_port()
    log = tempfile.TemporaryFile()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.Popen(moto_command(port), stdout=log, stderr=log, env=env)
    try:
        wait_for_port(port, proc)
        yield Moto(url=f"http://127.0.0.1:{port}", port=port, pid=proc.pid)
    finally:
        stop(proc)
        log.close()
