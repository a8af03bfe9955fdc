"""``--user-data`` on local VMs, under real QEMU (TCG) with the session's
busybox test image: a job with user data gets a NoCloud seed of its own,
attached to its VM (the busybox guest has no cloud-init, but it can read
the seed's drive: the merged user data and the VM's own instance id are
on it), and an image without a seed is refused at the image step.

A boot through cloud-init itself needs a guest with cloud-init
(tests/integration/test_image_import.py, once a Debian build with cloud-init exists). At most two VMs run at once; every QEMU
is stopped by its job's cleanup.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.trial.unittest import TestCase

from tests.support import checkrun
from tests.support import real_daemon as D
from txvmbot.jobs.smoke import LocalCheck
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckResult
from txvmbot.qemu.image import custom_image, make_nocloud_seed
from txvmbot.qemu.model import READY_MARKER, LocalPool, LocalSpec, LocalTimeouts

reactor: Any = _reactor

MARK = "txvmbot-user-data-mark-7d1e"
USER_DATA = f"#cloud-config\nwrite_files:\n  - path: /etc/mark\n    content: {MARK}\n".encode()


def cloud_kind_image(src: Any, d: str) -> str:
    """The busybox image's kernel, initrd and disk recorded in ``d`` as a
    cloud image with a NoCloud seed (what ``image import --kernel`` makes)."""
    os.makedirs(d)
    for path in (src.kernel, src.initrd, src.disk, src.ssh_key, src.ssh_key + ".pub"):
        shutil.copy2(path, os.path.join(d, os.path.basename(path)))
    make_nocloud_seed(d, src.ssh_public, user="root")
    custom_image(
        d, ssh_key=os.path.basename(src.ssh_key), kernel=os.path.basename(src.kernel),
        initrd=os.path.basename(src.initrd), disk=os.path.basename(src.disk),
        seed="seed.img", cmdline=src.cmdline, ready_marker=READY_MARKER, kind="cloud",
        extra={"nocloud": {"user": "root", "hostname": "txvmbot-guest",
                           "instance_id": "txvmbot-img"}},
    )
    return d


@pytest.fixture(scope="class")
def _image_for_class(request: pytest.FixtureRequest, qemu_image: Any) -> None:
    request.cls.image = qemu_image


@pytest.mark.usefixtures("_image_for_class")
class LocalUserDataTests(TestCase):
    timeout = 120
    image: Any

    def setUp(self) -> None:
        # Short: QMP socket paths must fit in 107 bytes.
        self.root = tempfile.mkdtemp(prefix="txud-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def cloud_kind(self) -> str:
        return cloud_kind_image(self.image, os.path.join(self.root, "img"))

    async def job(self, image_dir: str, *commands: str, fast_start: bool = False) -> CheckResult:
        pool = LocalPool(name="ud", image_dir=image_dir, run_dir=os.path.join(self.root, "run"),
                         min_free_mb=64, fast_start=fast_start, keep_on_failure=False)
        spec = LocalSpec(pool=pool, commands=commands or ("true",), user_data=USER_DATA,
                         timeouts=LocalTimeouts(boot=60, ssh=30, command=20, shutdown=5))
        return await LocalCheck(reactor, spec, journal=MemoryJournal()).run()

    async def test_each_vm_boots_with_its_own_seed(self) -> None:
        image = self.cloud_kind()
        result = await self.job(
            image,
            f"grep -o -F {MARK} /dev/vdb | head -n 1",
            "grep -o 'instance-id: \"[^\"]*\"' /dev/vdb | head -n 1",
            "grep -o -F final_message /dev/vdb | head -n 1",
            fast_start=True,
        )
        self.assertTrue(result.passed, f"{result.error}\n{result.steps}")
        out = [c.stdout.decode().strip() for c in result.commands]
        self.assertEqual(out[0], MARK)
        self.assertTrue(out[1].startswith(f'instance-id: "{result.check_id}-'), out[1])
        self.assertEqual(out[2], "final_message")
        names = [s.name for s in result.steps]
        self.assertNotIn("template", names)  # user data needs a real boot
        [image_step] = [s for s in result.steps if s.name == "image"]
        self.assertIn(f"user data: {len(USER_DATA)} bytes", image_step.detail)
        self.assertIn("fast start skipped", image_step.detail)
        self.assertEqual(dict(result.facts.extra)["user_data_bytes"], str(len(USER_DATA)))
        # Cleanup removed the VM's directory, its seed with it.
        self.assertEqual(os.listdir(os.path.join(self.root, "run")), [])

    async def test_an_image_without_a_seed_is_refused_before_any_vm(self) -> None:
        result = await self.job(self.image.dir)
        self.assertFalse(result.passed)
        [image_step] = [s for s in result.steps if s.name == "image"]
        self.assertEqual(image_step.outcome, "failed")
        self.assertIn("--user-data needs a cloud image booted by cloud-init", result.error)
        self.assertIn("is a busybox image without a NoCloud seed", result.error)
        self.assertNotIn("boot", [s.name for s in result.steps])


def test_a_pool_on_an_image_by_name_takes_user_data_through_the_daemon(qemu_image: Any) -> None:
    """``[pools.cloudy] image = "bb-cloud"`` (an image by name in the
    state dir) and ``submit --pool cloudy --user-data FILE``: the job's VM
    gets the merged user data on its own seed."""
    root = tempfile.mkdtemp(prefix="txud-")
    try:
        xdg = os.path.join(root, "xdg")
        cloud_kind_image(qemu_image, os.path.join(xdg, "txvmbot", "images", "bb-cloud"))
        run_dir = os.path.join(root, "run")
        config = os.path.join(root, "txvmbot.toml")
        with open(config, "w") as f:
            f.write("[daemon]\nworkers = 1\n\n[pools.cloudy]\nimage = \"bb-cloud\"\n"
                    f"run_dir = {json.dumps(run_dir)}\nmax_vms = 1\n")
        ud = os.path.join(root, "user-data")
        with open(ud, "wb") as f:
            f.write(USER_DATA)
        data = os.path.join(root, "data")
        os.makedirs(data)
        env = dict(checkrun.env(), XDG_STATE_HOME=xdg)
        listed = subprocess.run(checkrun.txvmbot_cmd("image", "list", "--json"), env=env,
                                capture_output=True, text=True, timeout=60)
        assert [(i["name"], i["kind"], i["verified"]) for i in json.loads(listed.stdout)] == [
            ("bb-cloud", "cloud", True)], listed.stderr
        proc, d = D.start(data, ["--config", config], env=env)
        try:
            p = d.client("submit", "--pool", "cloudy", "--wait", "--json", "-", "--max-attempts",
                         "1", "--user-data", ud, "--command",
                         f"grep -o -F {MARK} /dev/vdb | head -n 1", timeout=180)
            assert p.returncode == 0, p.stdout + p.stderr + d.log()[-3000:]
            job = json.loads(p.stdout)
            assert job["result"]["commands"][0]["stdout"] == MARK + "\n"
            assert job["spec"]["pool_settings"]["image_dir"].endswith("/images/bb-cloud")
        finally:
            D.stop(proc)
        assert os.listdir(run_dir) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
