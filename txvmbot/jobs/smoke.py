"""The smoke job, written once for every backend: machines from an
:class:`~txvmbot.machines.IMachines`, then ``uname -a`` (for the facts) and
the user's commands over one ssh connection per machine, judged by their
exit status; the console on failure, the machines kept if asked, cleanup on
every exit path, and the evidence of a failure saved.

:class:`Check` is the euca-style check of an EC2-API cloud, :class:`LocalCheck`
the same job on a fresh local VM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from txvmbot import facts as _facts
from txvmbot.engine import (
    StepContext,
    StepRunner,
    StepSequence,
    cleanup_failure_kind,
    gather,
    new_check_id,
)
from txvmbot.errors import StepFailed, StepTimeout
from txvmbot.evidence import save_evidence
from txvmbot.interfaces import IEC2Client, IJournal
from txvmbot.machines import IMachines, Machine
from txvmbot.model import CheckResult, CheckSpec, CommandResult, FailureKind, StepEvent
from txvmbot.qemu.model import LocalSpec

__all__ = ["Check", "LocalCheck", "SmokeJob", "commands_bound", "judge"]

#: Run before the user's commands, for the facts (seed 000: the kernel
#: decided pass or fail): ``uname -a`` and the guest's os-release.
UNAME = _facts.GUEST_FACTS_COMMAND


def commands_bound(command: float, commands: int, connect: float) -> float:
    """The commands step's bound: each command has its own inside it; the
    step covers all of them plus ``uname -a`` and connecting."""
    return command * (commands + 1) + connect


@attrs.frozen
class SmokeOptions:
    """What a smoke job does on its machines, whatever the backend."""

    commands: tuple[str, ...]
    command_timeout: float
    connect_timeout: float
    count: int = 1
    ssh: bool = True
    console: bool = False
    #: Name each failure by its machine (a cloud check's instance ids).
    name_failures: bool = True


class SmokeJob:
    """One smoke job on fresh machines. ``run()`` fires with a CheckResult
    and never errbacks for a failing job; ``cancel()`` stops at the current
    step and cleans up."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        machines: IMachines,
        options: SmokeOptions,
        *,
        observer: Callable[[StepEvent], None] | None = None,
        evidence_root: str | None = None,
        label: str = "job",
    ) -> None:
        self.reactor = reactor
        self.machines = machines
        self.options = options
        self.evidence_root = evidence_root
        self.check_id: str = machines.check_id
        self.steps = StepRunner(reactor, observer)
        self.sequence = StepSequence(self.steps, f"{label} {self.check_id}")
        self._machines: tuple[Machine, ...] = ()
        self._commands: list[CommandResult] = []
        self._guest_uname = ""
        self._guest_os = ""

    def run(self) -> Deferred[CheckResult]:
        return ensureDeferred(self._run())

    def cancel(self, reason: str) -> None:
        self.sequence.cancel(reason)

    async def _run(self) -> CheckResult:
        o = self.options
        error = await self.sequence.error_of(self._steps())
        passed = not error
        kind: FailureKind | None = self.sequence.kind if error else None
        console: tuple[tuple[str, str], ...] = ()
        if not passed or o.console:
            console = await self.machines.console(self.steps)
        if not passed and self.sequence.cancelled is None:
            await self.machines.keep(self.steps, error)
        cleanup_errors = await self.machines.cleanup(self.steps)
        if cleanup_errors and passed:
            passed = False
            error = "cleanup failed: " + "; ".join(cleanup_errors)
            kind = cleanup_failure_kind(self.steps.results)
        result = CheckResult(
            check_id=self.check_id,
            passed=passed,
            steps=self.steps.results,
            facts=attrs.evolve(self.machines.facts(self._guest_uname), guest_os=self._guest_os),
            commands=tuple(self._commands),
            console=console,
            host_keys=self.machines.host_keys(),
            error=error,
            kind=kind,
        )
        if not passed or o.console:
            result = save_evidence(self.evidence_root, result, self.log)
        await self.machines.close()
        return result

    async def _steps(self) -> None:
        o = self.options
        await self.machines.prepare(self.sequence)
        self._machines = await self.machines.acquire(self.sequence, o.count, ssh=o.ssh)
        if o.ssh:
            bound = commands_bound(o.command_timeout, len(o.commands), o.connect_timeout)
            await self.sequence.step("commands", bound, self._run_commands)

    async def _run_commands(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        o = self.options
        commands = [UNAME, *o.commands]

        def running(m: Machine) -> Deferred[Any]:
            return ssh.run_commands(
                self.reactor,
                m.ssh_endpoint,
                m.ssh_user,
                m.key,
                commands,
                command_timeout=o.command_timeout,
                connect_timeout=o.connect_timeout,
            )

        try:
            outcomes = await gather([running(m) for m in self._machines])
        except ssh.SSHCommandFailed as e:
            kept, error = cut_off(e)
            self._commands.extend(kept)
            raise error from e
        failures: list[str] = []
        for m, outcome in zip(self._machines, outcomes, strict=True):
            done = judge(outcome.results)
            if not self._guest_uname:
                self._guest_uname, self._guest_os = done.uname, done.guest_os
            self._commands.extend(done.results)
            failures.extend(f"{m.name}: {f}" if o.name_failures else f for f in done.failures)
        if failures:
            raise StepFailed("commands", "; ".join(failures))
        if o.name_failures:
            ctx.saw(f"{len(commands) - 1} command(s) passed on {len(outcomes)} instance(s)")
        else:
            ctx.saw(f"{len(commands) - 1} command(s) passed")


class Check(SmokeJob):
    """The euca-style smoke check of an EC2-API cloud: keypair, image,
    security group, ingress rule, run instances, wait for running, floating
    IP, wait for ssh, commands, console, then cleanup in reverse from the
    journal on every exit path. ``api_observer`` is told of every EC2 API
    attempt of the client it makes (see txvmbot.ec2.retry.ApiCallObserver)."""

    def __init__(
        self,
        reactor: Any,
        spec: CheckSpec,
        *,
        journal: IJournal,
        observer: Callable[[StepEvent], None] | None = None,
        evidence_root: str | None = None,
        check_id: str | None = None,
        client: IEC2Client | None = None,
        api_observer: Callable[[str, str, bool], object] | None = None,
    ) -> None:
        from txvmbot.ec2.machines import CloudMachines

        self.spec = spec
        self.journal = journal
        machines = CloudMachines(
            reactor,
            spec,
            journal=journal,
            check_id=check_id or new_check_id(),
            client=client,
            api_observer=api_observer,
        )
        t = spec.timeouts
        options = SmokeOptions(
            commands=spec.commands,
            command_timeout=t.command,
            connect_timeout=t.ssh_connect,
            count=spec.parallel,
            ssh=spec.ssh,
            console=spec.console,
        )
        super().__init__(
            reactor, machines, options, observer=observer, evidence_root=evidence_root, label="check"
        )


class LocalCheck(SmokeJob):
    """The smoke job on a fresh local VM: disk space, image, overlay, boot,
    ready, ssh, commands, console, teardown; a failed VM kept if the pool
    says so."""

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
        from txvmbot.qemu.machines import LocalMachines

        self.spec = spec
        self.journal = journal
        machines = LocalMachines(reactor, spec, journal=journal, check_id=check_id or new_check_id())
        t = spec.timeouts
        options = SmokeOptions(
            commands=spec.commands,
            command_timeout=t.command,
            connect_timeout=t.ssh_connect,
            console=spec.console,
            name_failures=False,
        )
        super().__init__(reactor, machines, options, observer=observer, evidence_root=evidence_root)


@attrs.frozen
class CommandsRun:
    """What one machine's commands did: the guest's ``uname -a`` and
    distribution (:func:`txvmbot.facts.guest_os`), each user command's
    result, and a sentence per failed one."""

    uname: str
    results: tuple[CommandResult, ...]
    failures: tuple[str, ...]
    guest_os: str = ""


def judge(outcome_results: Sequence[CommandResult]) -> CommandsRun:
    """Split the facts command (``uname -a``, os-release) off and describe
    every command that did not exit 0."""
    uname, *rest = outcome_results
    failures = []
    for r in rest:
        if not r.ok:
            how = f"signal {r.signal}" if r.signal else f"exit status {r.exit_status}"
            tail = r.stderr.decode("utf-8", "replace").strip()[-300:]
            failures.append(f"{r.command!r} ended with {how}" + (f": {tail}" if tail else ""))
    guest_uname, guest_os = (
        _facts.split_guest_facts(uname.stdout.decode("utf-8", "replace")) if uname.ok else ("", "")
    )
    return CommandsRun(
        uname=guest_uname, results=tuple(rest), failures=tuple(failures), guest_os=guest_os
    )


def cut_off(e: Any) -> tuple[tuple[CommandResult, ...], StepFailed]:
    """For an SSHCommandFailed: the results worth keeping (the commands that
    finished, then what the cut-off one printed so far) and the step error
    to raise (a timeout when it passed its bound)."""
    from txvmbot import ssh

    kept = (*e.results[1:], e.partial)
    out = (e.partial.stdout + e.partial.stderr).decode("utf-8", "replace").strip()[-200:]
    seen = f"{e.command!r} still running" + (f", output so far: {out}" if out else "")
    if isinstance(e, ssh.SSHCommandTimeout):
        return kept, StepTimeout("commands", e.bound, seen)
    return kept, StepFailed("commands", str(e))
