"""A smoke job on a local VM, in the same shape as the cloud check: disk
space, image, overlay, boot, ready, ssh, commands, console, teardown; the
same step results and facts.

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

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import Logger

from txvmbot import facts as _facts
from txvmbot.engine import Cleanup, StepContext, StepRunner, track
from txvmbot.errors import StepFailed, StepTimeout, TxvmbotError
from txvmbot.evidence import save_evidence
from txvmbot.interfaces import IJournal
from txvmbot.model import CheckResult, CommandResult, JournalEntry, StepEvent
from txvmbot.qemu import kept as K
from txvmbot.qemu.model import LocalSpec
from txvmbot.smoke import (
    UNAME,
    StepSequence,
    commands_bound,
    cut_off,
    judge,
    new_check_id,
    ssh_wait_bound,
)

log = Logger()

VM_KIND = "qemu-vm"


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
        from txvmbot.qemu.vm import stop_from_record

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


class LocalCheck:
    """One smoke job on a fresh local VM. ``run()`` fires with a CheckResult
    and never errbacks for a failing job; ``cancel()`` stops at the current
    step and cleans up."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        spec: LocalSpec,
        *,
        journal: IJournal,
        observer: Callable[[StepEvent], None] | None = None,
        evidence_root: str | None = None,
        check_id: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.journal = journal
        self.evidence_root = evidence_root
        self.check_id = check_id or new_check_id()
        self.steps = StepRunner(reactor, observer)
        self.sequence = StepSequence(self.steps, f"job {self.check_id}")
        self.undo = LocalUndoer(spec.timeouts.shutdown)
        self._image: Any = None
        self._template: Any = None
        self._vm: Any = None
        self._vm_dir = ""
        self._vm_id = ""
        self._key: Any = None
        self._commands: list[CommandResult] = []
        self._guest_uname = ""
        self._host_key = ""
        self._kept = False
        self._error = ""

    def run(self) -> Deferred[CheckResult]:
        return ensureDeferred(self._run())

    def cancel(self, reason: str) -> None:
        self.sequence.cancel(reason)

    async def _step(self, name: str, bound: float, action: Callable[[StepContext], Any]) -> Any:
        return await self.sequence.step(name, bound, action)

    async def _run(self) -> CheckResult:
        t = self.spec.timeouts
        error = ""
        try:
            await self._step("disk-space", 10, self._disk_space)
            await self._step("image", 30, self._load_image)
            if self.spec.pool.fast_start:
                await self._step("template", self._template_bound(), self._ensure_template)
            await self._step("overlay", 30, self._overlay)
            await self._step("boot", t.boot, self._boot)
            await self._step("ready", t.boot, self._ready)
            await self._step("wait-ssh", t.ssh, self._wait_ssh)
            bound = commands_bound(t.command, len(self.spec.commands), t.ssh_connect)
            await self._step("commands", bound, self._run_commands)
        except CancelledError:
            error = f"cancelled: {self.sequence.cancelled or 'cancelled'}"
        except TxvmbotError as e:
            error = str(e)
        except Exception as e:
            self.log.failure("Unexpected error in job {check_id}", check_id=self.check_id)
            error = f"internal error: {e!r}"
        passed = not error
        console: tuple[tuple[str, str], ...] = ()
        if self._vm is not None and (not passed or self.spec.console):
            console = ((self._vm_id, self._vm.console_text()),)
        if (
            not passed
            and self.spec.pool.keep_on_failure
            and self._vm_dir
            and self.sequence.cancelled is None
        ):
            self._error = error
            try:
                await self.steps.run("keep-evidence", 60, self._keep)
            except Exception as e:  # recorded as a failed step already
                self.log.info("Keeping evidence failed: {e}", e=e)
        errors = await Cleanup(self.journal, self.undo, self.steps, t.shutdown * 3 + 10).run(
            self.check_id
        )
        if errors and passed:
            passed = False
            error = "cleanup failed: " + "; ".join(errors)
        result = self._result(passed, error, console)
        if not passed or self.spec.console:
            result = save_evidence(self.evidence_root, result, self.log)
        return result

    def _result(self, passed: bool, error: str, console: tuple[tuple[str, str], ...]) -> CheckResult:
        pool = self.spec.pool
        extra: dict[str, str] = {}
        if self._vm is not None:
            extra.update({k: str(v) for k, v in self._vm.facts.items()})
        if self._template is not None:
            extra["template"] = "built" if self._template.built else "reused"
            extra["template_image_key"] = self._template.image_key
        if self._kept:
            extra["kept_vm"] = self._vm_id
            extra["kept_path"] = self._vm_dir
        facts = _facts.collect(
            endpoint=journal_endpoint(pool.name),
            region=pool.run_dir,
            image_id=pool.image_dir,
            image_name=getattr(self._image, "kernel_version", "") or "",
            instance_type=f"{pool.memory_mb} MiB, {pool.cpus} cpu",
            guest_uname=self._guest_uname,
            extra=tuple(sorted(extra.items())),
        )
        return CheckResult(
            check_id=self.check_id,
            passed=passed,
            steps=self.steps.results,
            facts=facts,
            commands=tuple(self._commands),
            console=console,
            host_keys=((self._vm_id, self._host_key),) if self._host_key else (),
            error=error,
        )

    # -- steps ------------------------------------------------------------

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

    async def _overlay(self, ctx: StepContext) -> None:
        from txvmbot.qemu.disk import create_overlay

        pool = self.spec.pool
        base = self._image.disk if self._template is None else self._template.overlay
        self._vm_id = f"{self.check_id}-{uuid.uuid4().hex[:6]}"
        self._vm_dir = K.vm_dir(pool.run_dir, self._vm_id)

        async def creating() -> str:
            os.makedirs(self._vm_dir, mode=0o700)
            await create_overlay(self.reactor, base, os.path.join(self._vm_dir, K.OVERLAY_FILE))
            return self._vm_id

        await track(
            self.journal,
            self.check_id,
            VM_KIND,
            self._vm_dir,
            journal_endpoint(pool.name),
            pool.run_dir,
            lambda: ensureDeferred(creating()),
        )
        ctx.saw(self._vm_dir + (" (on the template's overlay)" if self._template else ""))

    async def _boot(self, ctx: StepContext) -> None:
        from txvmbot.qemu.vm import boot

        pool = self.spec.pool
        tmpl = self._template
        disk = os.path.join(self._vm_dir, K.OVERLAY_FILE)
        if tmpl is None:
            self._vm = await boot(
                self.reactor,
                self._image,
                self._vm_dir,
                accel=pool.accel,
                memory_mb=pool.memory_mb,
                cpus=pool.cpus,
                disk=disk,
            )
        else:
            # The saved state only fits the machine it was saved from.
            self._vm = await boot(
                self.reactor,
                self._image,
                self._vm_dir,
                accel=tmpl.accel,
                memory_mb=tmpl.memory_mb,
                cpus=tmpl.cpus,
                machine=tmpl.machine,
                disk=disk,
                incoming=tmpl.state,
            )
        self.undo.running[self._vm_dir] = self._vm
        ctx.saw(f"pid {self._vm.pid}, ssh on {self._vm.ssh_endpoint}")

    async def _ready(self, ctx: StepContext) -> None:
        if self._template is not None:
            ctx.saw("waiting for the template's saved state to run again")
        else:
            ctx.saw("waiting for the ready marker on the serial console")
        from txvmbot.qemu.vm import VMNotReady

        try:
            await self._vm.wait_ready(self.spec.timeouts.boot)
        except VMNotReady as e:
            # The VM's own timeout names its wait; the step's is "ready".
            marker = getattr(self._image, "ready_marker", None) or "the ready marker"
            seen = f"no {marker} on the serial console; its tail:{e.last_seen}"
            raise StepTimeout("ready", e.bound, seen) from e
        ctx.saw("ready")

    async def _wait_ssh(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        t = self.spec.timeouts
        self._key = ssh.load_private_key(self._image.ssh_key)

        def progress(attempt: int, last: str) -> None:
            ctx.saw(f"attempt {attempt}: {last}")

        self._host_key = await ssh.wait_for_ssh(
            self.reactor,
            self._vm.ssh_endpoint,
            self.spec.ssh_user,
            self._key,
            connect_timeout=t.ssh_connect,
            bound=ssh_wait_bound(t.ssh),
            on_attempt=progress,
        )
        expected = getattr(self._image, "host_key_fingerprint", "")
        if expected and self._host_key != expected:
            raise StepFailed(
                "wait-ssh", f"the guest's host key is {self._host_key}, the image's is {expected}"
            )
        ctx.saw(self._host_key)

    async def _run_commands(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        t = self.spec.timeouts
        try:
            outcome = await ssh.run_commands(
                self.reactor,
                self._vm.ssh_endpoint,
                self.spec.ssh_user,
                self._key,
                [UNAME, *self.spec.commands],
                command_timeout=t.command,
                connect_timeout=t.ssh_connect,
            )
        except ssh.SSHCommandFailed as e:
            kept, error = cut_off(e)
            self._commands.extend(kept)
            raise error from e
        done = judge(outcome.results)
        self._guest_uname = done.uname
        self._commands.extend(done.results)
        if done.failures:
            raise StepFailed("commands", "; ".join(done.failures))
        ctx.saw(f"{len(done.results)} command(s) passed")

    async def _keep(self, ctx: StepContext) -> None:
        """Save the failed VM's state next to its overlay and console log,
        and mark the directory kept, so a person can start it again."""
        from txvmbot.qemu.vm import VMState

        if self._vm is not None and self._vm.state is VMState.READY:
            ctx.saw("saving the VM's state")
            await self._vm.save_state(os.path.join(self._vm_dir, K.STATE_FILE))
        elif self._vm is not None and self._vm.state is VMState.BOOTING:
            # Never got ready: there is no state worth saving, but its
            # console log and overlay are the evidence of why.
            ctx.saw("stopping the VM that never got ready, keeping its disk")
            await self._vm.stop(self.spec.timeouts.shutdown, keep=True)
        if self._vm is not None:
            self.undo.running.pop(self._vm_dir, None)
        if (
            self._template is not None
            and self._image.disk
            and (self._vm is None or not self._vm.running)
        ):
            # The template may be rebuilt before someone looks at this
            # evidence: make the kept overlay stand on the image's disk alone.
            from txvmbot.qemu.template import detach_overlay

            ctx.saw("detaching the overlay from the template")
            await detach_overlay(
                self.reactor, os.path.join(self._vm_dir, K.OVERLAY_FILE), self._image.disk
            )
        K.mark_kept(self._vm_dir, self.check_id, self._error)
        self._kept = True
        ctx.saw(f"kept in {self._vm_dir}")
