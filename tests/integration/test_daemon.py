"""The daemon end to end: ``twistd -n txvmbot`` and the ``txvmbot`` client
commands, as real processes, against moto on loopback."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.support import checkrun, paths
from tests.support import real_daemon as D
from tests.support.daemon_jobs import fresh_moto, image, job_args
from tests.support.servers import Moto

ROOT = paths.ROOT

__all__ = ["fresh_moto", "image"]  # fixtures, used by name


def test_embedded_default_runs_a_submitted_job_to_a_pass(
    moto: Moto, image: str, tmp_path: object
) -> None:
    """No --data-dir, no --config: the daemon and the client agree on the
    socket in the state dir by themselves."""
    state = os.path.join(str(tmp_path), "state")
    env = dict(checkrun.env(), XDG_STATE_HOME=state)
    log_path = os.path.join(str(tmp_path), "twistd.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([D.TWISTD, "-n", "--pidfile=", "--logfile=-", "txvmbot"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))
    try:
        sock = os.path.join(state, "txvmbot", "txvmbot.sock")
        D.wait_for_socket(sock, proc, log_path)
        assert oct(os.stat(sock).st_mode & 0o777) == oct(0o600)
        p = subprocess.run(checkrun.txvmbot_cmd("submit", "--wait", *job_args(moto, image)),
                           capture_output=True, text=True, timeout=180, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "passed" in (p.stdout + p.stderr).lower()
    finally:
        D.stop(proc)
    # twistd shuts down cleanly, then re-raises the SIGTERM it was sent so
    # that its exit status says why it stopped.
    with open(log_path) as f:
        log = f.read()
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Server Shut Down." in log and "Traceback" not in log, log


def test_worker_killed_mid_job_is_an_error_event_and_nothing_leaks(
    fresh_moto: Moto, image: str, tmp_path: object
) -> None:
    moto = fresh_moto
    data = os.path.join(str(tmp_path), "data")
    closed = "tcp:host=127.0.0.1:port=9"  # discard port: nothing listens, refused at once
    with D.daemon(data, ["--workers", "1"]) as d:
        key, _ = checkrun.ssh_keypair(str(tmp_path))
        p = d.client("submit", *job_args(moto, image), "--ssh", "--ssh-key", key,
                     "--ssh-endpoint", closed, "--timeout-ssh", "60", "--max-attempts", "1")
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not checkrun.leftovers(moto.url):
            time.sleep(0.2)
        workers = D.worker_pids(d.pid)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 90
        jobs: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            jobs = d.client_json("jobs")
            if jobs and all(j["state"] in ("passed", "failed", "cancelled", "error") for j in jobs):
                break
            time.sleep(0.5)
        assert jobs and jobs[0]["state"] == "error", jobs
        assert "signal 9" in str(jobs[0]["reason"]) or "SIGKILL" in str(jobs[0]["reason"])
        log = d.log()
        assert "[txvmbot" in log and "#error]" in log and "died" in log
    assert checkrun.leftovers(moto.url) == []


def test_daemon_killed_while_jobs_run_then_restarted(
    fresh_moto: Moto, image: str, tmp_path: object
) -> None:
    """Every job reaches a final state after the restart, and moto holds
    nothing the jobs created."""
    moto = fresh_moto
    data = os.path.join(str(tmp_path), "data")
    os.makedirs(data)
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    closed = "tcp:host=127.0.0.1:port=9"
    proc, d = D.start(data, ["--workers", "2"])
    try:
        ids = []
        for _ in range(4):
            p = d.client("submit", *job_args(moto, image), "--ssh", "--ssh-key", key,
                         "--ssh-endpoint", closed, "--timeout-ssh", "8", "--json", "-")
            assert p.returncode == 0, p.stderr
            ids.append(p.stdout)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(checkrun.leftovers(moto.url)) < 2:
            time.sleep(0.2)
        assert checkrun.leftovers(moto.url)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # The workers die with their parent's pipes; give them a moment.
    time.sleep(1)
    proc, d = D.start(data, ["--workers", "2"], log_name="twistd2.log")
    try:
        deadline = time.monotonic() + 180
        jobs: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            jobs = d.client_json("jobs")
            if len(jobs) == 4 and all(j["state"] in ("passed", "failed", "cancelled", "error") for j in jobs):
                break
            time.sleep(0.5)
        assert len(jobs) == 4 and all(j["state"] in ("passed", "failed", "cancelled", "error") for j in jobs), jobs
        assert any("daemon restarted" in str(j.get("reason", "")) for j in jobs) or all(
            j["state"] == "failed" for j in jobs
        )
    finally:
        D.stop(proc)
    assert checkrun.leftovers(moto.url) == []


@pytest.mark.timeout(900)
def test_two_hundred_jobs_on_four_workers_never_leave_a_worker_idle(
    fresh_moto: Moto, tmp_path: object
) -> None:
    # A fresh moto: it keeps terminated instances, and its tag filters slow
    # down with every one of them (hundreds by this point of a full run).
    moto = fresh_moto
    image = sorted(
        i["ImageId"] for i in checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    )[0]
    data = os.path.join(str(tmp_path), "data")
    with D.daemon(data, ["--workers", "4"]) as d:
        # "At once": the backend is drained while the 200 are submitted,
        # then resumed, so all 200 queue before the first one starts.
        backend = f"{moto.url} {checkrun.REGION}"
        p = d.client("drain", backend)
        assert p.returncode == 0, p.stderr
        script = (
            "from twisted.internet import task\n"
            "from twisted.internet.defer import ensureDeferred, gatherResults\n"
            "from txvmbot.daemon.api.client import connect\n"
            f"doc = {{'endpoint': {moto.url!r}, 'region': 'us-east-1', 'image': {image!r},\n"
            "       'ssh': False, 'timeouts': {'poll_interval': 0.2, 'poll_max_interval': 0.5}}\n"
            "async def main(reactor):\n"
            f"    client = await connect(reactor, {d.connect!r})\n"
            "    jobs = await gatherResults([client.submit(doc) for _ in range(200)])\n"
            "    assert len({j.id for j in jobs}) == 200\n"
            "    client.close()\n"
            "task.react(lambda r: ensureDeferred(main(r)))\n"
        )
        p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=120,
                           capture_output=True, text=True, env=checkrun.env())
        assert p.returncode == 0, p.stderr
        p = d.client("resume", backend)
        assert p.returncode == 0, p.stderr
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = d.client_json("status")
            if status["queue_depth"] == 0 and status["running"] == 0:
                break
            time.sleep(1)
        # All 200, read from the daemon's store (read-only): a `jobs` answer
        # holds only what fits in one AMP value.
        db = sqlite3.connect(f"file:{os.path.join(data, 'jobs.sqlite')}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT state, started, finished FROM jobs").fetchall()
        finally:
            db.close()
        assert len(rows) == 200
        assert [r[0] for r in rows] == ["passed"] * 200, [r[0] for r in rows if r[0] != "passed"]
        jobs = [{"started": r[1], "finished": r[2]} for r in rows]
    # No idle worker while jobs queued: once the first four are running,
    # every later job starts as soon as some job ends.
    starts = sorted(float(j["started"]) for j in jobs)  # type: ignore[arg-type]
    ends = sorted(float(j["finished"]) for j in jobs)  # type: ignore[arg-type]
    slack = 0.5
    for k in range(4, 200):
        # The k-th start may not come later than the (k-3)-th end (4 slots).
        assert starts[k] <= ends[k - 4] + slack, (k, starts[k], ends[k - 4])


def test_a_pool_without_a_usable_image_is_drained_at_start(tmp_path: object) -> None:
    """The base image is checked when a pool starts; a pool that has none
    waits for an operator (drained, the reason in the log) instead of
    failing every job, and the daemon serves the rest."""
    data = os.path.join(str(tmp_path), "data")
    config = os.path.join(str(tmp_path), "txvmbot.toml")
    with open(config, "w") as f:
        f.write(
            "[pools.broken]\n"
            f"image_dir = {os.path.join(str(tmp_path), 'no-image')!r}\n"
            f"run_dir = {os.path.join(str(tmp_path), 'vms')!r}\n"
        )
    with D.daemon(data, ["--config", config]) as d:
        status = d.client_json("status")
        (broken,) = [b for b in status["backends"] if b["name"] == "broken"]
        assert broken["state"] == "draining", broken
        log = d.log()
        assert "Local pool broken is drained" in log and "no-image" in log, log


def test_sigterm_while_workers_start_stops_cleanly(tmp_path: object) -> None:
    """SIGTERM before the daemon is ready (its workers still starting): it
    stops within its bound, says start-up was interrupted rather than that
    it failed, starts no replacement worker, and leaves no process."""
    data = os.path.join(str(tmp_path), "data")
    os.makedirs(data)
    log_path = os.path.join(str(tmp_path), "twistd.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [D.TWISTD, "-n", "--pidfile=", "--logfile=-", "txvmbot", "--data-dir", data,
             "--workers", "6"],
            stdout=log, stderr=subprocess.STDOUT, env=checkrun.env(), cwd=data,
        )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "Worker w1 started" not in text and time.monotonic() < deadline:
            assert proc.poll() is None, text
            time.sleep(0.05)
            with open(log_path, errors="replace") as f:
                text = f.read()
        assert "Worker w1 started" in text, text
        # twistd installs its SIGTERM handler once the reactor's startup
        # triggers ran, which may be after the first worker said hello:
        # a SIGTERM before that kills it unhandled.
        while not _catches(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _catches(proc.pid, signal.SIGTERM), "twistd never installed its SIGTERM handler"
        with open(log_path, errors="replace") as f:
            text = f.read()
        assert "txvmbot daemon ready" not in text  # still starting
        workers = D.worker_pids(proc.pid)
        assert workers
        os.kill(proc.pid, signal.SIGTERM)
        # twistd exits by re-raising the signal that stopped it.
        assert proc.wait(60) == -signal.SIGTERM
    finally:
        D.stop(proc)
    with open(log_path, errors="replace") as f:
        text = f.read()
    assert "start-up interrupted" in text, text
    assert "failed to start" not in text and "Traceback" not in text, text
    assert "Worker w7 started" not in text, text  # six workers, none replaced
    assert "txvmbot daemon stopped" in text, text
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"worker {pid} left running"


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
