"""Environment facts recorded with every result (seeds 000 and 003: the host
kernel decided pass or fail, and nobody had written it down)."""

from __future__ import annotations

import functools
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import attrs

from txvmbot.model import Facts


@functools.cache
def _version(dist: str) -> str:
    """The installed version of ``dist``; read once per process (reading
    package metadata cost ~0.2 ms a check on the reactor thread)."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def host_kernel() -> str:
    u = platform.uname()
    return f"{u.system} {u.release} {u.version} {u.machine}"


#: Run first on every guest, for the facts, in one ssh round trip:
#: ``uname -a`` (one line), then the guest's os-release, else (a busybox
#: guest has none) busybox's banner line. Exits with uname's status: a
#: guest without os-release is not an error.
GUEST_FACTS_COMMAND = (
    "uname -a && { cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null"
    " || busybox 2>/dev/null | head -n 1; true; }"
)
#: A guest_os longer than this is cut (a PRETTY_NAME is a few dozen).
MAX_GUEST_OS = 100
_OS_KEY = re.compile(r"[A-Z][A-Z0-9_]*")
_BUSYBOX = re.compile(r"BusyBox v([0-9][0-9A-Za-z.+~_-]*)")
_UNQUOTE = re.compile(r"\\([\\\"$`])")


def _os_value(raw: str) -> str:
    """One os-release value: shell-quoted or bare, backslash escapes of the
    spec undone; anything unprintable dropped."""
    v = raw.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        v = _UNQUOTE.sub(r"\1", v[1:-1]) if v[0] == '"' else v[1:-1]
    return "".join(c for c in v if c.isprintable()).strip()


def parse_os_release(text: str) -> dict[str, str]:
    """The ``KEY=value`` pairs of an os-release file (os-release(5));
    comments, blank and malformed lines are skipped, never an error."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.strip().partition("=")
        if sep and _OS_KEY.fullmatch(key):
            values[key] = _os_value(raw)
    return values


def guest_os(text: str) -> str:
    """The guest's distribution and release from its os-release text:
    ``ID VERSION_ID`` ("debian 12"), else PRETTY_NAME, else ID; for a
    busybox banner ("BusyBox v1.36.1 (...) multi-call binary.") "busybox
    1.36.1"; ``""`` for nothing or garbage."""
    values = parse_os_release(text)
    os_id = values.get("ID", "").lower()
    release = values.get("VERSION_ID", "")
    if os_id and release:
        found = f"{os_id} {release}"
    else:
        found = values.get("PRETTY_NAME", "") or os_id
    if not found:
        m = _BUSYBOX.search(text)
        found = f"busybox {m.group(1)}" if m else ""
    return found[:MAX_GUEST_OS]


def split_guest_facts(stdout: str) -> tuple[str, str]:
    """``(uname, guest_os)`` from what :data:`GUEST_FACTS_COMMAND` printed:
    its first line is ``uname -a``, the rest the os-release."""
    uname, _, rest = stdout.strip().partition("\n")
    return uname.strip(), guest_os(rest)


def collect(**known: Any) -> Facts:
    """Facts about this host and txvmbot, plus what the check learnt."""
    from txvmbot import __version__

    base = Facts(
        host_kernel=host_kernel(),
        txvmbot_version=__version__,
        twisted_version=_version("twisted"),
        botocore_version=_version("botocore"),
    )
    return attrs.evolve(base, **known)
