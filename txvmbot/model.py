"""Frozen values that flow through txvmbot: specs in, results out.

Nothing here does I/O. Validation that needs no I/O happens here, so a value
that exists is a value that makes sense.
"""

from __future__ import annotations

import enum
from typing import Literal

import attrs
from attrs import field, frozen

SignatureVersion = Literal["v4", "v2"]
Outcome = Literal["passed", "failed", "timeout", "cancelled", "skipped"]
AddressDomain = Literal["vpc", "standard"]
ADDRESS_DOMAINS: tuple[AddressDomain, ...] = ("vpc", "standard")

DEFAULT_SSH_ENDPOINT = "tcp:host={public_ip}:port=22"


class FailureKind(enum.Enum):
    """Whose fault a failure is, decided where the error was caught (see
    :func:`txvmbot.errors.failure_kind`) and carried with the result, so
    nothing downstream guesses it from the error text.

    Only ``INFRASTRUCTURE`` counts towards a backend's quarantine; a
    ``CANCELLED`` job was stopped from outside (a request, its bound, the
    daemon stopping); ``TIMEOUT`` is a step that passed its bound; ``TEST``
    is everything else: what the job tested failed (a command exited
    non-zero, the cloud refused a request with a 4xx, the guest never
    answered ssh), or txvmbot itself broke.
    """

    TEST = "test"
    INFRASTRUCTURE = "infrastructure"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


@frozen
class Credentials:
    """An access key pair. The secret never appears in a repr or a log."""

    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@frozen
class RetryPolicy:
    """How transient API errors are retried: exponential backoff with full
    jitter, bounded both in attempts and in total time."""

    max_attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 5.0
    max_elapsed: float = 60.0
    request_timeout: float = 30.0


@frozen
class Cloud:
    """Where and how to reach one EC2-API endpoint."""

    endpoint: str
    region: str
    name: str = "default"
    signature_version: SignatureVersion = "v4"
    credentials: Credentials | None = None
    profile: str | None = None
    retry: RetryPolicy = RetryPolicy()


@frozen
class Timeouts:
    """The bound of every wait in a check, in seconds."""

    api_step: float = 120.0
    running: float = 300.0
    ssh: float = 180.0
    ssh_connect: float = 10.0
    command: float = 300.0
    terminate: float = 300.0
    poll_interval: float = 1.0
    poll_max_interval: float = 10.0


@frozen
class CheckSpec:
    """Everything one euca-style check needs to know."""

    cloud: Cloud
    image: str | None = None
    image_name: str | None = None
    image_owner: str | None = None
    instance_type: str = "t3.micro"
    ssh_user: str = "root"
    ssh_key: str | None = None
    ssh_endpoint: str = DEFAULT_SSH_ENDPOINT
    ssh_cidr: str = "0.0.0.0/0"
    commands: tuple[str, ...] = ("uname -a",)
    floating_ip: bool = False
    #: AllocateAddress's Domain: "standard" for clouds with only EC2-Classic
    #: addresses (Eucalyptus, OpenStack's ec2-api in classic mode).
    address_domain: AddressDomain = "vpc"
    parallel: int = 1
    console: bool = False
    ssh: bool = True
    timeouts: Timeouts = Timeouts()
    #: RunInstances' UserData, plain (the EC2 client base64-encodes it); kept
    #: out of reprs: user data often holds secrets.
    user_data: bytes | None = field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.image and not self.image_name:
            raise ValueError("an image id or an image name filter is required")
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if self.address_domain not in ADDRESS_DOMAINS:
            raise ValueError(f"address_domain must be vpc or standard, not {self.address_domain!r}")


@frozen
class StepResult:
    """What one step did. ``started`` is seconds since the epoch (a number,
    never a string, so results order by time)."""

    name: str
    started: float
    duration: float
    outcome: Outcome
    detail: str = ""
    #: Why a failed, timed-out or cancelled step ended (None for a step
    #: that passed or was skipped).
    kind: FailureKind | None = None


@frozen
class StepEvent:
    """A step changed state; watchers and the live table consume these."""

    name: str
    state: Literal["running", "passed", "failed", "timeout", "cancelled", "skipped"]
    at: float
    detail: str = ""


@frozen
class CommandResult:
    """One command run over ssh."""

    command: str
    exit_status: int | None
    stdout: bytes = b""
    stderr: bytes = b""
    signal: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@frozen
class JournalEntry:
    """A resource a check is about to create, or created.

    Written before the create call, so a crash between the two still leaves a
    trace. ``resource_id`` is filled in once the cloud answered; ``name`` and
    the check's tag find the resource when the answer was lost.
    """

    check_id: str
    seq: int
    kind: str
    name: str
    endpoint: str
    region: str
    created: float
    resource_id: str | None = None
    parent_id: str | None = None
    done: bool = False


@frozen
class Facts:
    """Environment facts recorded with every result, so failures can be
    grouped by them. ``extra`` holds anything backend-specific, sorted."""

    endpoint: str = ""
    region: str = ""
    signature_version: str = ""
    api_version: str = ""
    image_id: str = ""
    image_name: str = ""
    instance_type: str = ""
    guest_uname: str = ""
    #: The guest's distribution and release from its os-release
    #: ("debian 12"; see txvmbot.facts.guest_os), "" when unknown.
    guest_os: str = ""
    host_kernel: str = ""
    txvmbot_version: str = ""
    twisted_version: str = ""
    botocore_version: str = ""
    extra: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, str]:
        d = attrs.asdict(self)
        d.pop("extra")
        d.update(dict(self.extra))
        return d


@frozen
class CheckResult:
    """The outcome of one check: every step, the facts and the evidence."""

    check_id: str
    passed: bool
    steps: tuple[StepResult, ...]
    facts: Facts
    commands: tuple[CommandResult, ...] = ()
    console: tuple[tuple[str, str], ...] = ()
    host_keys: tuple[tuple[str, str], ...] = ()
    error: str = ""
    evidence_dir: str | None = None
    #: What kind of failure ended the check: None when it passed; a failed
    #: result made without one is :attr:`FailureKind.TEST`.
    kind: FailureKind | None = None

    def __attrs_post_init__(self) -> None:
        if self.passed:
            if self.kind is not None:
                raise ValueError(f"a passed check has no failure kind, not {self.kind}")
        elif self.kind is None:
            object.__setattr__(self, "kind", FailureKind.TEST)

    @property
    def infrastructure_failed(self) -> bool:
        """Whether the check failed because of the infrastructure (the
        transport, an exhausted retry, a 5xx from the cloud, a dead worker)
        rather than what it tested: those count towards a backend's
        quarantine."""
        return self.kind is FailureKind.INFRASTRUCTURE

    @property
    def cancelled(self) -> bool:
        """Whether the check was cancelled under it (by a request, its
        bound, or the pool stopping)."""
        return self.kind is FailureKind.CANCELLED


@frozen
class ReapReport:
    """What ``txvmbot reap`` found and removed. Each item is a short
    description such as ``instance i-0123 (check 1a2b…)``."""

    found: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    dry_run: bool = False
