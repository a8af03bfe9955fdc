"""Unit tests for images by name, with no VM: ``txvmbot image import`` of a
cloud image's qcow2 made here with qemu-img (tests/support/image_files.py),
what ``image list`` says of a broken image, a pool naming its image, and
the kernel release read from a kernel file; the errors say what is wrong
with a file or a name."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.cli_runs import cli
from tests.support.image_files import cloud_qcow2, qcow2, sha256, state
from txvmbot.qemu import _image_errors
from txvmbot.qemu._image_import import import_cloud_image
from txvmbot.qemu._image_list import kind_of, list_images
from txvmbot.qemu.image import ImageError, load_image, read_vfat_file
from txvmbot.qemu.model import READY_MARKER

__all__ = ["cloud_qcow2", "state"]  # fixtures, used by name

pytestmark = pytest.mark.skipif(
    not all(_image_errors.find_tool(t) for t in ("qemu-img", "mkfs.vfat", "mtype", "ssh-keygen")),
    reason="needs qemu-utils, dosfstools, mtools and openssh-client",
)


# --- import ------------------------------------------------------------------------


def test_import_records_a_cloud_image(cloud_qcow2: Path, state: str) -> None:
    code, out, err = cli("image", "import", str(cloud_qcow2), "--user", "debian", "--distro",
                         "debian", "--release", "12", "--state-dir", state)
    assert code == 0, err
    d = os.path.join(state, "images", "debian-12-genericcloud-amd64")
    assert "imported as debian-12-genericcloud-amd64" in out and "kind:         cloud" in out
    assert sorted(os.listdir(d)) == ["disk.qcow2", "id_ed25519", "id_ed25519.pub",
                                     "manifest.json", "seed.img"]
    info = load_image(d, verify=True)
    assert info.disk == os.path.join(d, "disk.qcow2") and sha256(info.disk) == sha256(cloud_qcow2)
    assert info.kernel is None and info.ssh_user == "debian"
    assert info.ready_marker == READY_MARKER and info.seed == os.path.join(d, "seed.img")
    assert os.stat(info.ssh_key).st_mode & 0o777 == 0o600
    m = info.manifest
    assert kind_of(m) == "cloud" and m["custom"] is False
    assert (m["distro"], m["release"]) == ("debian", "12")
    assert m["nocloud"] == {"user": "debian", "hostname": "txvmbot-guest",
                            "instance_id": "txvmbot-debian-12-genericcloud-amd64"}
    assert m["imported_from"]["path"] == str(cloud_qcow2)
    assert m["files"]["disk.qcow2"]["sha256"] == sha256(cloud_qcow2)
    # The seed creates the user with the image's key and prints the marker.
    user_data = yaml.safe_load(read_vfat_file(info.seed, "user-data"))
    [user] = [u for u in user_data["users"] if isinstance(u, dict)]
    assert user["name"] == "debian" and user["ssh_authorized_keys"] == [info.ssh_public]
    assert user_data["final_message"] == READY_MARKER
    assert "txvmbot-debian-12" in read_vfat_file(info.seed, "meta-data")


def test_import_with_a_kernel_and_replace_with_force(cloud_qcow2: Path, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k" * 100)
    initrd.write_bytes(b"i" * 50)
    dest = str(tmp_path / "images" / "x")
    info = import_cloud_image(str(cloud_qcow2), dest, user="root", kernel=str(kernel),
                              initrd=str(initrd))
    assert info.kernel == os.path.join(dest, "vmlinuz") and info.initrd
    assert info.cmdline == "root=/dev/vda1 rw console=ttyS0"
    key = Path(info.ssh_key).read_bytes()
    with pytest.raises(ImageError, match="exists; choose another --name, or --force"):
        import_cloud_image(str(cloud_qcow2), dest, user="root")
    again = import_cloud_image(str(cloud_qcow2), dest, user="admin", cmdline=None, force=True)
    assert again.kernel is None and again.ssh_user == "admin"
    assert Path(again.ssh_key).read_bytes() != key
    assert os.listdir(tmp_path / "images") == ["x"]  # nothing left beside it


@pytest.mark.parametrize(
    ("make", "argv", "message"),
    [
        ("fake", [], "fake.qcow2 is not a qcow2 image (qemu-img reads it as raw); convert it"),
        ("overlay", ["--name", "o"], "overlay.qcow2 is an overlay on"),
        ("missing", ["--name", "m"], "missing.qcow2 is not a file"),
        ("good", ["--name", "k", "--initrd", "/etc/hostname"], "--initrd needs --kernel"),
        ("good", ["--name", "k", "--append", "quiet"], "--append needs --kernel"),
        ("good", ["--name", "k", "--kernel", "/nonexistent"], "--kernel /nonexistent is not a file"),
    ],
)
def test_import_errors_say_what_is_wrong_and_leave_nothing(
    tmp_path: Path, state: str, make: str, argv: list[str], message: str
) -> None:
    good = qcow2(tmp_path / "good.qcow2")
    files = {"fake": tmp_path / "fake.qcow2", "good": good, "missing": tmp_path / "missing.qcow2",
             "overlay": tmp_path / "overlay.qcow2"}
    (tmp_path / "fake.qcow2").write_bytes(b"this is not a disk image\n" * 100)
    qcow2(files["overlay"], backing=good)
    code, _, err = cli("image", "import", str(files[make]), "--user", "debian", "--state-dir",
                       state, *argv)
    assert code == 1, err
    assert "txvmbot image import: error: " in err and message in err, err
    images = os.path.join(state, "images")
    assert not os.path.isdir(images) or os.listdir(images) == []


def test_import_names_and_users_are_checked(cloud_qcow2: Path, tmp_path: Path, state: str) -> None:
    code, _, err = cli("image", "import", str(cloud_qcow2), "--user", "Debian", "--state-dir", state)
    assert code == 1 and "--user 'Debian': a user name is" in err
    odd = tmp_path / "-odd.qcow2"
    shutil.copyfile(cloud_qcow2, odd)
    code, _, err = cli("image", "import", str(odd), "--user", "debian", "--state-dir", state)
    assert code == 2 and "--name" in err and "(give --name)" in err, err
    code, _, err = cli("image", "import", str(cloud_qcow2), "--user", "debian", "--name",
                       "default", "--state-dir", state)
    assert code == 2 and "'default' is the busybox test image's" in err
    code, _, err = cli("image", "import", str(cloud_qcow2), "--state-dir", state)
    assert code == 2 and "--user" in err


def test_list_says_which_image_is_broken_and_why(cloud_qcow2: Path, state: str) -> None:
    code, out, _ = cli("image", "list", "--state-dir", state)
    assert code == 0 and "no images in" in out and "image import" in out
    for name in ("a", "b"):
        assert cli("image", "import", str(cloud_qcow2), "--user", "u", "--name", name,
                   "--state-dir", state)[0] == 0
    os.remove(os.path.join(state, "images", "b", "seed.img"))
    os.makedirs(os.path.join(state, "images", "c"))  # no manifest at all
    code, out, err = cli("image", "list", "--state-dir", state)
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert rows["a"].endswith("yes") and rows["b"].endswith("NO") and rows["c"].endswith("NO")
    assert "b: image " in err and "seed.img is missing" in err
    assert "c: image " in err and "no manifest.json" in err
    # --verify finds a changed byte that keeps size and mtime.
    disk = os.path.join(state, "images", "a", "disk.qcow2")
    st = os.stat(disk)
    with open(disk, "r+b") as f:
        f.seek(st.st_size - 1)
        last = f.read(1)
        f.seek(st.st_size - 1)
        f.write(bytes([last[0] ^ 1]))
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [i.verified for i in list_images(state)][:1] == [True]
    [a] = [i for i in list_images(state, verify=True) if i.name == "a"]
    assert not a.verified and "sha256 differs" in a.error


# --- [pools.NAME] image = "NAME" ----------------------------------------------------------


def _pool(tmp_path: Path, body: str) -> object:
    from txvmbot.daemon import settings

    conf = tmp_path / "daemon.toml"
    conf.write_text(f"[daemon]\ndata_dir = {json.dumps(str(tmp_path / 'data'))}\n\n"
                    f"[pools.cloudy]\n{body}")
    [pool] = settings.load(str(conf), {"XDG_STATE_HOME": str(tmp_path / "xdg"),
                                       "HOME": str(tmp_path)}).pools
    return pool


def test_a_pool_names_its_image(tmp_path: Path) -> None:
    from txvmbot.errors import ConfigError

    state = tmp_path / "xdg" / "txvmbot"
    assert _pool(tmp_path, 'image = "deb"\n').image_dir == str(state / "images" / "deb")  # type: ignore[attr-defined]
    assert _pool(tmp_path, 'image = "default"\n').image_dir == str(state / "image")  # type: ignore[attr-defined]
    assert _pool(tmp_path, 'image_dir = "imgs/x"\n').image_dir == str(tmp_path / "imgs" / "x")  # type: ignore[attr-defined]
    for body, message in (
        ('image = "deb"\nimage_dir = "/x"\n', "give image (a name) or image_dir, not both"),
        ('image = "../x"\n', "is a path: use image_dir = '../x'"),
        ('image = "a b"\n', "image name 'a b': use 1 to 64 letters"),
        ("image = 3\n", "expected str, found 3"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            _pool(tmp_path, body)
        assert e.value.where == "pools.cloudy.image" and "daemon.toml" in e.value.message


def test_kernel_release_from_a_bzimage_header_or_a_vmlinux_banner(tmp_path: Path) -> None:
    from txvmbot.qemu._image_import import kernel_release

    bz = bytearray(0x600)
    bz[0x202:0x206] = b"HdrS"
    bz[0x20E:0x210] = (0x300).to_bytes(2, "little")
    bz[0x500:0x520] = b"6.1.0-28-amd64 (debian@x) #1\0"
    (tmp_path / "vmlinuz").write_bytes(bytes(bz))
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF" + b"\0" * 1000 + b"Linux version 6.1.0-28-amd64 (gcc)")
    (tmp_path / "other").write_bytes(b"nothing")
    assert kernel_release(str(tmp_path / "vmlinuz")) == "6.1.0-28-amd64"
    assert kernel_release(str(tmp_path / "vmlinux")) == "6.1.0-28-amd64"
    assert kernel_release(str(tmp_path / "other")) == ""
    assert kernel_release(str(tmp_path / "missing")) == ""
