"""The real daemon with its data dir on a small tmpfs that fills up while
jobs run (seed 003: a full disk on the test host). Nothing is stuck: the
jobs that ran end, their final states reach the job store once there is
room, submits are refused with the reason meanwhile and taken again after.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time

import pytest

from tests.support import checkrun
from tests.support import real_daemon as D
from tests.support.daemon_jobs import fresh_moto, image, job_args
from tests.support.servers import Moto

__all__ = ["fresh_moto", "image"]  # fixtures, used by name

FINAL = ("passed", "failed", "cancelled", "error")


def mount_tmpfs(path: str, size: str) -> None:
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the data dir ({p.stderr.strip()}): needs root")


def umount(path: str) -> None:
    subprocess.run(["umount", "-l", path], capture_output=True, timeout=30)


def fill(path: str) -> str:
    """Write a file in ``path`` until the file system is full; its path."""
    filler = os.path.join(path, "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            for _ in range(100_000):
                try:
                    os.write(fd, b"\0" * size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return filler


def stored_states(data: str) -> dict[str, str]:
    conn = sqlite3.connect(os.path.join(data, "jobs.sqlite"))
    try:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        conn.close()


def test_a_full_data_dir_holds_writes_refuses_submits_and_recovers(
    fresh_moto: Moto, image: str, tmp_path: object
) -> None:
    moto = fresh_moto
    data = os.path.join(str(tmp_path), "data")
    mount_tmpfs(data, "16m")
    try:
        config = os.path.join(str(tmp_path), "txvmbot.toml")
        with open(config, "w") as f:
            f.write("[daemon]\nmin_free_mb = 1\n")
        closed = "tcp:host=127.0.0.1:port=9"  # nothing listens: ssh waits out its bound
        key, _ = checkrun.ssh_keypair(str(tmp_path))
        with D.daemon(data, ["--workers", "3", "--config", config]) as d:
            for _ in range(3):
                p = d.client(
                    "submit", *job_args(moto, image), "--ssh", "--ssh-key", key,
                    "--ssh-endpoint", closed, "--timeout-ssh", "8", "--max-attempts", "1",
                )
                assert p.returncode == 0, p.stderr
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                jobs = d.client_json("jobs")
                if len(jobs) == 3 and all(j["state"] == "running" for j in jobs):
                    break
                time.sleep(0.2)
            assert all(j["state"] == "running" for j in jobs), jobs
            ids = sorted(j["id"] for j in jobs)

            filler = fill(data)
            # The jobs' ssh waits run out now, with no room to record it.
            refused = d.client("submit", *job_args(moto, image))
            assert refused.returncode != 0
            assert "new jobs are refused" in refused.stderr, refused.stderr
            assert f"data dir {data}" in refused.stderr and "0.0 MB free" in refused.stderr
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = d.client_json("status")
                if status["writes_held"]:
                    break
                time.sleep(0.5)
            assert "database or disk is full" in status["writes_held"], status
            assert status["refusing"] and status["data_dir"] == data
            refused = d.client("submit", *job_args(moto, image))
            assert "cannot write to its data dir" in refused.stderr, refused.stderr

            os.unlink(filler)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                jobs = d.client_json("jobs")
                status = d.client_json("status")
                if all(j["state"] in FINAL for j in jobs) and not status["writes_held"]:
                    break
                time.sleep(0.5)
            assert sorted(j["id"] for j in jobs) == ids
            assert all(j["state"] == "failed" for j in jobs), jobs
            assert (status["writes_held"], status["refusing"]) == ("", ""), status
            assert stored_states(data) == {i: "failed" for i in ids}
            again = d.client("submit", "--wait", *job_args(moto, image))
            assert again.returncode == 0, again.stderr
            log = d.log()
        assert log.count("Its writes are held") >= 1
        assert "takes writes again" in log
        assert "Bug while" not in log
        assert "only writer" not in log
        states = stored_states(data)
        assert len(states) == 4 and all(s in FINAL for s in states.values()), states
    finally:
        umount(data)
    assert checkrun.leftovers(moto.url) == []
