"""A small Debian guest image, built once and kept across test sessions.

``debian_image`` builds (or reuses) ``txvmbot image build --distro debian``
with python3-twisted and python3-subunit under ``$TXVMBOT_TEST_DEBIAN_ROOT``
(default ``/var/tmp/txvmbot-test-debian``): ``<root>/<inputs key>/image``.
The kernel ``.deb`` comes from the busybox image's cache
(``tests.support.qemu_fixtures.IMAGE_ROOT/cache``), where the Debian archive's
``.deb`` files and package lists are kept too (``debian-bookworm/``), so a
rebuild downloads nothing. The key changes with the package set, the kernel,
busybox and the builder's code; images of other keys not used for a day are
removed (each is ~450 MB). A file lock serialises concurrent builds. First
build ~1 min on a fresh machine (mostly mmdebstrap installing packages),
reuse ~1 s.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.support.qemu_fixtures import IMAGE_ROOT, _locked
from txvmbot.qemu.image import ImageInfo, build_debian_image, debian_inputs, inputs_key, load_image

DEBIAN_ROOT = os.environ.get("TXVMBOT_TEST_DEBIAN_ROOT", "/var/tmp/txvmbot-test-debian")
CACHE = os.path.join(IMAGE_ROOT, "cache")
PACKAGES = ("python3-twisted", "python3-subunit")
RELEASE = "bookworm"
#: Other keys' images unused for this long are removed.
PRUNE_AFTER = 24 * 3600.0


def _prune(root: str, keep: str) -> None:
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name == keep or name.startswith(".") or not os.path.isdir(path):
            continue
        if now - os.stat(path).st_mtime > PRUNE_AFTER:
            shutil.rmtree(path, ignore_errors=True)


def build_debian_test_image(root: str = DEBIAN_ROOT) -> ImageInfo:
    """Build the Debian test image if needed (once per inputs, across
    sessions)."""
    inputs = debian_inputs(RELEASE, PACKAGES)
    key = inputs_key(inputs)
    image = os.path.join(root, key, "image")
    with _locked(os.path.join(root, ".lock")):
        build_debian_image(
            image, cache_dir=CACHE, release=RELEASE, packages=PACKAGES, inputs=inputs
        )
        os.utime(os.path.join(root, key))
        _prune(root, key)
        return load_image(image)


@pytest.fixture(scope="session")
def debian_image() -> ImageInfo:
    """The Debian test image (systemd, OpenSSH, python3, python3-twisted,
    python3-subunit) as an ``ImageInfo``: boot it like the busybox image
    (``kernel``/``initrd``/``cmdline`` and an overlay on ``disk``, here the
    root file system), wait for ``ready_marker``, ssh as root with
    ``ssh_key``."""
    return build_debian_test_image()
