"""Which accelerator QEMU may use here, and which QEMU it is.

``/dev/kvm`` alone proves nothing: on these hosts it is a software module
(kvm_pvm) that is slower than TCG and crashes stock kernels. KVM is used only
when a hardware KVM module (kvm_intel or kvm_amd) is loaded and /dev/kvm can
be opened; otherwise TCG. The reason goes into the facts of every result
(seeds 000 and 003: the host's kernel and KVM module decided pass or fail).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from typing import Literal

from txvmbot.errors import TxvmbotError

__all__ = ["AccelError", "QEMUNotFound", "detect_accel", "find_binary", "qemu_version"]

HARDWARE_KVM_MODULES = ("kvm_intel", "kvm_amd")


class AccelError(TxvmbotError):
    """The accelerator asked for cannot be used here; says why."""


class QEMUNotFound(TxvmbotError):
    """A QEMU program is not installed or not on PATH."""

    def __init__(self, binary: str, package: str) -> None:
        super().__init__(f"{binary}: not found on PATH; install the Debian package {package}")
        self.binary = binary


def _loaded_modules(proc_modules: str) -> list[str] | None:
    try:
        with open(proc_modules, encoding="ascii", errors="replace") as f:
            return [line.split(" ", 1)[0] for line in f if line.strip()]
    except OSError:
        return None


def _dev_kvm_usable(dev_kvm: str) -> str | None:
    """None if ``dev_kvm`` opens read-write, else why not."""
    try:
        fd = os.open(dev_kvm, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{dev_kvm}: {e.strerror or e}"
    os.close(fd)
    return None


def detect_accel(
    override: str = "auto",
    proc_modules: str = "/proc/modules",
    dev_kvm: str = "/dev/kvm",
) -> tuple[Literal["kvm", "tcg"], str]:
    """Pick ``"kvm"`` or ``"tcg"`` and say why.

    ``override`` is the pool's setting: ``"tcg"`` is always honoured;
    ``"kvm"`` fails with AccelError unless kvm_intel or kvm_amd is loaded and
    /dev/kvm opens; ``"auto"`` takes KVM under the same condition, else TCG.
    """
    if override not in ("auto", "kvm", "tcg"):
        raise AccelError(f"accel: {override!r} is not one of auto, kvm, tcg")
    if override == "tcg":
        return "tcg", "tcg asked for"
    modules = _loaded_modules(proc_modules)
    if modules is None:
        why_not = f"{proc_modules} unreadable, so no hardware KVM module can be confirmed"
    else:
        hw = [m for m in HARDWARE_KVM_MODULES if m in modules]
        if hw:
            unusable = _dev_kvm_usable(dev_kvm)
            if unusable is None:
                return "kvm", f"{hw[0]} loaded and {dev_kvm} usable"
            why_not = f"{hw[0]} loaded but {unusable}"
        else:
            other = sorted(m for m in modules if m.startswith("kvm"))
            seen = f" (loaded: {', '.join(other)}; not a hardware KVM)" if other else ""
            why_not = f"neither kvm_intel nor kvm_amd loaded{seen}"
    if override == "kvm":
        raise AccelError(
            f"accel kvm asked for, but {why_not}; set accel to auto or tcg, "
            "or load kvm_intel/kvm_amd on a host with hardware virtualisation"
        )
    return "tcg", why_not


def find_binary(binary: str, package: str = "qemu-system-x86") -> str:
    """The absolute path of ``binary`` (a name looked up on PATH, or a path)."""
    path = shutil.which(binary)
    if path is None:
        raise QEMUNotFound(binary, package)
    return os.path.abspath(path)


@functools.cache
def qemu_version(binary: str = "qemu-system-x86_64") -> str:
    """QEMU's version as it reports it, e.g. ``"7.2.22 (Debian 1:7.2+dfsg-7)"``.

    Runs ``binary --version`` once per binary per process (about 20 ms,
    synchronously; the answer is cached), so call it at setup, not per VM on
    a busy reactor.
    """
    path = find_binary(binary)
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, timeout=10, check=True
        ).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError) as e:
        raise TxvmbotError(f"{path} --version failed: {e}") from e
    first = out.strip().splitlines()[0] if out.strip() else ""
    marker = "version "
    return first.split(marker, 1)[1].strip() if marker in first else first
