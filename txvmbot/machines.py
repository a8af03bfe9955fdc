"""The seam between jobs and backends: fresh machines reachable over ssh.

A backend (an EC2-API cloud in ``txvmbot.ec2.machines``, local QEMU VMs in
``txvmbot.qemu.machines``) gives a job fresh machines and takes them back;
jobs (``txvmbot.jobs``: the smoke check, the suite) only see
:class:`Machine` values and :class:`IMachines`. Everything a backend
creates is journalled under the job's check id before it is created, so
:meth:`IMachines.cleanup` (and, after a crash, the daemon's recovery and
``txvmbot reap``) can undo it.

Layers, lowest first: values (``model``, ``config``) -> machines (``ec2``,
``qemu``, behind this seam) -> jobs (``jobs.smoke``, ``jobs.suite``) ->
daemon -> cli.
"""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from zope.interface import Attribute, Interface

__all__ = ["IMachines", "Machine", "ssh_wait_bound"]


@frozen
class Machine:
    """One fresh machine a backend handed out.

    ``name`` is the backend's own (an instance id, a VM id); ``ssh_endpoint``
    a Twisted client endpoint string that reaches its sshd; ``key`` the
    conch private key that logs in as ``ssh_user``; ``host_key`` the SHA256
    fingerprint of its host key, once ssh answered (empty if ssh was not
    waited for).
    """

    name: str
    ssh_endpoint: str
    ssh_user: str
    key: Any = field(eq=False, repr=False)
    host_key: str = ""


class IMachines(Interface):
    """Fresh machines of one backend, for one job.

    Every method that takes ``sequence`` (a :class:`txvmbot.engine.StepSequence`)
    runs its work as named, bounded steps of it, so a job's step table shows
    the machines being made and a cancel stops them. Methods that take
    ``steps`` (a :class:`txvmbot.engine.StepRunner`) run even after a cancel:
    evidence and cleanup must.
    """

    check_id = Attribute("The id every resource of the job is journalled and tagged with (str).")

    def prepare(sequence: Any) -> Any:
        """Make what all of the job's machines share (a keypair, an image, a
        firewall rule; or check disk space, load the image, build the
        template). Fires with None."""

    def acquire(sequence: Any, count: int, *, ssh: bool = True) -> Any:
        """Start ``count`` fresh machines side by side and wait until each
        is running and, with ``ssh``, takes ssh logins. Fires with a tuple
        of :class:`Machine`; fails with the step error that stopped it
        (what was started is still cleaned up by :meth:`cleanup`)."""

    def release(machine: Machine) -> Any:
        """Give one machine back before the job ends (the suite replaces a
        hung or dead machine this way). Fires with None; never fails: what
        could not be released is left to :meth:`cleanup`."""

    def console(steps: Any) -> Any:
        """Fetch the console output of every machine acquired so far (for
        the evidence of a failure). Fires with ``((name, text), ...)``."""

    def keep(steps: Any, error: str) -> Any:
        """Keep the job's machines for a person to look at, where the backend
        can and was asked to (a local VM's saved state and disk). Fires with
        True when something was kept."""

    def cleanup(steps: Any) -> Any:
        """Undo everything the job's journal holds, newest first. Fires with
        the error of each resource that could not be removed (empty when
        all is clean); never fails."""

    def host_keys() -> Any:
        """``((name, fingerprint), ...)`` of every machine whose sshd was
        seen, even one the job then refused (a host key that was not the
        image's)."""

    def facts(guest_uname: str) -> Any:
        """The environment facts of the job (a :class:`txvmbot.model.Facts`):
        where it ran, on what image, with ``guest_uname`` as the guest's."""

    def close() -> Any:
        """Let go of connections the backend opened (an API client). Fires
        with None; never fails."""


def ssh_wait_bound(step_bound: float) -> float:
    """The bound given to wait_for_ssh: a little inside its step's, so the
    wait's own error (attempts, last error) is the one reported."""
    return max(step_bound - min(1.0, step_bound * 0.1), step_bound * 0.9)
