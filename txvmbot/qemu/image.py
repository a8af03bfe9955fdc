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

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from typing import Any

from txvmbot.qemu._image_build import build_image, build_inputs, fingerprint_of, inputs_key
from txvmbot.qemu._image_debian import build_debian_image, debian_inputs
from txvmbot.qemu._image_errors import ImageError, find_tool, need_tool, run_tool
from txvmbot.qemu._image_manifest import (
    DEFAULT_CMDLINE,
    FORMAT_VERSION,
    MANIFEST,
    ImageInfo,
    load_image,
    sha256_file,
)
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


def _state_dir(environ: Mapping[str, str]) -> str:
    from txvmbot.config import state_dir_for

    return state_dir_for(None, None, environ)


def default_image_dir(environ: Mapping[str, str] = os.environ, state_dir: str | None = None) -> str:
    """``STATE_DIR/image``: where ``txvmbot image build`` puts the image."""
    return os.path.join(state_dir or _state_dir(environ), "image")


def default_cache_dir(environ: Mapping[str, str] = os.environ, state_dir: str | None = None) -> str:
    """``STATE_DIR/cache/debs``: the kernel packages kept between builds."""
    return os.path.join(state_dir or _state_dir(environ), "cache", "debs")


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
