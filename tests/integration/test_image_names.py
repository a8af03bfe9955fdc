"""Integration test for images by name: ``image list`` and ``image show
NAME`` for every kind, one of them the session's test image built with
QEMU (the ``qemu_image`` fixture)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support.cli_runs import cli
from tests.support.image_files import cloud_qcow2, state
from txvmbot.qemu import _image_errors
from txvmbot.qemu.image import ImageInfo

__all__ = ["cloud_qcow2", "state"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(
    not all(_image_errors.find_tool(t) for t in ("qemu-img", "mkfs.vfat", "mtype", "ssh-keygen")),
    reason="needs qemu-utils, dosfstools, mtools and openssh-client",
)


# --- list and show ---------------------------------------------------------------------


def test_list_and_show_every_kind(
    qemu_image: ImageInfo, cloud_qcow2: Path, tmp_path: Path, state: str
) -> None:
    os.makedirs(state)
    os.symlink(qemu_image.dir, os.path.join(state, "image"))  # the default, read only
    assert cli("image", "import", str(cloud_qcow2), "--user", "debian", "--name", "deb",
               "--distro", "debian", "--release", "12", "--state-dir", state)[0] == 0
    # A custom image (the Python API's), placed by name.
    from txvmbot.qemu.image import custom_image

    custom = os.path.join(state, "images", "mine")
    os.makedirs(custom)
    for f in ("id_ed25519", "id_ed25519.pub", "vmlinux", "initrd.img"):
        src = os.path.join(qemu_image.dir, f if os.path.exists(os.path.join(qemu_image.dir, f))
                           else "vmlinuz")
        shutil.copy2(src, os.path.join(custom, f))
    custom_image(custom, ssh_key="id_ed25519", kernel="vmlinux", initrd="initrd.img")

    code, out, err = cli("image", "list", "--state-dir", state)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "DISTRIBUTION", "KERNEL", "SIZE", "BUILT",
                                "(UTC)", "VERIFIED"]
    assert [line.split()[0] for line in lines[1:]] == ["default", "deb", "mine"]
    assert lines[1].split()[1] == "busybox" and qemu_image.kernel_version in lines[1]
    assert lines[2].split()[1:4] == ["cloud", "debian", "12"] and "the disk's own" in lines[2]
    assert lines[3].split()[1] == "custom"
    assert all(line.rstrip().endswith("yes") for line in lines[1:])

    code, out, _ = cli("image", "list", "--verify", "--json", "--state-dir", state)
    assert code == 0
    rows = json.loads(out)
    assert [(r["name"], r["kind"], r["verified"], r["checked"]) for r in rows] == [
        ("default", "busybox", True, "sha256"), ("deb", "cloud", True, "sha256"),
        ("mine", "custom", True, "sha256")]
    assert rows[1]["size_bytes"] > 0 and rows[1]["built_at"] > 0

    for name, kind in (("default", "busybox"), ("deb", "cloud"), ("mine", "custom")):
        code, out, err = cli("image", "show", name, "--verify", "--state-dir", state)
        assert code == 0, err
        assert f"kind:         {kind}" in out
    code, out, _ = cli("image", "show", "deb", "--json", "-", "--state-dir", state)
    doc = json.loads(out)
    assert doc["kind"] == "cloud" and doc["ssh_user"] == "debian" and doc["seed"].endswith("seed.img")
    code, _, err = cli("image", "show", "deb", "--output", custom, "--state-dir", state)
    assert code == 2 and "NAME or --output DIR, not both" in err
    code, _, err = cli("image", "show", "no/such", "--state-dir", state)
    assert code == 1 and "no manifest.json" in err
    code, _, err = cli("image", "show", "bad name", "--state-dir", state)
    assert code == 2 and "image name 'bad name'" in err
