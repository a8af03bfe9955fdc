"""Environment facts recorded with every result (seeds 000 and 003: the host
kernel decided pass or fail, and nobody had written it down)."""

from __future__ import annotations

import functools
import platform
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
