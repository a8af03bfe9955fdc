"""The error of the image builder and the check that a tool is installed."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from txvmbot.errors import TxvmbotError

#: Which Debian package provides each tool the builder, the seed maker and
#: the tests run.
TOOL_PACKAGES: dict[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "busybox": "busybox-static",
    "dropbear": "dropbear-bin",
    "dropbearkey": "dropbear-bin",
    "ssh-keygen": "openssh-client",
    "ssh": "openssh-client",
    "ldd": "libc-bin",
    "mkfs.ext4": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "chroot": "coreutils",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mtype": "mtools",
    "genisoimage": "genisoimage",
    "xorriso": "xorriso",
}

_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


class ImageError(TxvmbotError):
    """Building, loading or checking a VM image failed: says which file,
    package or tool, and how to fix it."""


def find_tool(name: str) -> str | None:
    """The path of ``name`` on $PATH or in the sbin directories (which a
    non-root $PATH often lacks), or None."""
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def need_tool(name: str) -> str:
    """The path of ``name``; an ImageError naming its apt package if absent."""
    path = find_tool(name)
    if path is None:
        pkg = TOOL_PACKAGES.get(name)
        fix = f"install it: apt-get install {pkg}" if pkg else "install it"
        raise ImageError(f"{name} is not installed; {fix}")
    return path


def run_tool(argv: Sequence[str], step: str, fix: str = "", cwd: str | None = None) -> str:
    """Run ``argv``; its stdout, or an ImageError naming ``step``, the
    command, its last lines of stderr and ``fix``."""
    argv = [need_tool(argv[0]), *argv[1:]]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise ImageError(f"{step}: {' '.join(argv)} did not finish within 600s") from None
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        hint = f"; {fix}" if fix else ""
        raise ImageError(
            f"{step}: {' '.join(argv)} exited {p.returncode}: {' / '.join(tail)}{hint}"
        )
    out: str = p.stdout
    return out
