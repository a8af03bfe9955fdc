"""Processes on this machine, read from /proc: whether one runs, waiting
until one does (or is gone), the children of a pid, and SIGKILL as a
last-resort cleanup by pid."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

reactor: Any = _reactor


def running(marker: str) -> bool:
    """Whether a process on this machine has ``marker`` in its command line."""
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline.replace(b"\0", b" ") and state != b"Z":
            return True
    return False


async def seen(marker: str, present: bool = True, seconds: float = 5.0) -> None:
    """Wait until a process has ``marker`` in its command line (or, not
    ``present``, none has)."""
    for _ in range(int(seconds / 0.05)):
        if running(marker) == present:
            return
        await deferLater(reactor, 0.05)
    state = "not there" if present else "still there"
    raise AssertionError(f"a process running {marker!r} is {state} after {seconds}s")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill_if(pid: int, marker: str) -> None:
    """SIGKILL ``pid`` if it still runs a command line containing ``marker``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read() and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def kill_pids(pids: list[int]) -> None:
    """SIGKILL these processes (sshd's, started by this test); some may
    have gone already."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid``, and theirs (from /proc)."""
    found: list[int] = []
    parents = {pid}
    for _ in range(5):  # sshd's per-connection processes nest 2-3 deep
        more = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) in parents and int(entry) not in found:
                more.append(int(entry))
        if not more:
            break
        found.extend(more)
        parents = set(more)
    return found


def kill_qemu_pid(pid: int | None) -> None:
    """Last-resort cleanup by pid, if the VM's own stop did not happen."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"qemu-system" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
