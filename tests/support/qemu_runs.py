"""The run directories of local VMs (real QEMU) in tests: the QEMU
processes under one, its VM directories and which are ready, reaping what
a test left, short temporary directories (a QMP socket path must fit 107
bytes), and reading a step of a check's JSON result."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from txvmbot.qemu import kept as K
from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.recover import stop_from_record


def qemu_pids(run_dir: str) -> list[int]:
    """QEMU processes whose command line names a path under ``run_dir``."""
    run_dir = os.path.abspath(run_dir) + "/"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0")[:-1]]
        except OSError:
            continue
        if argv and "qemu-system" in os.path.basename(argv[0]) and any(run_dir in a for a in argv):
            found.append(int(entry))
    return found


def reap_run_dir(run_dir: str) -> None:
    """Teardown: stop any QEMU a VM directory of ``run_dir`` still records
    (by its pid, only if it is that QEMU), including a revived one."""
    for path in K.iter_vm_dirs(run_dir):
        for d in (path, os.path.join(path, "revived")):
            if os.path.isdir(d):
                stop_from_record(d)


def vm_dirs(run_dir: str) -> list[str]:
    return sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []


def ready_vms(run_dir: str) -> list[str]:
    """VM directories whose console shows the ready marker."""
    out = []
    for name in vm_dirs(run_dir):
        try:
            with open(os.path.join(run_dir, name, K.CONSOLE_FILE), errors="replace") as f:
                if READY_MARKER in f.read():
                    out.append(name)
        except OSError:
            pass
    return out


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    for s in result["steps"]:
        if s["name"] == name:
            return dict(s)
    raise AssertionError(f"no step {name!r} in {[s['name'] for s in result['steps']]}")


@contextmanager
def short_dirs() -> Iterator[Callable[[], str]]:
    """Short temp dirs (a VM's QMP socket path must fit 107 bytes), each
    reaped of QEMU and removed on exit."""
    made: list[str] = []

    def make() -> str:
        d = tempfile.mkdtemp(prefix="txl-", dir="/tmp")
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in made:
            for run_dir in (d, os.path.join(d, "vms"), os.path.join(d, "run")):
                reap_run_dir(run_dir)
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def short_dir() -> Iterator[Callable[[], str]]:
    with short_dirs() as make:
        yield make
