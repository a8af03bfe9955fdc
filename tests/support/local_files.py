"""Files on this machine written for a test: ``write`` makes the parents
and sets the mode."""

from __future__ import annotations

import os


def write(path: str, data: bytes, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)

