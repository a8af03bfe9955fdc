"""The damage check of the daemon's SQLite files (txvmbot.daemon.stores.sqlite.datafiles
and txvmbot._sqlite.quick_check) on real files damaged as a host damages
them, and the one line a failed start prints (txvmbot.tap)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable

import pytest

from tests.support import damage
from txvmbot._sqlite import quick_check
from txvmbot.daemon.stores.sqlite.datafiles import (
    JOB_STORE,
    JOURNAL,
    DamagedFile,
    DataFile,
    DataFileError,
    move_aside,
    sqlite_files,
)
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.errors import ConfigError
from txvmbot.journal import SQLiteJournal
from txvmbot.tap import cannot_start_line

#: 2026-12-06T23:44:00Z
NOW = 1796600640.0
STAMP = "20261206T234400"


def _made(data_dir: str, data_file: DataFile) -> str:
    path = data_file.path(data_dir)
    (damage.make_store if data_file is JOB_STORE else damage.make_journal)(path)
    return path


def test_sound_missing_and_empty_files_pass(tmp_path: object) -> None:
    d = str(tmp_path)
    assert quick_check(os.path.join(d, "nothing.sqlite")) is None
    open(os.path.join(d, "empty.sqlite"), "wb").close()
    assert quick_check(os.path.join(d, "empty.sqlite")) is None
    for data_file in (JOB_STORE, JOURNAL):
        _made(d, data_file)
        data_file.check(d, NOW)


DAMAGE: dict[str, Callable[[str], None]] = {
    "a random block inside": damage.scribble,
    "truncated": damage.truncate_half,
    "a garbage header": damage.garbage_header,
}


@pytest.mark.parametrize("data_file", [JOB_STORE, JOURNAL], ids=["store", "journal"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damage_is_found_and_named_and_the_file_left_alone(
    tmp_path: object, data_file: DataFile, how: str
) -> None:
    d = str(tmp_path)
    path = _made(d, data_file)
    DAMAGE[how](path)
    before = damage.read(path)
    with pytest.raises(DamagedFile) as caught:
        data_file.check(d, NOW)
    e = caught.value
    assert (e.what, e.path) == (data_file.what, path)
    assert e.said and "\n" not in str(e), str(e)
    if how == "a garbage header":
        assert e.said == "file is not a database"
    assert str(e).startswith(f"{data_file.what} {path} is damaged (SQLite: {e.said}); ")
    assert f"move it aside with: mv {path} {path}.damaged-{STAMP}" in str(e)
    assert e.lost in str(e)
    # Read-only: the damage is there for whoever wants to salvage the file.
    assert damage.read(path) == before


def test_what_is_lost_is_said_per_file(tmp_path: object) -> None:
    assert "job history" in JOB_STORE.lost
    assert "txvmbot reap" in JOURNAL.lost and "tags" in JOURNAL.lost


def test_the_journal_damaged_inside_as_the_issue_found_it(tmp_path: object) -> None:
    """4 KiB of random bytes over page 3 (dd ... seek=2): SQLite opens it
    and the daemon used to say "ready"; quick_check names the page."""
    path = _made(str(tmp_path), JOURNAL)
    damage.scribble(path, page=3)
    said = quick_check(path)
    assert said is not None and "Page 3" in said, said


def test_the_move_command_works_and_keeps_the_wal_with_its_file(tmp_path: object) -> None:
    """Run as printed: the file, its -wal and -shm go aside under names
    SQLite still pairs, and the data dir starts over with a new file."""
    d = str(tmp_path)
    path = _made(d, JOURNAL)
    damage.garbage_header(path)
    # A daemon killed with its WAL not yet checkpointed leaves these.
    for suffix in ("-wal", "-shm"):
        with open(path + suffix, "wb") as f:
            f.write(b"x" * 100)
    with pytest.raises(DamagedFile) as caught:
        JOURNAL.check(d, NOW)
    command = caught.value.command
    assert command == move_aside(path, STAMP)
    assert command.count("mv ") == 3
    subprocess.run(["sh", "-c", command], check=True, timeout=30)
    assert sorted(os.listdir(d)) == [
        f"journal.sqlite.damaged-{STAMP}",
        f"journal.sqlite.damaged-{STAMP}-shm",
        f"journal.sqlite.damaged-{STAMP}-wal",
    ]
    JOURNAL.check(d, NOW)
    SQLiteJournal(path).close()


def test_move_command_quotes_paths(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "my data", "jobs.sqlite")
    assert move_aside(path, STAMP) == f"mv '{path}' '{path}.damaged-{STAMP}'"


def test_a_sound_store_opened_after_its_check_still_works(tmp_path: object) -> None:
    d = str(tmp_path)
    path = _made(d, JOB_STORE)
    JOB_STORE.check(d, NOW)
    store = SQLiteJobStore(path)
    try:
        assert store.get("job-7") is not None
    finally:
        store.close()


def test_a_file_that_cannot_be_read_is_not_called_damaged(tmp_path: object) -> None:
    d = str(tmp_path)
    os.mkdir(JOB_STORE.path(d))
    with pytest.raises(DataFileError) as caught:
        JOB_STORE.check(d, NOW)
    assert not isinstance(caught.value, DamagedFile)
    assert str(caught.value).startswith(f"job store {JOB_STORE.path(d)} cannot be checked: ")


def test_a_shared_store_daemon_keeps_no_sqlite_files() -> None:
    assert sqlite_files(shared=True) == ()
    assert sqlite_files(shared=False) == (JOB_STORE, JOURNAL)


def test_the_line_a_failed_start_prints() -> None:
    e = DamagedFile("journal", "/x/journal.sqlite", "file is not a database", "mv a b", "it all")
    assert cannot_start_line(e) == f"txvmbot: cannot start: {e}"
    assert cannot_start_line(ConfigError("daemon.data_dir", "/x is not writable")) == (
        "txvmbot: cannot start: daemon.data_dir: /x is not writable"
    )
    assert cannot_start_line(KeyError("w1")) == "txvmbot: cannot start: KeyError: 'w1'"
