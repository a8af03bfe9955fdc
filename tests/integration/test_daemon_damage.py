"""A start that fails is a failure (issue 16): the real ``twistd -n
txvmbot`` on a data dir with a damaged job store or journal exits 1, with
one line on stderr that says which file, what SQLite said, how to move it
aside and what that loses; moved aside as it says, the daemon starts."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.support import checkrun, damage
from tests.support import real_daemon as D


def start_and_wait(data_dir: str, *args: str) -> tuple[int, str, str]:
    """``twistd -n txvmbot --data-dir DATA_DIR``, waited for (60 s at most,
    then stopped by its pid): exit status, log (stdout), stderr."""
    proc = subprocess.Popen(
        [D.TWISTD, "-n", "--pidfile=", "--logfile=-", "txvmbot", "--data-dir", data_dir,
         "--workers", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=checkrun.env(), cwd="/",
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        D.stop(proc)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


CASES: list[tuple[str, str, Callable[[str], None], Callable[[str], None]]] = [
    # The three the issue found: 4 KiB of random bytes inside the journal
    # (the daemon said "ready"), a truncated job store and a journal with a
    # garbage header (both exited 0).
    ("journal", "journal.sqlite", damage.make_journal, damage.scribble),
    ("job store", "jobs.sqlite", damage.make_store, damage.truncate_half),
    ("journal", "journal.sqlite", damage.make_journal, damage.garbage_header),
]


@pytest.mark.parametrize(("what", "name", "make", "spoil"), CASES,
                         ids=["journal-block", "store-truncated", "journal-header"])
def test_damaged_file_stops_the_start_with_what_to_do(
    tmp_path: object,
    what: str,
    name: str,
    make: Callable[[str], None],
    spoil: Callable[[str], None],
) -> None:
    data_dir = os.path.join(str(tmp_path), "data")
    os.makedirs(data_dir, mode=0o700)
    path = os.path.join(data_dir, name)
    make(path)
    spoil(path)
    before = damage.read(path)

    code, log, err = start_and_wait(data_dir)

    assert code == 1, (code, log, err)
    line = err.splitlines()[0]
    assert line.startswith(f"txvmbot: cannot start: {what} {path} is damaged (SQLite: "), err
    assert f"move it aside with: mv {path} {path}.damaged-" in line
    lost = "txvmbot reap" if what == "journal" else "the job history"
    assert lost in line
    # The traceback is in the log, after the line; nothing was started and
    # the file is as it was found.
    assert "txvmbot daemon failed to start" in log and "Traceback" in log, log
    assert "Worker w1 started" not in log and "daemon ready" not in log, log
    assert damage.read(path) == before

    # Do what it says, and the daemon starts on a new, empty file.
    command = line.split("move it aside with: ", 1)[1].split(" ; ", 1)[0]
    subprocess.run(["sh", "-c", command], check=True, timeout=30)
    assert not os.path.exists(path)
    assert any(n.startswith(f"{name}.damaged-") for n in os.listdir(data_dir))
    with D.daemon(data_dir, ["--workers", "1"]) as d:
        assert "txvmbot daemon ready" in wait_for(d, "txvmbot daemon ready")


def wait_for(d: D.Daemon, text: str, timeout: float = 30) -> str:
    """The daemon's log once it holds ``text`` (or after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    log = d.log()
    while text not in log and time.monotonic() < deadline:
        time.sleep(0.05)
        log = d.log()
    return log


def test_clean_data_dir_starts(tmp_path: object) -> None:
    data_dir = os.path.join(str(tmp_path), "data")
    os.makedirs(data_dir, mode=0o700)
    damage.make_store(os.path.join(data_dir, "jobs.sqlite"))
    damage.make_journal(os.path.join(data_dir, "journal.sqlite"))
    with D.daemon(data_dir, ["--workers", "1"]) as d:
        assert "txvmbot daemon ready" in wait_for(d, "txvmbot daemon ready")
        status = d.client_json("status")
        assert status["workers"] == 1, status


def test_config_problem_at_start_exits_1_with_the_reason(tmp_path: object) -> None:
    """A data dir that cannot be made (a file is in the way): status 1 and
    the ConfigError, key and reason, as the line."""
    blocker = os.path.join(str(tmp_path), "a-file")
    open(blocker, "w").close()
    data_dir = os.path.join(blocker, "data")
    code, log, err = start_and_wait(data_dir)
    assert code == 1, (code, log, err)
    assert err.splitlines()[0] == (
        f"txvmbot: cannot start: daemon.data_dir: cannot create {data_dir}: Not a directory"
    ), err
    assert "txvmbot daemon failed to start" in log, log
