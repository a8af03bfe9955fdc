"""Integration tests for fast start: a pool's template (booted once, saved)
and the jobs that resume from it, on real QEMU under TCG with the session's
test image.

At most two VMs run at once; every QEMU is stopped by its job's cleanup or
killed by pid in the test's cleanup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import attrs
import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.trial.unittest import TestCase

from txvmbot.jobs.smoke import LocalCheck
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckResult, StepResult
from txvmbot.qemu import template as T
from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts
from txvmbot.qemu.recover import stop_from_record

reactor: Any = _reactor


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step(result: CheckResult, name: str) -> StepResult:
    [s] = [s for s in result.steps if s.name == name]
    return s


def _boot_to_ssh(result: CheckResult) -> float:
    """From the start of the boot step to the end of wait-ssh."""
    boot, ssh = _step(result, "boot"), _step(result, "wait-ssh")
    return ssh.started + ssh.duration - boot.started


@pytest.fixture(scope="class")
def _image_for_class(request: pytest.FixtureRequest, qemu_image: Any) -> None:
    request.cls.image = qemu_image


@pytest.mark.usefixtures("_image_for_class")
class FastStartTests(TestCase):
    """Jobs with ``fast_start`` and ``ensure_template`` on a real image."""

    timeout = 60
    image: Any

    def setUp(self) -> None:
        # Short: QMP socket paths must fit in 107 bytes.
        self.run_dir = tempfile.mkdtemp(prefix="txvt-")
        self.addCleanup(shutil.rmtree, self.run_dir, True)
        # Last resort: a template build left running by a failing test.
        self.addCleanup(stop_from_record, os.path.join(self.run_dir, "template", ".build"))
        self.pool = LocalPool(
            name="fast",
            image_dir=self.image.dir,
            run_dir=self.run_dir,
            accel="auto",
            fast_start=True,
            min_free_mb=64,
        )

    async def job(self, *commands: str, pool: LocalPool | None = None) -> CheckResult:
        spec = LocalSpec(
            pool=pool or self.pool,
            commands=commands or ("uname -a",),
            timeouts=LocalTimeouts(boot=30, ssh=20, command=20, shutdown=5),
        )
        check = LocalCheck(reactor, spec, journal=MemoryJournal())
        return await check.run()

    def assertPassed(self, result: CheckResult) -> None:
        self.assertTrue(result.passed, f"{result.error}\n{result.steps}")

    async def test_first_job_builds_second_reuses(self) -> None:
        first = await self.job()
        self.assertPassed(first)
        names = [s.name for s in first.steps]
        self.assertEqual(
            names[:8],
            ["disk-space", "image", "template", "overlay", "boot", "ready", "wait-ssh", "commands"],
        )
        self.assertIn("built", _step(first, "template").detail)
        second = await self.job()
        self.assertPassed(second)
        tmpl = _step(second, "template")
        self.assertIn("reused", tmpl.detail)
        self.assertLess(tmpl.duration, 0.5)
        facts = dict(second.facts.extra)
        self.assertEqual(facts["vm_start"], "incoming state")
        self.assertEqual(facts["template"], "reused")
        self.assertEqual(dict(first.facts.extra)["template"], "built")
        # The template's build is a cold boot to the ready marker plus the
        # save; a job from the template reaches ssh in a fraction of that.
        with open(os.path.join(self.run_dir, "template", "template.json")) as f:
            build_seconds = json.load(f)["build_seconds"]
        fast = _boot_to_ssh(second)
        self.assertLess(fast, 1.5)
        self.assertLess(fast, build_seconds / 2)
        # Job cleanup removed the jobs' VMs and left the pool's template.
        self.assertEqual(sorted(os.listdir(self.run_dir)), ["template"])
        print(f"\ntemplate built in {build_seconds:.2f}s; job boot-to-ssh {fast:.2f}s")

    async def test_writes_do_not_leak(self) -> None:
        first = await self.job("echo secret > /data/leak && sync && cat /data/leak")
        self.assertPassed(first)
        self.assertEqual(first.commands[-1].stdout, b"secret\n")
        tdir = os.path.join(self.run_dir, "template")
        overlay, state = os.path.join(tdir, "overlay.qcow2"), os.path.join(tdir, "state.bin")
        before = (_sha256(overlay), _sha256(state))
        self.assertEqual(os.stat(overlay).st_mode & 0o777, 0o400)
        second = await self.job("test ! -e /data/leak && ls /data")
        self.assertPassed(second)
        self.assertEqual((_sha256(overlay), _sha256(state)), before)
        # the template's own disk does not have it either
        info = subprocess.run(
            ["qemu-img", "check", overlay], capture_output=True, text=True, check=False
        )
        self.assertEqual(info.returncode, 0, info.stdout + info.stderr)

    async def test_changed_image_rebuilds(self) -> None:
        a = await T.ensure_template(reactor, self.image, self.pool)
        self.assertTrue(a.built)
        again = await T.ensure_template(reactor, self.image, self.pool)
        self.assertFalse(again.built)
        changed = attrs.evolve(
            self.image, manifest={**self.image.manifest, "built_at": 1}
        )
        self.assertNotEqual(T.image_key(changed), T.image_key(self.image))
        b = await T.ensure_template(reactor, changed, self.pool)
        self.assertTrue(b.built)
        self.assertEqual(b.image_key, T.image_key(changed))
        self.assertEqual(b.state, a.state)  # same place, new files
        with open(os.path.join(b.dir, "template.json")) as f:
            self.assertEqual(json.load(f)["image_key"], T.image_key(changed))
        self.assertFalse(os.path.exists(os.path.join(b.dir, ".build")))

    async def test_concurrent_callers_build_once(self) -> None:
        results: list[T.Template] = await gatherResults(
            [
                T.ensure_template(reactor, self.image, self.pool),
                T.ensure_template(reactor, self.image, self.pool),
            ]
        )
        self.assertEqual(sorted(r.built for r in results), [False, True])
        self.assertEqual(results[0].state, results[1].state)
        self.assertEqual(results[0].build_seconds, results[1].build_seconds)

    async def test_cancelled_build_leaves_nothing(self) -> None:
        d = T.ensure_template(reactor, self.image, self.pool)
        await _sleep(1.0)
        d.cancel()
        try:
            await d
        except CancelledError:
            pass
        else:
            self.fail("the build was not cancelled")
        tdir = os.path.join(self.run_dir, "template")
        self.assertFalse(os.path.exists(os.path.join(tdir, ".build")))
        self.assertFalse(os.path.exists(os.path.join(tdir, "template.json")))
        # the lock is free again: the next caller builds
        t = await T.ensure_template(reactor, self.image, self.pool)
        self.assertTrue(t.built)

    async def test_kept_failure_stands_without_the_template(self) -> None:
        result = await self.job("echo evidence > /data/e && sync && false")
        self.assertFalse(result.passed)
        kept = dict(result.facts.extra)["kept_path"]
        self.addCleanup(shutil.rmtree, kept, True)
        overlay = os.path.join(kept, "overlay.qcow2")
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", overlay],
            capture_output=True,
            check=True,
        )
        self.assertEqual(json.loads(info.stdout)["backing-filename"], self.image.disk)
        self.assertTrue(os.path.exists(os.path.join(kept, "state.bin")))


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
