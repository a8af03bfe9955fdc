"""A pool's template: one VM booted once, saved, and resumed by every job.

With ``fast_start``, a job's VM does not boot: it resumes from the saved
state of a VM that booted once (QMP ``migrate`` to a file, then
``-incoming``), on an overlay of its own backed by the template's frozen
overlay; ssh is ready in well under a second instead of a few seconds.

The template lives in ``<run_dir>/template/``::

    template.json   what it was built from: the image (its manifest digest,
                    kernel version), QEMU version, accel, machine, memory,
                    cpus; a template that differs from the pool's is rebuilt
    state.bin       the saved VM (guest RAM and devices)
    overlay.qcow2   the saved VM's disk, read-only from then on; every job's
                    overlay is backed by it
    console.log     the serial console of the build, for diagnosis
    .lock           flock: one builder at a time (across processes too)
    .build/         a build in progress (QEMU's directory)

It belongs to the pool, not to a job: no job journals it and no cleanup
removes it. A rebuild renames the new files over the old, so a VM already
running on the old ones keeps them (QEMU holds them open).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txvmbot.errors import StepTimeout, TxvmbotError
from txvmbot.qemu.model import LocalPool

__all__ = [
    "FORMAT",
    "Template",
    "TemplateError",
    "detach_overlay",
    "ensure_template",
    "image_key",
    "template_dir",
]

log = Logger(namespace="txvmbot.qemu.template")

#: Version of template.json; a different one is rebuilt.
FORMAT = 1
TEMPLATE_DIR = "template"
RECORD = "template.json"
STATE = "state.bin"
OVERLAY = "overlay.qcow2"
CONSOLE = "console.log"
LOCK = ".lock"
BUILD = ".build"


class TemplateError(TxvmbotError):
    """The pool's template could not be built: says which part and why."""


@frozen
class Template:
    """A saved VM to resume jobs from. Boot a job's VM with
    ``incoming=state``, a disk that is an overlay backed by ``overlay``, and
    exactly this ``machine``, ``memory_mb``, ``cpus`` and ``accel``."""

    dir: str
    state: str
    overlay: str
    machine: str
    memory_mb: int
    cpus: int
    accel: str
    image_key: str
    kernel_version: str
    #: built by this call (False: an existing template was reused).
    built: bool
    #: seconds the build took (boot, ready, save), as recorded when built.
    build_seconds: float


def template_dir(run_dir: str) -> str:
    """Where a pool keeps its template."""
    return os.path.join(run_dir, TEMPLATE_DIR)


def image_key(image: Any) -> str:
    """A digest of the image's manifest (its files' checksums, kernel,
    command line, build time): a rebuilt image has a new key even from the
    same inputs (it has new ssh keys, which the saved RAM would not)."""
    manifest = getattr(image, "manifest", None) or {}
    blob = json.dumps(
        {
            "manifest": manifest,
            "kernel": image.kernel,
            "initrd": image.initrd,
            "disk": image.disk,
            "cmdline": image.cmdline,
        },
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _wanted(image: Any, pool: LocalPool, machine: str) -> dict[str, Any]:
    """What template.json must say for the template to fit this pool."""
    from txvmbot.qemu.accel import detect_accel, find_binary, qemu_version

    accel, _reason = detect_accel(pool.accel)
    return {
        "format": FORMAT,
        "image_dir": os.path.abspath(image.dir),
        "image_key": image_key(image),
        "kernel_version": str(getattr(image, "kernel_version", "") or ""),
        "qemu_version": qemu_version(find_binary("qemu-system-x86_64")),
        "accel": accel,
        "machine": machine,
        "memory_mb": pool.memory_mb,
        "cpus": pool.cpus,
    }


def _file_record(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _valid(tdir: str, wanted: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The record of the template in ``tdir`` if it fits ``wanted`` and its
    files are as recorded; else None and why not."""
    try:
        with open(os.path.join(tdir, RECORD), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None, "no template yet"
    except (OSError, ValueError) as e:
        return None, f"{RECORD} unreadable ({e})"
    if not isinstance(record, dict):
        return None, f"{RECORD} is not an object"
    for key, value in wanted.items():
        if record.get(key) != value:
            return None, f"{key} changed ({record.get(key)!r} -> {value!r})"
    for name in (STATE, OVERLAY):
        try:
            now = _file_record(os.path.join(tdir, name))
        except OSError:
            return None, f"{name} is missing"
        if now != record.get("files", {}).get(name):
            return None, f"{name} changed since the template was saved"
    return record, ""


def _template(tdir: str, record: dict[str, Any], built: bool) -> Template:
    return Template(
        dir=tdir,
        state=os.path.join(tdir, STATE),
        overlay=os.path.join(tdir, OVERLAY),
        machine=str(record["machine"]),
        memory_mb=int(record["memory_mb"]),
        cpus=int(record["cpus"]),
        accel=str(record["accel"]),
        image_key=str(record["image_key"]),
        kernel_version=str(record["kernel_version"]),
        built=built,
        build_seconds=float(record.get("build_seconds", 0.0)),
    )


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    from txvmbot.qemu.vm import _sleep as sleep

    return sleep(clock, seconds)


async def _lock(path: str, clock: IReactorTime, bound: float, poll: float) -> int:
    """flock ``path`` exclusively without blocking the reactor: a
    non-blocking attempt every ``poll`` seconds, for at most ``bound``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    start = clock.seconds()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if clock.seconds() - start >= bound:
                raise StepTimeout(
                    "template", bound, f"{path} still locked by another builder"
                )
            await _sleep(clock, poll)
    except BaseException:
        os.close(fd)
        raise


def ensure_template(
    reactor: Any,
    image: Any,
    pool: LocalPool,
    *,
    machine: str = "q35",
    boot_bound: float = 60.0,
    save_bound: float = 60.0,
    lock_bound: float | None = None,
    lock_poll: float = 0.05,
    clock: IReactorTime | None = None,
) -> Deferred[Template]:
    """The pool's template for ``image``: reused if ``<run_dir>/template``
    holds one that fits (same image manifest, kernel, QEMU, accel, machine,
    memory, cpus, files untouched), else built: boot ``image`` on a fresh
    overlay, wait for its ready marker (``boot_bound``), save its state
    (``save_bound``) and freeze the overlay (mode 0400).

    Builders take an flock on ``template/.lock`` (polled without blocking,
    for at most ``lock_bound``, by default the time of one build), so
    concurrent callers in any process build once and the others reuse it.
    Fails with TemplateError, or the boot's own errors (QEMUExited,
    VMNotReady) naming the build's console. Cancelling kills the build's
    QEMU; nothing half-built is left as the template.
    """
    the_clock: IReactorTime = reactor if clock is None else clock
    bound = lock_bound if lock_bound is not None else boot_bound + save_bound + 30.0
    return Deferred.fromCoroutine(
        _ensure(reactor, the_clock, image, pool, machine, boot_bound, save_bound, bound, lock_poll)
    )


async def _ensure(
    reactor: Any,
    clock: IReactorTime,
    image: Any,
    pool: LocalPool,
    machine: str,
    boot_bound: float,
    save_bound: float,
    lock_bound: float,
    lock_poll: float,
) -> Template:
    if not pool.run_dir:
        raise TemplateError(f"pool {pool.name!r} has no run_dir to keep its template in")
    tdir = os.path.abspath(template_dir(pool.run_dir))
    os.makedirs(tdir, mode=0o700, exist_ok=True)
    wanted = _wanted(image, pool, machine)
    fd = await _lock(os.path.join(tdir, LOCK), clock, lock_bound, lock_poll)
    try:
        record, why = _valid(tdir, wanted)
        if record is not None:
            return _template(tdir, record, built=False)
        log.info("Building the template of pool {pool} in {dir}: {why}", pool=pool.name, dir=tdir, why=why)
        record = await _build(reactor, clock, image, pool, tdir, wanted, boot_bound, save_bound)
        return _template(tdir, record, built=True)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


async def _build(
    reactor: Any,
    clock: IReactorTime,
    image: Any,
    pool: LocalPool,
    tdir: str,
    wanted: dict[str, Any],
    boot_bound: float,
    save_bound: float,
) -> dict[str, Any]:
    from txvmbot.qemu.boot import BootSpec, boot
    from txvmbot.qemu.disk import check_image, create_overlay
    from txvmbot.qemu.recover import stop_from_record
    from txvmbot.qemu.vm import VM

    if not image.disk:
        raise TemplateError(
            f"image {image.dir} has no disk: a template needs one to freeze "
            "(fast_start works with disk images only)"
        )
    started = clock.seconds()
    build = os.path.join(tdir, BUILD)
    if os.path.isdir(build):
        # A builder that crashed: its QEMU may still run.
        stop_from_record(build)
        shutil.rmtree(build)
    os.makedirs(build, mode=0o700)
    overlay = os.path.join(build, OVERLAY)
    state = os.path.join(build, STATE)
    vm: VM | None = None
    try:
        await create_overlay(reactor, image.disk, overlay)
        vm = await boot(
            reactor,
            BootSpec(
                image,
                build,
                accel=wanted["accel"],
                memory_mb=pool.memory_mb,
                cpus=pool.cpus,
                machine=wanted["machine"],
                disk=overlay,
            ),
            clock,
        )
        await vm.wait_ready(boot_bound)
        await vm.save_state(state, bound=save_bound)
        await check_image(reactor, overlay)
    except BaseException:
        if vm is not None and vm.exit_status is None:
            try:
                await vm.kill()
            except Exception:
                log.failure("Killing the template build's QEMU in {dir}", dir=build)
        shutil.rmtree(build, ignore_errors=True)
        raise
    # Read-only from now on (QEMU opens a backing file read-only anyway).
    # The state holds the guest's RAM, its private host key included.
    os.chmod(overlay, 0o400)
    os.chmod(state, 0o400)
    # Invalidate first, then swap the files in, then say they are valid: a
    # reader never sees a record with someone else's files.
    try:
        os.unlink(os.path.join(tdir, RECORD))
    except FileNotFoundError:
        pass
    os.replace(overlay, os.path.join(tdir, OVERLAY))
    os.replace(state, os.path.join(tdir, STATE))
    try:
        os.replace(os.path.join(build, CONSOLE), os.path.join(tdir, CONSOLE))
    except FileNotFoundError:
        pass
    record: dict[str, Any] = {
        **wanted,
        "built_at": time.time(),
        "build_seconds": round(clock.seconds() - started, 3),
        "files": {
            STATE: _file_record(os.path.join(tdir, STATE)),
            OVERLAY: _file_record(os.path.join(tdir, OVERLAY)),
        },
    }
    tmp = os.path.join(tdir, RECORD + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(tdir, RECORD))
    shutil.rmtree(build, ignore_errors=True)
    log.info(
        "Template of pool {pool} built in {seconds:.2f}s", pool=pool.name, seconds=record["build_seconds"]
    )
    return record


def detach_overlay(reactor: Any, overlay: str, base: str) -> Deferred[str]:
    """Rebase ``overlay`` (a job's, backed by the template's overlay) onto
    the image's ``base`` disk, copying in what the template's overlay held:
    kept evidence then survives a rebuild of the template. QEMU must not
    have ``overlay`` open. Fires with ``overlay``; DiskImageError if
    qemu-img fails."""
    return Deferred.fromCoroutine(_detach(reactor, overlay, base))


async def _detach(reactor: Any, overlay: str, base: str) -> str:
    from txvmbot.qemu.disk import DiskImageError, _qemu_img

    base = os.path.abspath(base)
    text, code = await _qemu_img(
        reactor,
        "qemu-img",
        "rebase",
        overlay,
        ["-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay],
    )
    if code != 0:
        raise DiskImageError("rebase", overlay, f"onto {base}: {text}", code)
    return overlay
