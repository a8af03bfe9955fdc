"""QEMU's command line for one VM, and what it is started through.

Pure but for two probes of this host: ``free_port`` (a port nothing listens
on now) and ``parent_death_launcher`` (whether ``setpriv --pdeathsig``
works, so that QEMU does not outlive the process that starts it).
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Sequence
from typing import Protocol

from twisted.logger import Logger

from txvmbot.qemu.vm_files import PIDFILE, QMP_SOCKET

__all__ = ["ImageLike", "free_port", "parent_death_launcher", "qemu_argv"]

log = Logger()


class ImageLike(Protocol):
    """What a VM needs of txvmbot.qemu.image.ImageInfo."""

    @property
    def dir(self) -> str: ...

    @property
    def kernel(self) -> str | None: ...

    @property
    def initrd(self) -> str | None: ...

    @property
    def disk(self) -> str | None: ...

    @property
    def cmdline(self) -> str: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` nothing listens on right now (bind, read,
    release). Another process may take it before QEMU does; ``boot``
    retries with a new port when QEMU cannot bind its forward."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _opt(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas double)."""
    return value.replace(",", ",,")


def qemu_argv(
    *,
    binary: str,
    image: ImageLike,
    vm_dir: str,
    disk: str | None,
    accel: str,
    machine: str,
    memory_mb: int,
    cpus: int,
    ssh_port: int,
    incoming: str | None = None,
    append: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The full QEMU command line for one VM (no shell is involved)."""
    vm_dir = os.path.abspath(vm_dir)
    argv = [
        binary,
        "-name",
        f"txvmbot-{os.path.basename(vm_dir)}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        # A guest that resets during a smoke test has failed: let QEMU exit
        # so the failure shows at once instead of at the bound.
        "-no-reboot",
        "-machine",
        f"{machine},accel={accel}",
        "-m",
        str(memory_mb),
        "-smp",
        str(cpus),
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if image.kernel:
        argv += ["-kernel", image.kernel]
        if image.initrd:
            argv += ["-initrd", image.initrd]
        argv += ["-append", image.cmdline if append is None else append]
    if disk is not None:
        # node-name: snapshot-save and blockdev commands need one.
        argv += [
            "-drive",
            f"file={_opt(os.path.abspath(disk))},format=qcow2,if=none,id=vda,node-name=disk0,"
            "cache=writeback",
            "-device",
            "virtio-blk-pci,drive=vda,id=vda-dev",
        ]
    seed = getattr(image, "seed", None)
    if seed:
        argv += [
            "-drive",
            f"file={_opt(os.path.abspath(seed))},format=raw,if=none,id=seed,node-name=seed0,"
            "readonly=on",
            "-device",
            "virtio-blk-pci,drive=seed,id=seed-dev",
        ]
    argv += [
        "-netdev",
        f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device",
        "virtio-net-pci,netdev=n0,id=n0-dev",
        "-device",
        "virtio-rng-pci,id=rng0",
        # The serial console is QEMU's stdout, read by the VM and appended to
        # console.log as it arrives. signal=off: ^C in the stream is data.
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{_opt(os.path.join(vm_dir, QMP_SOCKET))},server=on,wait=off",
        "-pidfile",
        os.path.join(vm_dir, PIDFILE),
    ]
    if incoming is not None:
        # QEMU 7.2 has no file: migration URI; exec: runs through /bin/sh.
        argv += ["-incoming", "exec:cat " + shlex.quote(os.path.abspath(incoming))]
    argv += list(extra_args)
    return argv


@functools.cache
def parent_death_launcher() -> tuple[str, ...]:
    """``(setpriv, "--pdeathsig", "KILL", "--")``: the prefix that makes a
    QEMU die with the process that starts it; () if this host cannot.

    util-linux's setpriv sets PR_SET_PDEATHSIG and execs QEMU, which keeps
    setpriv's pid and has exactly the recorded command line (what
    ``stop_from_record`` compares). The kernel then SIGKILLs QEMU when the
    thread that spawned it ends: the reactor thread of a daemon's worker or
    of ``txvmbot check --local``. A worker ends when its daemon does (its
    AMP pipe closes; if its reactor cannot run, the kernel kills it:
    ``txvmbot.daemon.workers.bootstrap``), so a SIGKILLed daemon's QEMUs end too,
    without waiting for a daemon to start again (bench/qemu_orphan.py: a few ms after the
    parent's SIGKILL; without it, QEMU ran on). KILL, not TERM: a job's
    disk is thrown away anyway, and KILL cannot be held up by a stuck QEMU.

    Probed once per process (``setpriv --pdeathsig KILL -- true``, ~2 ms,
    synchronously). Without setpriv (util-linux 2.33 or later) QEMU runs
    bare, with one warning: then only the record stops an orphan, when a
    daemon starts again.
    """
    path = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if path is None:
        log.warn(
            "No setpriv (util-linux) on PATH: a VM's QEMU will outlive a killed worker or "
            "daemon until a daemon starts again; install util-linux to tie it to its parent"
        )
        return ()
    launcher = (os.path.abspath(path), "--pdeathsig", "KILL", "--")
    try:
        subprocess.run([*launcher, "true"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        log.warn(
            "{setpriv} --pdeathsig does not work here ({error}): a VM's QEMU will outlive a "
            "killed worker or daemon until a daemon starts again",
            setpriv=path,
            error=e,
        )
        return ()
    return launcher
