"""A cloud image imported with ``txvmbot image import`` boots through
cloud-init, on real QEMU (TCG): the Debian image built with cloud-init in
it (``build_debian_image(..., packages=["cloud-init"])``, booted with its
own kernel and initrd, as ``image import --kernel --initrd --append``
allows), imported under a state dir, then ``txvmbot check --local`` on it
with ``--user-data``: cloud-init created the import's user with the
image's key, ran the user's cloud-config, and printed the ready marker.

The image is built once (cached under
``$TXVMBOT_TEST_IMAGE_ROOT/debian-cloud-init``, a file lock serialising
builds) and needs root and mmdebstrap, like the build. One boot, with a
#cloud-config (each boot costs ~90 s under TCG); the MIME multi-part that
a script becomes is checked without a boot in tests/unit/test_userdata.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import checkrun
from tests.support.qemu_fixtures import IMAGE_ROOT, _locked
from txvmbot.qemu._image_errors import find_tool
from txvmbot.qemu.image import build_debian_image, load_image

pytestmark = [
    # The first test may build the image (mmdebstrap) before it boots.
    pytest.mark.timeout(1200),
    pytest.mark.skipif(find_tool("mmdebstrap") is None, reason="needs mmdebstrap (bin/setup)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the Debian image is built as root"),
]

USER = "tester"
MARK = "written-by-the-users-cloud-config"


@pytest.fixture(scope="module")
def debian_with_cloud_init() -> Any:
    root = os.path.join(IMAGE_ROOT, "debian-cloud-init")
    out = os.path.join(root, "image")
    with _locked(os.path.join(root, ".lock")):
        build_debian_image(out, cache_dir=os.path.join(IMAGE_ROOT, "cache"),
                           packages=["cloud-init"])
        return load_image(out)


@pytest.fixture(scope="module")
def imported(debian_with_cloud_init: Any) -> Iterator[tuple[str, dict[str, str]]]:
    """The Debian image imported as ``deb-ci`` into a fresh state dir
    (short: QMP socket paths must fit in 107 bytes); the dir and the
    environment to run txvmbot in."""
    src = debian_with_cloud_init
    root = tempfile.mkdtemp(prefix="txci-")
    state = os.path.join(root, "state")
    env = dict(checkrun.env(), XDG_STATE_HOME=os.path.join(root, "xdg"))
    try:
        p = subprocess.run(
            checkrun.txvmbot_cmd(
                "image", "import", src.disk, "--user", USER, "--name", "deb-ci",
                "--state-dir", state, "--distro", "debian",
                "--release", str(src.manifest.get("release", "")),
                "--kernel", src.kernel, "--initrd", src.initrd, "--append", src.cmdline,
            ),
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert p.returncode == 0, p.stdout + p.stderr
        yield state, env
    finally:
        from tests.support.qemu_runs import reap_run_dir

        reap_run_dir(os.path.join(state, "vms"))
        shutil.rmtree(root, ignore_errors=True)


#: Bounded: cloud-init's final stage after the ready marker, under TCG.
WAIT_FINAL = (
    "i=0; while [ ! -f /var/lib/cloud/instance/boot-finished ] && [ $i -lt 180 ]; do "
    "sleep 1; i=$((i+1)); done; cat /var/lib/cloud/data/result.json"
)
INSTANCE_ID = (
    "python3 -c 'import json; print(json.load(open("
    "\"/run/cloud-init/instance-data.json\"))[\"v1\"][\"instance_id\"])'"
)


def test_import_lists_the_image(imported: tuple[str, dict[str, str]]) -> None:
    state, env = imported
    listed = subprocess.run(checkrun.txvmbot_cmd("image", "list", "--json", "--state-dir", state),
                            capture_output=True, text=True, timeout=120, env=env)
    [row] = json.loads(listed.stdout)
    assert (row["name"], row["kind"], row["verified"]) == ("deb-ci", "cloud", True)
    assert row["kernel"].endswith("-amd64") and row["distro"] == "debian"


@pytest.mark.parametrize(
    "user_data",
    [
        # merged into txvmbot's #cloud-config
        f"#cloud-config\nwrite_files:\n  - path: /etc/txvmbot-mark\n    content: {MARK}\n",
    ],
    ids=["cloud-config"],
)
def test_an_imported_cloud_image_boots_through_cloud_init(
    imported: tuple[str, dict[str, str]], user_data: str
) -> None:
    state, env = imported
    root = os.path.dirname(state)
    ud = os.path.join(root, "user-data")
    with open(ud, "w") as f:
        f.write(user_data)
    out = os.path.join(root, "result.json")
    p = subprocess.run(
        checkrun.txvmbot_cmd(
            "check", "--local", "--image", "deb-ci", "--state-dir", state, "--user-data", ud,
            "--memory", "512", "--timeout-boot", "240", "--timeout-ssh", "120",
            "--timeout-command", "240", "--no-keep-on-failure",
            # A module may fail on a minimal image (no locales, no resize2fs)
            # and `cloud-init status --wait` ends at the first error: wait for
            # the final stage itself.
            "--command", WAIT_FINAL, "--command", INSTANCE_ID,
            "--command", "id -un", "--command", "cat /etc/txvmbot-mark",
            "--json", out,
        ),
        capture_output=True, text=True, timeout=900, env=env,
    )
    with open(out) as f:
        [result] = json.load(f)
    assert p.returncode == 0 and result["passed"], p.stdout + p.stderr
    done, instance_id, whoami, mark = (c["stdout"] for c in result["commands"])
    assert "DataSourceNoCloud" in json.loads(done)["v1"]["datasource"], done
    # The job's own seed, not the image's: its instance id is the VM's.
    assert instance_id.startswith(result["check_id"] + "-"), instance_id
    # cloud-init made txvmbot's user with the image's key, and ran the user's part.
    assert whoami.strip() == USER
    assert mark.strip() == MARK
    assert os.listdir(os.path.join(state, "vms")) == []
