#!/usr/bin/env python
"""Benchmark: how long a VM's QEMU outlives the process that started it once
that process is SIGKILLed (issue 16, part 4: a daemon's VMs die with it).

Sides, each timed --runs times (median and max reported):

  bare           qemu-system-x86_64 started by a Python parent (Popen, from
                 its main thread), as txvmbot started it before: it runs on
  setpriv-KILL   the same through ``setpriv --pdeathsig KILL --`` (what
                 txvmbot.qemu.argv.parent_death_launcher gives)
  setpriv-TERM   the same with ``--pdeathsig TERM`` (QEMU quits cleanly)
  python-prctl   a ``python3 -S -c`` wrapper that calls
                 prctl(PR_SET_PDEATHSIG, SIGKILL) through ctypes and execs QEMU
  txvmbot        a parent that boots the VM with txvmbot.qemu.boot.boot() on
                 its reactor
  daemon         ``twistd -n txvmbot`` with [pools.local], one job running
                 ``sleep 600`` in its VM (ready marker seen): the daemon is
                 SIGKILLed; its worker ends when its AMP pipe closes, and the
                 kernel then kills the worker's QEMU
  daemon-stuck   the same with the worker SIGSTOPped first (a worker whose
                 reactor cannot run never reads that EOF): the kernel kills
                 the worker when the daemon dies (txvmbot.daemon.workers.bootstrap),
                 then its QEMU; timed until both are gone

Each run is timed from the parent's (the daemon's) SIGKILL to QEMU's /proc
entry gone or a zombie, polled every 2 ms, bounded by --timeout (a QEMU still
there then is counted "alive"). The bare sides' QEMU gets 1 s after its QMP
socket appears first. Every QEMU, worker and daemon is killed by its pid at
the end of its run; QEMU's only network is a forward on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import bench_parser, median, reproduce_line, table  # noqa: E402
from tests.support import checkrun  # noqa: E402
from tests.support import real_daemon as D  # noqa: E402
from tests.support.qemu_fixtures import build_test_image  # noqa: E402
from tests.support.qemu_runs import qemu_pids  # noqa: E402
from txvmbot.qemu.argv import free_port, qemu_argv  # noqa: E402
from txvmbot.qemu.image import ImageInfo  # noqa: E402
from txvmbot.qemu.model import READY_MARKER  # noqa: E402
from txvmbot.qemu.recover import stop_from_record  # noqa: E402

_PRCTL = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL)\n"
    "os.execv(sys.argv[1],sys.argv[1:])\n"
)

#: Prefixes of QEMU's command line, per plain side.
WRAPPERS: dict[str, list[str]] = {
    "bare": [],
    "setpriv-KILL": ["setpriv", "--pdeathsig", "KILL", "--"],
    "setpriv-TERM": ["setpriv", "--pdeathsig", "TERM", "--"],
    "python-prctl": ["/usr/bin/python3", "-S", "-c", _PRCTL],
}

_POPEN_PARENT = (
    "import subprocess,sys,time\n"
    "p=subprocess.Popen(sys.argv[1:],stdin=subprocess.PIPE,stdout=subprocess.DEVNULL,"
    "stderr=subprocess.DEVNULL)\n"
    "print(p.pid,flush=True)\n"
    "time.sleep(300)\n"
)

_TXVMBOT_PARENT = (
    "import sys\n"
    "from twisted.internet import reactor\n"
    "from txvmbot.qemu.image import load_image\n"
    "from txvmbot.qemu.boot import BootSpec, boot\n"
    "def booted(vm):\n"
    "    print(vm.pid, flush=True)\n"
    "def failed(f):\n"
    "    print('boot failed:', f.getErrorMessage(), file=sys.stderr)\n"
    "    reactor.stop()\n"
    "reactor.callWhenRunning(lambda: boot(reactor, BootSpec(load_image(sys.argv[1]), sys.argv[2],"
    " accel='tcg', memory_mb=256, cpus=1)).addCallbacks(booted, failed))\n"
    "reactor.callLater(300, reactor.stop)\n"
    "reactor.run()\n"
)

SIDES = [*WRAPPERS, "txvmbot", "daemon", "daemon-stuck"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, timeout=10.0, warmup=False)
    p.add_argument("--sides", nargs="+", choices=SIDES, default=SIDES, help="sides to run")
    return p.parse_args(argv)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_until(what: str, probe: Callable[[], object], bound: float) -> None:
    deadline = time.monotonic() + bound
    while not probe():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {bound:g}s")
        time.sleep(0.01)


def time_death(
    victim: subprocess.Popen[bytes], qemu: int, bound: float, also: Sequence[int] = ()
) -> float | None:
    """SIGKILL ``victim``; seconds until ``qemu`` (and ``also``) are gone,
    None if one outlives ``bound``."""
    assert alive(qemu), f"QEMU {qemu} is not running before the kill"
    pids = [qemu, *also]
    t0 = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    while any(alive(p) for p in pids) and time.monotonic() - t0 < bound:
        time.sleep(0.002)
    took = time.monotonic() - t0
    victim.wait(10)
    return None if any(alive(p) for p in pids) else took


def plain_run(side: str, image: ImageInfo, bound: float) -> float | None:
    d = tempfile.mkdtemp(prefix="orph-", dir="/tmp")
    parent: subprocess.Popen[bytes] | None = None
    qemu = 0
    try:
        env = checkrun.env()
        if side == "txvmbot":
            cmd = [sys.executable, "-c", _TXVMBOT_PARENT, image.dir, os.path.join(d, "vm")]
        else:
            disk = os.path.join(d, "disk.qcow2")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "qcow2",
                 disk],
                check=True, timeout=30,
            )
            binary = shutil.which("qemu-system-x86_64")
            assert binary is not None, "no qemu-system-x86_64"
            argv = qemu_argv(binary=binary, image=image, vm_dir=d, disk=disk, accel="tcg",
                             machine="q35", memory_mb=256, cpus=1, ssh_port=free_port())
            cmd = [sys.executable, "-c", _POPEN_PARENT, *WRAPPERS[side], *argv]
        parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        assert parent.stdout is not None
        line = parent.stdout.readline()  # bounded by the parent's own 300 s
        if not line.strip():
            raise RuntimeError(f"{side}: the parent printed no QEMU pid")
        qemu = int(line)
        if side != "txvmbot":
            wait_until("QMP socket", lambda: os.path.exists(os.path.join(d, "qmp.sock")), 15)
        time.sleep(1.0)
        return time_death(parent, qemu, bound)
    finally:
        if parent is not None:
            kill(parent.pid)
            parent.wait(10)
        if qemu:
            kill(qemu)
        shutil.rmtree(d, ignore_errors=True)


def ready(run_dir: str) -> bool:
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        try:
            with open(os.path.join(run_dir, name, "console.log"), errors="replace") as f:
                if READY_MARKER in f.read():
                    return True
        except OSError:
            pass
    return False


def daemon_run(image: ImageInfo, bound: float, stuck: bool = False) -> float | None:
    root = tempfile.mkdtemp(prefix="orph-", dir="/tmp")
    run_dir, data = os.path.join(root, "run"), os.path.join(root, "data")
    os.makedirs(data)
    config = os.path.join(root, "txvmbot.toml")
    with open(config, "w") as f:
        f.write(f'[daemon]\nworkers = 1\n\n[pools.local]\nimage_dir = "{image.dir}"\n'
                f'run_dir = "{run_dir}"\nmax_vms = 1\n')
    proc, d = D.start(data, ["--config", config], log_name="orphan-twistd.log")
    workers: list[int] = []
    qemus: list[int] = []
    try:
        p = d.client("submit", "--pool", "local", "--command", "sleep 600",
                     "--timeout-command", "900", "--max-attempts", "1")
        if p.returncode != 0:
            raise RuntimeError(f"submit failed: {p.stdout}{p.stderr}")
        wait_until("the VM ready", lambda: ready(run_dir), 90)
        qemus = qemu_pids(run_dir)
        workers = D.worker_pids(d.pid)
        if len(qemus) != 1 or len(workers) != 1:
            raise RuntimeError(f"expected one QEMU and one worker, found {qemus}, {workers}")
        if stuck:
            os.kill(workers[0], signal.SIGSTOP)
        return time_death(proc, qemus[0], bound, also=workers if stuck else ())
    finally:
        for pid in [proc.pid, *workers, *qemus]:
            kill(pid)
        proc.wait(10)
        if os.path.isdir(run_dir):
            for name in os.listdir(run_dir):
                stop_from_record(os.path.join(run_dir, name))
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    args = parse_args(list(argv[1:]))
    image = build_test_image()
    rows = []
    for side in args.sides:
        times: list[float | None] = []
        for _ in range(args.runs):
            if side.startswith("daemon"):
                times.append(daemon_run(image, args.timeout, stuck=side == "daemon-stuck"))
            else:
                times.append(plain_run(side, image, args.timeout))
        died = [t * 1000 for t in times if t is not None]
        rows.append([side, f"{len(died)}/{len(times)}", median(died) if died else float("nan"),
                     max(died) if died else float("nan")])
        print(f"{side}: {['alive' if t is None else f'{t * 1000:.1f} ms' for t in times]}",
              flush=True)
    print()
    print(f"QEMU's life after its parent's SIGKILL (bound {args.timeout:g}s; alive = outlived it)")
    print(table(["side", "died", "median ms", "max ms"], rows))
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
