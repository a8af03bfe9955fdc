"""A cpio archive in the "newc" format the kernel unpacks as initramfs.

Written in Python, not with cpio(1), so every entry is owned by root and
device nodes (``/dev/console``) need no mknod or privileges.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

from attrs import frozen


@frozen
class Entry:
    """One file, directory, symlink or device node of the archive."""

    path: str  # relative, no leading slash: "bin/busybox"
    mode: int  # including the S_IF* type bits
    data: bytes = b""  # file contents, or the symlink's target
    rdev: tuple[int, int] = (0, 0)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(out: BinaryIO, entries: list[Entry], mtime: int = 0) -> None:
    """Write ``entries`` (parents before children) and the trailer."""
    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.path.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        fields = (
            ino if e.path != "TRAILER!!!" else 0,
            e.mode,
            0,  # uid
            0,  # gid
            nlink if e.mode else 1,
            mtime,
            len(e.data),
            0,
            0,  # dev major/minor
            e.rdev[0],
            e.rdev[1],
            len(name),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + name)
        out.write(_pad(len(header) + len(name)))
        out.write(e.data)
        out.write(_pad(len(e.data)))
