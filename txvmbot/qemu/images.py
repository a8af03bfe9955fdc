"""Local VM images by name.

Every image is a directory with a ``manifest.json`` (:mod:`txvmbot.qemu.image`).
Where the named ones live, under the state dir:

- ``default``: ``STATE_DIR/image``, the busybox test image that ``txvmbot
  image build`` makes without ``--distro`` (where it always was);
- any other NAME: ``STATE_DIR/images/NAME`` (``image build --distro debian``
  makes ``debian-RELEASE`` unless given ``--name``; ``image import`` makes
  the name it is given).

``--image NAME`` on ``check --local`` and ``suite --local``, and ``image =
"NAME"`` in a ``[pools.NAME]`` table, resolve through :func:`image_dir_for`;
a value with a ``/`` in it is a directory path instead.

The manifest's ``kind`` says what the image is: ``busybox`` (the default
build; a manifest without ``kind`` that is not ``custom`` is one),
``debian`` (built from Debian's archive with mmdebstrap), ``cloud`` (a
distribution's cloud image, booted with a cloud-init NoCloud seed) or
``custom`` (:func:`txvmbot.qemu.image.custom_image`). ``distro`` and
``release`` name the guest's distribution where known.

Synchronous and reactor-free, like the rest of the image code.
"""

from __future__ import annotations

import os
import re

from txvmbot.qemu._image_errors import ImageError

__all__ = ["DEFAULT", "KINDS", "check_name", "image_dir_for", "image_names", "images_root"]

#: The name of the image at ``STATE_DIR/image``.
DEFAULT = "default"

KINDS = ("busybox", "debian", "cloud", "custom")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def check_name(name: str, where: str = "image name") -> str:
    """``name`` if it is a usable image name; an ImageError says why not."""
    if not _NAME.match(name):
        raise ImageError(
            f"{where} {name!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def images_root(state_dir: str) -> str:
    """``STATE_DIR/images``: where named images live."""
    return os.path.join(state_dir, "images")


def image_dir_for(name_or_dir: str, state_dir: str) -> str:
    """The directory of the image ``name_or_dir``: a path (it holds a
    ``/``) as given, ``default`` at ``STATE_DIR/image``, any other name at
    ``STATE_DIR/images/NAME``."""
    if "/" in name_or_dir:
        return os.path.abspath(os.path.expanduser(name_or_dir))
    if name_or_dir == DEFAULT:
        return os.path.join(state_dir, "image")
    return os.path.join(images_root(state_dir), check_name(name_or_dir))


def image_names(state_dir: str) -> list[str]:
    """The names of the images in the state dir, ``default`` first (when it
    exists), then the others sorted. A directory without a manifest is
    listed too: ``image list`` says it is broken."""
    names = []
    if os.path.isdir(os.path.join(state_dir, "image")):
        names.append(DEFAULT)
    root = images_root(state_dir)
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        if entry != DEFAULT and _NAME.match(entry) and os.path.isdir(os.path.join(root, entry)):
            names.append(entry)
    return names
