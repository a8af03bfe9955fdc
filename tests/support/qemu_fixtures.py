"""The local VM test image, built once and kept across test sessions.

``qemu_image`` builds (or reuses) the default test image under
``$TXVMBOT_TEST_IMAGE_ROOT`` (default ``/var/tmp/txvmbot-test-image``):
``<root>/<inputs key>/image``, with the kernel ``.deb`` cached in
``<root>/cache``. The key changes with the kernel package, busybox and
dropbear versions, the guest's files and the image format, so sessions on
different code never rebuild each other's image; a file lock serialises
concurrent builds. First build ~10 s (kernel download included), reuse ~1 s.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from txvmbot.qemu.image import ImageInfo, build_image, build_inputs, inputs_key, load_image

IMAGE_ROOT = os.environ.get("TXVMBOT_TEST_IMAGE_ROOT", "/var/tmp/txvmbot-test-image")


@contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_test_image(root: str = IMAGE_ROOT) -> ImageInfo:
    """Build the test image if needed (once per inputs, across sessions)."""
    inputs = build_inputs()
    image = os.path.join(root, inputs_key(inputs), "image")
    with _locked(os.path.join(root, ".lock")):
        build_image(image, cache_dir=os.path.join(root, "cache"), inputs=inputs)
        return load_image(image)


@pytest.fixture(scope="session")
def qemu_image() -> ImageInfo:
    """The default test image (vmlinux, initrd, disk.qcow2, ssh key), as an
    ``ImageInfo``. Boot it with ``-kernel info.kernel -initrd info.initrd
    -append info.cmdline`` and a qcow2 overlay on ``info.disk``; wait for
    ``info.ready_marker`` on the serial console; ssh as root with
    ``info.ssh_key``."""
    return build_test_image()
