"""``txvmbot submit --suite`` end to end: the real daemon (``twistd -n
txvmbot``) runs 12 busybox shell tests across 3 real QEMU VMs of its local
pool, one failing, one hanging past ``--test-timeout``, one writing bytes
that are not text; ``watch`` follows it, ``cancel`` stops another, and the
pool's cap counts a suite's machines."""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator

import pytest

from tests.support import real_daemon as D
from tests.support.qemu_runs import qemu_pids, vm_dirs
from tests.support.suite_runs import RUN, subunit_stats
from txvmbot.qemu.image import ImageInfo


@pytest.fixture
def suite_daemon(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> Iterator[tuple[D.Daemon, str, str]]:
    """The daemon with one worker and ``[pools.local]`` of at most 3 VMs."""
    root = short_dir()
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data")
    os.makedirs(data)
    config = os.path.join(root, "txvmbot.toml")
    with open(config, "w") as f:
        f.write(
            "[daemon]\nworkers = 1\n\n[pools.local]\n"
            f"image_dir = {json.dumps(qemu_image.dir)}\nrun_dir = {json.dumps(run_dir)}\n"
            "max_vms = 3\n"
        )
    proc, d = D.start(data, ["--config", config])
    try:
        yield d, run_dir, root
    finally:
        D.stop(proc)
        print(d.log()[-3000:])


def suite_args(tests_file: str, *extra: str) -> list[str]:
    return [
        "submit", "--pool", "local", "--suite", "--name", "busybox", "--machines", "3",
        "--tests", tests_file, "--run", RUN, "--test-timeout", "4", "--max-attempts", "1",
        *extra,
    ]


def write_tests(root: str, n: int = 12) -> str:
    path = os.path.join(root, "tests.txt")
    with open(path, "w") as f:
        f.write("".join(f"t{i:02d}\n" for i in range(1, n + 1)))
    return path


def test_suite_through_the_daemon(suite_daemon: tuple[D.Daemon, str, str]) -> None:
    d, run_dir, root = suite_daemon
    junit = os.path.join(root, "r.xml")
    subunit = os.path.join(root, "r.subunit")
    p = d.client(
        *suite_args(write_tests(root), "--wait", "--junit", junit, "--subunit", subunit),
        timeout=400,
    )
    assert p.returncode == 1, p.stdout + p.stderr  # t01 hangs, t03 fails
    for step in ("overlay", "boot", "ready", "wait-ssh", "setup", "tests"):
        assert step in p.stdout, p.stdout
    assert "2 of 12 test(s) did not pass: t01 timeout, t03 failed" in p.stdout + p.stderr

    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    assert sorted(cases) == [f"t{i:02d}" for i in range(1, 13)]
    assert cases["t03"].find("failure") is not None and cases["t01"].find("failure") is not None
    assert "garbage" in (cases["t09"].findtext("system-out") or "")
    assert subunit_stats(subunit)["Total tests"] == "12"

    (job,) = d.client_json("jobs")
    shown = d.client_json("show", job["id"])
    assert shown["state"] == "failed"
    assert shown["spec"]["suite"]["name"] == "busybox"
    evidence = shown["result"]["evidence_dir"]
    assert {"results.xml", "results.subunit", "results.json"} <= set(os.listdir(evidence))
    with open(os.path.join(evidence, "results.json")) as f:
        summary = json.load(f)["summary"]
    # The hung test's VM was replaced while the others still ran.
    assert len([m for w in summary["machines"] for m in w["machines"]]) == 4
    assert vm_dirs(run_dir) == [] and qemu_pids(run_dir) == []


def test_cancel_a_running_suite_and_the_cap_counts_machines(
    suite_daemon: tuple[D.Daemon, str, str],
) -> None:
    d, run_dir, root = suite_daemon
    tests = write_tests(root, 3)
    # 4 machines can never fit a pool of 3.
    over = d.client(*suite_args(tests, "--machines", "4"))
    assert over.returncode == 2, over.stdout + over.stderr
    assert "at most 3 instances at once; this job asks for 4" in over.stderr

    p = d.client(
        "submit", "--pool", "local", "--suite", "--name", "hang", "--machines", "2",
        "--tests", tests, "--run", "sleep 600; echo {test}", "--test-timeout", "300", "--json", "-",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    job_id = json.loads(p.stdout)["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if d.client_json("show", job_id)["state"] == "running" and len(qemu_pids(run_dir)) == 2:
            break
        time.sleep(1)
    else:
        raise AssertionError("the suite never had its two VMs running")
    cancelled = d.client("cancel", job_id, timeout=120)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    shown = d.client_json("show", job_id)
    assert shown["state"] == "cancelled", shown
    assert vm_dirs(run_dir) == [] and qemu_pids(run_dir) == []
