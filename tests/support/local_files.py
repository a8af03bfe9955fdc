"""Files on this machine for a test: ``write`` makes the parents and sets
the mode; ``TempDirMixin.mktemp_dir`` makes a temp dir removed at cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile


def write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


class TempDirMixin:
    def mktemp_dir(self) -> str:
        d = tempfile.mkdtemp(prefix="txvmbot-vm-")
        self.addCleanup(shutil.rmtree, d, True)  # type: ignore[attr-defined]
        return d
