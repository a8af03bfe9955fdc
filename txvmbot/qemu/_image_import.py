"""``txvmbot image import``: a distribution's cloud image (Debian
genericcloud, Ubuntu, Fedora Cloud: a qcow2 with cloud-init) recorded as an
image of kind ``cloud`` under ``STATE_DIR/images/NAME``.

The image directory holds the qcow2 (reflinked or copied: VMs boot
overlays on it, it is never written), a new ed25519 key pair, and a
cloud-init NoCloud seed (:func:`txvmbot.qemu.image.make_nocloud_seed`)
that creates the user with that key, lets sshd start and prints the ready
marker on the serial console once cloud-init is done. A job with
``--user-data`` gets its own seed, merged (``txvmbot.userdata``), made from
the ``nocloud`` record of the manifest.

The disk boots through its own boot loader; an image without one (a root
file system only) is booted with ``kernel``/``initrd``/``cmdline``.

Synchronous and reactor-free, like the rest of the image code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from txvmbot.qemu._image_errors import ImageError, run_tool
from txvmbot.qemu.model import READY_MARKER

__all__ = ["DISK", "SEED", "import_cloud_image", "qcow2_info"]

DISK = "disk.qcow2"
SEED = "seed.img"
KEY = "id_ed25519"
#: The kernel command line of an image booted with ``kernel``: a cloud
#: image's root is its first partition.
DEFAULT_KERNEL_CMDLINE = "root=/dev/vda1 rw console=ttyS0"
#: The guest's host name in the image's seed (and a job's).
HOSTNAME = "txvmbot-guest"

_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}\Z")

Progress = Callable[[str], None]


def qcow2_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of ``path``, which must be a standalone qcow2; an
    ImageError says what it is instead and how to make one."""
    if not os.path.isfile(path):
        raise ImageError(f"image import: {path} is not a file")
    out = run_tool(
        ["qemu-img", "info", "--output=json", "-U", path],
        f"image import: read {path}",
    )
    try:
        info = json.loads(out)
    except ValueError as e:  # pragma: no cover - qemu-img writes JSON
        raise ImageError(f"image import: qemu-img info {path} did not give JSON: {e}") from None
    fmt = info.get("format")
    if fmt != "qcow2":
        raise ImageError(
            f"image import: {path} is not a qcow2 image (qemu-img reads it as {fmt}); "
            f"convert it first: qemu-img convert -O qcow2 {path} NAME.qcow2"
        )
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    if backing:
        raise ImageError(
            f"image import: {path} is an overlay on {backing}; import a standalone "
            f"image: qemu-img convert -O qcow2 {path} NAME.qcow2"
        )
    return dict(info)


def kernel_release(path: str) -> str:
    """The release of the Linux kernel ``path`` (``6.1.0-28-amd64``), read
    from a bzImage's header or a vmlinux's banner; "" if neither says."""
    import mmap

    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
            if len(head) >= 0x210 and head[0x202:0x206] == b"HdrS":
                f.seek(int.from_bytes(head[0x20E:0x210], "little") + 0x200)
                return f.read(256).split(b"\0", 1)[0].split(b" ", 1)[0].decode("ascii", "replace")
            if head[:4] == b"\x7fELF":
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    at = m.find(b"Linux version ")
                    if at >= 0:
                        banner = m[at + 14 : at + 14 + 128]
                        return banner.split(b" ", 1)[0].decode("ascii", "replace")
    except (OSError, ValueError):
        pass
    return ""


def check_user(user: str) -> str:
    """``user`` if cloud-init can create it (a Linux user name)."""
    if not _USER.match(user):
        raise ImageError(
            f"image import: --user {user!r}: a user name is 1 to 32 lower-case letters, "
            "digits, '_' or '-', starting with a letter or '_'"
        )
    return user


def import_cloud_image(
    source: str,
    dest: str,
    *,
    user: str,
    distro: str | None = None,
    release: str | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
    cmdline: str | None = None,
    force: bool = False,
    progress: Progress = lambda line: None,
) -> Any:
    """Import the qcow2 ``source`` as a cloud image into the directory
    ``dest`` (made whole in a temporary directory beside it, then renamed
    in); return its :class:`~txvmbot.qemu.image.ImageInfo`.

    An existing ``dest`` is an error unless ``force``; then it is replaced
    only once the new image is complete.
    """
    from txvmbot import __version__
    from txvmbot.qemu._image_build import _replace_dir
    from txvmbot.qemu.image import custom_image, load_image, make_nocloud_seed

    check_user(user)
    source = os.path.abspath(os.path.expanduser(source))
    dest = os.path.abspath(dest)
    if initrd is not None and kernel is None:
        raise ImageError("image import: --initrd needs --kernel")
    if cmdline is not None and kernel is None:
        raise ImageError("image import: --append needs --kernel (a disk boots its own)")
    for what, path in (("--kernel", kernel), ("--initrd", initrd)):
        if path is not None and not os.path.isfile(path):
            raise ImageError(f"image import: {what} {path} is not a file")
    if os.path.lexists(dest) and not force:
        raise ImageError(
            f"image import: {dest} exists; choose another --name, or --force to replace it"
        )
    info = qcow2_info(source)
    progress(
        f"{source}: qcow2, {info.get('virtual-size', 0) / 2**30:.1f} GiB virtual, "
        f"{info.get('actual-size', 0) / 2**20:.0f} MiB on disk"
    )
    parent = os.path.dirname(dest)
    os.makedirs(parent, mode=0o700, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.import-", dir=parent)
    try:
        progress(f"copying it into {dest} (a reflink where the file system can)")
        run_tool(
            ["cp", "--reflink=auto", "--sparse=always", source, os.path.join(tmp, DISK)],
            f"image import: copy {source}",
        )
        names: dict[str, str] = {}
        for key, path, name in (("kernel", kernel, "vmlinuz"), ("initrd", initrd, "initrd.img")):
            if path is not None:
                base = os.path.basename(path)
                if base not in (DISK, SEED, KEY, KEY + ".pub", "manifest.json", *names.values()):
                    name = base
                shutil.copyfile(path, os.path.join(tmp, name))
                names[key] = name
        progress(f"generating the ssh key pair {KEY} and the NoCloud seed for user {user}")
        run_tool(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
             f"txvmbot-{os.path.basename(dest)}", "-f", os.path.join(tmp, KEY)],
            "image import: generate the ssh key",
        )
        with open(os.path.join(tmp, KEY + ".pub")) as f:
            public = f.read().strip()
        instance_id = f"txvmbot-{os.path.basename(dest)}"
        make_nocloud_seed(
            tmp, public, name=SEED, instance_id=instance_id, hostname=HOSTNAME, user=user
        )
        extra: dict[str, Any] = {
            "distro": distro,
            "release": release,
            "nocloud": {"user": user, "hostname": HOSTNAME, "instance_id": instance_id},
            "imported_from": {
                "path": source,
                "virtual_size": info.get("virtual-size"),
                "compat": (info.get("format-specific") or {}).get("data", {}).get("compat"),
            },
            "built_at": time.time(),
            **({"kernel": {"release": kernel_release(kernel)}} if kernel else {}),
            "builder": {"host_kernel": os.uname().release, "txvmbot": __version__},
        }
        progress("writing the manifest (sha256 of every file)")
        custom_image(
            tmp,
            ssh_key=KEY,
            disk=DISK,
            seed=SEED,
            kernel=names.get("kernel"),
            initrd=names.get("initrd"),
            cmdline=(cmdline or DEFAULT_KERNEL_CMDLINE) if kernel else "",
            ssh_user=user,
            ready_marker=READY_MARKER,
            kind="cloud",
            extra=extra,
        )
        os.chmod(tmp, 0o755)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_image(dest)
