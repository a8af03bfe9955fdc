"""VM images for local QEMU jobs.

- ``build_image(dir, cache_dir=...)``: the default test image, built offline
  from Debian packages (``txvmbot image build``).
- ``build_debian_image(dir, cache_dir=..., release=..., packages=...)``: a
  real Debian guest (systemd, OpenSSH) built from Debian's archive with
  mmdebstrap (``txvmbot image build --distro debian``).
- ``load_image(dir)``: an image directory, checked against its manifest, as
  an ``ImageInfo``.
- ``custom_image(...)``: a user's own kernel + initrd, or a qcow2 disk (a
  cloud image) with a cloud-init NoCloud seed from ``make_nocloud_seed``.

Everything here is synchronous (subprocess, file I/O) and imports no
reactor: it runs from the CLI and test setup, not on the daemon's reactor.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from txvmbot.qemu._image_build import (
    DEFAULT_CMDLINE,
    FORMAT_VERSION,
    build_image,
    build_inputs,
    fingerprint_of,
    inputs_key,
    sha256_file,
)
from txvmbot.qemu._image_debian import build_debian_image, debian_inputs
from txvmbot.qemu._image_errors import ImageError, find_tool, need_tool, run_tool
from txvmbot.qemu.model import READY_MARKER

__all__ = [
    "DEFAULT_CMDLINE",
    "FORMAT_VERSION",
    "ImageError",
    "ImageInfo",
    "build_debian_image",
    "build_image",
    "build_inputs",
    "custom_image",
    "debian_inputs",
    "default_cache_dir",
    "default_image_dir",
    "fingerprint_of",
    "inputs_key",
    "load_image",
    "make_nocloud_seed",
    "nocloud_files",
    "read_vfat_file",
]

MANIFEST = "manifest.json"


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


def _state_dir(environ: Mapping[str, str]) -> str:
    from txvmbot.config import state_dir_for

    return state_dir_for(None, None, environ)


def default_image_dir(environ: Mapping[str, str] = os.environ, state_dir: str | None = None) -> str:
    """``STATE_DIR/image``: where ``txvmbot image build`` puts the image."""
    return os.path.join(state_dir or _state_dir(environ), "image")


def default_cache_dir(environ: Mapping[str, str] = os.environ, state_dir: str | None = None) -> str:
    """``STATE_DIR/cache/debs``: the kernel packages kept between builds."""
    return os.path.join(state_dir or _state_dir(environ), "cache", "debs")


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


def custom_image(
    dir: str,
    *,
    ssh_key: str,
    kernel: str | None = None,
    initrd: str | None = None,
    disk: str | None = None,
    cmdline: str = DEFAULT_CMDLINE,
    seed: str | None = None,
    ssh_user: str = "root",
    ready_marker: str | None = None,
    kind: str = "custom",
    extra: Mapping[str, Any] | None = None,
) -> ImageInfo:
    """Record a user's own image in ``dir`` (a ``manifest.json`` naming
    the given files, copied or linked in by the caller beforehand: all paths
    are names inside ``dir``) and load it.

    Either ``kernel`` (with an optional ``initrd``) or ``disk`` is needed; a
    cloud image usually comes with a ``seed`` from ``make_nocloud_seed``.
    ``kind`` is the manifest's (:mod:`txvmbot.qemu.images`); ``extra`` adds
    keys to the manifest (``distro``, ``release``, ``nocloud``...).
    """
    if kernel is None and disk is None:
        raise ImageError(f"image {dir}: give a kernel (and initrd) or a disk to boot")
    names = {
        "kernel_file": kernel,
        "initrd": initrd,
        "disk": disk,
        "ssh_key": ssh_key,
        "seed": seed,
    }
    files = {}
    for key, name in names.items():
        if name is None:
            continue
        if os.path.basename(name) != name:
            raise ImageError(f"image {dir}: {key} must be a file name inside {dir}, not {name!r}")
        path = os.path.join(dir, name)
        if not os.path.isfile(path):
            raise ImageError(f"image {dir}: {key} {path} does not exist")
        st = os.stat(path)
        files[name] = {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if not os.path.isfile(os.path.join(dir, ssh_key + ".pub")):
        raise ImageError(f"image {dir}: no public key {ssh_key}.pub next to the ssh key")
    manifest = {
        **(extra or {}),
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "custom": kind == "custom",
        **{k: v for k, v in names.items() if v is not None},
        "cmdline": cmdline,
        "ssh_user": ssh_user,
        "ready_marker": ready_marker,
        "host_key_fingerprint": None,
        "files": files,
    }
    _write_json(os.path.join(dir, MANIFEST), manifest)
    return load_image(dir)


def _write_json(path: str, value: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".manifest-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --- cloud-init NoCloud seed ------------------------------------------------


def nocloud_files(
    ssh_public: str,
    *,
    instance_id: str = "txvmbot",
    hostname: str = "txvmbot-guest",
    user: str = "root",
    ready_marker: str | None = READY_MARKER,
    user_data: bytes | None = None,
) -> dict[str, str]:
    """The ``user-data`` and ``meta-data`` of a NoCloud seed: ``ssh_public``
    authorized for ``user`` (root login allowed when ``user`` is root), and
    ``ready_marker`` written to the console once cloud-init is done.

    ``user_data`` (a job's ``--user-data``) is merged with that
    (:func:`txvmbot.userdata.merge_nocloud`); a ConfigError names
    ``--user-data`` when it cannot be."""
    if not ssh_public.startswith(("ssh-", "ecdsa-", "sk-")):
        raise ImageError(f"nocloud seed: {ssh_public[:30]!r} is not an ssh public key line")
    lines = [
        "#cloud-config",
        f"hostname: {json.dumps(hostname)}",
    ]
    if user == "root":
        lines += [
            "disable_root: false",
            "ssh_authorized_keys:",
            f"  - {json.dumps(ssh_public)}",
        ]
    else:
        lines += [
            "users:",
            "  - default",
            f"  - name: {json.dumps(user)}",
            "    sudo: ALL=(ALL) NOPASSWD:ALL",
            "    shell: /bin/sh",
            "    ssh_authorized_keys:",
            f"      - {json.dumps(ssh_public)}",
        ]
    if ready_marker:
        lines += [f"final_message: {json.dumps(ready_marker)}"]
    own = "\n".join(lines) + "\n"
    if user_data is None:
        user_data_text = own
    else:
        from txvmbot.userdata import merge_nocloud

        user_data_text = merge_nocloud(own, user_data)
    meta_data = f"instance-id: {json.dumps(instance_id)}\nlocal-hostname: {json.dumps(hostname)}\n"
    return {"user-data": user_data_text, "meta-data": meta_data}


def make_nocloud_seed(
    dir: str,
    ssh_public: str,
    *,
    name: str = "seed.img",
    instance_id: str = "txvmbot",
    hostname: str = "txvmbot-guest",
    user: str = "root",
    ready_marker: str | None = READY_MARKER,
    user_data: bytes | None = None,
) -> str:
    """Write a cloud-init NoCloud seed (volume label ``cidata``) into
    ``dir``; return its path. A vfat image made with mkfs.vfat and mcopy,
    else an iso from genisoimage or xorriso; an ImageError names the apt
    packages when none is installed. ``user_data`` as for
    :func:`nocloud_files`."""
    files = nocloud_files(
        ssh_public,
        instance_id=instance_id,
        hostname=hostname,
        user=user,
        ready_marker=ready_marker,
        user_data=user_data,
    )
    os.makedirs(dir, exist_ok=True)
    dest = os.path.join(dir, name)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=dir) as src:
        paths = []
        for fname, text in files.items():
            p = os.path.join(src, fname)
            with open(p, "w") as f:
                f.write(text)
            paths.append(p)
        tmp = os.path.join(src, "seed.out")
        if find_tool("mkfs.vfat") and find_tool("mcopy"):
            run_tool(["mkfs.vfat", "-n", "CIDATA", "-C", tmp, "1024"], "make the nocloud seed")
            run_tool(["mcopy", "-o", "-i", tmp, *paths, "::"], "copy files into the nocloud seed")
        elif find_tool("genisoimage") or find_tool("xorriso"):
            iso = ["genisoimage"] if find_tool("genisoimage") else ["xorriso", "-as", "mkisofs"]
            run_tool(
                [*iso, "-quiet", "-o", tmp, "-V", "cidata", "-J", "-r", *paths],
                "make the nocloud seed",
            )
        else:
            raise ImageError(
                "nocloud seed: needs mkfs.vfat and mcopy (apt-get install dosfstools "
                "mtools) or genisoimage (apt-get install genisoimage) or xorriso "
                "(apt-get install xorriso)"
            )
        os.replace(tmp, dest)
    return dest


def read_vfat_file(image: str, name: str) -> str:
    """A file of a vfat image, read with mtools (for checks and tests)."""
    p = subprocess.run(
        [need_tool("mtype"), "-i", image, f"::{name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if p.returncode != 0:
        raise ImageError(f"read {name} from {image}: {p.stderr.strip()}")
    return p.stdout
