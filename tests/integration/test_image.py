"""Integration tests for the local VM test image: the session's image (built
with QEMU, the ``qemu_image`` fixture), loading and checking an image
directory, the CLI, and a real boot under QEMU (TCG) to ready marker, ssh
and ACPI power-off."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import free_port
from txvmbot.cli import run
from txvmbot.qemu import _image_errors
from txvmbot.qemu.image import (
    ImageError,
    ImageInfo,
    custom_image,
    fingerprint_of,
    load_image,
    make_nocloud_seed,
)
from txvmbot.qemu.model import READY_MARKER

# --- the built image --------------------------------------------------------


def test_image_manifest_lists_versions_and_checksums(qemu_image: ImageInfo) -> None:
    m = qemu_image.manifest
    assert m["format_version"] == qemu_image.format_version == 1
    assert m["kernel"]["package"].startswith("linux-image-")
    assert m["kernel"]["version"] and m["kernel"]["release"] == qemu_image.kernel_version
    assert set(m["packages"]) == {"busybox-static", "dropbear-bin", "openssh-sftp-server"}
    assert all(m["packages"].values())
    assert isinstance(m["built_at"], int) and m["builder"]["host_kernel"]
    assert m["ready_marker"] == READY_MARKER == qemu_image.ready_marker
    assert m["cmdline"] == qemu_image.cmdline and "console=ttyS0" in m["cmdline"]
    assert qemu_image.kernel and qemu_image.kernel.endswith("vmlinux")
    files = m["files"]
    for name in ("vmlinux", "vmlinuz", "initrd", "disk.qcow2", "id_ed25519", "id_ed25519.pub"):
        assert len(files[name]["sha256"]) == 64, name
    assert set(files) == set(os.listdir(qemu_image.dir)) - {"manifest.json"}
    assert os.stat(qemu_image.ssh_key).st_mode & 0o777 == 0o600
    assert qemu_image.host_key_fingerprint == fingerprint_of(m["host_key_public"])
    # The initrd has what the guest needs, owned by root.
    assert qemu_image.initrd
    p = subprocess.run(
        ["cpio", "-itv", "--quiet", "-F", qemu_image.initrd],
        capture_output=True,
        text=True,
        check=True,
    )
    listing = p.stdout
    for path in (
        "init",
        "bin/sh",
        "bin/busybox",
        "usr/sbin/dropbear",
        "usr/lib/sftp-server",
        "sbin/poweroff",
        "lib/modules/virtio_net.ko",
        "lib/modules/ext4.ko",
        "lib/modules/button.ko",
        "etc/acpi/PWRF/00000080",
        "root/.ssh/authorized_keys",
    ):
        assert f" {path}" in listing, path
    load_image(qemu_image.dir, verify=True)


@pytest.fixture
def image_copy(qemu_image: ImageInfo, tmp_path: Path) -> str:
    dest = os.path.join(tmp_path, "image")
    shutil.copytree(qemu_image.dir, dest)  # copy2 keeps mtimes
    return dest


def test_load_image_copy_loads(image_copy: str, qemu_image: ImageInfo) -> None:
    info = load_image(image_copy)
    assert info.initrd == os.path.join(image_copy, "initrd")
    assert info.host_key_fingerprint == qemu_image.host_key_fingerprint


def test_load_image_names_a_missing_file(image_copy: str) -> None:
    os.unlink(os.path.join(image_copy, "initrd"))
    with pytest.raises(ImageError, match=r"initrd is missing.*txvmbot image build --force"):
        load_image(image_copy)


def test_load_image_detects_a_changed_file(image_copy: str) -> None:
    path = os.path.join(image_copy, "vmlinuz")
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    # Same size and mtime: only --verify (sha256) sees it.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    load_image(image_copy)
    with pytest.raises(ImageError, match="vmlinuz changed since the image was built"):
        load_image(image_copy, verify=True)
    # A new mtime makes the cheap check hash it.
    os.utime(path)
    with pytest.raises(ImageError, match="vmlinuz changed"):
        load_image(image_copy)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(ImageError, match=r"vmlinuz has \d+ bytes, the manifest says"):
        load_image(image_copy)


def test_load_image_refuses_a_readable_key_and_no_manifest(image_copy: str) -> None:
    os.chmod(os.path.join(image_copy, "id_ed25519"), 0o644)
    with pytest.raises(ImageError, match="chmod 600"):
        load_image(image_copy)
    os.unlink(os.path.join(image_copy, "manifest.json"))
    with pytest.raises(ImageError, match="no manifest.json; build one"):
        load_image(image_copy)


def test_custom_disk_image_with_seed(tmp_path: Path, qemu_image: ImageInfo) -> None:
    d = str(tmp_path)
    shutil.copy(qemu_image.disk or "", os.path.join(d, "cloud.qcow2"))
    shutil.copy(qemu_image.ssh_key, os.path.join(d, "key"))
    shutil.copy(qemu_image.ssh_key + ".pub", os.path.join(d, "key.pub"))
    with pytest.raises(ImageError, match="give a kernel"):
        custom_image(d, ssh_key="key")
    seed = None
    if _image_errors.find_tool("mkfs.vfat") and _image_errors.find_tool("mcopy"):
        seed = os.path.basename(make_nocloud_seed(d, qemu_image.ssh_public))
    info = custom_image(d, ssh_key="key", disk="cloud.qcow2", seed=seed, ssh_user="debian")
    assert info.kernel is None and info.initrd is None and info.ready_marker is None
    assert info.disk == os.path.join(d, "cloud.qcow2") and info.ssh_user == "debian"
    assert info.seed == (os.path.join(d, seed) if seed else None)
    assert load_image(d) == info


def test_cli_image_show_and_build_reuse(qemu_image: ImageInfo, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run(["image", "show", "--dir", qemu_image.dir, "--verify"], stdout=out, stderr=err) == 0
    assert str(qemu_image.host_key_fingerprint) in out.getvalue()
    assert "busybox-static" in out.getvalue()
    out = io.StringIO()
    code = run(
        ["image", "build", "--output", qemu_image.dir, "--cache-dir", str(tmp_path)],
        stdout=out,
        stderr=err,
    )
    assert code == 0 and "up to date" in out.getvalue(), err.getvalue()
    err = io.StringIO()
    missing = os.path.join(str(tmp_path), "nothing")
    assert run(["image", "show", "--dir", missing], stdout=io.StringIO(), stderr=err) == 1
    assert "no manifest.json" in err.getvalue()


# --- a real boot -------------------------------------------------------------


def _accel() -> str:
    try:
        with open("/proc/modules") as f:
            mods = f.read()
    except OSError:
        return "tcg"
    if ("kvm_intel " in mods or "kvm_amd " in mods) and os.access("/dev/kvm", os.W_OK):
        return "kvm"
    return "tcg"


class _QMP:
    """A minimal QMP client: line-delimited JSON on a unix socket."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")
        json.loads(self.f.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str) -> object:
        self.f.write(json.dumps({"execute": command}) + "\n")
        self.f.flush()
        for _ in range(100):
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg
        raise AssertionError(f"no answer to {command}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def booted(qemu_image: ImageInfo, tmp_path: Path) -> Iterator[dict[str, object]]:
    d = str(tmp_path)
    overlay = os.path.join(d, "overlay.qcow2")
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            qemu_image.disk or "",
            overlay,
        ],
        check=True,
    )
    port = free_port()
    console = os.path.join(d, "console.log")
    qmp_path = os.path.join(d, "qmp.sock")
    argv = [
        "qemu-system-x86_64", "-M", "pc", "-accel", _accel(), "-m", "256", "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", qemu_image.kernel or "", "-initrd", qemu_image.initrd or "",
        "-append", qemu_image.cmdline,
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", "virtio-net-pci,netdev=n0",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-serial", f"file:{console}",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield {
            "proc": proc,
            "port": port,
            "console": console,
            "qmp": qmp_path,
            "started": started,
            "overlay": overlay,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def _ssh(image: ImageInfo, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", image.ssh_key, "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
         "-o", "ConnectTimeout=10", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_boot_ready_ssh_and_power_button(
    qemu_image: ImageInfo, booted: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    proc = booted["proc"]
    assert isinstance(proc, subprocess.Popen)
    started = float(booted["started"])  # type: ignore[arg-type]
    console = str(booted["console"])
    port = int(booted["port"])  # type: ignore[call-overload]
    deadline = started + 60
    text = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"QEMU exited {proc.returncode}: {text[-2000:]}"
        if os.path.exists(console):
            with open(console, errors="replace") as f:
                text = f.read()
            if READY_MARKER in text:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no {READY_MARKER} within 60s; console: {text[-2000:]}")
    ready = time.monotonic() - started

    p = _ssh(
        qemu_image,
        port,
        "uname -a; id -u; echo job > /data/job.txt; cat /data/README; "
        "which sh cat echo sleep id touch ls poweroff uname",
    )
    ssh_done = time.monotonic() - started
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"Linux txvmbot-guest {qemu_image.kernel_version} ")
    assert "\n0\n" in p.stdout and "base disk" in p.stdout
    assert p.stdout.count("\n/") >= 9  # every applet found on PATH

    # Host key: what the guest presents is what the manifest says.
    scan = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if scan.returncode == 0 and scan.stdout.strip():
        line = scan.stdout.strip().splitlines()[-1]
        assert fingerprint_of(line.split(None, 1)[1]) == qemu_image.host_key_fingerprint

    qmp = _QMP(str(booted["qmp"]))
    t0 = time.monotonic()
    assert qmp.execute("system_powerdown") == {"return": {}}
    try:
        proc.wait(timeout=10)
    finally:
        qmp.close()
    off = time.monotonic() - t0
    assert proc.returncode == 0
    with open(console, errors="replace") as f:
        assert "Power down" in f.read()
    # What the job wrote is in its overlay.
    check = subprocess.run(
        ["qemu-img", "info", "--output=json", str(booted["overlay"])],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(check.stdout)["actual-size"] > 0
    with capsys.disabled():
        print(
            f"\n[image boot] accel={_accel()} ready={ready:.2f}s ssh={ssh_done:.2f}s "
            f"powerdown={off:.2f}s"
        )


def test_load_image_falls_back_to_vmlinuz(image_copy: str) -> None:
    os.unlink(os.path.join(image_copy, "vmlinux"))
    info = load_image(image_copy, verify=True)
    assert info.kernel == os.path.join(image_copy, "vmlinuz")
