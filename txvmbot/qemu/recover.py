"""Stopping, after a crash, the QEMU that a VM directory's record names
(synchronously, before a daemon starts anything new)."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable

from twisted.logger import Logger

from txvmbot.qemu.vm import VMError, VMStopError
from txvmbot.qemu.vm_files import PIDFILE, RECORD

__all__ = ["stop_from_record"]

log = Logger()


def _proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (``Z`` zombie), None if no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # "pid (comm) S ..." - comm may hold spaces and parentheses.
    return stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else None


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]]


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def stop_from_record(
    vm_dir: str,
    *,
    term_bound: float = 2.0,
    kill_bound: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Stop the QEMU that ``vm_dir/vm.json`` records, if it still runs.

    For recovery after a crash, synchronously. The pid is killed only if
    /proc/PID/cmdline is exactly the recorded QEMU command line, that
    command line runs a ``qemu-system-*`` binary and is this directory's (its
    pidfile): a pid recycled by another process, or a record of a process
    that is not QEMU, is never touched. SIGTERM (QEMU closes its disks
    cleanly), then SIGKILL after ``term_bound`` seconds. Returns True if such a QEMU was
    running; raises VMStopError if it survives SIGKILL for ``kill_bound``.
    """
    vm_dir = os.path.abspath(vm_dir)
    try:
        with open(os.path.join(vm_dir, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as e:
        raise VMError(f"{os.path.join(vm_dir, RECORD)}: unreadable: {e}") from e
    pid = record.get("pid")
    argv = record.get("argv")
    if not isinstance(pid, int) or pid <= 1 or not isinstance(argv, list):
        log.warn("{path}: no usable pid/argv", path=os.path.join(vm_dir, RECORD))
        return False
    if not argv or not os.path.basename(str(argv[0])).startswith("qemu-system"):
        log.warn(
            "{path} records {program!r}, not a QEMU; not touching pid {pid}",
            path=os.path.join(vm_dir, RECORD),
            program=argv[0] if argv else None,
            pid=pid,
        )
        return False
    if os.path.join(vm_dir, PIDFILE) not in argv:
        log.warn(
            "{path} records a QEMU of another directory; not touching pid {pid}",
            path=os.path.join(vm_dir, RECORD),
            pid=pid,
        )
        return False
    if not _alive(pid):
        return False
    if _cmdline(pid) != argv:
        log.warn(
            "pid {pid} from {vm_dir}/vm.json is not that QEMU any more (recycled); not killed",
            pid=pid,
            vm_dir=vm_dir,
        )
        return False
    log.info("Stopping QEMU pid {pid} of {vm_dir} from its record", pid=pid, vm_dir=vm_dir)
    for sig, bound in ((signal.SIGTERM, term_bound), (signal.SIGKILL, kill_bound)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            sleep(0.02)
    if _alive(pid):
        raise VMStopError(f"QEMU pid {pid} of {vm_dir} still there {kill_bound:g}s after SIGKILL")
    return True
