"""Starting one VM: its directory and disk, QEMU with a free forward port,
and its QMP session; then the VM waits for its guest (``VM.wait_ready``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.qemu.accel import detect_accel, find_binary, qemu_version
from txvmbot.qemu.argv import ImageLike, free_port, parent_death_launcher, qemu_argv
from txvmbot.qemu.disk import check_free_disk, create_overlay
from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.qmp import QMPConnectionLost, QMPTimeout, connect_qmp
from txvmbot.qemu.vm import VM, VMConfig, VMError
from txvmbot.qemu.vm_files import DISK, PIDFILE, QMP_SOCKET

__all__ = ["BootSpec", "boot"]

log = Logger()

# sun_path is 108 bytes on Linux, with the terminating NUL.
_MAX_SOCKET_PATH = 107


def _extra_args(args: Sequence[str]) -> tuple[str, ...]:
    return tuple(args)


@frozen
class BootSpec:
    """What to boot and how: one VM for ``image`` in ``vm_dir``.

    ``accel`` is the pool's setting (auto, kvm or tcg; see detect_accel).
    ``disk`` is the drive; by default ``vm_dir/disk.qcow2``, created as an
    overlay on ``image.disk`` when missing. ``incoming`` is a file written by
    ``VM.save_state``: the VM resumes from it instead of booting; its
    ``disk`` must then hold what the saved VM's disk held (an overlay backed
    by the saved VM's overlay), and machine, memory and cpus must match.
    ``append`` replaces the image's kernel command line; ``extra_args`` are
    appended to QEMU's. ``min_free_mb`` > 0 checks free disk at ``vm_dir``
    before anything is created (DiskFull). ``ssh_port`` fixes the forward's
    port; by default a free one is picked, and one taken by someone else
    between free_port and QEMU's bind is retried with a new port up to
    ``port_attempts`` times. ``qmp_bound`` is how long QMP may take to come
    up; ``incoming_poll`` how often a VM resuming a saved state is asked
    whether it runs.
    """

    image: ImageLike
    vm_dir: str
    accel: str
    memory_mb: int
    cpus: int
    incoming: str | None = None
    qemu_binary: str = "qemu-system-x86_64"
    machine: str = "q35"
    disk: str | None = None
    append: str | None = None
    extra_args: tuple[str, ...] = field(default=(), converter=_extra_args)
    min_free_mb: float = 0
    ssh_port: int | None = None
    qmp_bound: float = 15.0
    port_attempts: int = 3
    incoming_poll: float = 0.02


def boot(reactor: Any, spec: BootSpec, clock: IReactorTime | None = None) -> Deferred[VM]:
    """Start one QEMU as ``spec`` says; fire with the VM once its QMP
    session is up (so its ssh forward is bound), in state booting. Then
    ``wait_ready``. ``clock`` is ``reactor`` unless given.

    Fails with QEMUExited (exit status, stderr) if QEMU ends before QMP is
    up, QMPTimeout if QMP does not come up within ``spec.qmp_bound`` (QEMU is
    then killed). Cancelling kills QEMU.
    """
    the_clock: IReactorTime = reactor if clock is None else clock
    return Deferred.fromCoroutine(_boot(reactor, the_clock, spec, os.path.abspath(spec.vm_dir)))


def _ready_marker(image: ImageLike) -> str | None:
    marker = getattr(image, "ready_marker", READY_MARKER)
    return str(marker) if marker else None


async def _boot(reactor: Any, clock: IReactorTime, spec: BootSpec, vm_dir: str) -> VM:
    image = spec.image
    incoming = spec.incoming
    ssh_port = spec.ssh_port
    disk = spec.disk
    qmp_path = os.path.join(vm_dir, QMP_SOCKET)
    if len(qmp_path.encode()) > _MAX_SOCKET_PATH:
        raise VMError(
            f"VM directory {vm_dir} is too long for a unix socket path "
            f"({len(qmp_path.encode())} > {_MAX_SOCKET_PATH} bytes for {QMP_SOCKET}); "
            "use a shorter run_dir"
        )
    if spec.min_free_mb > 0:
        check_free_disk(vm_dir, spec.min_free_mb)
    accel, accel_reason = detect_accel(spec.accel)
    binary = find_binary(spec.qemu_binary)
    version = qemu_version(binary)
    launcher = parent_death_launcher()
    if incoming is not None and not os.path.isfile(incoming):
        raise VMError(f"incoming state {incoming} does not exist")
    os.makedirs(vm_dir, mode=0o700, exist_ok=True)
    if disk is None:
        if image.disk:
            disk = os.path.join(vm_dir, DISK)
            if not os.path.exists(disk):
                await create_overlay(reactor, image.disk, disk)
    else:
        disk = os.path.abspath(disk)
        if not os.path.isfile(disk):
            raise VMError(f"disk {disk} for VM {vm_dir} does not exist")

    attempt = 0
    while True:
        attempt += 1
        port = ssh_port if ssh_port is not None else free_port()
        for stale in (qmp_path, os.path.join(vm_dir, PIDFILE)):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        argv = qemu_argv(
            binary=binary,
            image=image,
            vm_dir=vm_dir,
            disk=disk,
            accel=accel,
            machine=spec.machine,
            memory_mb=spec.memory_mb,
            cpus=spec.cpus,
            ssh_port=port,
            incoming=incoming,
            append=spec.append,
            extra_args=spec.extra_args,
        )
        config = VMConfig(
            vm_dir=vm_dir,
            image_dir=os.path.abspath(image.dir),
            disk=disk,
            accel=accel,
            accel_reason=accel_reason,
            machine=spec.machine,
            memory_mb=spec.memory_mb,
            cpus=spec.cpus,
            ssh_port=port,
            qemu_binary=binary,
            qemu_version=version,
            argv=tuple(argv),
            incoming=os.path.abspath(incoming) if incoming else None,
            kernel_version=str(getattr(image, "kernel_version", "") or ""),
            ready_marker=_ready_marker(image),
            launcher=launcher,
        )
        vm = VM(reactor, clock, config)
        vm._spawn()
        try:
            vm.qmp = await connect_qmp(
                reactor,
                qmp_path,
                bound=spec.qmp_bound,
                clock=clock,
                still_worth_trying=vm._why_not_connect,
            )
        except QMPConnectionLost:
            if vm.exit_status is None:
                await vm.wait_exited(2.0)
            if vm.exit_status is None:
                vm._signal("KILL")
                raise
            error = vm._exited_error("starting")
            if (
                ssh_port is None
                and attempt < spec.port_attempts
                and "host forwarding rule" in error.stderr_tail
            ):
                log.warn(
                    "QEMU could not bind 127.0.0.1:{port}; retrying with another port",
                    port=port,
                )
                continue
            raise error from None
        except QMPTimeout:
            vm._phase = "kill"
            vm._signal("KILL")
            raise
        except BaseException:
            vm._phase = "kill"
            vm._signal("KILL")
            raise
        if incoming is None and config.ready_marker is None:
            vm._became_ready()
        elif incoming is not None:
            task = Deferred.fromCoroutine(vm._resume_incoming(spec.incoming_poll))
            vm._incoming_task = task

            def done(result: object, vm: VM = vm) -> None:
                vm._incoming_task = None
                if isinstance(result, Failure) and not result.check(
                    CancelledError, QMPConnectionLost
                ):
                    log.failure("Resuming {vm_dir} from its state", result, vm_dir=vm.vm_dir)

            task.addBoth(done)
        return vm
