"""``txvmbot image build``: the default test image, built offline from
Debian packages.

The image directory holds ``vmlinux`` (and ``vmlinuz``), ``initrd`` (busybox,
dropbear, OpenSSH's sftp-server, the virtio/ext4/power-button modules and the
guest's /init),
``disk.qcow2`` (a small ext4 base disk for each job's overlay), the client
ssh key pair ``id_ed25519``/``id_ed25519.pub``, the guest's host public key
``host_key.pub`` and ``manifest.json`` (provenance and checksums).

The build is atomic (``DIR.tmp-XXXX`` renamed to ``DIR``) and an existing
image built from the same inputs is reused. Synchronous: it runs from the
CLI and test setup, never on the daemon's reactor.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from importlib import resources

from twisted.logger import Logger

from txvmbot.qemu import _image_cpio as cpio
from txvmbot.qemu._image_errors import ImageError, need_tool, run_tool
from txvmbot.qemu._image_kernel import (
    GUEST_MODULES,
    KERNEL_META_PACKAGE,
    fetch_deb,
    kernel_package,
    unpack_kernel,
)
from txvmbot.qemu._image_manifest import DEFAULT_CMDLINE, FORMAT_VERSION, load_image, sha256_file
from txvmbot.qemu.model import READY_MARKER

log = Logger()

#: QEMU user networking, configured statically in the guest (faster than DHCP).
GUEST_ADDR = "10.0.2.15/24"
GUEST_GW = "10.0.2.2"
GUEST_HOSTNAME = "txvmbot-guest"

DISK_SIZE = "64M"

#: Tools the build runs, checked before it starts.
BUILD_TOOLS = (
    "apt-get",
    "apt-cache",
    "dpkg-deb",
    "dpkg-query",
    "busybox",
    "dropbear",
    "dropbearkey",
    "ssh-keygen",
    "ldd",
    "mkfs.ext4",
    "qemu-img",
)

#: OpenSSH's SFTP server on the build host (package openssh-sftp-server), and
#: where Debian's dropbear runs it from for the "sftp" subsystem (compiled in:
#: ``strings $(which dropbear) | grep sftp``).
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
SFTP_SERVER_PACKAGE = "openssh-sftp-server"
GUEST_SFTP_SERVER = "usr/lib/sftp-server"

_GUEST_FILES = ("init", "inittab", "shutdown", "acpi-power", "udhcpc.script")

Progress = Callable[[str], None]


def _guest_file(name: str) -> bytes:
    # guest/ is package data of txvmbot.qemu (setup.py package_data).
    return resources.files("txvmbot.qemu").joinpath("guest", name).read_bytes()


def _package_version(package: str) -> str:
    out = run_tool(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        f"find the version of {package}",
        f"install it: apt-get install {package}",
    )
    return out.strip()


def _owning_package(path: str) -> str:
    """The Debian package that installed ``path`` (``dpkg-query -S``)."""
    real = os.path.realpath(path)
    for candidate in dict.fromkeys(
        [path, real, "/usr" + real if not real.startswith("/usr") else real]
    ):
        p = subprocess.run(
            ["dpkg-query", "-S", candidate], capture_output=True, text=True, check=False
        )
        if p.returncode == 0 and p.stdout:
            return p.stdout.split(":", 1)[0].split(",")[0].strip()
    return ""


def check_tools() -> None:
    """An ImageError naming every missing tool and its apt package."""
    missing = []
    for tool in BUILD_TOOLS:
        try:
            need_tool(tool)
        except ImageError as e:
            missing.append(str(e).split(";")[0].replace(" is not installed", ""))
    packages: dict[str, str] = {}
    if not os.access(SFTP_SERVER, os.X_OK):
        missing.append(SFTP_SERVER)
        packages[SFTP_SERVER] = SFTP_SERVER_PACKAGE
    if missing:
        from txvmbot.qemu._image_errors import TOOL_PACKAGES

        packages.update(TOOL_PACKAGES)
        pkgs = sorted({packages.get(t, t) for t in missing})
        raise ImageError(
            f"cannot build the image: not installed: {', '.join(missing)}; "
            f"install them: apt-get install {' '.join(pkgs)}"
        )


def build_inputs(kernel: tuple[str, str] | None = None) -> dict[str, object]:
    """What the image is made of; an image with the same inputs is reused."""
    guest = hashlib.sha256()
    for name in _GUEST_FILES:
        guest.update(name.encode() + b"\0" + _guest_file(name) + b"\0")
    busybox = need_tool("busybox")
    dropbear = need_tool("dropbear")
    bb_pkg = _owning_package(busybox) or "busybox-static"
    db_pkg = _owning_package(dropbear) or "dropbear-bin"
    sftp_pkg = _owning_package(SFTP_SERVER) or SFTP_SERVER_PACKAGE
    kernel_pkg, kernel_version = kernel or kernel_package()
    return {
        "format_version": FORMAT_VERSION,
        "kernel_package": kernel_pkg,
        "kernel_version": kernel_version,
        "busybox": [bb_pkg, _package_version(bb_pkg)],
        "dropbear": [db_pkg, _package_version(db_pkg)],
        "sftp_server": [sftp_pkg, _package_version(sftp_pkg)],
        "guest_files_sha256": guest.hexdigest(),
        "modules": list(GUEST_MODULES),
        "cmdline": DEFAULT_CMDLINE,
        "disk_size": DISK_SIZE,
    }


def inputs_key(inputs: dict[str, object]) -> str:
    """A short stable digest of ``inputs`` (to key caches by)."""
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_image(
    output: str,
    *,
    cache_dir: str,
    force: bool = False,
    progress: Progress | None = None,
    kernel_meta: str = KERNEL_META_PACKAGE,
    inputs: dict[str, object] | None = None,
) -> str:
    """Build the test image into ``output``; return ``"built"`` or
    ``"reused"``.

    ``cache_dir`` keeps the kernel ``.deb`` and its unpacked files between
    builds. ``inputs`` is ``build_inputs()`` if the caller has it already. Without ``force`` an existing image that loads and was built
    from the same inputs is kept. ``progress`` receives one line per step.
    """
    say: Progress = progress or (lambda line: None)

    def step(line: str) -> None:
        log.info("image build: {line}", line=line)
        say(line)

    check_tools()
    output = os.path.abspath(output)
    if inputs is None:
        inputs = build_inputs(kernel_for_build(kernel_meta, step))
    return build_or_reuse(
        output, inputs, force, step, lambda tmp: _build_into(tmp, inputs, cache_dir, step)
    )


def kernel_for_build(meta: str, step: Progress) -> tuple[str, str]:
    """The kernel package ``meta`` depends on, and its version, after one
    ``apt-get update`` if apt does not know it yet."""
    try:
        return kernel_package(meta)
    except ImageError as e:
        step(f"apt does not know {meta} ({e}); running apt-get update once")
        run_tool(
            ["apt-get", "update", "-q"],
            "apt-get update (to find the kernel package)",
            "run it as root, with access to the Debian mirror",
        )
        return kernel_package(meta)


def build_or_reuse(
    output: str,
    inputs: dict[str, object],
    force: bool,
    step: Progress,
    build_into: Callable[[str], None],
    remove: Callable[[str], None] = lambda path: shutil.rmtree(path, ignore_errors=True),
) -> str:
    """Keep the image in ``output`` if it loads and was built from
    ``inputs`` (unless ``force``): ``"reused"``. Else ``build_into`` a fresh
    directory beside it, then put that at ``output`` (``remove`` cleans up
    after a failed build): ``"built"``."""
    if not force and os.path.isdir(output):
        try:
            info = load_image(output)
        except ImageError as e:
            step(f"existing image in {output} is not usable ({e}); rebuilding")
        else:
            if info.manifest.get("inputs") == inputs:
                step(f"image in {output} is up to date (use --force to rebuild)")
                return "reused"
            step(f"image in {output} was built from other inputs; rebuilding")

    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
    try:
        build_into(tmp)
        _replace_dir(tmp, output)
    except BaseException:
        remove(tmp)
        raise
    step(f"image ready in {output}")
    return "built"


def _replace_dir(new: str, dest: str) -> None:
    """Put directory ``new`` at ``dest``, moving an old one aside first."""
    old = None
    if os.path.lexists(dest):
        old = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".old-", dir=os.path.dirname(dest))
        os.rmdir(old)
        os.rename(dest, old)
    os.rename(new, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(tmp: str, inputs: dict[str, object], cache_dir: str, step: Progress) -> None:
    started = time.monotonic()
    kernel_pkg = str(inputs["kernel_package"])
    deb = fetch_deb(kernel_pkg, str(inputs["kernel_version"]), cache_dir, step)
    kernel = unpack_kernel(deb, cache_dir, step)

    shutil.copyfile(kernel.vmlinuz, os.path.join(tmp, "vmlinuz"))
    kernel_file = "vmlinuz"
    if kernel.vmlinux:
        shutil.copyfile(kernel.vmlinux, os.path.join(tmp, "vmlinux"))
        kernel_file = "vmlinux"

    step("generating the client ssh key (ed25519) and the guest's host key")
    key = os.path.join(tmp, "id_ed25519")
    run_tool(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "txvmbot-image", "-f", key],
        "generate the client ssh key",
    )
    os.chmod(key, 0o600)
    with open(key + ".pub") as f:
        client_public = f.read().strip()
    host_key = os.path.join(tmp, ".host_key")
    run_tool(["dropbearkey", "-t", "ed25519", "-f", host_key], "generate the guest host key")
    host_public = _dropbear_public(host_key)
    with open(os.path.join(tmp, "host_key.pub"), "w") as f:
        f.write(host_public + "\n")
    with open(host_key, "rb") as f:
        host_key_bytes = f.read()
    os.unlink(host_key)

    step(
        f"writing the initrd (busybox, dropbear, sftp-server, {len(kernel.modules)} modules, /init)"
    )
    entries = _initrd_entries(kernel.modules, client_public, host_key_bytes)
    initrd = os.path.join(tmp, "initrd")
    buf = io.BytesIO()
    cpio.write_newc(buf, entries)
    with open(initrd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(initrd, 0o600)  # it holds the guest's private host key

    step(f"making the base disk (ext4, {DISK_SIZE}) and converting it to qcow2")
    _make_disk(tmp)

    built_at = int(time.time())
    files = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if os.path.isfile(path):
            files[name] = file_record(path)
    packages: dict[str, str] = {}
    for name in ("busybox", "dropbear", "sftp_server"):
        package = inputs[name]
        assert isinstance(package, list)
        packages[package[0]] = package[1]
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "busybox",
        "built_at": built_at,
        "build_seconds": round(time.monotonic() - started, 2),
        "builder": {
            "host_kernel": platform.release(),
            "host": platform.node(),
            "machine": platform.machine(),
        },
        "kernel": {
            "package": kernel.package,
            "version": kernel.version,
            "release": kernel.release,
            "meta_package": KERNEL_META_PACKAGE,
            "modules": [os.path.basename(m) for m in kernel.modules],
        },
        "packages": packages,
    }
    write_manifest(tmp, manifest, kernel_file, host_public, DEFAULT_CMDLINE, files, inputs)


def write_manifest(
    tmp: str,
    manifest: dict[str, object],
    kernel_file: str,
    host_public: str,
    cmdline: str,
    files: Mapping[str, object],
    inputs: dict[str, object],
) -> None:
    """Write ``manifest.json`` into ``tmp``: what a build says of itself
    (``manifest``) and what every built image boots from (the files
    :func:`txvmbot.qemu.image.load_image` reads)."""
    boot = {
        "kernel_file": kernel_file,
        "initrd": "initrd",
        "disk": "disk.qcow2",
        "ssh_key": "id_ed25519",
        "ssh_user": "root",
        "host_key_public": host_public,
        "host_key_fingerprint": fingerprint_of(host_public),
        "cmdline": cmdline,
        "ready_marker": READY_MARKER,
        "network": {"address": GUEST_ADDR, "gateway": GUEST_GW, "ssh_port": 22},
        "files": files,
        "inputs": inputs,
    }
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump({**manifest, **boot}, f, indent=2, sort_keys=True)
        f.write("\n")


def file_record(path: str) -> dict[str, object]:
    st = os.stat(path)
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _dropbear_public(key: str) -> str:
    out = run_tool(["dropbearkey", "-y", "-f", key], "read the guest host key")
    for line in out.splitlines():
        if line.startswith("ssh-"):
            kind, blob = line.split()[:2]
            return f"{kind} {blob}"
    raise ImageError(f"read the guest host key: no public key in `dropbearkey -y -f {key}`")


def fingerprint_of(public_line: str) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key line."""
    blob = base64.b64decode(public_line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _ldd(binary: str) -> list[str]:
    """The shared libraries (and dynamic loader) ``binary`` needs."""
    p = subprocess.run([need_tool("ldd"), binary], capture_output=True, text=True, check=False)
    if "not a dynamic executable" in (p.stdout + p.stderr):
        return []
    if p.returncode != 0:
        raise ImageError(f"ldd {binary} exited {p.returncode}: {p.stderr.strip()}")
    libs = []
    for line in p.stdout.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line:
            raise ImageError(f"ldd {binary}: {line.strip()}")
    return libs


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _initrd_entries(
    modules: tuple[str, ...], client_public: str, host_key: bytes
) -> list[cpio.Entry]:
    files: dict[str, cpio.Entry] = {}

    def add(e: cpio.Entry) -> None:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in files:
                files[d] = cpio.directory(d)
        files[e.path] = e

    for d in ("proc", "sys", "dev", "tmp", "run", "data", "var/log", "mnt"):
        add(cpio.directory(d))
    add(cpio.Entry("tmp", 0o41777))
    add(cpio.directory("root", 0o700))
    add(cpio.directory("root/.ssh", 0o700))
    add(cpio.chardev("dev/console", 5, 1))
    add(cpio.chardev("dev/null", 1, 3, 0o666))

    busybox = need_tool("busybox")
    add(cpio.regular("bin/busybox", _read(busybox), 0o755))
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            add(cpio.symlink(applet, "/bin/busybox"))
    dropbear = need_tool("dropbear")
    add(cpio.regular("usr/sbin/dropbear", _read(dropbear), 0o755))
    # dropbear runs this (through the user's shell) for the "sftp" subsystem.
    add(cpio.regular(GUEST_SFTP_SERVER, _read(SFTP_SERVER), 0o755))
    for lib in {*_ldd(busybox), *_ldd(dropbear), *_ldd(SFTP_SERVER)}:
        add(cpio.regular(lib.lstrip("/"), _read(os.path.realpath(lib)), 0o755))

    add(cpio.regular("init", _guest_file("init"), 0o755))
    add(cpio.regular("etc/inittab", _guest_file("inittab")))
    add(cpio.regular("etc/txvmbot/shutdown", _guest_file("shutdown"), 0o755))
    add(cpio.regular("etc/txvmbot/udhcpc.script", _guest_file("udhcpc.script"), 0o755))
    # busybox acpid maps the power button to "PWRF/00000080" and runs that
    # file in its config dir.
    add(cpio.regular("etc/acpi/PWRF/00000080", _guest_file("acpi-power"), 0o755))
    config = (
        f"READY_MARKER='{READY_MARKER}'\n"
        f"GUEST_NET=static\n"
        f"GUEST_ADDR='{GUEST_ADDR}'\n"
        f"GUEST_GW='{GUEST_GW}'\n"
        f"GUEST_HOSTNAME='{GUEST_HOSTNAME}'\n"
    )
    add(cpio.regular("etc/txvmbot/config", config.encode()))
    names = [os.path.basename(m) for m in modules]
    add(cpio.regular("etc/txvmbot/modules", ("\n".join(names) + "\n").encode()))
    for m in modules:
        add(cpio.regular(f"lib/modules/{os.path.basename(m)}", _read(m)))

    add(cpio.regular("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"))
    add(cpio.regular("etc/group", b"root:x:0:\n"))
    add(cpio.regular("etc/shells", b"/bin/sh\n/bin/ash\n"))
    add(cpio.regular("etc/hostname", f"{GUEST_HOSTNAME}\n".encode()))
    add(cpio.regular("etc/dropbear/dropbear_ed25519_host_key", host_key, 0o600))
    add(cpio.regular("root/.ssh/authorized_keys", (client_public + "\n").encode(), 0o600))
    return [files[p] for p in sorted(files, key=lambda p: (p.count("/"), p))]


def _make_disk(tmp: str) -> None:
    staging = tempfile.mkdtemp(prefix=".disk-", dir=tmp)
    raw = os.path.join(tmp, ".disk.raw")
    try:
        with open(os.path.join(staging, "README"), "w") as f:
            f.write(
                "txvmbot test image base disk. Each job's VM boots with a qcow2\n"
                "overlay on it, mounted at /data: what a job writes here stays in\n"
                "its overlay.\n"
            )
        run_tool(
            ["mkfs.ext4", "-q", "-F", "-L", "txvmbot-data", "-d", staging, raw, DISK_SIZE],
            "make the base disk",
        )
        run_tool(
            ["qemu-img", "convert", "-O", "qcow2", raw, os.path.join(tmp, "disk.qcow2")],
            "convert the base disk to qcow2",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.exists(raw):
            os.unlink(raw)
