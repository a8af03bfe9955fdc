"""``txvmbot suite --local`` end to end: 12 busybox shell tests across 3 real
QEMU VMs (TCG), one failing, one hanging past ``--test-timeout``, one writing
bytes that are not text to stdout. The JUnit XML is parsed back, the merged
subunit stream is read by python-subunit's own tools, and no QEMU or VM
directory is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET

from tests.support import checkrun
from tests.support.qemu_runs import qemu_pids, reap_run_dir
from tests.support.suite_runs import RUN, subunit_stats
from txvmbot.qemu.image import ImageInfo


def test_twelve_busybox_tests_on_three_vms(qemu_image: ImageInfo, tmp_path: object) -> None:
    base = str(tmp_path)
    state = os.path.join(base, "state")
    ids = [f"t{i:02d}" for i in range(1, 13)]
    tests_file = os.path.join(base, "tests.txt")
    with open(tests_file, "w") as f:
        f.write("\n".join(ids) + "\n")
    out = {n: os.path.join(base, n) for n in ("r.json", "r.subunit", "r.xml")}
    image_dir = qemu_image.dir
    # A small tree copied to every VM over SFTP (dropbear + sftp-server).
    src = os.path.join(base, "suite")
    os.makedirs(os.path.join(src, "lib"))
    with open(os.path.join(src, "lib", "data.txt"), "w") as f:
        f.write("uploaded\n")
    try:
        proc = subprocess.run(
            checkrun.txvmbot_cmd(
                "suite",
                "--local",
                "--image-dir",
                image_dir,
                "--state-dir",
                state,
                "--name",
                "busybox",
                "--machines",
                "3",
                "--upload",
                f"{src}:/root/suite",
                "--setup",
                "grep -q uploaded /root/suite/lib/data.txt",
                "--tests",
                tests_file,
                "--run",
                RUN,
                "--test-timeout",
                "4",
                "--bound",
                "400",
                "--json",
                out["r.json"],
                "--subunit",
                out["r.subunit"],
                "--junit",
                out["r.xml"],
            ),
            env=checkrun.env(),
            capture_output=True,
            text=True,
            timeout=420,
        )
        run_dir = os.path.join(state, "vms")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        with open(out["r.json"]) as f:
            doc = json.load(f)
        by_id = {t["test_id"]: t for t in doc["tests"]}
        assert sorted(by_id) == ids
        assert by_id["t03"]["outcome"] == "failed"
        assert by_id["t03"]["message"] == "exit status 3" and "about to fail" in by_id["t03"]["output"]
        assert by_id["t01"]["outcome"] == "timeout" and "4s" in by_id["t01"]["message"]
        assert by_id["t09"]["outcome"] == "passed" and "garbage" in by_id["t09"]["output"]
        passed = [t for t in ids if by_id[t]["outcome"] == "passed"]
        assert len(passed) == 10
        assert {by_id[t]["worker"] for t in ids} <= {"worker-1", "worker-2", "worker-3"}
        summary = doc["summary"]
        # The hung test (the first handed out) cost its machine: a fresh one
        # took its place while the other tests still ran.
        machines = [m for w in summary["machines"] for m in w["machines"]]
        assert len(machines) == 4, summary
        assert summary["makespan"] > 0 and summary["end_spread"] >= 0
        assert "end spread" in proc.stdout

        root = ET.parse(out["r.xml"]).getroot()
        cases = {c.get("name"): c for c in root.iter("testcase")}
        assert sorted(cases) == ids
        assert cases["t03"].find("failure") is not None
        assert cases["t01"].find("failure") is not None
        assert cases["t02"].find("failure") is None and float(cases["t02"].get("time") or -1) >= 2

        figures = subunit_stats(out["r.subunit"])
        assert figures["Total tests"] == "12" and figures["Failed tests"] == "2", figures

        # Evidence of the failing tests, with the consoles of their machines.
        evidence = summary["evidence_dir"]
        kept = os.listdir(os.path.join(evidence, "tests"))
        assert {"t01.txt", "t03.txt"} <= set(kept)
        assert any(n.startswith("console-") for n in os.listdir(evidence))
        # Everything was stopped and removed.
        assert qemu_pids(run_dir) == []
        assert [d for d in os.listdir(run_dir) if not d.startswith(".")] == [] if os.path.isdir(run_dir) else True
    finally:
        reap_run_dir(os.path.join(state, "vms"))
