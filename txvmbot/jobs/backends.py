"""Which backend's machines a target spec asks for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from txvmbot.interfaces import IEC2Client, IJournal
from txvmbot.machines import IMachines
from txvmbot.model import CheckSpec
from txvmbot.qemu.model import LocalSpec


def machines_for(
    reactor: Any,
    target: CheckSpec | LocalSpec,
    *,
    journal: IJournal,
    check_id: str,
    client: IEC2Client | None = None,
    api_observer: Callable[[str, str, bool], object] | None = None,
) -> IMachines:
    """Fresh machines of a local pool (a LocalSpec) or a cloud (a CheckSpec)."""
    if isinstance(target, LocalSpec):
        from txvmbot.qemu.machines import LocalMachines

        return LocalMachines(reactor, target, journal=journal, check_id=check_id)
    from txvmbot.ec2.machines import CloudMachines

    return CloudMachines(
        reactor, target, journal=journal, check_id=check_id, client=client, api_observer=api_observer
    )
