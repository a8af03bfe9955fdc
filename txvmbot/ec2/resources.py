"""What a check creates on an EC2-API cloud, how it is named and tagged, and
how each kind of resource is undone.

Undo works from a journal entry alone, so ``txvmbot reap`` in another
process, after ``check`` was killed, can run it. Every undo is idempotent: a
resource that is already gone counts as undone. Undo also searches by the
check's tag, so a resource whose create answer was lost (the cloud acted,
we never heard) is found and removed too.

Addresses come in two kinds. A VPC address has an AllocationId (and, once
associated, an AssociationId); an EC2-Classic one (Eucalyptus, OpenStack's
ec2-api in classic mode, ``--address-domain standard``) has neither and goes
by its public IP everywhere. The journal holds whichever id the cloud gave
(:func:`address_key` tells them apart). A classic address carries no tag
(EC2-Classic refused them), so only its journalled IP finds it: one whose
AllocateAddress answer was lost cannot be found at all.
"""

from __future__ import annotations

import calendar
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from txvmbot.errors import CloudError, StepFailed
from txvmbot.interfaces import IEC2Client
from txvmbot.model import JournalEntry

log = Logger()

TAG_CHECK = "txvmbot:check"
TAG_CREATED = "txvmbot:created"
NAME_PREFIX = "txvmbot-"

KEYPAIR = "keypair"
GROUP = "security-group"
RULE = "ingress-rule"
INSTANCES = "instances"
ADDRESS = "address"
ASSOCIATION = "association"

#: Instance states that still hold resources.
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


def resource_name(check_id: str) -> str:
    """The name given to a check's keypair and security group."""
    return f"{NAME_PREFIX}{check_id}"


def tag_specs(resource_type: str, check_id: str, now: float) -> list[dict[str, Any]]:
    """TagSpecifications marking a resource as this check's."""
    return [
        {
            "ResourceType": resource_type,
            "Tags": [
                {"Key": TAG_CHECK, "Value": check_id},
                {"Key": TAG_CREATED, "Value": str(int(now))},
                {"Key": "Name", "Value": resource_name(check_id)},
            ],
        }
    ]


def rule_name(cidr: str) -> str:
    return f"tcp:22:{cidr}"


def ssh_permission(cidr: str) -> list[dict[str, Any]]:
    return [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": cidr}]}]


def address_key(address_id: str) -> Literal["PublicIp", "AllocationId"]:
    """The parameter that names an address journalled as ``address_id``:
    ``PublicIp`` if it is an IP address (a classic address, which has no
    allocation id), else ``AllocationId`` (``eipalloc-…``, never an IP)."""
    try:
        ipaddress.ip_address(address_id)
    except ValueError:
        return "AllocationId"
    return "PublicIp"


#: The journal name of the address a check attaches to an instance.
ADDRESS_NAME_PREFIX = "address-for-"


def address_name(instance_id: str) -> str:
    return ADDRESS_NAME_PREFIX + instance_id


def _still_ours(entry: JournalEntry, address: dict[str, Any]) -> bool:
    """Whether ``address``, found by the public IP journalled in ``entry``,
    is still the check's own. A released IP may since have gone to another check:
    never release one tagged as another check's or, untagged (classic),
    attached to an instance other than the one the entry was for. (An
    unattached classic IP another check allocated a moment ago cannot be
    told apart; the window is that check's AllocateAddress to its
    AssociateAddress.)"""
    tag = tags_of(address).get(TAG_CHECK)
    if tag is not None:
        return tag == entry.check_id
    attached = address.get("InstanceId") or ""
    return not attached or entry.name == address_name(attached)


def is_gone(err: CloudError) -> bool:
    """The cloud says the resource does not exist (any more)."""
    return err.code.endswith((".NotFound", ".Malformed")) or err.code in (
        "InvalidGroup.NotFound",
        "InvalidPermission.NotFound",
        "InvalidAssociationID.NotFound",
        "InvalidAllocationID.NotFound",
    )


def is_duplicate(err: CloudError) -> bool:
    return err.code.endswith(".Duplicate")


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in item.get("Tags", []) or []}


def instances_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """All instances in a DescribeInstances answer."""
    return [i for r in answer.get("Reservations", []) for i in r.get("Instances", [])]


def created_time(item: dict[str, Any]) -> float | None:
    """When txvmbot created a resource, from its tag or the cloud's own time."""
    tag = tags_of(item).get(TAG_CREATED)
    if tag:
        try:
            return float(tag)
        except ValueError:
            pass
    for key in ("LaunchTime", "CreateTime"):
        value = item.get(key)
        if value is not None and hasattr(value, "utctimetuple"):
            return float(calendar.timegm(value.utctimetuple()))
    return None


@attrs.frozen
class Undoer:
    """Undoes journal entries against one cloud."""

    client: IEC2Client
    clock: IReactorTime
    poll_interval: float = 1.0
    poll_max_interval: float = 10.0

    def __call__(self, entry: JournalEntry) -> Deferred[bool]:
        handler = {
            KEYPAIR: self._keypair,
            GROUP: self._group,
            RULE: self._rule,
            INSTANCES: self._instances,
            ADDRESS: self._address,
            ASSOCIATION: self._association,
        }.get(entry.kind)
        if handler is None:
            raise StepFailed(f"cleanup {entry.kind}", f"unknown resource kind {entry.kind!r}")
        return ensureDeferred(handler(entry))

    async def _ignore_gone(self, operation: str, params: dict[str, Any]) -> bool:
        try:
            await self.client.call(operation, params)
        except CloudError as e:
            if not is_gone(e):
                raise
        return True

    async def _keypair(self, entry: JournalEntry) -> bool:
        return await self._ignore_gone("DeleteKeyPair", {"KeyName": entry.name})

    async def _group_ids(self, entry: JournalEntry) -> list[str]:
        if entry.resource_id:
            return [entry.resource_id]
        answer = await self.client.call(
            "DescribeSecurityGroups", {"Filters": [{"Name": "group-name", "Values": [entry.name]}]}
        )
        return [g["GroupId"] for g in answer.get("SecurityGroups", [])]

    async def _group(self, entry: JournalEntry) -> bool:
        for group_id in await self._group_ids(entry):
            await delete_group(self.client, self.clock, group_id)
        return True

    async def _rule(self, entry: JournalEntry) -> bool:
        if not entry.parent_id:
            return True  # the group was never created, so neither was the rule
        cidr = entry.name.split(":", 2)[2]
        return await self._ignore_gone(
            "RevokeSecurityGroupIngress",
            {"GroupId": entry.parent_id, "IpPermissions": ssh_permission(cidr)},
        )

    async def _instances(self, entry: JournalEntry) -> bool:
        ids = set(entry.resource_id.split(",")) if entry.resource_id else set()
        answer = await self.client.call(
            "DescribeInstances",
            {
                "Filters": [
                    {"Name": f"tag:{TAG_CHECK}", "Values": [entry.check_id]},
                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
                ]
            },
        )
        ids.update(i["InstanceId"] for i in instances_of(answer))
        await terminate_and_wait(
            self.client, self.clock, sorted(ids), self.poll_interval, self.poll_max_interval
        )
        return True

    async def _address(self, entry: JournalEntry) -> bool:
        key = address_key(entry.resource_id or "")
        addresses: list[dict[str, Any]] = []
        if key == "AllocationId":
            # By tag as well as by id: a retried AllocateAddress whose first
            # answer was lost has allocated a second address nobody was
            # told of. (A classic address has no tag to search by.)
            answer = await self.client.call(
                "DescribeAddresses",
                {"Filters": [{"Name": f"tag:{TAG_CHECK}", "Values": [entry.check_id]}]},
            )
            addresses = list(answer.get("Addresses", []))
        if entry.resource_id and entry.resource_id not in {a.get(key) for a in addresses}:
            try:
                answer = await self.client.call("DescribeAddresses", {f"{key}s": [entry.resource_id]})
            except CloudError as e:
                if not is_gone(e):
                    raise
            else:
                found = answer.get("Addresses", [])
                if key == "PublicIp":  # an allocation id is never reused; an IP is
                    found = [a for a in found if _still_ours(entry, a)]
                addresses.extend(found)
        await release_addresses(self.client, addresses)
        return True

    async def _association(self, entry: JournalEntry) -> bool:
        if not entry.resource_id or entry.resource_id == entry.parent_id:
            # No association id (a classic address has none, so the journal
            # holds the address's own id): the address undo, which runs
            # next, disassociates whatever is attached.
            return True
        return await self._ignore_gone("DisassociateAddress", {"AssociationId": entry.resource_id})


async def delete_group(client: IEC2Client, clock: IReactorTime, group_id: str) -> None:
    """Delete a security group. Instances that just terminated may still hold
    it for a little while, so DependencyViolation gets a bounded wait."""
    for attempt in range(8):
        try:
            await client.call("DeleteSecurityGroup", {"GroupId": group_id})
            return
        except CloudError as e:
            if is_gone(e):
                return
            if e.code != "DependencyViolation" or attempt == 7:
                raise
        await deferLater(clock, min(2.0**attempt, 10.0), lambda: None)


async def release_addresses(client: IEC2Client, addresses: Iterable[dict[str, Any]]) -> None:
    """Disassociate (moto and some clouds keep an association after the
    instance is gone) and release each address, VPC or classic."""
    for address in addresses:
        detach: dict[str, Any] | None = None
        if address.get("AssociationId"):
            detach = {"AssociationId": address["AssociationId"]}
        elif address.get("InstanceId"):
            # An associated classic address has no association id.
            detach = {"PublicIp": address["PublicIp"]}
        if detach is not None:
            try:
                await client.call("DisassociateAddress", detach)
            except CloudError as e:
                if not is_gone(e):
                    raise
        if address.get("AllocationId"):
            params = {"AllocationId": address["AllocationId"]}
        else:
            params = {"PublicIp": address["PublicIp"]}
        try:
            await client.call("ReleaseAddress", params)
        except CloudError as e:
            if not is_gone(e):
                raise


async def terminate_and_wait(
    client: IEC2Client,
    clock: IReactorTime,
    instance_ids: Sequence[str],
    interval: float = 1.0,
    max_interval: float = 10.0,
) -> None:
    """Terminate instances and wait until every one says terminated. The
    caller bounds the wait (by cancelling); this polls with backoff."""
    if not instance_ids:
        return
    remaining = list(instance_ids)
    try:
        await client.call("TerminateInstances", {"InstanceIds": remaining})
    except CloudError as e:
        if not is_gone(e):
            raise
        # One of them never existed; terminate the rest one by one.
        for iid in remaining:
            try:
                await client.call("TerminateInstances", {"InstanceIds": [iid]})
            except CloudError as e2:
                if not is_gone(e2):
                    raise
    delay = interval
    while True:
        # A filter, not InstanceIds: one unknown id would fail the whole
        # call, and "no answer" must never read as "all terminated".
        answer = await client.call(
            "DescribeInstances", {"Filters": [{"Name": "instance-id", "Values": remaining}]}
        )
        states = {i["InstanceId"]: i["State"]["Name"] for i in instances_of(answer)}
        remaining = [iid for iid, state in states.items() if state != "terminated"]
        if not remaining:
            return
        log.debug("Waiting for {ids} to terminate", ids=remaining)
        await deferLater(clock, delay, lambda: None)
        delay = min(delay * 2, max_interval)
