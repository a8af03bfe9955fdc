"""The daemon's SQLite files in its data dir, and the check for damage that
every start and ``txvmbot doctor`` run on them.

A damaged file found at start stops the start (the daemon would otherwise
say "ready" and meet the damage in the middle of a recovery), with a
message that names the file, quotes SQLite, and says how to move the file
aside and what is lost by that. The check is SQLite's ``PRAGMA
quick_check`` (:func:`txvmbot._sqlite.quick_check`), read-only: the file is
left as it was found, for whoever wants to salvage it.

With a shared PostgreSQL store the daemon keeps no SQLite files: the job
store and the journal are in the database.
"""

from __future__ import annotations

import os
import shlex
import sqlite3
import time

from attrs import frozen

from txvmbot._sqlite import quick_check
from txvmbot.errors import TxvmbotError

__all__ = ["JOB_STORE", "JOURNAL", "DamagedFile", "DataFile", "DataFileError", "sqlite_files"]


class DataFileError(TxvmbotError):
    """A file in the data dir cannot be checked (it cannot be read)."""


class DamagedFile(DataFileError):
    """A file in the data dir is damaged: SQLite refuses it or its
    ``quick_check`` is not "ok".

    ``what`` and ``path`` name it, ``said`` is what SQLite said, ``command``
    the shell command that moves it (and its -wal and -shm files) aside,
    ``lost`` what is lost if one does.
    """

    def __init__(self, what: str, path: str, said: str, command: str, lost: str) -> None:
        super().__init__(
            f"{what} {path} is damaged (SQLite: {said}); move it aside with: {command} ; "
            f"the daemon then starts with a new, empty {what}, and loses {lost}"
        )
        self.what = what
        self.path = path
        self.said = said
        self.command = command
        self.lost = lost


def move_aside(path: str, stamp: str) -> str:
    """The shell command that renames ``path`` to ``PATH.damaged-STAMP``,
    and its -wal and -shm files, where there are any, so that SQLite still
    reads them as one database (``sqlite3 PATH.damaged-STAMP .recover``)."""
    moves = [f"mv {shlex.quote(path)} {shlex.quote(f'{path}.damaged-{stamp}')}"]
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            moves.append(
                f"mv {shlex.quote(path + suffix)} {shlex.quote(f'{path}.damaged-{stamp}{suffix}')}"
            )
    return " && ".join(moves)


@frozen
class DataFile:
    """One SQLite file of the daemon's, named ``name`` in the data dir.

    :param what: the file in messages: ``"job store"``, ``"journal"``.
    :param lost: what is lost when it is moved aside (after "loses ").
    """

    name: str
    what: str
    lost: str

    def path(self, data_dir: str) -> str:
        return os.path.join(data_dir, self.name)

    def check(self, data_dir: str, now: float | None = None) -> None:
        """Raise :class:`DamagedFile` if the file is damaged,
        :class:`DataFileError` if it cannot be read. A missing or empty
        file passes (the daemon creates it). ``now`` (epoch seconds, UTC)
        stamps the name to move it aside to."""
        path = self.path(data_dir)
        try:
            said = quick_check(path)
        except (OSError, sqlite3.Error) as e:
            raise DataFileError(f"{self.what} {path} cannot be checked: {e}") from e
        if said is None:
            return
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
        raise DamagedFile(self.what, path, said, move_aside(path, stamp), self.lost)


JOB_STORE = DataFile(
    "jobs.sqlite",
    "job store",
    lost="the job history (every job, its events and results; clients must submit "
    "the jobs that were still queued or running again)",
)

JOURNAL = DataFile(
    "journal.sqlite",
    "journal",
    lost="the record of the cloud resources that unfinished checks created, which "
    "cleanup at start works from; `txvmbot reap` still finds those resources in the "
    "cloud by their txvmbot tags",
)


def sqlite_files(shared: bool) -> tuple[DataFile, ...]:
    """The SQLite files a daemon opens in its data dir: none with a shared
    store (PostgreSQL holds its jobs and journal)."""
    return () if shared else (JOB_STORE, JOURNAL)
