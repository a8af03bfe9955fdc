"""``txvmbot image build --distro debian``: a real Debian guest, built from
Debian's archive with mmdebstrap.

The image directory holds what the busybox image holds (``vmlinux`` and
``vmlinuz`` from the same kernel package, ``initrd``, ``disk.qcow2``, the
client key pair ``id_ed25519``, ``host_key.pub``, ``manifest.json``), but:

- ``disk.qcow2`` is the root file system: ext4 on the whole disk (no
  partition table), made with ``mkfs.ext4 -d`` from the tree mmdebstrap
  installed, with systemd, udev, D-Bus, OpenSSH's sshd, python3 and the
  packages asked for, and the kernel's modules (the ones a VM can use) in
  /lib/modules for udev and modprobe;
- ``initrd`` is busybox with the virtio/ext4/power-button modules and a
  small /init (``guest/debian-init``) that gives eth0 QEMU user networking's
  static address, mounts the disk and hands PID 1 to systemd;
- sshd (ed25519 host key made at build) starts, and a oneshot unit prints
  the ready marker on the serial console once it runs;
- the ACPI power button powers the guest off (systemd-logind);
- units useless in a short-lived test VM are masked (``MASKED_UNITS`` says
  why, one by one): they cost seconds of an emulated CPU at every boot.

Downloaded packages are kept in ``CACHE/debian-RELEASE/archives`` and the
package lists in ``.../lists`` (synced in and out with mmdebstrap's hooks):
a build with a warm cache downloads nothing, and a build without network
uses the cached lists. ``SOURCE_DATE_EPOCH`` is honoured by mmdebstrap and
mkfs.ext4 (file times, file system UUID and hash seed); the ssh keys are new
at every build by design.

Builds run as root (mmdebstrap's root mode; mkfs.ext4 -d keeps the files'
owners). Synchronous, like the rest of the image code: it runs from the CLI
and test setup, never on the daemon's reactor.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from importlib import resources

from twisted.logger import Logger

from txvmbot.qemu import _image_cpio as cpio
from txvmbot.qemu._image_build import (
    GUEST_ADDR,
    GUEST_GW,
    GUEST_HOSTNAME,
    _ldd,
    _owning_package,
    _package_version,
    build_or_reuse,
    file_record,
    kernel_for_build,
    write_manifest,
)
from txvmbot.qemu._image_errors import TOOL_PACKAGES, ImageError, find_tool, need_tool, run_tool
from txvmbot.qemu._image_kernel import (
    GUEST_MODULES,
    KERNEL_META_PACKAGE,
    KernelFiles,
    fetch_deb,
    kernel_package,
    unpack_kernel,
)
from txvmbot.qemu._image_manifest import FORMAT_VERSION
from txvmbot.qemu.model import READY_MARKER

log = Logger()

__all__ = [
    "BASE_PACKAGES",
    "DEBIAN_CMDLINE",
    "DEFAULT_MIRROR",
    "DEFAULT_RELEASE",
    "MASKED_UNITS",
    "build_debian_image",
    "check_debian_tools",
    "check_packages",
    "debian_inputs",
    "default_debian_name",
]

DEFAULT_RELEASE = "bookworm"
#: No mirror: mmdebstrap's default, deb.debian.org with RELEASE,
#: RELEASE-updates and RELEASE-security (for a stable release).
DEFAULT_MIRROR: str | None = None

#: Always installed (``--package`` adds to these): a systemd boot with udev
#: and D-Bus (systemd-logind needs it: the power button), kmod (modprobe,
#: depmod), OpenSSH's sshd, iproute2 and python3.
BASE_PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "openssh-server",
    "iproute2",
    "python3",
)

#: The kernel command line: serial console, panic = exit (with -no-reboot),
#: quiet kernel and systemd (every byte on the emulated UART costs under
#: TCG), the root file system mounted read-write by the initramfs (so
#: systemd does not remount it).
DEBIAN_CMDLINE = "console=ttyS0 panic=-1 quiet rw root=/dev/vda rootfstype=ext4 net.ifnames=0"

#: Units masked in the guest, and why: each costs time at every boot of an
#: emulated CPU, or does something a throw-away test VM must not do.
MASKED_UNITS: dict[str, str] = {
    # Nobody logs in on a console: ssh is the way in.
    "getty@.service": "no console logins (ssh is the way in)",
    "serial-getty@.service": "no login prompt on the serial console",
    # A job's VM lives minutes: periodic jobs would only perturb its tests.
    "apt-daily.timer": "no package list refresh (the guest reaches no network)",
    "apt-daily-upgrade.timer": "no unattended upgrades",
    "dpkg-db-backup.timer": "periodic job, useless in a VM that lives minutes",
    "fstrim.timer": "periodic job, useless in a VM that lives minutes",
    "e2scrub_all.timer": "periodic job, useless in a VM that lives minutes",
    "e2scrub_reap.service": "no LVM snapshots to reap",
    "systemd-tmpfiles-clean.timer": "periodic job, useless in a VM that lives minutes",
    # The image is built whole: nothing to update at boot. These run when
    # /usr is newer than /etc/.updated, i.e. at every boot of a fresh
    # overlay, and systemd-hwdb-update alone takes seconds under TCG.
    "systemd-hwdb-update.service": "the image is built whole (hwdb.bin made at build)",
    "ldconfig.service": "the image is built whole (ld.so.cache made at build)",
    "systemd-journal-catalog-update.service": "the image is built whole",
    "systemd-update-done.service": "the image is built whole",
    # No hardware for these in a QEMU VM.
    "systemd-pstore.service": "no pstore in a VM",
    "sys-kernel-debug.mount": "no debugfs needed by a test VM",
    "sys-kernel-tracing.mount": "no tracefs needed by a test VM",
    "sys-kernel-config.mount": "no configfs needed by a test VM",
    "sys-fs-fuse-connections.mount": "no FUSE control fs (FUSE itself loads on use)",
    "dev-hugepages.mount": "no huge pages in a 256 MiB VM",
    "proc-sys-fs-binfmt_misc.automount": "no foreign binaries to register",
    "proc-sys-fs-binfmt_misc.mount": "no foreign binaries to register",
    "systemd-binfmt.service": "no foreign binaries to register",
    "modprobe@drm.service": "no GPU",
    "modprobe@dm_mod.service": "no device mapper at boot (loads on use)",
    "modprobe@loop.service": "loop loads on use (/dev/loop-control)",
    "modprobe@fuse.service": "fuse loads on use (/dev/fuse)",
    "modprobe@configfs.service": "no configfs needed by a test VM",
    "modprobe@efi_pstore.service": "no EFI in the VM",
    "systemd-modules-load.service": "the initramfs loaded what the VM needs; modprobe the rest",
    # Done at build, or by the initramfs.
    "systemd-remount-fs.service": "the initramfs mounts / read-write; no fstab entries",
    "systemd-sysusers.service": "system users are made at build by the packages",
    "systemd-firstboot.service": "it could prompt on the console; the image is configured",
    "systemd-random-seed.service": "virtio-rng seeds the kernel's entropy",
    "systemd-journal-flush.service": "the journal stays in memory (Storage=volatile)",
    "systemd-update-utmp.service": "no utmp/wtmp records of boots in a throw-away VM",
    "systemd-update-utmp-runlevel.service": "no utmp/wtmp records of boots in a throw-away VM",
}

#: systemd generators disabled in the guest, and why: systemd runs every
#: generator (a process each) before it starts any unit, at every boot. The
#: fstab and SysV ones stay (a job may add to /etc/fstab or install a
#: package with only an init script).
DISABLED_GENERATORS: dict[str, str] = {
    "systemd-cryptsetup-generator": "no encrypted disks",
    "systemd-integritysetup-generator": "no dm-integrity disks",
    "systemd-veritysetup-generator": "no dm-verity disks",
    "systemd-gpt-auto-generator": "no partition table: the root is the whole disk",
    "systemd-hibernate-resume-generator": "no hibernation",
    "systemd-getty-generator": "no console logins (getty units are masked)",
    "systemd-debug-generator": "no systemd.debug_shell/systemd.mask on the command line",
    "systemd-run-generator": "no systemd.run on the command line",
    "systemd-system-update-generator": "no offline updates",
    "systemd-rc-local-generator": "no /etc/rc.local",
}

#: The kernel modules copied into the guest's /lib/modules (for udev and
#: modprobe): everything a VM can use, not the drivers of real hardware.
MODULE_DIRS: tuple[str, ...] = (
    "kernel/arch",
    "kernel/block",
    "kernel/crypto",
    "kernel/fs",
    "kernel/lib",
    "kernel/mm",
    "kernel/net",
    "kernel/virt",
    "kernel/drivers/block",
    "kernel/drivers/char",
    "kernel/drivers/input",
    "kernel/drivers/md",
    "kernel/drivers/net",
    "kernel/drivers/scsi/virtio_scsi.ko",
    "kernel/drivers/vhost",
    "kernel/drivers/virtio",
)
MODULE_SKIP: tuple[str, ...] = (
    "kernel/drivers/net/can",
    "kernel/drivers/net/ethernet",
    "kernel/drivers/net/ieee802154",
    "kernel/drivers/net/usb",
    "kernel/drivers/net/wireless",
    "kernel/drivers/net/wwan",
    "kernel/net/bluetooth",
    "kernel/net/mac80211",
    "kernel/net/wireless",
)
MODULE_FILES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")

#: The smallest root file system (the rest of a job's disk is free space).
MIN_DISK_MB = 2048

#: Tools the build runs, checked before it starts.
DEBIAN_TOOLS = (
    "mmdebstrap",
    "apt-get",
    "apt-cache",
    "dpkg-deb",
    "dpkg-query",
    "busybox",
    "ssh-keygen",
    "mkfs.ext4",
    "qemu-img",
    "chroot",
)

#: Bounds of the steps that run other programs.
MMDEBSTRAP_BOUND = 1800.0
#: Package lists younger than this are used without ``apt-get update``.
LISTS_MAX_AGE = 24 * 3600.0
_TAIL = 40

_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?\Z")
_RELEASE = re.compile(r"[a-z][a-z0-9-]{1,31}\Z")

Progress = Callable[[str], None]

_GUEST_FILES = ("debian-init",)


def default_debian_name(release: str) -> str:
    """The name ``image build --distro debian`` gives an image of
    ``release`` without ``--name``."""
    return f"debian-{release}"


def check_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """``packages`` if each is a Debian package name (optionally
    ``NAME=VERSION``); an ImageError names the first that is not."""
    for p in packages:
        if not _PACKAGE.match(p):
            raise ImageError(
                f"--package {p!r} is not a Debian package name (lower-case letters, digits "
                "and + - . , at least two characters, optionally =VERSION)"
            )
    return tuple(packages)


def check_release(release: str) -> str:
    if not _RELEASE.match(release):
        raise ImageError(f"--release {release!r} is not a Debian release name such as bookworm")
    return release


def check_debian_tools() -> None:
    """An ImageError naming every missing tool and its apt package."""
    missing = [t for t in DEBIAN_TOOLS if find_tool(t) is None]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
        raise ImageError(
            f"cannot build the Debian image: not installed: {', '.join(missing)}; "
            f"install them: apt-get install {' '.join(pkgs)}"
        )


def _check_root(geteuid: Callable[[], int] = os.geteuid) -> None:
    if geteuid() != 0:
        raise ImageError(
            "the Debian image is built as root (mmdebstrap installs packages in its root "
            "mode, and mkfs.ext4 -d keeps the files' owners): run it as root, e.g. "
            "sudo txvmbot image build --distro debian"
        )


def _guest_file(name: str) -> bytes:
    return resources.files("txvmbot.qemu").joinpath("guest", name).read_bytes()


def _builder_digest() -> str:
    """A digest of this module and the guest's /init: a change to how the
    image is made changes the inputs, so an old image is rebuilt."""
    h = hashlib.sha256()
    h.update(resources.files("txvmbot.qemu").joinpath("_image_debian.py").read_bytes())
    for name in _GUEST_FILES:
        h.update(name.encode() + b"\0" + _guest_file(name) + b"\0")
    return h.hexdigest()


def debian_inputs(
    release: str = DEFAULT_RELEASE,
    packages: Sequence[str] = (),
    mirror: str | None = DEFAULT_MIRROR,
    kernel: tuple[str, str] | None = None,
) -> dict[str, object]:
    """What the image is made of; an image with the same inputs is reused.
    The versions of the guest's packages are whatever the archive has at
    build time: the manifest lists them."""
    busybox = need_tool("busybox")
    bb_pkg = _owning_package(busybox) or "busybox-static"
    kernel_pkg, kernel_version = kernel or kernel_package()
    wanted = sorted(dict.fromkeys([*BASE_PACKAGES, *check_packages(packages)]))
    return {
        "format_version": FORMAT_VERSION,
        "kind": "debian",
        "release": check_release(release),
        "mirror": mirror,
        "packages": wanted,
        "kernel_package": kernel_pkg,
        "kernel_version": kernel_version,
        "busybox": [bb_pkg, _package_version(bb_pkg)],
        "builder_sha256": _builder_digest(),
        "modules": list(GUEST_MODULES),
        "cmdline": DEBIAN_CMDLINE,
        "masked_units": sorted(MASKED_UNITS),
        "disabled_generators": sorted(DISABLED_GENERATORS),
    }


def build_debian_image(
    output: str,
    *,
    cache_dir: str,
    release: str = DEFAULT_RELEASE,
    packages: Sequence[str] = (),
    mirror: str | None = DEFAULT_MIRROR,
    force: bool = False,
    progress: Progress | None = None,
    inputs: dict[str, object] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """Build a Debian image into ``output``; return ``"built"`` or
    ``"reused"``.

    ``packages`` are installed on top of ``BASE_PACKAGES``. ``cache_dir``
    keeps the kernel ``.deb`` (as the busybox build does) and, in
    ``debian-RELEASE/``, the archive's ``.deb`` files and package lists.
    Without ``force`` an image that loads and was built from the same inputs
    is kept. ``SOURCE_DATE_EPOCH`` in ``environ`` makes the build as
    reproducible as the tools allow.
    """
    say: Progress = progress or (lambda line: None)

    def step(line: str) -> None:
        log.info("image build (debian): {line}", line=line)
        say(line)

    check_release(release)
    check_packages(packages)
    check_debian_tools()
    _check_root()
    output = os.path.abspath(output)
    if inputs is None:
        kernel = kernel_for_build(KERNEL_META_PACKAGE, step)
        inputs = debian_inputs(release, packages, mirror, kernel)
    epoch = _epoch(environ)
    return build_or_reuse(
        output,
        inputs,
        force,
        step,
        lambda tmp: _build_into(tmp, inputs, cache_dir, step, epoch),
        remove=_remove_tree,
    )


def _epoch(environ: Mapping[str, str]) -> int | None:
    value = environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise ImageError(f"SOURCE_DATE_EPOCH={value!r} is not a number of seconds")
    return int(value)


# --- the build -----------------------------------------------------------------


def _build_into(
    tmp: str, inputs: dict[str, object], cache_dir: str, step: Progress, epoch: int | None
) -> None:
    started = time.monotonic()
    release = str(inputs["release"])
    mirror = None if inputs.get("mirror") is None else str(inputs["mirror"])
    packages = [str(p) for p in inputs["packages"]]  # type: ignore[attr-defined]
    step("generating the client ssh key and the guest's host key (ed25519)")
    key = os.path.join(tmp, "id_ed25519")
    _keygen(key, "txvmbot-image")
    with open(key + ".pub") as f:
        client_public = f.read().strip()
    keys = tempfile.mkdtemp(prefix=".keys-", dir=tmp)
    host_key = os.path.join(keys, "ssh_host_ed25519_key")
    _keygen(host_key, f"root@{GUEST_HOSTNAME}")
    with open(host_key + ".pub") as f:
        host_public = " ".join(f.read().split()[:2])
    with open(os.path.join(tmp, "host_key.pub"), "w") as f:
        f.write(host_public + "\n")

    rootfs = os.path.join(tmp, ".rootfs")
    apt_cache = os.path.join(cache_dir, f"debian-{release}")
    # First: a package name apt does not know fails here, in seconds.
    _mmdebstrap(rootfs, release, mirror, packages, apt_cache, step, epoch)
    try:
        deb = fetch_deb(
            str(inputs["kernel_package"]), str(inputs["kernel_version"]), cache_dir, step
        )
        kernel = unpack_kernel(deb, cache_dir, step)
        shutil.copyfile(kernel.vmlinuz, os.path.join(tmp, "vmlinuz"))
        kernel_file = "vmlinuz"
        if kernel.vmlinux:
            shutil.copyfile(kernel.vmlinux, os.path.join(tmp, "vmlinux"))
            kernel_file = "vmlinux"
        step("configuring the guest: sshd, the ready marker unit, masked units")
        machine_id = uuid.uuid4().hex
        _configure(rootfs, client_public, host_key, machine_id)
        shutil.rmtree(keys)
        step(f"copying the kernel's modules into /lib/modules/{kernel.release}")
        module_count = _install_modules(deb, kernel.release, rootfs)
        installed = _installed_packages(rootfs)
        sources = _apt_sources(rootfs)
        os_release = _os_release(rootfs)
        if epoch is not None:
            _clamp_mtimes(rootfs, epoch)
        size_mb = _disk_size_mb(rootfs)
        seed = f"txvmbot:{json.dumps(inputs, sort_keys=True)}:{epoch}"
        fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, seed))
        step(f"making the root disk (ext4, {size_mb} MiB, mkfs.ext4 -d) and converting it to qcow2")
        _make_root_disk(rootfs, tmp, size_mb, fs_uuid if epoch is not None else None, epoch)
    finally:
        _remove_tree(rootfs)

    step(f"writing the initrd (busybox, {len(kernel.modules)} modules, /init)")
    initrd = os.path.join(tmp, "initrd")
    buf = io.BytesIO()
    cpio.write_newc(buf, _initrd_entries(kernel), mtime=epoch or 0)
    with open(initrd, "wb") as f:
        f.write(buf.getvalue())

    built_at = epoch if epoch is not None else int(time.time())
    files = {}
    for name in sorted(os.listdir(tmp)):
        path = os.path.join(tmp, name)
        if os.path.isfile(path) and not name.startswith("."):
            files[name] = file_record(path)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "debian",
        "distro": "debian",
        "release": release,
        "os_release": os_release,
        "mirror": mirror,
        "apt_sources": sources,
        "built_at": built_at,
        "build_seconds": round(time.monotonic() - started, 2),
        "source_date_epoch": epoch,
        "builder": {
            "host_kernel": platform.release(),
            "host": platform.node(),
            "machine": platform.machine(),
            "mmdebstrap": _package_version("mmdebstrap"),
        },
        "kernel": {
            "package": kernel.package,
            "version": kernel.version,
            "release": kernel.release,
            "meta_package": KERNEL_META_PACKAGE,
            "modules": [os.path.basename(m) for m in kernel.modules],
            "rootfs_modules": module_count,
        },
        "requested_packages": packages,
        "packages": installed,
        "masked_units": dict(sorted(MASKED_UNITS.items())),
        "disabled_generators": dict(sorted(DISABLED_GENERATORS.items())),
        "root": {"device": "/dev/vda", "fstype": "ext4", "size_mb": size_mb},
    }
    write_manifest(tmp, manifest, kernel_file, host_public, DEBIAN_CMDLINE, files, inputs)


def _keygen(path: str, comment: str) -> None:
    run_tool(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
        f"generate the ssh key {os.path.basename(path)}",
    )
    os.chmod(path, 0o600)


# --- mmdebstrap ------------------------------------------------------------------

#: Left out of the guest: documentation, man pages and translations (the
#: copyright files stay). mmdebstrap writes them to the guest's dpkg
#: configuration, so packages a job installs leave them out too.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
    "force-unsafe-io",
)


def mmdebstrap_argv(
    rootfs: str,
    release: str,
    mirror: str | None,
    packages: Sequence[str],
    archives: str,
    lists: str | None,
    lists_out: str,
) -> list[str]:
    """The mmdebstrap command line: root mode, a directory, the apt variant
    plus ``packages``; the archive cache synced in and out, and the cached
    package lists synced in (``lists``, skipping ``apt-get update``) or
    fetched."""
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        "--variant=apt",
        "--include=" + ",".join(packages),
        "--aptopt=Acquire::Languages \"none\"",
        *(f"--dpkgopt={o}" for o in DPKG_OPTIONS),
        # Keep the downloaded .debs in the chroot's cache until synced out.
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ \"$1\"/var/lib/apt/lists/",
        f"--setup-hook=sync-in {shlex.quote(archives)} /var/cache/apt/archives/",
    ]
    if lists is not None:
        argv += [f"--setup-hook=sync-in {shlex.quote(lists)} /var/lib/apt/lists/", "--skip=update"]
    argv += [
        f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(archives)}",
        f"--customize-hook=sync-out /var/lib/apt/lists {shlex.quote(lists_out)}",
        release,
        rootfs,
    ]
    if mirror is not None:
        argv.append(mirror)
    return argv


def _mmdebstrap(
    rootfs: str,
    release: str,
    mirror: str | None,
    packages: Sequence[str],
    apt_cache: str,
    step: Progress,
    epoch: int | None,
    lists_max_age: float = LISTS_MAX_AGE,
) -> None:
    """Install the guest into ``rootfs``. The package lists cached in
    ``apt_cache/lists`` are used if younger than ``lists_max_age`` seconds
    (a warm build downloads nothing), else fetched again; if fetching fails
    (no network) the cached ones are used, however old."""
    archives = os.path.join(apt_cache, "archives")
    lists = os.path.join(apt_cache, "lists")
    os.makedirs(archives, exist_ok=True)
    os.makedirs(lists, exist_ok=True)
    stamp = os.path.join(apt_cache, "lists.stamp")
    cached = _cached_lists(stamp, release, mirror)
    env = dict(os.environ)
    env.pop("SOURCE_DATE_EPOCH", None)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(epoch)
    debs = len([n for n in os.listdir(archives) if n.endswith(".deb")])
    fresh = cached is not None and time.time() - cached < lists_max_age
    step(
        f"installing Debian {release} from {_where(release, mirror)} with mmdebstrap: "
        f"{len(packages)} packages and their dependencies ({debs} .debs cached in "
        f"{archives}; package lists "
        + ("cached" if fresh else "fetched")
        + ")"
    )

    def say(line: str) -> None:
        if line.startswith("I: "):
            step("mmdebstrap: " + line[3:])

    new_lists = tempfile.mkdtemp(prefix=".lists-", dir=apt_cache)
    try:
        use = lists if fresh else None
        code, tail = _run_streaming(
            mmdebstrap_argv(rootfs, release, mirror, packages, archives, use, new_lists),
            env,
            MMDEBSTRAP_BOUND,
            say,
        )
        if code != 0 and use is None and cached is not None and _update_failed(tail):
            age = time.strftime("%Y-%m-%d %H:%M", time.localtime(cached))
            step(f"apt-get update failed (no network?); using the package lists cached {age}")
            _remove_tree(rootfs)
            use = lists
            code, tail = _run_streaming(
                mmdebstrap_argv(rootfs, release, mirror, packages, archives, use, new_lists),
                env,
                MMDEBSTRAP_BOUND,
                say,
            )
        if code != 0:
            _remove_tree(rootfs)
            raise mmdebstrap_error(code, tail, release, mirror)
        if use is None and any(n.endswith("_Packages") for n in os.listdir(new_lists)):
            # Fetched now: keep them for the next build.
            _remove_tree(lists)
            os.replace(new_lists, lists)
            with open(stamp + ".tmp", "w") as f:
                json.dump({"release": release, "mirror": mirror, "fetched": time.time()}, f)
            os.replace(stamp + ".tmp", stamp)
    finally:
        _remove_tree(new_lists)


def _where(release: str, mirror: str | None) -> str:
    if mirror is not None:
        return mirror
    return f"deb.debian.org ({release}, {release}-updates, {release}-security)"


def _cached_lists(stamp: str, release: str, mirror: str | None) -> float | None:
    """When the cached lists of ``release`` from ``mirror`` were fetched."""
    try:
        with open(stamp) as f:
            record = json.load(f)
        if record.get("release") == release and record.get("mirror") == mirror:
            return float(record["fetched"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _update_failed(tail: Sequence[str]) -> bool:
    """Did ``apt-get update`` fail (no network, mirror down)?"""
    return any(
        re.match(r"E: apt-get update .*failed", line) or "Failed to fetch" in line
        for line in tail
    )


def mmdebstrap_error(
    code: int, tail: Sequence[str], release: str, mirror: str | None
) -> ImageError:
    """The ImageError of a failed mmdebstrap: a package apt does not know is
    named as such; anything else shows mmdebstrap's last error lines."""
    text = "\n".join(tail)
    unknown = sorted(set(re.findall(r"Unable to locate package (\S+)", text)))
    unknown += sorted(
        set(re.findall(r"Package '?([^\s']+)'? has no installation candidate", text))
    )
    if unknown:
        names = ", ".join(unknown)
        return ImageError(
            f"build the Debian root file system: Debian {release} "
            f"({_where(release, mirror)}) has no package {names}; check the --package "
            f"names (https://packages.debian.org/{release}/)"
        )
    errors = [line for line in tail if line.startswith("E: ")] or list(tail[-3:])
    return ImageError(
        f"build the Debian root file system: mmdebstrap exited {code}: "
        f"{' / '.join(errors[-3:])}; check access to {_where(release, mirror)} (or run "
        "with network once, so the package lists and .debs are cached)"
    )


def _run_streaming(
    argv: Sequence[str], env: Mapping[str, str], bound: float, on_line: Callable[[str], object]
) -> tuple[int, list[str]]:
    """Run ``argv`` in a session of its own, passing each line of its
    output to ``on_line``; its exit code and last lines. Past ``bound``
    seconds its process group is killed and an ImageError says so."""
    argv = [need_tool(argv[0]), *argv[1:]]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,
    )
    assert proc.stdout is not None
    tail: list[str] = []
    deadline = time.monotonic() + bound
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                raise ImageError(
                    f"{os.path.basename(argv[0])} did not finish within {bound:g}s; "
                    f"last output: {' / '.join(tail[-3:])}"
                )
            if not sel.select(min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    tail = [*tail[-(_TAIL - 1) :], line]
                    on_line(line)
        if buf.strip():
            tail = [*tail[-(_TAIL - 1) :], buf.decode("utf-8", "replace").rstrip()]
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    except BaseException:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        raise
    finally:
        sel.close()
        proc.stdout.close()
    return code, tail


def _mounts_under(path: str) -> list[str]:
    prefix = os.path.realpath(path).rstrip("/") + "/"
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                point = line.split()[1].replace("\\040", " ")
                if point.startswith(prefix) or point == prefix[:-1]:
                    found.append(point)
    except OSError:
        pass
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: str) -> None:
    """Remove ``path`` unless something is still mounted under it (a killed
    mmdebstrap's /proc, /sys or /dev/pts): unmount those first, and leave
    the tree if one stays mounted rather than delete through it."""
    if not os.path.lexists(path):
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)
    left = _mounts_under(path)
    if left:
        log.warn("Not removing {path}: still mounted: {left}", path=path, left=left)
        return
    shutil.rmtree(path, ignore_errors=True)


# --- configuring the guest -------------------------------------------------------


def _write(root: str, path: str, text: str, mode: int = 0o644) -> None:
    dest = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.islink(dest):
        os.unlink(dest)
    with open(dest, "w") as f:
        f.write(text)
    os.chmod(dest, mode)


def _link(root: str, path: str, target: str) -> None:
    dest = os.path.join(root, path.lstrip("/"))
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):
        os.unlink(dest)
    os.symlink(target, dest)


READY_UNIT = f"""\
[Unit]
Description=txvmbot: say on the serial console that sshd runs and the power button works
After=ssh.service systemd-logind.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "{READY_MARKER} $(uname -r)" >/dev/ttyS0'

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = """\
# txvmbot: the host key made at build, keys only.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

#: sshd -r: no re-exec of sshd for every connection (it reloads its
#: configuration and keys each time: 0.7 s of an emulated CPU per ssh
#: connection here). The re-exec re-randomises the address space per
#: connection, which a throw-away test VM does not need.
SSHD_DEFAULTS = """\
# txvmbot: see /etc/ssh/sshd_config.d/txvmbot.conf
SSHD_OPTS=-r
"""

#: Debian's ssh.service checks the configuration (sshd -t) before every
#: start; the image's configuration was checked at build.
SSH_DROPIN = """\
[Service]
ExecStartPre=
"""

JOURNALD_CONF = """\
# txvmbot: the journal lives in memory (a job's VM is thrown away).
[Journal]
Storage=volatile
"""


def _configure(root: str, client_public: str, host_key: str, machine_id: str) -> None:
    etc = os.path.join(root, "etc")
    _write(root, "/etc/hostname", GUEST_HOSTNAME + "\n")
    _write(
        root,
        "/etc/hosts",
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n",
    )
    _write(root, "/etc/resolv.conf", "nameserver 10.0.2.3\n")
    # / is mounted read-write by the initramfs: no fstab entry (one would
    # make systemd wait for dev-vda.device and remount).
    _write(root, "/etc/fstab", "# / is mounted by the initramfs (root= on the command line)\n")
    # A fixed machine id: no "first boot" (systemd-firstboot, preset-all).
    _write(root, "/etc/machine-id", machine_id + "\n", 0o444)

    # sshd: our host key only, root with the image's key.
    for name in os.listdir(os.path.join(etc, "ssh")):
        if name.startswith("ssh_host_"):
            os.unlink(os.path.join(etc, "ssh", name))
    shutil.copyfile(host_key, os.path.join(etc, "ssh", "ssh_host_ed25519_key"))
    os.chmod(os.path.join(etc, "ssh", "ssh_host_ed25519_key"), 0o600)
    shutil.copyfile(host_key + ".pub", os.path.join(etc, "ssh", "ssh_host_ed25519_key.pub"))
    _write(root, "/etc/ssh/sshd_config.d/txvmbot.conf", SSHD_CONFIG)
    _write(root, "/etc/default/ssh", SSHD_DEFAULTS)
    _write(root, "/etc/systemd/system/ssh.service.d/txvmbot.conf", SSH_DROPIN)
    os.makedirs(os.path.join(root, "root", ".ssh"), mode=0o700, exist_ok=True)
    os.chmod(os.path.join(root, "root", ".ssh"), 0o700)
    _write(root, "/root/.ssh/authorized_keys", client_public + "\n", 0o600)

    # The ready marker once sshd runs and the address is up.
    _write(root, "/etc/systemd/system/txvmbot-ready.service", READY_UNIT)
    _link(root, "/etc/systemd/system/multi-user.target.wants/txvmbot-ready.service",
          "/etc/systemd/system/txvmbot-ready.service")

    _write(root, "/etc/systemd/journald.conf.d/txvmbot.conf", JOURNALD_CONF)
    for unit in MASKED_UNITS:
        _link(root, f"/etc/systemd/system/{unit}", "/dev/null")
    for generator in DISABLED_GENERATORS:
        _link(root, f"/etc/systemd/system-generators/{generator}", "/dev/null")
    # Units enabled in *.wants/ of masked ones would only warn.
    for wants in ("getty.target.wants", "timers.target.wants", "sysinit.target.wants"):
        d = os.path.join(etc, "systemd", "system", wants)
        if os.path.isdir(d):
            for name in os.listdir(d):
                base = re.sub(r"@[^.]+\.", "@.", name)
                if name in MASKED_UNITS or base in MASKED_UNITS:
                    os.unlink(os.path.join(d, name))


def _wanted_module(rel: str) -> bool:
    if rel in MODULE_FILES:
        return True
    if any(rel == s or rel.startswith(s + "/") for s in MODULE_SKIP):
        return False
    return any(rel == d or rel.startswith(d + "/") for d in MODULE_DIRS)


def _install_modules(deb: str, release: str, root: str) -> int:
    """Copy the wanted part of the kernel package's /lib/modules/RELEASE
    into ``root`` (read from ``dpkg-deb --fsys-tarfile``), then run depmod
    in the guest (kmod is one of its packages). The number of modules."""
    dest = os.path.join(root, "usr", "lib", "modules", release)
    if not os.path.isdir(os.path.join(root, "usr", "lib")):
        raise ImageError(f"the guest has no /usr/lib in {root}")
    prefixes = (f"lib/modules/{release}/", f"usr/lib/modules/{release}/")
    proc = subprocess.Popen(
        [need_tool("dpkg-deb"), "--fsys-tarfile", deb],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    count = 0
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
            for member in tf:
                name = member.name.lstrip("./")
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is None or not member.isfile():
                    continue
                rel = name[len(prefix) :]
                if not _wanted_module(rel):
                    continue
                path = os.path.join(dest, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None
                with open(path, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(path, 0o644)
                os.utime(path, (member.mtime, member.mtime))
                count += int(".ko" in rel)
    finally:
        proc.stdout.close()
        _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise ImageError(f"read {deb}: dpkg-deb --fsys-tarfile exited {proc.returncode}: {err!r}")
    if count == 0:
        raise ImageError(f"read {deb}: no kernel modules for {release} in it")
    run_tool(
        ["chroot", root, "/sbin/depmod", "-a", release],
        f"index the guest's kernel modules (depmod in {root})",
    )
    return count


def _installed_packages(root: str) -> dict[str, str]:
    out = run_tool(
        [
            "dpkg-query",
            "--admindir",
            os.path.join(root, "var", "lib", "dpkg"),
            "-W",
            "-f",
            "${Package}\t${Version}\t${db:Status-Abbrev}\n",
        ],
        "list the guest's packages",
    )
    packages = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[2].startswith("ii"):
            packages[parts[0]] = parts[1]
    return dict(sorted(packages.items()))


def _apt_sources(root: str) -> list[str]:
    """The guest's apt sources, as mmdebstrap wrote them."""
    lines: list[str] = []
    for rel in ("etc/apt/sources.list",):
        try:
            with open(os.path.join(root, rel)) as f:
                lines += [x.strip() for x in f if x.strip() and not x.startswith("#")]
        except OSError:
            pass
    return lines


def _os_release(root: str) -> dict[str, str]:
    """The guest's os-release (ID, VERSION_ID, PRETTY_NAME...)."""
    for rel in ("etc/os-release", "usr/lib/os-release"):
        path = os.path.join(root, rel)
        if os.path.islink(path):
            target = os.readlink(path)
            path = os.path.join(root, target.lstrip("/")) if target.startswith("/") else (
                os.path.normpath(os.path.join(os.path.dirname(path), target))
            )
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                values[key] = value.strip().strip('"')
        keys = ("ID", "VERSION_ID", "VERSION_CODENAME", "PRETTY_NAME")
        return {k: values[k] for k in keys if k in values}
    return {}


def _clamp_mtimes(root: str, epoch: int) -> None:
    """No file newer than SOURCE_DATE_EPOCH (what this build wrote, and
    what the maintainer scripts did)."""
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if st.st_mtime > epoch:
                    os.utime(path, (epoch, epoch), follow_symlinks=False)
            except OSError:
                pass
    os.utime(root, (epoch, epoch))


def _disk_size_mb(root: str) -> int:
    used = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    need = int(used * 1.5 / 2**20) + 512
    return max(MIN_DISK_MB, (need + 255) // 256 * 256)


def _make_root_disk(
    root: str, tmp: str, size_mb: int, fs_uuid: str | None, epoch: int | None
) -> None:
    raw = os.path.join(tmp, ".disk.raw")
    env = dict(os.environ)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "txvmbot-root",
        # Initialise the inode tables and journal now (zeros, dropped by
        # qemu-img convert): else the guest's ext4lazyinit writes them on
        # every boot, into each job's overlay.
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0" + (f",hash_seed={fs_uuid}" if fs_uuid else ""),
    ]
    if fs_uuid:
        argv += ["-U", fs_uuid]
    if epoch is not None:
        env["E2FSPROGS_FAKE_TIME"] = str(epoch)
    argv += ["-d", root, raw, f"{size_mb}M"]
    try:
        p = subprocess.run(
            [need_tool("mkfs.ext4"), *argv[1:]],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=600,
        )
        if p.returncode != 0:
            raise ImageError(
                f"make the root disk: mkfs.ext4 -d exited {p.returncode}: "
                f"{' / '.join(p.stderr.strip().splitlines()[-3:])}"
            )
        run_tool(
            ["qemu-img", "convert", "-O", "qcow2", raw, os.path.join(tmp, "disk.qcow2")],
            "convert the root disk to qcow2",
        )
    finally:
        if os.path.exists(raw):
            os.unlink(raw)


def _initrd_entries(kernel: KernelFiles) -> list[cpio.Entry]:
    files: dict[str, cpio.Entry] = {}

    def add(e: cpio.Entry) -> None:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in files:
                files[d] = cpio.directory(d)
        files[e.path] = e

    for d in ("proc", "sys", "dev", "newroot", "tmp"):
        add(cpio.directory(d))
    add(cpio.chardev("dev/console", 5, 1))
    add(cpio.chardev("dev/null", 1, 3, 0o666))
    busybox = need_tool("busybox")
    with open(busybox, "rb") as f:
        add(cpio.regular("bin/busybox", f.read(), 0o755))
    applets = subprocess.run(
        [busybox, "--list-full"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    for applet in applets:
        if applet != "bin/busybox":
            add(cpio.symlink(applet, "/bin/busybox"))
    for lib in _ldd(busybox):
        with open(os.path.realpath(lib), "rb") as f:
            add(cpio.regular(lib.lstrip("/"), f.read(), 0o755))
    add(cpio.regular("init", _guest_file("debian-init"), 0o755))
    config = f"GUEST_ADDR='{GUEST_ADDR}'\nGUEST_GW='{GUEST_GW}'\n"
    add(cpio.regular("etc/txvmbot/config", config.encode()))
    names = [os.path.basename(m) for m in kernel.modules]
    add(cpio.regular("etc/txvmbot/modules", ("\n".join(names) + "\n").encode()))
    for m in kernel.modules:
        with open(m, "rb") as f:
            add(cpio.regular(f"lib/modules/{os.path.basename(m)}", f.read()))
    return [files[p] for p in sorted(files, key=lambda p: (p.count("/"), p))]
