"""What the cleanup journal and the daemon's job store share: opening an
SQLite file of one kind, making sure it is that kind, and migrating its
schema.

Private: :mod:`txvmbot.journal` and :mod:`txvmbot.daemon.stores.sqlite.store` are the API.
Each describes its file once as a :class:`FileKind`; what differs between
them (the schema, the durability trade-off, how writes are done) stays
there.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from typing import Literal

from attrs import frozen
from twisted.logger import Logger

__all__ = ["FileKind", "Migration", "quick_check"]

#: Takes a database at schema version ``i`` to ``i + 1``, inside the caller's
#: transaction.
Migration = Callable[[sqlite3.Connection], None]


#: How many of ``PRAGMA quick_check``'s complaints a message quotes.
_SHOWN = 3

#: Bytes per read when a file is read through before its check.
_CHUNK = 1 << 20


def _is_damage(e: sqlite3.Error) -> bool:
    """Whether SQLite refused to read the file because of its contents:
    ``SQLITE_CORRUPT`` ("database disk image is malformed") or
    ``SQLITE_NOTADB`` ("file is not a database"), by result code."""
    name = getattr(e, "sqlite_errorname", "")
    return isinstance(name, str) and (name.startswith("SQLITE_CORRUPT") or name == "SQLITE_NOTADB")


def _read_through(path: str, size: int) -> None:
    """Read ``size`` bytes of ``path`` in order, into the page cache."""
    with open(path, "rb", buffering=0) as f:
        for _ in range(size // _CHUNK + 1):
            if not f.read(_CHUNK):
                break


def quick_check(path: str, *, busy_timeout: float = 5.0) -> str | None:
    """What SQLite finds wrong with the database file at ``path``, in its
    own words; None when ``PRAGMA quick_check`` says "ok".

    A missing or empty file is sound: opening it creates the schema. The
    file is opened read-only, so a damaged one is left as it was found (a
    read-write connection would checkpoint its WAL into it on close); a
    running daemon's file may be checked, WAL readers do not block its
    writes. quick_check reads every page and checks each b-tree's
    structure, but not that indexes match their tables
    (``integrity_check`` does, at several times the cost).

    The file is read through in order first: quick_check walks the
    b-trees a 4 KiB page at a time, out of file order, which on a cold
    cache waits on the disk for each page. bench/store_check.py, 100,000
    jobs with 30 events each (590 MiB, build machine): 10-14 s cold
    without the read-through, 1.6 s with it, 1.5 s warm. Not mmap, which
    is about as fast: a bad sector would kill the process with SIGBUS
    instead of being reported.

    Raises OSError or sqlite3.Error when the file cannot be read for
    another reason (no permission, a lock held longer than
    ``busy_timeout`` seconds).
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    try:
        _read_through(path, size)
    except OSError as e:
        if e.errno == errno.EIO:
            return f"cannot be read: {e.strerror}"
        raise
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as e:
        if _is_damage(e):
            return str(e)
        raise
    try:
        rows = [str(r[0]) for r in conn.execute(f"PRAGMA quick_check({_SHOWN + 1})")]
    except sqlite3.Error as e:
        # A page SQLite cannot even walk (a garbage header, a truncated
        # file) fails the PRAGMA itself.
        if _is_damage(e):
            return str(e)
        raise
    finally:
        conn.close()
    if rows == ["ok"]:
        return None
    # The first row starts with a "*** in database main ***" line.
    lines = [ln for r in rows for ln in r.splitlines() if ln and not ln.startswith("***")]
    said = "; ".join(lines[:_SHOWN]) or "; ".join(rows)
    return said + ("; ..." if len(lines) > _SHOWN else "")


def _user_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {r[0] for r in rows}


@frozen
class FileKind:
    """One kind of txvmbot SQLite file.

    :param what: the file's name in messages: ``"journal"``, ``"job store"``.
    :param application_id: the ``PRAGMA application_id`` that marks a file as
        this kind; the first migration sets it.
    :param migrations: ``migrations[i]`` takes schema version ``i`` to
        ``i + 1``; the first creates the ``schema_version`` table.
    :param error: makes the exception to raise from the path and a message
        (the module's own :class:`~txvmbot.errors.TxvmbotError`).
    """

    what: str
    application_id: int
    migrations: tuple[Migration, ...]
    error: Callable[[str, str], Exception]

    @property
    def version(self) -> int:
        """The schema version this code writes."""
        return len(self.migrations)

    def found_version(self, conn: sqlite3.Connection, path: str) -> int:
        """The schema version of the database, 0 if it is empty.

        Raises :attr:`error` if the file holds something that is not this
        kind of file, or a newer schema than this code understands.
        """
        tables = _user_tables(conn)
        if not tables:
            return 0
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        if "schema_version" not in tables or app_id != self.application_id:
            raise self.error(
                path,
                f"is an SQLite database but not a txvmbot {self.what} "
                f"(tables: {', '.join(sorted(tables))}); point the {self.what} at a new file",
            )
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        if row is None or not isinstance(row[0], int):
            raise self.error(path, "has no schema version; the file is damaged")
        found = int(row[0])
        if found > self.version:
            raise self.error(
                path,
                f"has schema version {found} but this txvmbot understands up to "
                f"{self.version}; upgrade txvmbot or use another {self.what} file",
            )
        return found

    def migrate(self, conn: sqlite3.Connection, path: str) -> int:
        """Bring the database in ``conn`` up to :attr:`version`.

        Runs in one ``BEGIN IMMEDIATE`` transaction, so a crash half-way
        leaves the old version and two processes opening a new file at once
        create the schema once. Returns the version found before migrating.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self.found_version(conn, path)
            for version in range(found, self.version):
                self.migrations[version](conn)
                conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return found

    def open(
        self,
        path: str,
        *,
        busy_timeout: float,
        synchronous: Literal["NORMAL", "FULL"],
        log: Logger,
        memory_ok: bool = False,
    ) -> sqlite3.Connection:
        """Open ``path`` in autocommit mode, WAL and ``synchronous``, migrated
        to :attr:`version`; create the file with its schema if it is missing
        or empty, and log when the schema changed.

        ``busy_timeout`` is in seconds. With ``memory_ok``, ``":memory:"``
        (which cannot use WAL) is allowed. Raises :attr:`error` naming the
        path when the file cannot be opened, is not this kind of file, has a
        newer schema or cannot use WAL; ValueError for a bad ``synchronous``.
        """
        # Checked here, next to the PRAGMA it is pasted into.
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        try:
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise self.error(path, f"cannot be opened: {e}") from e
        try:
            found = self._prepare(conn, path, busy_timeout, synchronous, memory_ok)
        except BaseException:
            conn.close()
            raise
        if found != self.version:
            log.info(
                "{what} {path} migrated from schema {found} to {version}",
                what=self.what.capitalize(),
                path=path,
                found=found,
                version=self.version,
            )
        return conn

    def _prepare(
        self,
        conn: sqlite3.Connection,
        path: str,
        busy_timeout: float,
        synchronous: str,
        memory_ok: bool,
    ) -> int:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # Look before writing anything: never turn someone else's file
            # into WAL mode or add tables to it.
            self.found_version(conn, path)
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal" and not (memory_ok and path == ":memory:"):
                raise self.error(
                    path,
                    f"cannot use write-ahead logging (journal_mode is {mode!r}); "
                    f"put the {self.what} on a local filesystem",
                )
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            return self.migrate(conn, path)
        except sqlite3.Error as e:
            raise self.error(path, f"cannot be opened as a {self.what}: {e}") from e
