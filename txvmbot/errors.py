"""One root for every error txvmbot raises on purpose.

Each error says what went wrong, where (the step, the flag, the key, the
resource) and, where it can, how to fix it; and, as its ``kind``, whose
fault it is when it ends a job (:func:`failure_kind`).
"""

from __future__ import annotations

from txvmbot.model import FailureKind

__all__ = [
    "CloudError",
    "ConfigError",
    "DaemonUnavailable",
    "SSHError",
    "StepFailed",
    "StepTimeout",
    "TransportError",
    "TxvmbotError",
    "UnknownJob",
    "WorkerDied",
    "failure_kind",
]


def failure_kind(exc: BaseException) -> FailureKind:
    """Whose fault ``exc`` is, when it ends a job.

    A txvmbot error says so itself (its ``kind``). Any other exception is
    :attr:`~FailureKind.TEST`: an error nobody turned into a txvmbot error
    is the job's own (or a bug of txvmbot's), never the infrastructure's.
    A cancel is not judged here: only the code that cancelled knows it did
    (``StepSequence.error_of``, the step runner), and a ``CancelledError``
    nobody asked for is a failure like any other.
    """
    if isinstance(exc, TxvmbotError):
        return exc.kind
    return FailureKind.TEST


class TxvmbotError(Exception):
    """Root of all txvmbot errors.

    ``kind``: whose fault the error is when it ends a job. By default the
    job's (:attr:`~FailureKind.TEST`); subclasses that are the
    infrastructure's say so.
    """

    @property
    def kind(self) -> FailureKind:
        return FailureKind.TEST


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

    #: Set by txvmbot.ec2.retry when it gave up retrying ("gave up after N
    #: attempts"): the number of attempts made.
    attempts: int | None = None

    @property
    def kind(self) -> FailureKind:
        """The infrastructure's when the cloud failed (HTTP 5xx) or kept
        failing until the retries ran out; the job's when the cloud said no
        (a 4xx: a missing image, a bad parameter, a quota)."""
        if self.attempts is not None or (self.status is not None and 500 <= self.status <= 599):
            return FailureKind.INFRASTRUCTURE
        return FailureKind.TEST


class TransportError(TxvmbotError):
    """A request never got an answer: refused, reset, timed out, or garbled.
    Always the infrastructure's fault."""

    #: Set by txvmbot.ec2.retry when it gave up retrying.
    attempts: int | None = None

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation}: {reason}")
        self.operation = operation
        self.reason = reason

    @property
    def kind(self) -> FailureKind:
        return FailureKind.INFRASTRUCTURE


class StepFailed(TxvmbotError):
    """A step of a scenario failed; ``step`` names it.

    Its ``kind`` is the one given (the step runner gives the kind of the
    error it wrapped), else that of the error it was raised from, else
    :attr:`~FailureKind.TEST`.
    """

    def __init__(self, step: str, reason: str, kind: FailureKind | None = None) -> None:
        super().__init__(f"step {step!r} failed: {reason}")
        self.step = step
        self.reason = reason
        self._kind = kind

    @property
    def kind(self) -> FailureKind:
        if self._kind is not None:
            return self._kind
        cause = self.__cause__
        return failure_kind(cause) if cause is not None else FailureKind.TEST


class StepTimeout(StepFailed):
    """A step passed its bound. Says how long it ran and what was seen last."""

    def __init__(self, step: str, bound: float, last_seen: str = "") -> None:
        seen = f"; last seen: {last_seen}" if last_seen else ""
        StepFailed.__init__(
            self, step, f"did not finish within {bound:g}s{seen}", FailureKind.TIMEOUT
        )
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

    @property
    def kind(self) -> FailureKind:
        return FailureKind.INFRASTRUCTURE


class UnknownJob(TxvmbotError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class DaemonUnavailable(TxvmbotError):
    """The daemon cannot be reached, or refused us; says where and why."""
