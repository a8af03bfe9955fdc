"""``txvmbot reap``: remove what checks left behind on a cloud.

Two sources, because either alone misses things: the journal (what a killed
``check`` meant to create, even if the cloud never told it the id) and a
sweep by the ``txvmbot:check`` tag and the ``txvmbot-`` name prefix (what the
journal missed, e.g. a second instance started by a retried RunInstances
whose first answer was lost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from txvmbot.ec2 import resources as R
from txvmbot.engine import Cleanup, StepContext, StepRunner
from txvmbot.errors import CloudError
from txvmbot.interfaces import IEC2Client, IJournal
from txvmbot.model import Cloud, ReapReport, StepEvent

log = Logger()

#: How long one sweep or one journal undo may take.
REAP_STEP_BOUND = 300.0


def reap(
    reactor: Any,
    cloud: Cloud,
    *,
    journal: IJournal,
    older_than: float | None,
    dry_run: bool,
    observer: Callable[[StepEvent], None] | None = None,
    client: IEC2Client | None = None,
    now: Callable[[], float] = time.time,
) -> Deferred[ReapReport]:
    """Find, and unless ``dry_run`` remove, every resource txvmbot created
    on ``cloud`` more than ``older_than`` seconds ago (all when None)."""
    return ensureDeferred(
        _Reaper(reactor, cloud, journal, older_than, dry_run, observer, client, now).run()
    )


class _Reaper:
    def __init__(
        self,
        reactor: Any,
        cloud: Cloud,
        journal: IJournal,
        older_than: float | None,
        dry_run: bool,
        observer: Callable[[StepEvent], None] | None,
        client: IEC2Client | None,
        now: Callable[[], float],
    ) -> None:
        self.reactor = reactor
        self.cloud = cloud
        self.journal = journal
        self.cutoff = now() - older_than if older_than else None
        self.dry_run = dry_run
        self.steps = StepRunner(reactor, observer)
        self._client = client
        self.found: list[str] = []
        self.removed: list[str] = []
        self.errors: list[str] = []

    @property
    def client(self) -> IEC2Client:
        if self._client is None:
            from txvmbot.ec2 import make_client

            self._client = make_client(self.reactor, self.cloud)
        return self._client

    def _old_enough(self, item: dict[str, Any]) -> bool:
        if self.cutoff is None:
            return True
        created = R.created_time(item)
        return created is not None and created <= self.cutoff

    async def run(self) -> ReapReport:
        own_client = self._client is None
        try:
            await self._from_journal()
            for name, sweep in (
                ("sweep instances", self._instances),
                ("sweep addresses", self._addresses),
                ("sweep security groups", self._groups),
                ("sweep keypairs", self._keypairs),
            ):
                try:
                    await self.steps.run(name, REAP_STEP_BOUND, sweep)
                except Exception as e:
                    self.errors.append(str(e))
        finally:
            if own_client and self._client is not None:
                close = getattr(self._client, "close", None)
                if close is not None:
                    await close()
        return ReapReport(
            found=tuple(self.found),
            removed=tuple(self.removed),
            errors=tuple(self.errors),
            dry_run=self.dry_run,
        )

    async def _from_journal(self) -> None:
        undo = R.Undoer(self.client, self.reactor)
        for check_id in await self.journal.checks(older_than=self.cutoff):
            entries = [
                e
                for e in await self.journal.pending(check_id)
                if e.endpoint == self.cloud.endpoint and e.region == self.cloud.region
            ]
            if not entries:
                continue
            for e in entries:
                self.found.append(f"{e.kind} {e.resource_id or e.name} (check {check_id}, journal)")
            if self.dry_run:
                continue
            errors = await Cleanup(self.journal, undo, self.steps, REAP_STEP_BOUND).run(check_id)
            self.errors.extend(errors)
            if not errors:
                self.removed.extend(
                    f"{e.kind} {e.resource_id or e.name} (check {check_id}, journal)" for e in entries
                )

    def _tagged(self) -> list[dict[str, Any]]:
        return [{"Name": "tag-key", "Values": [R.TAG_CHECK]}]

    async def _instances(self, ctx: StepContext) -> None:
        answer = await self.client.call(
            "DescribeInstances",
            {
                "Filters": [
                    *self._tagged(),
                    {"Name": "instance-state-name", "Values": list(R.LIVE_STATES)},
                ]
            },
        )
        victims = [i for i in R.instances_of(answer) if self._old_enough(i)]
        names = [f"instance {i['InstanceId']} (check {R.tags_of(i).get(R.TAG_CHECK)})" for i in victims]
        self.found.extend(names)
        ctx.saw(f"{len(victims)} instance(s)")
        if victims and not self.dry_run:
            await R.terminate_and_wait(self.client, self.reactor, [i["InstanceId"] for i in victims])
            self.removed.extend(names)

    async def _addresses(self, ctx: StepContext) -> None:
        # A classic address carries no tag and is not seen here; the
        # journal (its public IP) is what finds it.
        answer = await self.client.call("DescribeAddresses", {"Filters": self._tagged()})
        victims = [a for a in answer.get("Addresses", []) if self._old_enough(a)]
        names = [
            f"address {a.get('AllocationId') or a.get('PublicIp')} (check {R.tags_of(a).get(R.TAG_CHECK)})"
            for a in victims
        ]
        self.found.extend(names)
        ctx.saw(f"{len(victims)} address(es)")
        if victims and not self.dry_run:
            await R.release_addresses(self.client, victims)
            self.removed.extend(names)

    async def _groups(self, ctx: StepContext) -> None:
        answer = await self.client.call("DescribeSecurityGroups", {})
        victims = [
            g
            for g in answer.get("SecurityGroups", [])
            if (R.TAG_CHECK in R.tags_of(g) or g.get("GroupName", "").startswith(R.NAME_PREFIX))
            and self._old_enough(g)
        ]
        ctx.saw(f"{len(victims)} group(s)")
        for g in victims:
            name = f"security group {g['GroupId']} {g.get('GroupName', '')}"
            self.found.append(name)
            if self.dry_run:
                continue
            try:
                await R.delete_group(self.client, self.reactor, g["GroupId"])
                self.removed.append(name)
            except CloudError as e:
                self.errors.append(f"{name}: {e}")

    async def _keypairs(self, ctx: StepContext) -> None:
        answer = await self.client.call("DescribeKeyPairs", {})
        victims = [
            k
            for k in answer.get("KeyPairs", [])
            if k.get("KeyName", "").startswith(R.NAME_PREFIX) and self._old_enough(k)
        ]
        ctx.saw(f"{len(victims)} keypair(s)")
        for k in victims:
            name = f"keypair {k['KeyName']}"
            self.found.append(name)
            if self.dry_run:
                continue
            try:
                await self.client.call("DeleteKeyPair", {"KeyName": k["KeyName"]})
                self.removed.append(name)
            except CloudError as e:
                if not R.is_gone(e):
                    self.errors.append(f"{name}: {e}")

