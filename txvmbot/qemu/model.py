"""Frozen values of the local VM backend."""

from __future__ import annotations

from typing import Literal

from attrs import field, frozen

Accel = Literal["auto", "kvm", "tcg"]

#: The line the test image's init prints on the serial console once sshd
#: listens; a pool waits for it before it tries ssh.
READY_MARKER = "TXVMBOT-READY"


@frozen
class LocalTimeouts:
    """The bound of every wait of a local job, in seconds."""

    boot: float = 60.0  # QEMU started -> ready marker on the console
    ssh: float = 30.0
    ssh_connect: float = 5.0
    command: float = 120.0
    shutdown: float = 10.0  # ACPI powerdown -> QEMU exits; then quit, then kill


@frozen
class LocalPool:
    """A pool of local VMs on one image.

    ``image_dir`` holds what ``txvmbot image build`` made (kernel, initrd,
    base disk, ssh key, manifest.json). ``run_dir`` holds one directory per
    VM (overlay, console log, QMP socket, pid) and the kept evidence.
    """

    name: str = "local"
    image_dir: str = ""
    run_dir: str = ""
    accel: Accel = "auto"
    max_vms: int = 2
    memory_mb: int = 256
    cpus: int = 1
    min_free_mb: int = 256
    fast_start: bool = False
    keep_on_failure: bool = True


@frozen
class LocalSpec:
    """One smoke job on a local VM: boot, ready, ssh commands, console,
    teardown."""

    pool: LocalPool
    commands: tuple[str, ...] = ("uname -a",)
    ssh_user: str = "root"
    console: bool = False
    timeouts: LocalTimeouts = LocalTimeouts()
    #: merged with the image's NoCloud user-data into a seed per VM (a cloud
    #: image's only: ``txvmbot.userdata``); kept out of reprs.
    user_data: bytes | None = field(default=None, repr=False)
