"""What every smoke job shares, whatever it runs on: steps run one after
another with cancel stopping at the current one, and the commands step
(``uname -a`` for the facts, then the user's commands over one ssh
connection, judged by their exit status)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger

from txvmbot.engine import StepContext, StepRunner
from txvmbot.errors import StepFailed, StepTimeout
from txvmbot.model import CommandResult

#: Run before the user's commands, for the facts (seed 000: the kernel
#: decided pass or fail).
UNAME = "uname -a"


def new_check_id() -> str:
    """Short, unique, and safe in resource names, tags and paths."""
    import uuid

    return uuid.uuid4().hex[:12]


def ssh_wait_bound(step_bound: float) -> float:
    """The bound given to wait_for_ssh: a little inside its step's, so the
    wait's own error (attempts, last error) is the one reported."""
    return max(step_bound - min(1.0, step_bound * 0.1), step_bound * 0.9)


def commands_bound(command: float, commands: int, connect: float) -> float:
    """The commands step's bound: each command has its own inside it; the
    step covers all of them plus ``uname -a`` and connecting."""
    return command * (commands + 1) + connect


class StepSequence:
    """Runs a job's steps one at a time; :meth:`cancel` cancels the step
    that runs and refuses the ones after it, so the job goes straight to
    its cleanup."""

    log = Logger()

    def __init__(self, steps: StepRunner, job_id: str) -> None:
        self.steps = steps
        self.job_id = job_id
        self.cancelled: str | None = None
        self._current: Deferred[Any] | None = None

    def cancel(self, reason: str) -> None:
        if self.cancelled is None:
            self.cancelled = reason
            self.log.warn("Cancelling {job_id}: {reason}", job_id=self.job_id, reason=reason)
            if self._current is not None:
                self._current.cancel()

    async def step(self, name: str, bound: float, action: Callable[[StepContext], Any]) -> Any:
        if self.cancelled is not None:
            raise CancelledError(self.cancelled)
        d = self.steps.run(name, bound, action)
        self._current = d
        try:
            return await d
        finally:
            self._current = None


@attrs.frozen
class CommandsRun:
    """What one machine's commands did: the guest's ``uname -a`` and each
    user command's result, and a sentence per failed one."""

    uname: str
    results: tuple[CommandResult, ...]
    failures: tuple[str, ...]


def judge(outcome_results: Sequence[CommandResult]) -> CommandsRun:
    """Split ``uname -a`` off and describe every command that did not exit 0."""
    uname, *rest = outcome_results
    failures = []
    for r in rest:
        if not r.ok:
            how = f"signal {r.signal}" if r.signal else f"exit status {r.exit_status}"
            tail = r.stderr.decode("utf-8", "replace").strip()[-300:]
            failures.append(f"{r.command!r} ended with {how}" + (f": {tail}" if tail else ""))
    return CommandsRun(
        uname=uname.stdout.decode("utf-8", "replace").strip() if uname.ok else "",
        results=tuple(rest),
        failures=tuple(failures),
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
