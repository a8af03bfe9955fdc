"""Several real daemons on one real PostgreSQL (issue 9), against moto and
QEMU on loopback: any daemon serves any client, claims hold caps across
daemons, a SIGKILLed daemon's jobs are taken over, a database restart
loses nothing."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.support import checkrun
from tests.support import real_daemon as D
from tests.support.pgserver import PostgresServer
from tests.support.servers import Moto, moto_server
from tests.support.shared_cluster import Member, cluster, query, submit_script, wait_until_final

FINAL = ("passed", "failed", "cancelled", "error")
LEASE = 6.0


@pytest.fixture
def fresh_moto(moto: Moto) -> Iterator[Moto]:
    moto.reset()
    yield moto


def image_of(moto: Moto) -> str:
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return sorted(i["ImageId"] for i in images)[0]


def cloud_doc(moto: Moto, **extra: Any) -> dict[str, Any]:
    doc = {"endpoint": moto.url, "region": checkrun.REGION, "image": image_of(moto),
           "ssh": False, "timeouts": {"poll_interval": 0.2, "poll_max_interval": 0.5}}
    doc.update(extra)
    return doc


def hanging_args(moto: Moto, key: str, seconds: int) -> list[str]:
    """A cloud job that creates its resources, then waits ``seconds`` for
    an ssh that never answers (port 9 on loopback is closed), then fails
    and cleans up."""
    return ["--endpoint", moto.url, "--region", checkrun.REGION, "--image", image_of(moto),
            "--ssh", "--ssh-key", key, "--ssh-endpoint", "tcp:host=127.0.0.1:port=9",
            "--timeout-ssh", str(seconds), "--timeout-poll-interval", "0.2", "--json", "-"]


def submit(m: Member, *args: str) -> str:
    p = m.d.client("submit", *args)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(json.loads(p.stdout)["id"])


def wait(what: str, probe: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def held_by(dsn: str, job_id: str) -> str | None:
    rows = query(dsn, "SELECT owner FROM jobs WHERE id = %s AND state = 'running'", (job_id,))
    return str(rows[0][0]) if rows and rows[0][0] else None


def host_of_owner(owner: str) -> str:
    return owner.split("/", 1)[0]


def test_any_daemon_serves_any_client_and_watch_streams_across(
    pg_dsn: str, fresh_moto: Moto, tmp_path: Any
) -> None:
    moto = fresh_moto
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    # A password the server does not ask for (trust): it must show nowhere.
    secret = "not-in-any-log-4711"
    with_password = pg_dsn.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in with_password
    with cluster(with_password, str(tmp_path), 2, workers=2, lease=LEASE) as (a, b):
        by_host = {a.host: a, b.host: b}
        job = submit(a, *hanging_args(moto, key, 4))
        owner = wait("the job running", lambda: held_by(pg_dsn, job), 30)
        runner = by_host[host_of_owner(owner)]
        other = b if runner is a else a
        # The other daemon streams the running job's steps live, to the end.
        p = other.d.client("watch", job, timeout=120)
        out = p.stdout + p.stderr
        assert "cleanup" in out and "failed" in out, out
        # Both see it, the same.
        for m in (a, b):
            shown = m.d.client_json("show", job)
            assert shown["id"] == job and shown["state"] == "failed", shown
            assert job in {j["id"] for j in m.d.client_json("jobs")}
        # Cancel on one daemon of a job the other runs.
        job2 = submit(b, *hanging_args(moto, key, 60))
        owner = wait("the second job running", lambda: held_by(pg_dsn, job2), 30)
        runner = by_host[host_of_owner(owner)]
        other = b if runner is a else a
        p = other.d.client("cancel", job2, timeout=120)
        assert p.returncode in (0, 1), p.stdout + p.stderr
        shown = runner.d.client_json("show", job2)
        assert shown["state"] == "cancelled", shown
        # Drain on one holds on the other; status agrees.
        backend = f"{moto.url} {checkrun.REGION}"
        assert a.d.client("drain", backend).returncode == 0
        job3 = submit(b, "--endpoint", moto.url, "--region", checkrun.REGION,
                      "--image", image_of(moto), "--no-ssh", "--json", "-")
        time.sleep(2.5)  # a claim poll on each daemon, at least
        assert query(pg_dsn, "SELECT state, owner FROM jobs WHERE id = %s", (job3,)) == [
            ("queued", None)]
        for m in (a, b):
            status = m.d.client_json("status")
            assert status["queue_depth"] == 1, status
            assert [x["state"] for x in status["backends"] if x["name"] == backend] == [
                "draining"], status
        assert b.d.client("resume", backend).returncode == 0
        states = wait_until_final(pg_dsn, [job3], 60)
        assert states == {job3: "passed"}
        logs = a.d.log() + b.d.log()
        assert "Shared store: postgresql database txvmbot_t" in logs
        assert secret not in logs
    assert checkrun.leftovers(moto.url) == []


@pytest.mark.timeout(900)
@pytest.mark.parametrize("daemons", [2, 3])
def test_a_thousand_jobs_round_robin_each_end_once(
    pg_dsn: str, tmp_path: Any, daemons: int
) -> None:
    """1,000 quick cloud jobs (no ssh) over four moto servers, one backend
    each: moto is most of a job's CPU and slows as it fills, so four small
    ones run them on both cores."""
    count = 1000
    with ExitStack() as stack:
        motos = [stack.enter_context(moto_server()) for _ in range(4)]
        docs = [cloud_doc(m) for m in motos]
        members = stack.enter_context(cluster(
            pg_dsn, str(tmp_path), daemons, workers=2, lease=LEASE, default_cap=2 * daemons))
        ids = submit_script([m.d.connect for m in members], docs, count)
        assert len(set(ids)) == count
        states = wait_until_final(pg_dsn, ids, 840)
        left = [x for m in motos for x in checkrun.leftovers(m.url)]
    assert left == []
    assert sorted(states) == sorted(ids)
    assert set(states.values()) == {"passed"}, {s: list(states.values()).count(s)
                                                for s in set(states.values())}
    # Exactly one claim, one attempt and one final state event per job.
    claims = dict(query(pg_dsn, "SELECT job_id, count(*) FROM claims GROUP BY job_id"))
    assert claims == {i: 1 for i in ids}
    assert query(pg_dsn, "SELECT DISTINCT attempts FROM jobs") == [(1,)]
    finals: dict[str, int] = {}
    for job_id, data in query(pg_dsn, "SELECT job_id, data FROM events"):
        event = json.loads(data)
        if event["kind"] == "state" and event["state"] in FINAL:
            finals[job_id] = finals.get(job_id, 0) + 1
    assert finals == {i: 1 for i in ids}
    # Every daemon ran a share.
    hosts = dict(query(pg_dsn, "SELECT host, count(*) FROM jobs GROUP BY host"))
    assert set(hosts) == {m.host for m in members} and min(hosts.values()) > count / daemons / 3


def test_sigkilled_daemons_jobs_are_taken_over_and_nothing_leaks(
    pg_dsn: str, fresh_moto: Moto, tmp_path: Any
) -> None:
    moto = fresh_moto
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    with cluster(pg_dsn, str(tmp_path), 2, workers=2, lease=LEASE) as (a, b):
        ids = [submit(a, *hanging_args(moto, key, 60), "--max-attempts", "1") for _ in range(4)]
        # A's jobs: running there with resources in moto.
        wait("jobs running on both", lambda: len(query(
            pg_dsn, "SELECT 1 FROM jobs WHERE state = 'running'")) == 4, 60)
        wait("resources in moto", lambda: len(checkrun.leftovers(moto.url)) >= 4, 60)
        on_a = [r[0] for r in query(
            pg_dsn, "SELECT id FROM jobs WHERE owner LIKE %s", (f"{a.host}/%",))]
        assert on_a
        workers = D.worker_pids(a.d.pid)
        a.kill()
        killed = time.monotonic()
        states = wait_until_final(pg_dsn, on_a, LEASE + 60)
        took = time.monotonic() - killed
        assert all(s == "error" for s in states.values()), states
        reasons = [r[0] for r in query(
            pg_dsn, "SELECT data FROM jobs WHERE id = ANY(%s)", (on_a,))]
        assert all("lost (its lease expired)" in r for r in reasons), reasons
        # Takeover: the lease ran out, then B cleaned up; within lease + cleanup.
        assert took < LEASE + 45, took
        assert "Took over daemon" in b.d.log()
        for w in workers:
            try:
                os.kill(w, 9)
            except ProcessLookupError:
                pass
        # Stop B's own jobs (those it ran from the start).
        for job in set(ids) - set(on_a):
            b.d.client("cancel", job, timeout=120)
        wait_until_final(pg_dsn, ids, 120)
    assert checkrun.leftovers(moto.url) == []


def test_caps_hold_across_daemons(pg_dsn: str, fresh_moto: Moto, tmp_path: Any) -> None:
    moto = fresh_moto
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    backend = f"{moto.url} {checkrun.REGION}"
    with cluster(pg_dsn, str(tmp_path), 3, workers=2, lease=LEASE, caps={backend: 2}) as ms:
        ids = [submit(ms[i % 3], *hanging_args(moto, key, 2)) for i in range(9)]
        most = 0
        samples = 0
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            rows = query(pg_dsn, "SELECT state FROM jobs WHERE id = ANY(%s)", (ids,))
            running = sum(1 for (s,) in rows if s in ("running", "cleaning"))
            most = max(most, running)
            samples += 1
            if all(s in FINAL for (s,) in rows):
                break
            time.sleep(0.05)
        spans = query(pg_dsn, "SELECT started, finished FROM jobs WHERE id = ANY(%s)", (ids,))
        # Sampled while they ran, and exactly from their start and end times
        # (each job's last attempt: one attempt each here).
        assert samples > 20, samples
        assert most <= 2, most
        edges = sorted([(s, 1) for s, _ in spans] + [(f, -1) for _, f in spans])
        overlap = peak = 0
        for _, step in edges:
            overlap += step
            peak = max(peak, overlap)
        assert peak == 2, (peak, spans)  # reached, never passed
        hosts = {r[0] for r in query(pg_dsn, "SELECT host FROM jobs WHERE id = ANY(%s)", (ids,))}
        assert len(hosts) >= 2, hosts
    assert checkrun.leftovers(moto.url) == []


def test_database_restart_while_jobs_run_loses_nothing(
    pg_server: PostgresServer, pg_dsn: str, fresh_moto: Moto, tmp_path: Any
) -> None:
    moto = fresh_moto
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    with cluster(pg_dsn, str(tmp_path), 2, workers=2, lease=LEASE * 2) as (a, b):
        ids = [submit((a, b)[i % 2], *hanging_args(moto, key, 3)) for i in range(8)]
        wait("jobs running", lambda: len(query(
            pg_dsn, "SELECT 1 FROM jobs WHERE state = 'running'")) >= 2, 60)
        # Down for a while: steps go on and their writes wait.
        pg_server.stop()
        time.sleep(6)
        pg_server.start()
        states = wait_until_final(pg_dsn, ids, 240)
        assert sorted(states) == sorted(ids) and set(states.values()) == {"failed"}, states
        logs = a.d.log() + b.d.log()
        assert "Notifications from the shared database lost" in logs, logs
        assert "Job store writes cannot reach the database" in logs, logs
        assert "Job store writes reach the database again" in logs, logs
        # Once each, every event in order with nothing missing.
        claims = dict(query(pg_dsn, "SELECT job_id, count(*) FROM claims GROUP BY job_id"))
        assert claims == {i: 1 for i in ids}
        for job in ids:
            seqs = [r[0] for r in query(
                pg_dsn, "SELECT seq FROM events WHERE job_id = %s ORDER BY seq", (job,))]
            assert seqs == list(range(1, len(seqs) + 1)), (job, seqs)
            show = a.d.client_json("show", job)
            assert show["state"] == "failed" and "ssh" in show["reason"].lower(), show
    assert checkrun.leftovers(moto.url) == []


def test_status_on_a_daemon_sees_jobs_queued_on_another(
    pg_dsn: str, tmp_path: Any
) -> None:
    """No cloud: jobs to an endpoint nothing answers wait drained; any daemon
    lists and cancels them."""
    with cluster(pg_dsn, str(tmp_path), 2, workers=1, lease=LEASE) as (a, b):
        backend = "held"
        assert a.d.client("drain", backend).returncode == 0
        ids = [submit(a, "--endpoint", "http://127.0.0.1:9", "--region", "r", "--image", "ami-1",
                      "--no-ssh", "--backend", backend, "--json", "-") for _ in range(3)]
        listed = {j["id"] for j in b.d.client_json("jobs", "--state", "queued")}
        assert set(ids) <= listed
        p = b.d.client("cancel", ids[0])
        assert p.returncode in (0, 1), p.stdout + p.stderr
        assert a.d.client_json("show", ids[0])["state"] == "cancelled"
        status = b.d.client_json("status")
        assert status["queue_depth"] == 2, status



def test_local_jobs_of_a_lost_host_fail_and_their_vms_die_with_its_daemon(
    pg_dsn: str, qemu_image: Any, tmp_path: Any
) -> None:
    """Local VMs belong to their host. Daemon A (host-a) runs a local job
    and has another queued; A is SIGKILLed, its QEMU orphaned. B (host-b)
    fails the running job as "host lost" and leaves the queued one for
    host-a. A comes back: it stops the orphaned QEMU and runs the other."""
    from tests.support.processes import kill_if, pid_alive
    from tests.support.qemu_runs import qemu_pids, ready_vms, short_dirs

    with short_dirs() as short:
        root = short()
        runs = [os.path.join(root, f"run-{n}") for n in "ab"]
        pools = [
            "[pools.local]\n"
            f"image_dir = {json.dumps(qemu_image.dir)}\nrun_dir = {json.dumps(run)}\n"
            "max_vms = 1\n"
            for run in runs
        ]
        with cluster(pg_dsn, root, 2, workers=2, lease=LEASE, extra=pools) as (a, b):
            hang = submit(a, "--pool", "local", "--command", "sleep 600", "--timeout-command",
                          "900", "--max-attempts", "2", "--json", "-")
            later = submit(a, "--pool", "local", "--command", "true", "--max-attempts", "1",
                           "--json", "-")
            wait("A's VM ready", lambda: len(ready_vms(runs[0])) == 1, 90)
            orphans = qemu_pids(runs[0])
            assert len(orphans) == 1
            workers = D.worker_pids(a.d.pid)
            a.kill()
            try:
                wait("A's workers gone", lambda: not any(pid_alive(p) for p in workers), 15)
            finally:
                for pid in workers:
                    kill_if(pid, "txvmbot.daemon.workers.worker")
            states = wait_until_final(pg_dsn, [hang], LEASE + 30)
            assert states == {hang: "failed"}, states
            shown = b.d.client_json("show", hang)
            assert shown["reason"].startswith("host lost"), shown
            # Failed, not retried elsewhere: B has no VM of it, and the
            # queued job waits for its own host.
            assert qemu_pids(runs[1]) == []
            time.sleep(2)
            assert query(pg_dsn, "SELECT state, owner FROM jobs WHERE id = %s", (later,)) == [
                ("queued", None)]
            # The QEMU died with A (setpriv --pdeathsig), without waiting for
            # A to come back; A still cleans up what the job left on return.
            assert not pid_alive(orphans[0])
            a.start(log_name="twistd2.log")
            assert wait_until_final(pg_dsn, [later], 120) == {later: "passed"}
            assert "cleaning up what it left here" in a.d.log()


def test_the_web_page_of_one_daemon_follows_a_job_another_runs(
    pg_dsn: str, fresh_moto: Moto, tmp_path: Any
) -> None:
    """The page of the daemon that does not run a job (overview, job page,
    its live event stream, /metrics) shows it as it runs, to its end."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.servers import free_port

    moto = fresh_moto
    key, _ = checkrun.ssh_keypair(str(tmp_path))
    ports = [free_port(), free_port()]
    webs = [[f'web = "tcp:{p}:interface=127.0.0.1"', "web_insecure_loopback = true"]
            for p in ports]
    with cluster(pg_dsn, str(tmp_path), 2, workers=1, lease=LEASE, keys=webs) as (a, b):
        job = submit(b, *hanging_args(moto, key, 5))
        owner = wait("the job running", lambda: held_by(pg_dsn, job), 30)
        other = 1 if host_of_owner(owner) == a.host else 0  # the daemon not running it
        base = f"http://127.0.0.1:{ports[other]}"

        def get(path: str) -> str:
            with urllib.request.urlopen(base + path, timeout=30) as r:
                return str(r.read().decode("utf-8"))

        assert job in get("/") and "running" in get(f"/jobs/{job}?fragment=1")
        # The job's live stream: "changed" as the other daemon stores its
        # steps, then its end.
        with urllib.request.urlopen(f"{base}/jobs/{job}/events", timeout=60) as stream:
            seen = stream.read().decode("utf-8")  # until the server ends it
        assert "data: changed" in seen and "event: end" in seen, seen
        page = get(f"/jobs/{job}")
        assert "failed" in page and "wait-ssh" in page and "cleanup" in page, page
        names = {f.name for f in text_string_to_metric_families(get("/metrics"))}
        assert any(n.startswith("txvmbot_") for n in names), names
    assert checkrun.leftovers(moto.url) == []
