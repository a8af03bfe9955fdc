"""Disks of local VMs: free space before anything starts, a qcow2 overlay
per VM on a read-only base, and ``qemu-img check``.

Seed 003: a disk filled with backups corrupted running VMs. A pool checks
free space before it starts QEMU and refuses with a clear error instead.
qemu-img runs as a child process through the reactor, never blocking it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from txvmbot.errors import TxvmbotError
from txvmbot.qemu.accel import find_binary

__all__ = ["DiskFull", "DiskImageError", "check_free_disk", "check_image", "create_overlay"]

log = Logger(namespace="txvmbot.qemu.disk")


class DiskFull(TxvmbotError):
    """Too little free disk to start a VM: names the path, the free space
    and the minimum asked for."""

    def __init__(self, path: str, free_mb: float, min_free_mb: float) -> None:
        super().__init__(
            f"not enough free disk at {path}: {free_mb:.1f} MB free, at least "
            f"{min_free_mb:g} MB needed before a VM may start; free some space "
            "(old evidence, overlays, backups) or lower min_free_mb"
        )
        self.path = path
        self.free_mb = free_mb
        self.min_free_mb = min_free_mb


class DiskImageError(TxvmbotError):
    """qemu-img failed on a file: names the operation, the file and what
    qemu-img said."""

    def __init__(self, operation: str, path: str, output: str, status: int | None = None) -> None:
        st = f" (exit status {status})" if status is not None else ""
        super().__init__(f"qemu-img {operation} {path}{st}: {output.strip() or 'no output'}")
        self.operation = operation
        self.path = path
        self.output = output
        self.status = status


def free_mb(path: str) -> float:
    """Free MB (for an unprivileged user) on the filesystem holding
    ``path``, or its nearest existing parent."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


def check_free_disk(path: str, min_free_mb: float) -> float:
    """Raise DiskFull unless the filesystem of ``path`` has at least
    ``min_free_mb`` MB free; return the free MB."""
    free = free_mb(path)
    if free < min_free_mb:
        raise DiskFull(path, free, min_free_mb)
    return free


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}


async def _qemu_img(
    reactor: Any, qemu_img: str, operation: str, path: str, args: list[str]
) -> tuple[str, int]:
    exe = find_binary(qemu_img, "qemu-utils")
    out, err, code = await getProcessOutputAndValue(
        exe, [operation, *args], env=_env(), reactor=reactor
    )
    text = (out + err).decode("utf-8", "replace")
    return text, code


def create_overlay(
    reactor: Any, base: str, path: str, *, qemu_img: str = "qemu-img"
) -> Deferred[str]:
    """Create the qcow2 overlay ``path`` backed by the qcow2 ``base`` (which
    stays untouched); fire with ``path``. Fails with DiskImageError naming
    the file if ``base`` is missing or qemu-img fails."""
    return Deferred.fromCoroutine(_create_overlay(reactor, base, path, qemu_img))


async def _create_overlay(reactor: Any, base: str, path: str, qemu_img: str) -> str:
    base = os.path.abspath(base)
    if not os.path.isfile(base):
        raise DiskImageError("create", path, f"backing file {base} does not exist")
    if os.path.exists(path):
        raise DiskImageError("create", path, "file exists already; an overlay is made fresh")
    text, code = await _qemu_img(
        reactor, qemu_img, "create", path, ["-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path]
    )
    if code != 0:
        raise DiskImageError("create", path, f"backing file {base}: {text}", code)
    log.debug("Created overlay {path} on {base}", path=path, base=base)
    return path


def check_image(reactor: Any, qcow2: str, *, qemu_img: str = "qemu-img") -> Deferred[str]:
    """Run ``qemu-img check`` on ``qcow2``; fire with its report when the
    image is consistent (leaked clusters only waste space: logged, accepted),
    else fail with DiskImageError naming the file and quoting qemu-img."""
    return Deferred.fromCoroutine(_check_image(reactor, qcow2, qemu_img))


async def _check_image(reactor: Any, qcow2: str, qemu_img: str) -> str:
    if not os.path.isfile(qcow2):
        raise DiskImageError("check", qcow2, "no such file")
    text, code = await _qemu_img(reactor, qemu_img, "check", qcow2, [qcow2])
    # 0: fine; 3: leaked clusters (wasted space, not corruption); 1: the
    # check could not complete; 2: corruption; 63: format cannot be checked.
    if code == 3:
        log.warn("qemu-img check {path}: leaked clusters: {output}", path=qcow2, output=text)
        return text
    if code != 0:
        what = {1: "check failed", 2: "image corrupted", 63: "format cannot be checked"}.get(
            code, "failed"
        )
        raise DiskImageError("check", qcow2, f"{what}: {text}", code)
    return text
