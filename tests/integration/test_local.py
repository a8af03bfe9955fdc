"""Local VM jobs end to end: real QEMU under TCG, booted by the real
commands (``python -m txvmbot check --local``, ``twistd -n txvmbot`` and its
client commands), on the session's test image.

At most two VMs run at once (two cores). Every process a test starts is
stopped by its pid: the daemon through tests/support/real_daemon.py, stray QEMU through
``stop_from_record`` on the VM directories left in a run dir. The guests
reach nothing; their sshd is reached only through a forward on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import checkrun
from tests.support import real_daemon as D
from tests.support.processes import kill_if, pid_alive
from tests.support.qemu_runs import qemu_pids, ready_vms, short_dirs, step, vm_dirs
from txvmbot.qemu import kept as K
from txvmbot.qemu.image import ImageInfo
from txvmbot.qemu.model import READY_MARKER

FINAL = ("passed", "failed", "cancelled", "error")
STEPS = ("disk-space", "image", "overlay", "boot", "ready", "wait-ssh", "commands")


# -- helpers ------------------------------------------------------------------


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    """Poll ``probe`` until it returns something true, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s (last: {value!r})")
        time.sleep(interval)


def local_check(state_dir: str, image_dir: str, *args: str, timeout: float = 120) -> checkrun.Run:
    """``txvmbot check --local`` as a subprocess; its JSON result parsed."""
    out = os.path.join(state_dir, "result.json")
    cmd = checkrun.txvmbot_cmd(
        "check", "--local", "--state-dir", state_dir, "--image-dir", image_dir,
        "--json", out, *args,
    )
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=checkrun.env())
    result = None
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)[0]
    return checkrun.Run(p.returncode, p.stdout, p.stderr, result)


def txvmbot(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(checkrun.txvmbot_cmd(*args), capture_output=True, text=True,
                          timeout=timeout, env=checkrun.env())


def ended(s: dict[str, Any]) -> float:
    return float(s["started"]) + float(s["duration"])


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def wait_gone(what: str, pids: list[int], since: float, bound: float = 5.0) -> float:
    """Wait until none of ``pids`` runs, at most ``bound`` s after the
    monotonic time ``since``; the seconds it took from ``since``."""
    left = max(0.0, since + bound - time.monotonic())
    wait_until(f"{what} within {bound:g}s", lambda: not any(pid_alive(p) for p in pids), left,
               interval=0.01)
    return time.monotonic() - since


def pool_config(path: str, image_dir: str, run_dir: str) -> str:
    """A daemon config: 2 workers, ``[pools.local]`` on ``image_dir`` with
    ``run_dir``, at most 2 VMs."""
    lines = ["[daemon]", "workers = 2", "", "[pools.local]",
             f"image_dir = {json.dumps(image_dir)}", f"run_dir = {json.dumps(run_dir)}",
             "max_vms = 2"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def jobs_of(d: D.Daemon) -> dict[str, dict[str, Any]]:
    return {j["id"]: j for j in d.client_json("jobs", "--limit", "100")}


def submit(d: D.Daemon, *args: str) -> str:
    p = d.client("submit", "--pool", "local", *args, "--json", "-")
    assert p.returncode == 0, p.stdout + p.stderr
    return str(json.loads(p.stdout)["id"])


# -- check --local --------------------------------------------------------------


def test_passing_job_records_facts_and_leaves_nothing(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    state = short_dir()
    run = local_check(state, qemu_image.dir, "--command", "echo hello-from-guest")
    assert run.code == 0, run.stdout + run.stderr
    r = run.result
    assert r is not None and r["passed"] is True and r["error"] == ""
    names = [s["name"] for s in r["steps"]]
    for name in STEPS:
        assert step(r, name)["outcome"] == "passed", r["steps"]
    assert names[: len(STEPS)] == list(STEPS)
    assert any(n.startswith("cleanup qemu-vm") for n in names)
    assert [c["stdout"] for c in r["commands"]] == ["hello-from-guest\n"]
    facts = r["facts"]
    assert facts["qemu_version"] and facts["qemu_accel"] in ("tcg", "kvm")
    assert facts["host_kernel"].startswith("Linux")
    assert facts["guest_uname"].startswith("Linux") and qemu_image.kernel_version in facts[
        "guest_uname"
    ]
    assert "\n" not in facts["guest_uname"]
    # The busybox guest has no os-release: its busybox banner names it.
    assert facts["guest_os"].startswith("busybox "), facts
    with open(os.path.join(qemu_image.dir, "manifest.json"), "rb") as f:
        assert facts["image_digest"] == "sha256:" + hashlib.sha256(f.read()).hexdigest()
    # The VM is gone: its QEMU (pid from the boot step) and its directory.
    run_dir = os.path.join(state, "vms")
    vm_id = step(r, "overlay")["detail"].rsplit("/", 1)[-1]
    assert vm_id and vm_id not in vm_dirs(run_dir)
    assert vm_dirs(run_dir) == [] and K.list_kept(run_dir) == []
    assert qemu_pids(run_dir) == []
    qemu_pid = int(step(r, "boot")["detail"].split()[1].rstrip(","))
    assert not pid_alive(qemu_pid)


def test_failing_command_keeps_evidence_until_released(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    state = short_dir()
    run_dir = os.path.join(state, "vms")
    run = local_check(state, qemu_image.dir, "--command", "echo evidence > /data/marker; exit 3")
    assert run.code == 1, run.stdout + run.stderr
    r = run.result
    assert r is not None and r["passed"] is False
    assert run.failed_step() == "commands"
    assert "exit status 3" in r["error"]
    assert step(r, "keep-evidence")["outcome"] == "passed"
    vm_id = r["facts"]["kept_vm"]
    path = os.path.join(run_dir, vm_id)
    assert r["facts"]["kept_path"] == path
    files = set(os.listdir(path))
    assert {K.OVERLAY_FILE, K.CONSOLE_FILE, K.STATE_FILE, K.KEPT_FILE} <= files, files
    assert os.path.getsize(os.path.join(path, K.STATE_FILE)) > 0
    with open(os.path.join(path, K.CONSOLE_FILE)) as f:
        assert READY_MARKER in f.read()
    # Kept means the evidence, not a running VM: its QEMU was saved and quit.
    assert qemu_pids(run_dir) == []

    p = txvmbot("kept", "--state-dir", state)
    assert p.returncode == 0, p.stderr
    assert vm_id in p.stdout and "saved state" in p.stdout and "exit status 3" in p.stdout

    p = txvmbot("release", vm_id, "--state-dir", state)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"released {vm_id}" in p.stdout
    assert not os.path.exists(path) and vm_dirs(run_dir) == []
    p = txvmbot("kept", "--state-dir", state)
    assert p.returncode == 0 and "no kept VMs" in p.stdout, p.stdout + p.stderr


def make_never_ready_image(image: ImageInfo, dest: str) -> str:
    """The test image with init replaced by a shell (``rdinit=/bin/sh``): the
    kernel boots, nothing prints the ready marker. The manifest's cmdline is
    not checksummed; the files are hard links (same mtime: no re-hash)."""
    os.makedirs(dest)
    for name in os.listdir(image.dir):
        if name == "manifest.json":
            continue
        src = os.path.join(image.dir, name)
        try:
            os.link(src, os.path.join(dest, name))
        except OSError:
            shutil.copy2(src, os.path.join(dest, name))
    manifest = dict(image.manifest)
    manifest["cmdline"] = "console=ttyS0 panic=-1 rdinit=/bin/sh"
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return dest


@pytest.fixture(scope="module")
def never_ready(qemu_image: ImageInfo) -> Iterator[tuple[checkrun.Run, str]]:
    """One ``check --local`` on the never-ready image, boot bound 8 s; its
    run and run dir, shared by the tests that look at it."""
    with short_dirs() as make:
        image = make_never_ready_image(qemu_image, os.path.join(make(), "never-ready"))
        state = make()
        run = local_check(state, image, "--timeout-boot", "8", "--timeout-shutdown", "2")
        yield run, os.path.join(state, "vms")


def test_guest_that_never_becomes_ready_ends_at_the_bound_with_the_console(
    never_ready: tuple[checkrun.Run, str],
) -> None:
    run, run_dir = never_ready
    assert run.code == 1, run.stdout + run.stderr
    r = run.result
    assert r is not None and r["passed"] is False
    assert run.failed_step() == "ready"
    ready = step(r, "ready")
    assert ready["outcome"] == "timeout", ready
    # The bound, not later, and not much sooner either.
    assert 7.5 <= ready["duration"] <= 10, ready
    error = r["error"]
    assert "within 8s" in error and READY_MARKER in error, error
    # The console tail is in the error: the kernel ran the shell, not init.
    assert "Run /bin/sh as init process" in error, error
    # The console is in the result and the evidence too.
    assert r["console"] and "Run /bin/sh as init process" in r["console"][0][1]
    assert r["evidence_dir"] and os.listdir(r["evidence_dir"])
    assert qemu_pids(run_dir) == []
    # Whatever was kept is listed; nothing else is left.
    assert vm_dirs(run_dir) == sorted(k.vm_id for k in K.list_kept(run_dir))


def test_guest_that_never_becomes_ready_keeps_its_evidence(
    never_ready: tuple[checkrun.Run, str],
) -> None:
    run, run_dir = never_ready
    r = run.result
    assert r is not None
    assert step(r, "keep-evidence")["outcome"] == "passed", step(r, "keep-evidence")
    kept = K.list_kept(run_dir)
    assert [k.vm_id for k in kept] == [r["facts"]["kept_vm"]]
    assert {K.OVERLAY_FILE, K.CONSOLE_FILE} <= set(os.listdir(kept[0].path))


def test_full_disk_is_refused_before_qemu_starts(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    tmpfs = short_dir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", tmpfs],
                       capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        # check --local puts its run dir in <state dir>/vms, here on the
        # 2 MB tmpfs; the pool's min_free_mb is the default, 256.
        run = local_check(tmpfs, qemu_image.dir)
        run_dir = os.path.join(tmpfs, "vms")
        assert run.code == 1, run.stdout + run.stderr
        r = run.result
        assert r is not None and r["passed"] is False
        assert run.failed_step() == "disk-space"
        assert [s["name"] for s in r["steps"]] == ["disk-space"]
        error = r["error"]
        assert "not enough free disk" in error and run_dir in error, error
        assert "MB free" in error and "at least 256 MB needed" in error, error
        assert "not enough free disk" in run.stdout
        # No VM directory, so no QEMU was ever given one.
        assert vm_dirs(run_dir) == [] and qemu_pids(run_dir) == []
        assert "qemu_version" not in r["facts"]
    finally:
        subprocess.run(["umount", tmpfs], capture_output=True, timeout=30, check=False)


# -- the daemon ---------------------------------------------------------------------


@pytest.fixture
def pool_daemon(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> Iterator[tuple[D.Daemon, str]]:
    """``twistd -n txvmbot`` with 2 workers and ``[pools.local]`` (max_vms 2)
    on the test image, its run dir a short temp dir."""
    root = short_dir()
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data")
    os.makedirs(data)
    config = pool_config(os.path.join(root, "txvmbot.toml"), qemu_image.dir, run_dir)
    proc, d = D.start(data, ["--config", config])
    try:
        yield d, run_dir
    finally:
        D.stop(proc)
        print(d.log()[-3000:])


def test_two_vms_run_in_parallel_through_the_daemon(pool_daemon: tuple[D.Daemon, str]) -> None:
    d, run_dir = pool_daemon
    ids = [submit(d, "--command", "sleep 1", "--max-attempts", "1") for _ in range(2)]
    # One blocking client each (polling with a client process per poll
    # would take CPU from the VMs).
    for i in ids:
        p = d.client("watch", i, timeout=90)
        assert p.returncode == 0, p.stdout + p.stderr
    jobs = jobs_of(d)
    assert [jobs[i]["state"] for i in ids] == ["passed", "passed"], jobs
    # The jobs' running intervals overlap...
    a, b = (jobs[i] for i in ids)
    assert max(a["started"], b["started"]) < min(a["finished"], b["finished"]), (a, b)
    # ... and so do their VMs': each booted before the other's commands ended.
    results = [d.client_json("show", i)["result"] for i in ids]
    boots = [step(r, "boot")["started"] for r in results]
    ends = [ended(step(r, "commands")) for r in results]
    assert boots[0] < ends[1] and boots[1] < ends[0], (boots, ends)
    vms = {step(r, "overlay")["detail"] for r in results}
    assert len(vms) == 2
    assert vm_dirs(run_dir) == [] and qemu_pids(run_dir) == []


def test_each_job_gets_fresh_state(pool_daemon: tuple[D.Daemon, str]) -> None:
    d, run_dir = pool_daemon
    # /data is the virtio disk, the job's own overlay on the base image.
    p = d.client("submit", "--pool", "local", "--wait", "--max-attempts", "1",
                 "--command", "grep -q '^/dev/vda /data ext4' /proc/mounts",
                 "--command", "echo x > /data/marker && sync",
                 "--command", "test -e /data/marker")
    assert p.returncode == 0, p.stdout + p.stderr
    p = d.client("submit", "--pool", "local", "--wait", "--max-attempts", "1",
                 "--command", "grep -q '^/dev/vda /data ext4' /proc/mounts",
                 "--command", "test ! -e /data/marker")
    assert p.returncode == 0, p.stdout + p.stderr
    assert vm_dirs(run_dir) == [] and qemu_pids(run_dir) == []


def test_worker_killed_takes_its_qemu_with_it(pool_daemon: tuple[D.Daemon, str]) -> None:
    """SIGKILL the worker that drives a job's VM while the daemon is
    stopped (SIGSTOP), so that only the kernel can end that QEMU: it is gone
    within 5 s. Then the daemon, let go on, logs the death with the worker's
    pid, cleans up and ends the job."""
    d, run_dir = pool_daemon
    job = submit(d, "--command", "sleep 600", "--timeout-command", "900", "--max-attempts", "1")
    wait_until("a ready VM", lambda: len(ready_vms(run_dir)) == 1, 60)
    [qemu] = qemu_pids(run_dir)
    worker = parent_of(qemu)
    assert worker in D.worker_pids(d.pid), (worker, D.worker_pids(d.pid))
    os.kill(d.pid, signal.SIGSTOP)
    try:
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        took = wait_gone("the killed worker's QEMU gone", [qemu], killed)
        print(f"\nQEMU gone {took * 1000:.0f} ms after its worker's SIGKILL")
    finally:
        os.kill(d.pid, signal.SIGCONT)
        kill_if(qemu, "qemu-system")
    wait_until("the job ended", lambda: jobs_of(d)[job]["state"] in FINAL, 30)
    j = jobs_of(d)[job]
    assert j["state"] == "error", j
    assert "died: killed by signal 9 (SIGKILL)" in j["reason"], j
    assert f"(pid {worker}) died while running job {job}" in d.log()
    wait_until("its VM directory removed", lambda: vm_dirs(run_dir) == [], 30)
    assert qemu_pids(run_dir) == []


def test_killed_daemon_takes_a_stuck_worker_and_its_qemu_with_it(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    """A worker that cannot run its reactor (SIGSTOP here) never sees its
    pipe to the daemon close: when the daemon is SIGKILLed the kernel kills
    the worker (PR_SET_PDEATHSIG, from the worker's bootstrap), and so its
    QEMU, within 5 s."""
    root = short_dir()
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data")
    os.makedirs(data)
    config = pool_config(os.path.join(root, "txvmbot.toml"), qemu_image.dir, run_dir)
    proc, d = D.start(data, ["--config", config])
    qemus: list[int] = []
    workers: list[int] = []
    try:
        submit(d, "--command", "sleep 600", "--timeout-command", "900", "--max-attempts", "1")
        wait_until("a ready VM", lambda: len(ready_vms(run_dir)) == 1, 60)
        qemus = qemu_pids(run_dir)
        workers = D.worker_pids(d.pid)
        worker = parent_of(qemus[0])
        assert len(qemus) == 1 and worker in workers, (qemus, workers)
        assert worker is not None
        os.kill(worker, signal.SIGSTOP)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
    try:
        took = wait_gone("the stopped worker and its QEMU gone", [*workers, *qemus], killed)
        print(f"\nstopped worker and QEMU gone {took * 1000:.0f} ms after the daemon's SIGKILL")
    finally:
        for pid in workers:
            kill_if(pid, "txvmbot.daemon.workers.worker")
        for pid in qemus:
            kill_if(pid, "qemu-system")


def test_cli_killed_takes_its_qemu_with_it(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    """``txvmbot check --local`` SIGKILLed while its VM runs a command: the
    QEMU it started is gone within 5 s."""
    state = short_dir()
    run_dir = os.path.join(state, "vms")
    cmd = checkrun.txvmbot_cmd(
        "check", "--local", "--state-dir", state, "--image-dir", qemu_image.dir,
        "--command", "sleep 600", "--timeout-command", "900",
    )
    cli = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=checkrun.env())
    qemus: list[int] = []
    try:
        wait_until("a ready VM", lambda: len(ready_vms(run_dir)) == 1, 60)
        qemus = qemu_pids(run_dir)
        assert len(qemus) == 1 and parent_of(qemus[0]) == cli.pid, (qemus, cli.pid)
        os.kill(cli.pid, signal.SIGKILL)
        killed = time.monotonic()
        cli.wait(10)
        took = wait_gone("the killed CLI's QEMU gone", qemus, killed)
        print(f"\nQEMU gone {took * 1000:.0f} ms after the CLI's SIGKILL")
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(10)
        for pid in qemus:
            kill_if(pid, "qemu-system")


def test_daemon_killed_while_vms_run_then_restarted(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> None:
    """SIGKILL the daemon while two jobs hang in their VMs: its workers die
    with it, and their QEMUs within 5 s, without waiting for a restart
    (the kernel kills each QEMU when its worker dies: setpriv --pdeathsig).
    The restarted daemon cleans up through the journal, and every job
    ends."""
    root = short_dir()
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data")
    os.makedirs(data)
    config = pool_config(os.path.join(root, "txvmbot.toml"), qemu_image.dir, run_dir)
    hang = ["--command", "sleep 600", "--timeout-command", "900"]
    proc, d = D.start(data, ["--config", config])
    workers: list[int] = []
    qemus: list[int] = []
    try:
        once = submit(d, *hang, "--max-attempts", "1")
        twice = submit(d, *hang, "--max-attempts", "2")
        # Both VMs up (the ready marker on their consoles), both jobs running.
        wait_until("two ready VMs", lambda: len(ready_vms(run_dir)) == 2, 60)
        first_vms = vm_dirs(run_dir)
        qemus = qemu_pids(run_dir)
        assert len(first_vms) == 2 and len(qemus) == 2
        assert all(j["state"] == "running" for j in jobs_of(d).values())
        workers = D.worker_pids(d.pid)
        assert sorted(parent_of(p) or 0 for p in qemus) == sorted(workers)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(10)
    try:
        # The workers die with their pipes to the daemon, and the kernel
        # kills their QEMUs with them: nothing waits for a restart.
        took = wait_gone("QEMUs of the killed daemon gone", qemus, killed)
        print(f"\nQEMUs gone {took * 1000:.0f} ms after the daemon's SIGKILL")
        wait_until("workers gone", lambda: not any(pid_alive(p) for p in workers), 15)
    finally:
        for pid in workers:
            kill_if(pid, "txvmbot.daemon.workers.worker")
        for pid in qemus:
            kill_if(pid, "qemu-system")

    proc, d = D.start(data, ["--config", config], log_name="twistd2.log")
    try:
        # The attempt the daemon died under was cleaned up: its directories
        # removed (a QEMU still running would be stopped from its vm.json
        # record first: test_vm.py's test_stop_from_record).
        wait_until("first VMs removed", lambda: not set(first_vms) & set(vm_dirs(run_dir)), 30)
        # Recovery runs before the daemon listens: the job is final already.
        job = jobs_of(d)[once]
        assert job["state"] == "error" and "daemon restarted" in job["reason"], job
        assert job["attempts"] == 1, job
        # The other one is retried: a second attempt in a fresh VM...
        wait_until("the retry's QEMU started",
                   lambda: any(n.startswith(f"{twice}-2-") for n in vm_dirs(run_dir))
                   and qemu_pids(run_dir), 60)
        job = jobs_of(d)[twice]
        assert job["state"] == "running" and job["attempts"] == 2, job
        # ... that we cancel while it boots; its cleanup runs before cancel
        # returns.
        p = d.client("cancel", twice)
        assert p.returncode in (0, 1), p.stdout + p.stderr
        jobs = jobs_of(d)
        assert jobs[twice]["state"] == "cancelled" and jobs[twice]["attempts"] == 2, jobs
        assert set(jobs) == {once, twice} and all(j["state"] in FINAL for j in jobs.values())
    finally:
        D.stop(proc)
    assert qemu_pids(run_dir) == []
    # Nothing left but kept evidence; neither a restart nor a cancel keeps any.
    assert vm_dirs(run_dir) == sorted(k.vm_id for k in K.list_kept(run_dir)) == []
