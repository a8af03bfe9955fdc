"""What an SQLite error means for the daemon: a lock held by another
process, a fault of the host (a full disk, an I/O error, a read-only file
system) that may pass, or anything else (a bug, a damaged file).

Private to :mod:`txvmbot.journal`, :mod:`txvmbot.daemon.stores.sqlite.store` and
:mod:`txvmbot.daemon.stores.sqlite.held`. Reads the primary result code that Python 3.11
puts on every :class:`sqlite3.Error` (``sqlite_errorname``), never the
message text.
"""

from __future__ import annotations

import sqlite3

__all__ = ["host_fault", "is_lock_timeout", "sqlite_cause"]

#: Another connection holds the lock past the busy timeout.
_LOCK = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})

#: Faults of the host that a later write may get past once an operator
#: (or time) fixes them: nothing is wrong with the statement or the data.
_HOST = frozenset({"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"})


def _primary(e: BaseException) -> str:
    """``SQLITE_IOERR`` for ``SQLITE_IOERR_WRITE`` and the like."""
    name = getattr(e, "sqlite_errorname", None)
    if not isinstance(name, str):
        return ""
    parts = name.split("_")
    return "_".join(parts[:2])


def sqlite_cause(e: BaseException) -> sqlite3.Error | None:
    """The sqlite3 error ``e`` is or was raised from, if any."""
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 8:
        if isinstance(cause, sqlite3.Error):
            return cause
        cause = cause.__cause__
        seen += 1
    return None


def is_lock_timeout(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is SQLite's lock timeout:
    another connection held the write lock for longer than the busy
    timeout."""
    cause = sqlite_cause(e)
    return cause is not None and _primary(cause) in _LOCK


def host_fault(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) is a fault of the host
    that a retry may get past: the disk full, an I/O error, a read-only file
    system, a file that cannot be opened, or a lock held too long."""
    cause = sqlite_cause(e)
    return cause is not None and _primary(cause) in (_HOST | _LOCK)
