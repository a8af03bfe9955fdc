"""An image directory's ``manifest.json``, read back: every image build
(``_image_build``, ``_image_debian``) and ``custom_image`` write one, and
``load_image`` checks the directory against it and turns it into an
``ImageInfo``, the image a VM boots."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from txvmbot.qemu._image_errors import ImageError
from txvmbot.qemu.model import READY_MARKER

__all__ = [
    "DEFAULT_CMDLINE",
    "FORMAT_VERSION",
    "MANIFEST",
    "ImageInfo",
    "load_image",
    "sha256_file",
]

MANIFEST = "manifest.json"

#: Bump when the layout of the image or the guest changes incompatibly.
FORMAT_VERSION = 1

#: The kernel command line: serial console, reboot = exit (with -no-reboot),
#: quiet (printing to the emulated UART is slow under TCG).
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"


@frozen
class ImageInfo:
    """A VM image ready to boot.

    ``kernel``/``initrd`` are None for a disk boot (a cloud image); ``seed``
    is a NoCloud seed (iso or vfat) to attach as a second drive, if any.
    ``ready_marker`` is None when the guest prints none (a cloud image):
    wait for ssh instead.
    """

    dir: str
    kernel: str | None
    initrd: str | None
    disk: str | None
    ssh_key: str
    ssh_public: str
    host_key_fingerprint: str | None
    cmdline: str
    kernel_version: str = ""
    format_version: int = FORMAT_VERSION
    ready_marker: str | None = READY_MARKER
    ssh_user: str = "root"
    seed: str | None = None
    manifest: Mapping[str, Any] = field(factory=dict, eq=False, repr=False)
    #: "sha256:HEX" of manifest.json's bytes as loaded (the image_digest fact).
    manifest_digest: str = ""


def load_image(dir: str, *, verify: bool = False) -> ImageInfo:
    """The image in ``dir``, checked against its ``manifest.json``.

    Every file the manifest lists must exist with its recorded size; a file
    whose mtime changed is checked by sha256 (so a copied image still
    loads), and with ``verify`` every file is. An ImageError names the file
    that is missing or differs, and says to rebuild.
    """
    dir = os.path.abspath(dir)
    path = os.path.join(dir, MANIFEST)
    rebuild = "rebuild it: txvmbot image build --force"
    try:
        with open(path, "rb") as mf:
            raw = mf.read()
        manifest = json.loads(raw)
    except FileNotFoundError:
        raise ImageError(f"image {dir}: no {MANIFEST}; build one: txvmbot image build") from None
    except (OSError, ValueError) as e:
        raise ImageError(f"image {dir}: cannot read {MANIFEST}: {e}; {rebuild}") from None
    if not isinstance(manifest, dict):
        raise ImageError(f"image {dir}: {MANIFEST} is not a JSON object; {rebuild}")
    fmt = manifest.get("format_version")
    if fmt != FORMAT_VERSION:
        raise ImageError(
            f"image {dir}: format version {fmt!r}, this txvmbot reads {FORMAT_VERSION}; {rebuild}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ImageError(f"image {dir}: {MANIFEST} lists no files; {rebuild}")
    kernel_file = manifest.get("kernel_file")
    if (
        kernel_file == "vmlinux"
        and "vmlinuz" in files
        and not os.path.exists(os.path.join(dir, "vmlinux"))
    ):
        # vmlinux only boots faster; without it, boot the compressed kernel.
        files = {k: v for k, v in files.items() if k != "vmlinux"}
        manifest = {**manifest, "kernel_file": "vmlinuz", "files": files}
    for name, rec in sorted(files.items()):
        _check_file(dir, name, rec, verify, rebuild)

    def opt(key: str) -> str | None:
        name = manifest.get(key)
        if name is None:
            return None
        if name not in files:
            raise ImageError(f"image {dir}: {MANIFEST} names {key} {name!r} but lists no such file")
        return os.path.join(dir, str(name))

    ssh_key = opt("ssh_key")
    if ssh_key is None:
        raise ImageError(f"image {dir}: {MANIFEST} names no ssh_key; {rebuild}")
    pub = ssh_key + ".pub"
    try:
        with open(pub) as f:
            ssh_public = f.read().strip()
    except OSError as e:
        raise ImageError(f"image {dir}: cannot read {pub}: {e.strerror or e}; {rebuild}") from None
    kernel = manifest.get("kernel") or {}
    return ImageInfo(
        dir=dir,
        kernel=opt("kernel_file"),
        initrd=opt("initrd"),
        disk=opt("disk"),
        ssh_key=ssh_key,
        ssh_public=ssh_public,
        host_key_fingerprint=manifest.get("host_key_fingerprint"),
        cmdline=str(manifest.get("cmdline", DEFAULT_CMDLINE)),
        kernel_version=str(kernel.get("release", "")),
        format_version=int(fmt),
        ready_marker=manifest.get("ready_marker"),
        ssh_user=str(manifest.get("ssh_user", "root")),
        seed=opt("seed"),
        manifest=manifest,
        manifest_digest="sha256:" + hashlib.sha256(raw).hexdigest(),
    )


def _check_file(dir: str, name: str, rec: Any, verify: bool, rebuild: str) -> None:
    path = os.path.join(dir, name)
    if os.path.basename(name) != name or not isinstance(rec, dict):
        raise ImageError(f"image {dir}: {MANIFEST} has a bad entry for {name!r}; {rebuild}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(f"image {dir}: {name} is missing ({e.strerror}); {rebuild}") from None
    if st.st_size != rec.get("size"):
        raise ImageError(
            f"image {dir}: {name} has {st.st_size} bytes, the manifest says "
            f"{rec.get('size')}; {rebuild}"
        )
    if verify or st.st_mtime_ns != rec.get("mtime_ns"):
        if sha256_file(path) != rec.get("sha256"):
            raise ImageError(
                f"image {dir}: {name} changed since the image was built (sha256 "
                f"differs from the manifest); {rebuild}"
            )
    if name == "id_ed25519" and st.st_mode & 0o077:
        raise ImageError(
            f"image {dir}: {name} is readable by others (mode {st.st_mode & 0o777:o}); "
            f"chmod 600 {path}"
        )


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
