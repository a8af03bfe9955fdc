"""What ``txvmbot image list`` and ``image show`` say of each image by name
(:mod:`txvmbot.qemu.images`): kind, distribution, kernel, size on disk,
build date and whether it loads.

Synchronous and reactor-free, like the rest of the image code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from attrs import asdict, frozen

from txvmbot.qemu._image_errors import ImageError

__all__ = ["ImageSummary", "kind_of", "list_images", "summarize"]


def kind_of(manifest: Mapping[str, Any]) -> str:
    """The manifest's ``kind``; a manifest from before kinds is ``custom``
    when it says so, else ``busybox`` (the default build)."""
    kind = manifest.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    return "custom" if manifest.get("custom") else "busybox"


@frozen
class ImageSummary:
    """One image as ``image list`` shows it. ``verified`` is true when it
    loaded (every file's size, and its sha256 where its mtime changed or
    with ``verify``); ``error`` says why not."""

    name: str
    dir: str
    kind: str = ""
    distro: str = ""
    release: str = ""
    kernel: str = ""
    size_bytes: int = 0
    built_at: float | None = None
    verified: bool = False
    checked: str = "size"  # or "sha256"
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _disk_usage(path: str) -> int:
    """Bytes the files of the directory take on disk (sparse files count
    what they use)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for e in entries:
        try:
            if e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
    return total


def _kernel_text(manifest: Mapping[str, Any], info: Any) -> str:
    release = getattr(info, "kernel_version", "") if info is not None else ""
    if not release:
        k = manifest.get("kernel")
        release = str(k.get("release", "")) if isinstance(k, Mapping) else ""
    if release:
        return release
    if manifest.get("kernel_file"):
        return str(manifest["kernel_file"])
    return "the disk's own" if manifest.get("disk") else ""


def summarize(name: str, dir: str, *, verify: bool = False) -> ImageSummary:
    """The summary of the image ``name`` in ``dir``: loaded with
    :func:`txvmbot.qemu.image.load_image` (``verify``: every sha256)."""
    from txvmbot.qemu.image import MANIFEST, load_image

    manifest: Mapping[str, Any] = {}
    info = None
    error = ""
    try:
        info = load_image(dir, verify=verify)
        manifest = info.manifest
    except ImageError as e:
        error = str(e)
        try:
            with open(os.path.join(dir, MANIFEST)) as f:
                raw = json.load(f)
            if isinstance(raw, dict):
                manifest = raw
        except (OSError, ValueError):
            pass
    built = manifest.get("built_at")
    return ImageSummary(
        name=name,
        dir=os.path.abspath(dir),
        kind=kind_of(manifest) if manifest else "",
        distro=str(manifest.get("distro") or ""),
        release=str(manifest.get("release") or ""),
        kernel=_kernel_text(manifest, info),
        size_bytes=_disk_usage(dir),
        built_at=float(built) if isinstance(built, (int, float)) else None,
        verified=info is not None,
        checked="sha256" if verify else "size",
        error=error,
    )


def list_images(state_dir: str, *, verify: bool = False) -> list[ImageSummary]:
    """Every image by name in ``state_dir``, ``default`` first."""
    from txvmbot.qemu.images import image_dir_for, image_names

    return [summarize(n, image_dir_for(n, state_dir), verify=verify) for n in image_names(state_dir)]
