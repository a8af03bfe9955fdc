"""The VM directories of a pool's run dir, and the evidence kept in them.

Each VM lives in ``<run_dir>/<vm id>/`` (overlay, console log, QMP
socket, ``vm.json``). A failed job's directory is kept, with its saved
state, until someone releases it (seed 000: the bug vanished before it was
captured); ``kept.json`` in it says so and why.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator

from attrs import frozen

from txvmbot.errors import TxvmbotError

KEPT_FILE = "kept.json"
STATE_FILE = "state.bin"
OVERLAY_FILE = "overlay.qcow2"
CONSOLE_FILE = "console.log"
REVIVED_DIR = "revived"


class UnknownKept(TxvmbotError):
    def __init__(self, vm_id: str, run_dir: str) -> None:
        super().__init__(f"no kept VM {vm_id!r} in {run_dir} (see `txvmbot kept`)")


@frozen
class Kept:
    """One kept VM: where its evidence is and why it was kept."""

    vm_id: str
    path: str
    check_id: str
    reason: str
    kept_at: float
    has_state: bool
    size_bytes: int


def vms_dir(run_dir: str) -> str:
    """Where a pool's VM directories live: its run dir itself."""
    return run_dir


def vm_dir(run_dir: str, vm_id: str) -> str:
    if not vm_id or "/" in vm_id or vm_id.startswith("."):
        raise UnknownKept(vm_id, run_dir)
    return os.path.join(vms_dir(run_dir), vm_id)


def mark_kept(path: str, check_id: str, reason: str) -> None:
    with open(os.path.join(path, KEPT_FILE), "w", encoding="utf-8") as f:
        json.dump({"check_id": check_id, "reason": reason, "kept_at": time.time()}, f)


def is_kept(path: str) -> bool:
    return os.path.exists(os.path.join(path, KEPT_FILE))


def _size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _read(path: str) -> Kept | None:
    try:
        with open(os.path.join(path, KEPT_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return Kept(
        vm_id=os.path.basename(path),
        path=path,
        check_id=str(data.get("check_id", "")),
        reason=str(data.get("reason", "")),
        kept_at=float(data.get("kept_at", 0.0)),
        has_state=os.path.exists(os.path.join(path, STATE_FILE)),
        size_bytes=_size(path),
    )


def list_kept(run_dir: str) -> list[Kept]:
    """Kept VMs, newest first."""
    found = []
    root = vms_dir(run_dir)
    if os.path.isdir(root):
        for name in os.listdir(root):
            k = _read(os.path.join(root, name))
            if k is not None:
                found.append(k)
    return sorted(found, key=lambda k: k.kept_at, reverse=True)


def get_kept(run_dir: str, vm_id: str) -> Kept:
    k = _read(vm_dir(run_dir, vm_id))
    if k is None:
        raise UnknownKept(vm_id, run_dir)
    return k


def release(run_dir: str, vm_id: str) -> Kept:
    """Free a kept VM's evidence (its QEMU, if someone started it again,
    must be stopped first)."""
    from txvmbot.qemu.recover import stop_from_record

    k = get_kept(run_dir, vm_id)
    stop_from_record(k.path)
    stop_from_record(os.path.join(k.path, REVIVED_DIR))
    shutil.rmtree(k.path)
    return k


def iter_vm_dirs(run_dir: str) -> Iterator[str]:
    root = vms_dir(run_dir)
    if os.path.isdir(root):
        for name in sorted(os.listdir(root)):
            yield os.path.join(root, name)
