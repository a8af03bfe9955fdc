"""Unit tests for the local VM test image's parts, with no QEMU: cpio,
vmlinux, modules, keys, the NoCloud seed, the kernel package, and a failed
build that leaves nothing and says why."""

from __future__ import annotations

import io
import lzma
import os
import subprocess
from pathlib import Path

import pytest

from txvmbot.cli import run
from txvmbot.qemu import _image_cpio as cpio
from txvmbot.qemu import _image_errors, _image_kernel
from txvmbot.qemu.image import (
    ImageError,
    fingerprint_of,
    make_nocloud_seed,
    nocloud_files,
    read_vfat_file,
)
from txvmbot.qemu.model import READY_MARKER

# --- parts ----------------------------------------------------------------


def test_cpio_newc_lists_with_cpio(tmp_path: Path) -> None:
    entries = [
        cpio.directory("bin"),
        cpio.regular("bin/hello", b"hi\n", 0o755),
        cpio.symlink("bin/sh", "/bin/busybox"),
        cpio.directory("dev"),
        cpio.chardev("dev/console", 5, 1),
    ]
    buf = io.BytesIO()
    cpio.write_newc(buf, entries)
    assert len(buf.getvalue()) % 4 == 0
    p = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    )
    lines = p.stdout.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    assert names == ["bin", "bin/hello", "bin/sh", "dev", "dev/console"]
    assert lines[1].startswith("-rwxr-xr-x") and " root " in lines[1]
    assert lines[2].startswith("lrwxrwxrwx") and lines[2].endswith("-> /bin/busybox")
    assert lines[4].startswith("crw-------") and "5," in lines[4]


def test_extract_vmlinux_finds_the_xz_elf_payload(tmp_path: Path) -> None:
    elf = b"\x7fELF" + os.urandom(1000)
    decoy = lzma.compress(b"not an elf", format=lzma.FORMAT_XZ)
    bz = os.path.join(tmp_path, "vmlinuz")
    with open(bz, "wb") as f:
        f.write(b"MZ" + b"\0" * 500 + decoy + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"TAIL")
    dest = os.path.join(tmp_path, "vmlinux")
    assert _image_kernel.extract_vmlinux(bz, dest)
    with open(dest, "rb") as f:
        assert f.read() == elf
    with open(bz, "wb") as f:
        f.write(b"MZ no payload")
    assert not _image_kernel.extract_vmlinux(bz, os.path.join(tmp_path, "none"))


def _fake_module(path: str, depends: str, compress: bool = False) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = b"\x7fELF...\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"
    if compress:
        data = lzma.compress(data, format=lzma.FORMAT_XZ)
    with open(path, "wb") as f:
        f.write(data)


def test_modules_in_dependency_order_decompressed_builtins_skipped(tmp_path: Path) -> None:
    moddir = str(tmp_path / "lib/modules/6.1.0-test")
    k = os.path.join(moddir, "kernel")
    _fake_module(f"{k}/fs/ext4/ext4.ko.xz", "mbcache,jbd2,crc16", compress=True)
    _fake_module(f"{k}/fs/jbd2/jbd2.ko", "")
    _fake_module(f"{k}/fs/mbcache.ko", "")
    _fake_module(f"{k}/drivers/char/hw_random/virtio-rng.ko", "virtio,rng-core")
    _fake_module(f"{k}/drivers/virtio/virtio.ko", "")
    with open(os.path.join(moddir, "modules.builtin"), "w") as f:
        f.write("kernel/lib/crc16.ko\nkernel/drivers/char/hw_random/rng-core.ko\n")
    dest = str(tmp_path / "out")
    os.makedirs(dest)
    order = _image_kernel.copy_modules(moddir, ["virtio-rng", "ext4"], dest)
    assert order == ["virtio.ko", "virtio_rng.ko", "mbcache.ko", "jbd2.ko", "ext4.ko"]
    with open(os.path.join(dest, "ext4.ko"), "rb") as f:
        assert f.read().startswith(b"\x7fELF")
    _fake_module(f"{k}/drivers/net/virtio_net.ko", "net_failover")
    with pytest.raises(ImageError, match=r"net_failover \(needed by virtio_net\)"):
        _image_kernel.copy_modules(moddir, ["virtio_net"], dest)


def test_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = os.path.join(tmp_path, "k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    with open(key + ".pub") as f:
        public = f.read()
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", key + ".pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert fingerprint_of(public) == out.split()[1]


def test_missing_tool_names_its_apt_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_image_errors, "find_tool", lambda name: None)
    with pytest.raises(
        ImageError, match="dropbearkey is not installed; install it: apt-get install dropbear-bin"
    ):
        _image_errors.need_tool("dropbearkey")
    from txvmbot.qemu import _image_build

    with pytest.raises(ImageError, match="apt-get install .*busybox-static.*e2fsprogs"):
        _image_build.check_tools()


# --- NoCloud seed -----------------------------------------------------------

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHoxqk+0JekBYt7ed4e9HGR7wOP76iL1oLr4dfktgY2F t"


def test_nocloud_user_data_and_meta_data() -> None:
    files = nocloud_files(PUB, instance_id="job-7", hostname="vm7")
    assert files["meta-data"] == 'instance-id: "job-7"\nlocal-hostname: "vm7"\n'
    ud = files["user-data"]
    assert ud.startswith("#cloud-config\n")
    assert f'ssh_authorized_keys:\n  - "{PUB}"\n' in ud
    assert "disable_root: false" in ud
    assert f'final_message: "{READY_MARKER}"' in ud
    other = nocloud_files(PUB, user="admin", ready_marker=None)["user-data"]
    assert '- name: "admin"' in other and f'      - "{PUB}"' in other
    assert "final_message" not in other
    with pytest.raises(ImageError, match="not an ssh public key"):
        nocloud_files("hello")


@pytest.mark.skipif(
    not (_image_errors.find_tool("mkfs.vfat") and _image_errors.find_tool("mtype")),
    reason="needs dosfstools and mtools",
)
def test_nocloud_seed_is_a_cidata_vfat(tmp_path: Path) -> None:
    seed = make_nocloud_seed(str(tmp_path), PUB, instance_id="i-1")
    assert read_vfat_file(seed, "meta-data") == nocloud_files(PUB, instance_id="i-1")["meta-data"]
    assert PUB in read_vfat_file(seed, "user-data")
    label = subprocess.run(
        ["mlabel", "-s", "-i", seed, "::"], capture_output=True, text=True, check=True
    ).stdout
    assert "CIDATA" in label


def test_nocloud_seed_without_tools_names_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from txvmbot.qemu import image

    monkeypatch.setattr(image, "find_tool", lambda name: None)
    with pytest.raises(ImageError, match="dosfstools mtools.*genisoimage.*xorriso"):
        make_nocloud_seed(str(tmp_path), PUB)


def test_kernel_package_from_apt_cache_show(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake(argv: list[str], step: str, fix: str = "", cwd: str | None = None) -> str:
        calls.append(argv)
        return (
            "Package: linux-image-amd64\nVersion: 6.1.192-2\n"
            "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\n"
        )

    monkeypatch.setattr(_image_kernel, "_run", fake)
    assert _image_kernel.kernel_package() == ("linux-image-6.1.0-56-amd64", "6.1.192-2")
    assert calls == [["apt-cache", "show", "--no-all-versions", "linux-image-amd64"]]
    monkeypatch.setattr(_image_kernel, "_run", lambda *a, **k: "Package: x\nDepends: libc6\n")
    with pytest.raises(ImageError, match="names no linux-image dependency; run `apt-get update`"):
        _image_kernel.kernel_package()


def test_cached_deb_is_found_without_apt(tmp_path: Path) -> None:
    deb = tmp_path / "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"
    deb.write_bytes(b"!<arch>\n")
    lines: list[str] = []
    got = _image_kernel.fetch_deb(
        "linux-image-6.1.0-56-amd64", "6.1.192-2", str(tmp_path), lines.append
    )
    assert got == str(deb) and "cached" in lines[0]


def test_failed_build_leaves_nothing_and_cli_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from txvmbot.qemu import _image_build

    def no_download(package: str, version: str, cache_dir: str, progress: object) -> str:
        raise ImageError(
            f"download the kernel: apt-get download {package} exited 100; "
            f"try `apt-get update && apt-get download {package}` by hand"
        )

    monkeypatch.setattr(_image_build, "fetch_deb", no_download)
    inputs: dict[str, object] = {"kernel_package": "linux-image-x", "kernel_version": "1"}
    out = tmp_path / "image"
    with pytest.raises(ImageError, match="apt-get update && apt-get download linux-image-x"):
        _image_build.build_image(str(out), cache_dir=str(tmp_path / "c"), inputs=inputs)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(_image_build, "kernel_package", lambda meta: ("linux-image-x", "1"))
    err = io.StringIO()
    code = run(
        ["image", "build", "--output", str(out), "--cache-dir", str(tmp_path / "c")],
        stdout=io.StringIO(),
        stderr=err,
    )
    assert code == 1
    assert "\ntxvmbot image build: error: download the kernel" in "\n" + err.getvalue()
    assert sorted(os.listdir(tmp_path)) == []
