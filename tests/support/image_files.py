"""Image files made for the tests of images by name: ``qcow2`` (made with
qemu-img), ``sha256`` of a file, and the fixtures ``state`` (a state dir
under tmp_path) and ``cloud_qcow2`` (a cloud image's qcow2)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest


def qcow2(path: Path, size: str = "64M", backing: Path | None = None) -> Path:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*argv, str(path), size], check=True, timeout=60)
    return path


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def state(tmp_path: Path) -> str:
    return str(tmp_path / "state")


@pytest.fixture
def cloud_qcow2(tmp_path: Path) -> Path:
    return qcow2(tmp_path / "debian-12-genericcloud-amd64.qcow2")
