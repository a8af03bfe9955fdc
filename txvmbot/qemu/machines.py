"""Fresh local QEMU VMs, behind :class:`~txvmbot.machines.IMachines`: disk
space, image and template once per job (:meth:`LocalMachines.prepare`),
then overlay, boot, ready and ssh per machine (:meth:`~LocalMachines.acquire`),
with the same step results and facts as a cloud's machines. The local smoke
job is :class:`txvmbot.jobs.smoke.LocalCheck` on top of this.

Every job gets a fresh qcow2 overlay on the pool's base image (seed 000: a
reused VM kept stale state). With the pool's ``fast_start``, the overlay is
on the pool's template's frozen overlay instead, and the VM resumes from the
template's saved state rather than booting (see ``txvmbot.qemu.template``);
the step ``template`` before ``overlay`` builds or reuses it. The VM directory is journalled before it is
created, so a crash leaves a trace that cleanup and the daemon's recovery
follow to stop QEMU and remove the overlay. A failed job's VM, with
``keep_on_failure``, is saved (QMP migrate to a file) and kept with its
overlay and console log until released.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from txvmbot import facts as _facts
from txvmbot.engine import Cleanup, StepContext, StepRunner, StepSequence, gather, track
from txvmbot.errors import StepFailed, StepTimeout
from txvmbot.interfaces import IJournal
from txvmbot.machines import IMachines, Machine, ssh_wait_bound
from txvmbot.model import Facts, JournalEntry
from txvmbot.qemu import kept as K
from txvmbot.qemu.model import LocalSpec

log = Logger()

VM_KIND = "qemu-vm"
#: A VM's own NoCloud seed, in its directory, when the job has user data.
SEED_FILE = "seed.img"


def journal_endpoint(pool_name: str) -> str:
    """What a local VM's journal entries carry where a cloud's endpoint goes."""
    return f"local:{pool_name}"


class LocalUndoer:
    """Undoes ``qemu-vm`` journal entries: stops QEMU (gracefully when this
    process started it, by its recorded pid otherwise) and removes the VM
    directory unless its evidence is kept."""

    def __init__(
        self,
        shutdown_bound: float = 10.0,
        blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """``blocking`` runs a blocking call off the reactor thread
        (deferToThread by default; tests pass one that runs it at once)."""
        self.shutdown_bound = shutdown_bound
        self.running: dict[str, Any] = {}  # vm dir -> VM started by this process
        if blocking is None:
            from twisted.internet.threads import deferToThread

            blocking = deferToThread
        self._blocking = blocking

    def __call__(self, entry: JournalEntry) -> Deferred[bool]:
        return ensureDeferred(self._undo(entry))

    async def _undo(self, entry: JournalEntry) -> bool:
        if entry.kind != VM_KIND:
            raise StepFailed(f"cleanup {entry.kind}", f"unknown resource kind {entry.kind!r}")
        from txvmbot.qemu.recover import stop_from_record

        path = entry.name
        vm = self.running.pop(path, None)
        if vm is not None:
            await vm.stop(self.shutdown_bound)
        else:
            # Waits for the process and deletes gigabytes: not on the reactor.
            await self._blocking(stop_from_record, path)
        if os.path.isdir(path) and not K.is_kept(path):
            await self._blocking(shutil.rmtree, path)
        return True


@attrs.define
class _VM:
    """What one acquired VM is, as the job goes."""

    id: str
    dir: str
    vm: Any = None
    host_key: str = ""
    kept: bool = False
    #: this VM's own NoCloud seed (the job's user data merged in), if any.
    seed: str | None = None


@implementer(IMachines)
class LocalMachines:
    """The VMs of one job on one local pool, journalled under ``check_id``."""

    log = Logger()

    def __init__(self, reactor: Any, spec: LocalSpec, *, journal: IJournal, check_id: str) -> None:
        self.reactor = reactor
        self.spec = spec
        self.journal = journal
        self.check_id = check_id
        self.undo = LocalUndoer(spec.timeouts.shutdown)
        self._image: Any = None
        self._template: Any = None
        self._key: Any = None
        self._vms: list[_VM] = []

    # -- IMachines --------------------------------------------------------

    async def _prepare(self, sequence: StepSequence) -> None:
        await sequence.step("disk-space", 10, self._disk_space)
        await sequence.step("image", 30, self._load_image)
        # A template's guest ran cloud-init already: user data needs a boot.
        if self.spec.pool.fast_start and self.spec.user_data is None:
            await sequence.step("template", self._template_bound(), self._ensure_template)

    def prepare(self, sequence: StepSequence) -> Deferred[None]:
        return ensureDeferred(self._prepare(sequence))

    async def _acquire(self, sequence: StepSequence, count: int, ssh: bool) -> tuple[Machine, ...]:
        t = self.spec.timeouts
        batch = [self._new_vm() for _ in range(count)]
        self._vms.extend(batch)
        await sequence.step("overlay", 30, lambda ctx: self._each(ctx, batch, self._overlay))
        await sequence.step("boot", t.boot, lambda ctx: self._each(ctx, batch, self._boot))
        await sequence.step("ready", t.boot, lambda ctx: self._each(ctx, batch, self._ready))
        if ssh:
            await sequence.step("wait-ssh", t.ssh, lambda ctx: self._each(ctx, batch, self._wait_ssh))
        return tuple(
            Machine(
                name=v.id,
                ssh_endpoint=v.vm.ssh_endpoint,
                ssh_user=self._ssh_user(),
                key=self._key,
                host_key=v.host_key,
            )
            for v in batch
        )

    def acquire(
        self, sequence: StepSequence, count: int, *, ssh: bool = True
    ) -> Deferred[tuple[Machine, ...]]:
        return ensureDeferred(self._acquire(sequence, count, ssh))

    async def _release(self, machine: Machine) -> None:
        v = next((v for v in self._vms if v.id == machine.name), None)
        if v is None:
            return
        try:
            for entry in await self.journal.pending(self.check_id):
                if entry.kind == VM_KIND and entry.name == v.dir:
                    await self.undo(entry)
                    await self.journal.done(entry)
            v.vm = None
        except Exception as e:
            self.log.warn("Could not release VM {vm} early ({e}); cleanup will", vm=v.id, e=e)

    def release(self, machine: Machine) -> Deferred[None]:
        return ensureDeferred(self._release(machine))

    def console(self, steps: StepRunner) -> Deferred[tuple[tuple[str, str], ...]]:
        return succeed(tuple((v.id, v.vm.console_text()) for v in self._vms if v.vm is not None))

    def keep(self, steps: StepRunner, error: str) -> Deferred[bool]:
        async def go() -> bool:
            if not (self.spec.pool.keep_on_failure and any(v.dir for v in self._vms)):
                return False
            try:
                await steps.run("keep-evidence", 60, lambda ctx: self._keep(ctx, error))
            except Exception as e:  # recorded as a failed step already
                self.log.info("Keeping evidence failed: {e}", e=e)
                return False
            return True

        return ensureDeferred(go())

    def cleanup(self, steps: StepRunner) -> Deferred[tuple[str, ...]]:
        bound = self.spec.timeouts.shutdown * 3 + 10
        return Cleanup(self.journal, self.undo, steps, bound).run(self.check_id)

    def host_keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((v.id, v.host_key) for v in self._vms if v.host_key)

    def facts(self, guest_uname: str) -> Facts:
        pool = self.spec.pool
        extra: dict[str, str] = {}
        first = next((v for v in self._vms if v.vm is not None), None)
        if first is not None:
            extra.update({k: str(v) for k, v in first.vm.facts.items()})
        if self._template is not None:
            extra["template"] = "built" if self._template.built else "reused"
            extra["template_image_key"] = self._template.image_key
        digest = getattr(self._image, "manifest_digest", "")
        if digest:
            extra["image_digest"] = digest
        if self.spec.user_data is not None:
            extra["user_data_bytes"] = str(len(self.spec.user_data))
        kept = next((v for v in self._vms if v.kept), None)
        if kept is not None:
            extra["kept_vm"] = kept.id
            extra["kept_path"] = kept.dir
        return _facts.collect(
            endpoint=journal_endpoint(pool.name),
            region=pool.run_dir,
            image_id=pool.image_dir,
            image_name=getattr(self._image, "kernel_version", "") or "",
            instance_type=f"{pool.memory_mb} MiB, {pool.cpus} cpu",
            guest_uname=guest_uname,
            extra=tuple(sorted(extra.items())),
        )

    def close(self) -> Deferred[None]:
        return succeed(None)

    # -- steps ------------------------------------------------------------

    def _new_vm(self) -> _VM:
        vm_id = f"{self.check_id}-{uuid.uuid4().hex[:6]}"
        return _VM(id=vm_id, dir=K.vm_dir(self.spec.pool.run_dir, vm_id))

    async def _each(
        self, ctx: StepContext, batch: list[_VM], action: Callable[[StepContext, _VM], Any]
    ) -> None:
        """Run ``action`` for every VM of ``batch`` side by side; fail with
        the first failure (the others are cancelled)."""
        await gather([ensureDeferred(action(ctx, v)) for v in batch])

    def _disk_space(self, ctx: StepContext) -> None:
        from txvmbot.qemu.disk import check_free_disk

        pool = self.spec.pool
        os.makedirs(K.vms_dir(pool.run_dir), mode=0o700, exist_ok=True)
        check_free_disk(pool.run_dir, pool.min_free_mb)
        ctx.saw(f"{pool.run_dir} has room")

    def _load_image(self, ctx: StepContext) -> None:
        from txvmbot.qemu.image import load_image

        self._image = load_image(self.spec.pool.image_dir)
        ctx.saw(f"{self.spec.pool.image_dir} (kernel {self._image.kernel_version})")
        if self.spec.user_data is not None:
            self._check_user_data(ctx)

    def _ssh_user(self) -> str:
        """The job's user: the image's (a cloud image's cloud-init made it)
        unless the job names one other than root."""
        if self.spec.ssh_user == "root" and self._image is not None:
            return str(getattr(self._image, "ssh_user", "root") or "root")
        return self.spec.ssh_user

    def _nocloud(self) -> dict[str, Any]:
        record = self._image.manifest.get("nocloud")
        return dict(record) if isinstance(record, dict) else {}

    def _check_user_data(self, ctx: StepContext) -> None:
        """User data needs an image that boots cloud-init with a NoCloud
        seed; merge it once here, so a bad file fails before any VM."""
        from txvmbot.errors import ConfigError
        from txvmbot.qemu._image_list import kind_of
        from txvmbot.qemu.image import nocloud_files

        image = self._image
        if image.seed is None:
            raise StepFailed(
                "image",
                f"--user-data needs a cloud image booted by cloud-init (txvmbot image "
                f"import); {image.dir} is a {kind_of(image.manifest)} image without a "
                "NoCloud seed",
            )
        nocloud = self._nocloud()
        try:
            nocloud_files(
                image.ssh_public,
                hostname=str(nocloud.get("hostname", "txvmbot-guest")),
                user=str(nocloud.get("user", image.ssh_user)),
                ready_marker=image.ready_marker,
                user_data=self.spec.user_data,
            )
        except ConfigError as e:
            raise StepFailed("image", str(e)) from None
        skipped = (
            "; fast start skipped: the template's guest ran cloud-init without it"
            if self.spec.pool.fast_start
            else ""
        )
        ctx.saw(
            f"user data: {len(self.spec.user_data or b'')} bytes, merged into each VM's "
            f"seed{skipped}"
        )

    def _make_seed(self, v: _VM) -> str:
        """``v``'s own NoCloud seed, in its directory (removed with it)."""
        from txvmbot.qemu.image import make_nocloud_seed

        image = self._image
        nocloud = self._nocloud()
        return make_nocloud_seed(
            v.dir,
            image.ssh_public,
            name=SEED_FILE,
            instance_id=v.id,
            hostname=str(nocloud.get("hostname", "txvmbot-guest")),
            user=str(nocloud.get("user", image.ssh_user)),
            ready_marker=image.ready_marker,
            user_data=self.spec.user_data,
        )

    def _template_bound(self) -> float:
        # Waiting for another builder, then (if it failed) building here.
        return 2 * self._lock_bound() + 10

    def _lock_bound(self) -> float:
        return self.spec.timeouts.boot + 90.0

    async def _ensure_template(self, ctx: StepContext) -> None:
        from txvmbot.qemu.template import ensure_template, template_dir

        pool = self.spec.pool
        ctx.saw(f"checking {template_dir(pool.run_dir)}")
        t = await ensure_template(
            self.reactor,
            self._image,
            pool,
            boot_bound=self.spec.timeouts.boot,
            lock_bound=self._lock_bound(),
        )
        self._template = t
        if t.built:
            ctx.saw(f"built in {t.build_seconds:.2f}s: {t.dir} (image {t.image_key})")
        else:
            ctx.saw(f"reused {t.dir} (image {t.image_key}, built in {t.build_seconds:.2f}s)")

    async def _overlay(self, ctx: StepContext, v: _VM) -> None:
        from txvmbot.qemu.disk import create_overlay

        pool = self.spec.pool
        base = self._image.disk if self._template is None else self._template.overlay

        async def creating() -> str:
            os.makedirs(v.dir, mode=0o700)
            await create_overlay(self.reactor, base, os.path.join(v.dir, K.OVERLAY_FILE))
            if self.spec.user_data is not None:
                from twisted.internet.threads import deferToThread

                # mkfs.vfat and mcopy: off the reactor thread.
                v.seed = await deferToThread(self._make_seed, v)
            return v.id

        await track(
            self.journal,
            self.check_id,
            VM_KIND,
            v.dir,
            journal_endpoint(pool.name),
            pool.run_dir,
            lambda: ensureDeferred(creating()),
        )
        ctx.saw(v.dir + (" (on the template's overlay)" if self._template else ""))

    async def _boot(self, ctx: StepContext, v: _VM) -> None:
        from txvmbot.qemu.boot import BootSpec, boot

        pool = self.spec.pool
        tmpl = self._template
        disk = os.path.join(v.dir, K.OVERLAY_FILE)
        image = self._image if v.seed is None else attrs.evolve(self._image, seed=v.seed)
        if tmpl is None:
            v.vm = await boot(
                self.reactor,
                BootSpec(
                    image,
                    v.dir,
                    accel=pool.accel,
                    memory_mb=pool.memory_mb,
                    cpus=pool.cpus,
                    disk=disk,
                ),
            )
        else:
            # The saved state only fits the machine it was saved from.
            v.vm = await boot(
                self.reactor,
                BootSpec(
                    self._image,
                    v.dir,
                    accel=tmpl.accel,
                    memory_mb=tmpl.memory_mb,
                    cpus=tmpl.cpus,
                    machine=tmpl.machine,
                    disk=disk,
                    incoming=tmpl.state,
                ),
            )
        self.undo.running[v.dir] = v.vm
        ctx.saw(f"pid {v.vm.pid}, ssh on {v.vm.ssh_endpoint}")

    async def _ready(self, ctx: StepContext, v: _VM) -> None:
        if self._template is not None:
            ctx.saw("waiting for the template's saved state to run again")
        else:
            ctx.saw("waiting for the ready marker on the serial console")
        from txvmbot.qemu.vm import VMNotReady

        try:
            await v.vm.wait_ready(self.spec.timeouts.boot)
        except VMNotReady as e:
            # The VM's own timeout names its wait; the step's is "ready".
            marker = getattr(self._image, "ready_marker", None) or "the ready marker"
            seen = f"no {marker} on the serial console; its tail:{e.last_seen}"
            raise StepTimeout("ready", e.bound, seen) from e
        ctx.saw("ready")

    async def _wait_ssh(self, ctx: StepContext, v: _VM) -> None:
        from txvmbot import ssh

        t = self.spec.timeouts
        if self._key is None:
            self._key = ssh.load_private_key(self._image.ssh_key)

        def progress(attempt: int, last: str) -> None:
            ctx.saw(f"attempt {attempt}: {last}")

        v.host_key = await ssh.wait_for_ssh(
            self.reactor,
            v.vm.ssh_endpoint,
            self._ssh_user(),
            self._key,
            connect_timeout=t.ssh_connect,
            bound=ssh_wait_bound(t.ssh),
            on_attempt=progress,
        )
        expected = getattr(self._image, "host_key_fingerprint", "")
        if expected and v.host_key != expected:
            raise StepFailed(
                "wait-ssh", f"the guest's host key is {v.host_key}, the image's is {expected}"
            )
        ctx.saw(v.host_key)

    async def _keep(self, ctx: StepContext, error: str) -> None:
        """Save each failed VM's state next to its overlay and console log,
        and mark its directory kept, so a person can start it again."""
        from txvmbot.qemu.vm import VMState

        for v in self._vms:
            if not v.dir or not os.path.isdir(v.dir):
                continue
            if v.vm is not None and v.vm.state is VMState.READY:
                ctx.saw("saving the VM's state")
                await v.vm.save_state(os.path.join(v.dir, K.STATE_FILE))
            elif v.vm is not None and v.vm.state is VMState.BOOTING:
                # Never got ready: there is no state worth saving, but its
                # console log and overlay are the evidence of why.
                ctx.saw("stopping the VM that never got ready, keeping its disk")
                await v.vm.stop(self.spec.timeouts.shutdown, keep=True)
            if v.vm is not None:
                self.undo.running.pop(v.dir, None)
            if (
                self._template is not None
                and self._image.disk
                and (v.vm is None or not v.vm.running)
            ):
                # The template may be rebuilt before someone looks at this
                # evidence: make the kept overlay stand on the image's disk alone.
                from txvmbot.qemu.template import detach_overlay

                ctx.saw("detaching the overlay from the template")
                await detach_overlay(
                    self.reactor, os.path.join(v.dir, K.OVERLAY_FILE), self._image.disk
                )
            K.mark_kept(v.dir, self.check_id, error)
            v.kept = True
            ctx.saw(f"kept in {v.dir}")
