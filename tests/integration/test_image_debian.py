"""Integration tests for ``txvmbot image build --distro debian``: the
manifest of a real build (the session's Debian image, built once by
tests/support/debian_fixtures.py), a warm rebuild without network, and the
guest booted for real under QEMU: ``check --local --image NAME`` runs
python3 and systemctl, a suite runs trial tests, a template start reaches
ssh, the ACPI power button powers it off.

At most one VM runs at a time here; every QEMU is stopped by its job's
cleanup or killed by pid; the guests reach nothing, their sshd only through a
forward on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from tests.support import checkrun
from tests.support.cli_runs import cli_env
from tests.support.debian_fixtures import CACHE, PACKAGES, RELEASE
from tests.support.qemu_runs import reap_run_dir, short_dirs, step
from txvmbot.qemu import _image_debian as D
from txvmbot.qemu.image import (
    ImageInfo,
    build_debian_image,
    build_image,
    debian_inputs,
    fingerprint_of,
    load_image,
)
from txvmbot.qemu.model import READY_MARKER

reactor: Any = _reactor


def test_busybox_manifest_says_its_kind(qemu_image: ImageInfo, tmp_path: Path) -> None:
    out = tmp_path / "bb"
    assert build_image(str(out), cache_dir=CACHE) == "built"
    assert load_image(str(out)).manifest["kind"] == "busybox"


# --- the session's Debian image ----------------------------------------------------


def test_manifest_lists_every_package_and_the_inputs(debian_image: ImageInfo) -> None:
    m = debian_image.manifest
    assert (m["kind"], m["distro"], m["release"]) == ("debian", "debian", RELEASE)
    assert m["os_release"]["ID"] == "debian" and m["os_release"]["VERSION_ID"] == "12"
    pkgs = m["packages"]
    for name in ("python3-twisted", "python3-subunit", "openssh-server", "systemd", "udev",
                 "dbus", "python3", "libc6", "dpkg"):
        assert pkgs.get(name), name
    assert len(pkgs) > 100 and all(isinstance(v, str) and v for v in pkgs.values())
    assert m["requested_packages"] == sorted({*D.BASE_PACKAGES, *PACKAGES})
    assert m["inputs"] == debian_inputs(RELEASE, PACKAGES)
    assert m["inputs"]["mirror"] is None
    assert any("bookworm-security" in line for line in m["apt_sources"])
    with open(os.path.join(debian_image.dir, "host_key.pub")) as f:
        assert debian_image.host_key_fingerprint == fingerprint_of(f.read())
    assert debian_image.kernel_version == m["kernel"]["release"]
    assert m["kernel"]["rootfs_modules"] > 500
    assert m["ready_marker"] == READY_MARKER and m["ssh_user"] == "root"
    assert set(m["masked_units"]) == set(D.MASKED_UNITS)
    assert set(m["disabled_generators"]) == set(D.DISABLED_GENERATORS)
    assert m["format_version"] == 1 and m["built_at"] > 0
    assert debian_image.disk and debian_image.disk.endswith("disk.qcow2")
    mode = os.stat(debian_image.ssh_key).st_mode
    assert stat.S_IMODE(mode) == 0o600
    info = subprocess.run(["qemu-img", "check", debian_image.disk], capture_output=True,
                          text=True, check=False)
    assert info.returncode == 0, info.stdout + info.stderr
    # image show --verify: every file's sha256 against the manifest.
    code, out, err = cli_env("image", "show", "--verify", "--output", debian_image.dir)
    assert code == 0, err
    assert "kind:         debian" in out and "distribution: debian bookworm" in out
    assert f"installed, from {', '.join(m['requested_packages'])}" in out


def test_same_inputs_are_reused(debian_image: ImageInfo) -> None:
    started = time.monotonic()
    assert build_debian_image(
        debian_image.dir, cache_dir=CACHE, release=RELEASE, packages=PACKAGES
    ) == "reused"
    assert time.monotonic() - started < 10


def test_warm_rebuild_needs_no_network_and_honours_source_date_epoch(
    debian_image: ImageInfo, tmp_path: Path
) -> None:
    """With the packages cached, a rebuild runs in a network namespace of
    its own (no network at all): nothing is downloaded. SOURCE_DATE_EPOCH
    is the build date."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode:
        pytest.skip("unshare -n does not work here")
    out = tmp_path / "offline"
    env = {**checkrun.env(), "SOURCE_DATE_EPOCH": "1700000000"}
    cmd = ["unshare", "-n", *checkrun.txvmbot_cmd(
        "image", "build", "--distro", "debian", "--output", str(out), "--cache-dir", CACHE,
        *[a for p in PACKAGES for a in ("--package", p)],
    )]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    m = load_image(str(out), verify=True).manifest
    assert m["built_at"] == 1700000000 and m["source_date_epoch"] == 1700000000
    assert m["packages"]["python3-twisted"]
    assert m["inputs"] == debian_image.manifest["inputs"]


def test_check_local_image_name_runs_python_and_systemctl(debian_image: ImageInfo) -> None:
    """``txvmbot check --local --image NAME``: a cold boot of the Debian
    guest, python3 with Twisted, and systemd reports the system running (no
    unit failed: not even degraded)."""
    with short_dirs() as make:
        state = make()
        os.makedirs(os.path.join(state, "images"))
        os.symlink(debian_image.dir, os.path.join(state, "images", "deb"))
        out = os.path.join(state, "result.json")
        cmd = checkrun.txvmbot_cmd(
            "check", "--local", "--state-dir", state, "--image", "deb", "--json", out,
            "--command", "python3 -c 'import twisted, subunit, sys; "
            "print(twisted.__version__, sys.version_info[0])'",
            "--command", "systemctl is-system-running --wait",
        )
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=checkrun.env())
        assert p.returncode == 0, p.stdout + p.stderr
        with open(out) as f:
            r = json.load(f)[0]
        assert r["passed"] is True
        twisted_line, running = (c["stdout"] for c in r["commands"])
        assert twisted_line.endswith(" 3\n") and twisted_line.split()[0] == (
            debian_image.manifest["packages"]["python3-twisted"].split("-")[0])
        assert running == "running\n"
        assert debian_image.kernel_version in r["facts"]["guest_uname"]
        rel = debian_image.manifest["os_release"]
        assert r["facts"]["guest_os"] == f"debian {rel['VERSION_ID']}", r["facts"]
        assert r["facts"]["image_digest"] == debian_image.manifest_digest != ""
        assert r["facts"]["image_dir"] == os.path.join(state, "images", "deb")
        print(f"\n[debian cold boot] ready {step(r, 'ready')['duration']:.2f}s "
              f"wait-ssh {step(r, 'wait-ssh')['duration']:.2f}s")
        # An unknown name is refused, naming the images there.
        p = subprocess.run(
            checkrun.txvmbot_cmd("check", "--local", "--state-dir", state, "--image", "nope"),
            capture_output=True, text=True, timeout=60, env=checkrun.env(),
        )
        assert p.returncode == 2
        assert "--image: no local image 'nope'" in p.stderr and "(images there: deb)" in p.stderr


TRIAL_MODULES = ("twisted.test.test_defer", "twisted.test.test_task")


def test_suite_runs_twisted_trial_tests_as_a_native_run_does(debian_image: ImageInfo) -> None:
    """``txvmbot suite --local --machines 2 --image NAME``: Twisted's own
    tests from Debian's python3-twisted, fed through txvmbot's trial runner
    (subunit), count what a native ``trial`` run of the same modules inside
    one guest counts."""
    with short_dirs() as make:
        state = make()
        os.makedirs(os.path.join(state, "images"))
        os.symlink(debian_image.dir, os.path.join(state, "images", "deb"))
        out = os.path.join(state, "suite.json")
        cmd = checkrun.txvmbot_cmd(
            "suite", "--local", "--state-dir", state, "--image", "deb", "--machines", "2",
            "--name", "twisted", "--runner", "python3 {runner_py} --trial " + " ".join(TRIAL_MODULES),
            "--format", "subunit", "--json", out,
        )
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=checkrun.env())
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        with open(out) as f:
            counts = json.load(f)["counts"]
        native = subprocess.run(
            checkrun.txvmbot_cmd(
                "check", "--local", "--state-dir", state, "--image", "deb", "--json", out,
                "--command", "cd /tmp && python3 -m twisted.trial " + " ".join(TRIAL_MODULES),
            ),
            capture_output=True, text=True, timeout=300, env=checkrun.env(),
        )
        assert native.returncode == 0, native.stdout[-3000:] + native.stderr[-3000:]
        with open(out) as f:
            trial_out = json.load(f)[0]["commands"][0]["stdout"]
        ran = int(trial_out.split("\nRan ", 1)[1].split()[0])
        assert "PASSED (successes=" in trial_out
        assert counts == {"passed": ran, "failed": 0, "skipped": 0, "timeout": 0, "infra": 0}
        assert ran > 200
        print(f"\n[debian suite] {ran} trial tests on 2 VMs, as natively")


@pytest.fixture(scope="class")
def _debian_for_class(request: pytest.FixtureRequest, debian_image: ImageInfo) -> None:
    request.cls.image = debian_image


@pytest.mark.usefixtures("_debian_for_class")
class DebianTemplateTests(TestCase):
    """The Debian guest under txvmbot's own VM code: a pool's template, jobs
    resumed from it, and the ACPI power button."""

    timeout = 240
    image: Any

    def setUp(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="txvd-")
        self.addCleanup(shutil.rmtree, self.run_dir, True)
        self.addCleanup(reap_run_dir, self.run_dir)
        from txvmbot.qemu.recover import stop_from_record

        self.addCleanup(stop_from_record, os.path.join(self.run_dir, "template", ".build"))
        self.addCleanup(stop_from_record, os.path.join(self.run_dir, "button"))

    async def test_template_jobs_and_the_power_button(self) -> None:
        from txvmbot.jobs.smoke import LocalCheck
        from txvmbot.journal import MemoryJournal
        from txvmbot.qemu.boot import BootSpec, boot
        from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts
        from txvmbot.qemu.template import ensure_template

        pool = LocalPool(name="deb", image_dir=self.image.dir, run_dir=self.run_dir,
                         accel="auto", fast_start=True, min_free_mb=64)
        spec = LocalSpec(pool=pool, commands=("systemctl is-system-running --wait",),
                         timeouts=LocalTimeouts(boot=90, ssh=30, command=60, shutdown=10))
        results = []
        for _ in range(2):
            results.append(await LocalCheck(reactor, spec, journal=MemoryJournal()).run())
        for r in results:
            self.assertTrue(r.passed, f"{r.error}\n{r.steps}")
            self.assertEqual(r.commands[-1].stdout, b"running\n")
        first, second = (dict(r.facts.extra) for r in results)
        self.assertEqual((first["template"], second["template"]), ("built", "reused"))
        steps = {s.name: s for s in results[1].steps}
        fast = steps["wait-ssh"].started + steps["wait-ssh"].duration - steps["boot"].started
        print(f"\n[debian template start] boot to ssh {fast:.2f}s")
        self.assertLess(fast, 5.0)  # 0.8-1.3 s here, measured by bench/guest_boot.py

        # The ACPI power button (QMP system_powerdown) powers the guest off:
        # systemd-logind, which the ready marker waits for.
        t = await ensure_template(reactor, self.image, pool)
        self.assertFalse(t.built)
        vm_dir = os.path.join(self.run_dir, "button")
        os.makedirs(vm_dir)
        from txvmbot.qemu.disk import create_overlay

        await create_overlay(reactor, t.overlay, os.path.join(vm_dir, "disk.qcow2"))
        vm = await boot(reactor, BootSpec(self.image, vm_dir, accel=t.accel, memory_mb=t.memory_mb,
                                          cpus=t.cpus, machine=t.machine, incoming=t.state,
                                          disk=os.path.join(vm_dir, "disk.qcow2")))
        await vm.wait_ready(30)
        started = time.monotonic()
        how = await vm.stop(15.0)
        self.assertEqual(how, "powerdown")
        print(f"[debian power button] off in {time.monotonic() - started:.2f}s")
