"""One root for every error txvmbot raises on purpose.

Each error says what went wrong, where (the step, the flag, the key, the
resource) and, where it can, how to fix it.
"""

from __future__ import annotations


class TxvmbotError(Exception):
    """Root of all txvmbot errors."""


class ConfigError(TxvmbotError):
    """A flag, a config key or a job spec is invalid.

    ``where`` names the flag (``--parallel``) or key (``clouds.prod.region``).
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


class CloudError(TxvmbotError):
    """The cloud answered a request with an error.

    Carries the EC2 error ``code`` and ``message``, the ``request_id`` and the
    HTTP ``status`` so an operator can quote them to the cloud's admins.
    """

    def __init__(
        self,
        operation: str,
        code: str,
        message: str,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        rid = f", request id {request_id}" if request_id else ""
        st = f"HTTP {status} " if status is not None else ""
        super().__init__(f"{operation}: {st}{code}: {message}{rid}")
        self.operation = operation
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id


class TransportError(TxvmbotError):
    """A request never got an answer: refused, reset, timed out, or garbled."""

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation}: {reason}")
        self.operation = operation
        self.reason = reason


class StepFailed(TxvmbotError):
    """A step of a scenario failed; ``step`` names it."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step {step!r} failed: {reason}")
        self.step = step
        self.reason = reason


class StepTimeout(StepFailed):
    """A step passed its bound. Says how long it ran and what was seen last."""

    def __init__(self, step: str, bound: float, last_seen: str = "") -> None:
        seen = f"; last seen: {last_seen}" if last_seen else ""
        StepFailed.__init__(self, step, f"did not finish within {bound:g}s{seen}")
        self.bound = bound
        self.last_seen = last_seen


class SSHError(TxvmbotError):
    """Connecting, authenticating or running a command over ssh failed."""


class WorkerDied(TxvmbotError):
    """A worker process ended while it ran a job: its exit status (or the
    signal that killed it) and the last lines it wrote to stderr."""

    def __init__(self, job_id: str, status: str, stderr_tail: str = "") -> None:
        tail = f"; last stderr: {stderr_tail}" if stderr_tail else ""
        super().__init__(f"worker running job {job_id} died: {status}{tail}")
        self.job_id = job_id
        self.status = status
        self.stderr_tail = stderr_tail


class UnknownJob(TxvmbotError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class DaemonUnavailable(TxvmbotError):
    """The daemon cannot be reached, or refused us; says where and why."""
