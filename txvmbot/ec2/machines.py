"""Fresh machines on an EC2-API cloud, behind :class:`~txvmbot.machines.IMachines`.

What a job's machines share is made once (:meth:`CloudMachines.prepare`:
keypair, image, security group, ingress rule); each :meth:`~CloudMachines.acquire`
runs instances, waits for running (state running and a valid address),
attaches floating IPs and waits for ssh. Every resource is journalled
before it is created and tagged with the check id, so
:meth:`~CloudMachines.cleanup` (and ``txvmbot reap``) undo it in reverse
on every exit path. The euca-style smoke check is
:class:`txvmbot.jobs.smoke.Check` on top of this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from txvmbot import facts as _facts
from txvmbot.ec2 import resources as R
from txvmbot.ec2.retry import ApiCallObserver
from txvmbot.engine import Cleanup, StepContext, StepRunner, StepSequence, gather, poll, track
from txvmbot.errors import CloudError, StepFailed
from txvmbot.interfaces import IEC2Client, IJournal
from txvmbot.machines import IMachines, Machine, ssh_wait_bound
from txvmbot.model import CheckSpec, Facts

log = Logger()


def valid_address(address: str | None) -> bool:
    """Euca says "running" before the instance has an address; 0.0.0.0 and
    empty are not addresses."""
    return bool(address) and address not in ("0.0.0.0", "::")


@implementer(IMachines)
class CloudMachines:
    """The instances of one job on one cloud, all tagged and journalled
    under ``check_id``. ``client`` is made from the spec's cloud when not
    given (and closed by :meth:`close`); ``api_observer`` is given to the
    client it makes (the worker counts API calls for the daemon's metrics)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        spec: CheckSpec,
        *,
        journal: IJournal,
        check_id: str,
        client: IEC2Client | None = None,
        api_observer: ApiCallObserver | None = None,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.journal = journal
        self.check_id = check_id
        self._client = client
        self._own_client = client is None
        self._api_observer = api_observer
        # What the job learnt, as it goes.
        self._image: dict[str, Any] = {}
        self._key: Any = None
        self._group_id: str | None = None
        self._instances: list[dict[str, Any]] = []
        self._addresses: dict[str, str] = {}
        self._acquired = 0
        self._host_keys: dict[str, str] = {}

    @property
    def client(self) -> IEC2Client:
        if self._client is None:
            from txvmbot.ec2 import make_client

            self._client = make_client(
                self.reactor, self.spec.cloud, api_observer=self._api_observer
            )
        return self._client

    # -- IMachines --------------------------------------------------------

    async def _prepare(self, sequence: StepSequence) -> None:
        t = self.spec.timeouts
        await sequence.step("keypair", t.api_step, self._keypair)
        await sequence.step("image", t.api_step, self._find_image)
        await sequence.step("security-group", t.api_step, self._security_group)
        await sequence.step("authorize-ssh", t.api_step, self._authorize)

    def prepare(self, sequence: StepSequence) -> Deferred[None]:
        return ensureDeferred(self._prepare(sequence))

    async def _acquire(self, sequence: StepSequence, count: int, ssh: bool) -> tuple[Machine, ...]:
        t = self.spec.timeouts
        batch: list[dict[str, Any]] = []

        async def run(ctx: StepContext) -> None:
            batch.extend(await self._run_instances(ctx, count))

        await sequence.step("run-instances", t.api_step, run)

        async def wait(ctx: StepContext) -> None:
            batch[:] = await self._wait_running(ctx, batch)
            seen = {inst["InstanceId"]: inst for inst in batch}
            self._instances = [seen.get(i["InstanceId"], i) for i in self._instances]

        await sequence.step("wait-running", t.running, wait)
        if self.spec.floating_ip:

            async def attach(ctx: StepContext) -> None:
                for inst in batch:
                    ip = await self._attach_address(inst["InstanceId"])
                    ctx.saw(f"{ip} -> {inst['InstanceId']}")

            await sequence.step("floating-ip", t.api_step, attach)
        if not ssh:
            return tuple(
                Machine(name=inst["InstanceId"], ssh_endpoint="", ssh_user=self.spec.ssh_user, key=self._key)
                for inst in batch
            )
        machines: list[Machine] = []

        async def wait_ssh(ctx: StepContext) -> None:
            # The endpoints are worked out in the step: an address missing
            # for the --ssh-endpoint template fails the step that needs it.
            ready = tuple(
                Machine(
                    name=inst["InstanceId"],
                    ssh_endpoint=self._endpoint_for(inst, self._index(inst)),
                    ssh_user=self.spec.ssh_user,
                    key=self._key,
                )
                for inst in batch
            )
            prints = await self._wait_ssh(ctx, ready)
            machines.extend(attrs.evolve(m, host_key=fp) for m, fp in zip(ready, prints, strict=True))

        await sequence.step("wait-ssh", t.ssh, wait_ssh)
        return tuple(machines)

    def acquire(self, sequence: StepSequence, count: int, *, ssh: bool = True) -> Deferred[tuple[Machine, ...]]:
        return ensureDeferred(self._acquire(sequence, count, ssh))

    async def _release(self, machine: Machine) -> None:
        try:
            await self.client.call("TerminateInstances", {"InstanceIds": [machine.name]})
        except Exception as e:
            self.log.warn(
                "Could not terminate {iid} early ({e}); cleanup will", iid=machine.name, e=e
            )

    def release(self, machine: Machine) -> Deferred[None]:
        return ensureDeferred(self._release(machine))

    def console(self, steps: StepRunner) -> Deferred[tuple[tuple[str, str], ...]]:
        async def go() -> tuple[tuple[str, str], ...]:
            if not self._instances:
                return ()
            found: list[tuple[str, str]] = []

            async def fetch(ctx: StepContext) -> None:
                found.extend(await self._fetch_console(ctx))

            try:
                await steps.run("console", self.spec.timeouts.api_step, fetch)
            except Exception as e:  # recorded as a failed step already
                self.log.info("Console fetch failed: {e}", e=e)
            return tuple(found)

        return ensureDeferred(go())

    def keep(self, steps: StepRunner, error: str) -> Deferred[bool]:
        # A cloud's instances are not kept: their console is the evidence.
        return succeed(False)

    def cleanup(self, steps: StepRunner) -> Deferred[tuple[str, ...]]:
        t = self.spec.timeouts
        undo = R.Undoer(self.client, self.reactor, t.poll_interval, t.poll_max_interval)
        bound = max(t.terminate, t.api_step)
        return Cleanup(self.journal, undo, steps, bound).run(self.check_id)

    def host_keys(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._host_keys.items())

    def facts(self, guest_uname: str) -> Facts:
        spec = self.spec
        return _facts.collect(
            endpoint=spec.cloud.endpoint,
            region=spec.cloud.region,
            signature_version=spec.cloud.signature_version,
            api_version=getattr(self._client, "api_version", "") or "",
            image_id=self._image.get("ImageId", spec.image or ""),
            image_name=self._image.get("Name", ""),
            instance_type=spec.instance_type,
            guest_uname=guest_uname,
        )

    async def _close(self) -> None:
        if self._own_client and self._client is not None:
            close = getattr(self._client, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    self.log.failure("Check {check_id}: closing its EC2 client", check_id=self.check_id)

    def close(self) -> Deferred[None]:
        return ensureDeferred(self._close())

    # -- journal helpers --------------------------------------------------

    def _track(
        self, kind: str, name: str, create: Callable[[], Deferred[str]], parent_id: str | None = None
    ) -> Deferred[str]:
        cloud = self.spec.cloud
        return track(
            self.journal, self.check_id, kind, name, cloud.endpoint, cloud.region, create, parent_id
        )

    def _now(self) -> float:
        import time

        return time.time()

    # -- steps ------------------------------------------------------------

    async def _keypair(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        name = R.resource_name(self.check_id)
        tags = R.tag_specs("key-pair", self.check_id, self._now())
        if self.spec.ssh_key:
            key = ssh.load_private_key(self.spec.ssh_key)
            public = ssh.public_openssh(key)

            async def importing() -> str:
                try:
                    answer = await self.client.call(
                        "ImportKeyPair",
                        {
                            "KeyName": name,
                            "PublicKeyMaterial": public.encode("ascii"),
                            "TagSpecifications": tags,
                        },
                    )
                except CloudError as e:
                    if not R.is_duplicate(e):
                        raise
                    return name  # our own earlier attempt, whose answer was lost
                return str(answer.get("KeyPairId") or name)

            await self._track(R.KEYPAIR, name, lambda: ensureDeferred(importing()))
            self._key = key
            ctx.saw(f"imported {name} ({ssh.fingerprint_sha256(key)})")
            return

        async def creating() -> str:
            for _attempt in range(2):
                try:
                    answer = await self.client.call(
                        "CreateKeyPair", {"KeyName": name, "TagSpecifications": tags}
                    )
                except CloudError as e:
                    if not R.is_duplicate(e):
                        raise
                    # Our earlier attempt made it but its private key was
                    # lost with the answer: delete and create again.
                    await self.client.call("DeleteKeyPair", {"KeyName": name})
                    continue
                if self.spec.ssh:
                    self._key = _cloud_key(answer["KeyMaterial"])
                return str(answer.get("KeyPairId") or name)
            raise StepFailed("keypair", f"keypair {name} exists and could not be replaced")


        await self._track(R.KEYPAIR, name, lambda: ensureDeferred(creating()))
        ctx.saw(f"created {name}")

    async def _find_image(self, ctx: StepContext) -> None:
        spec = self.spec
        params: dict[str, Any]
        if spec.image:
            params = {"ImageIds": [spec.image]}
            wanted = f"image {spec.image}"
        else:
            params = {"Filters": [{"Name": "name", "Values": [spec.image_name]}]}
            wanted = f"an image named {spec.image_name!r}"
            if spec.image_owner:
                params["Owners"] = [spec.image_owner]
                wanted += f" owned by {spec.image_owner}"
        try:
            answer = await self.client.call("DescribeImages", params)
        except CloudError as e:
            if R.is_gone(e):
                raise StepFailed("image", f"no {wanted}: {e.code}: {e.message}") from e
            raise
        images = [i for i in answer.get("Images", []) if i.get("State", "available") == "available"]
        if not images:
            raise StepFailed("image", f"the cloud has no available {wanted}")
        images.sort(key=lambda i: str(i.get("CreationDate", "")), reverse=True)
        self._image = images[0]
        ctx.saw(f"{images[0]['ImageId']} {images[0].get('Name', '')}".strip())

    async def _security_group(self, ctx: StepContext) -> None:
        name = R.resource_name(self.check_id)

        async def creating() -> str:
            try:
                answer = await self.client.call(
                    "CreateSecurityGroup",
                    {
                        "GroupName": name,
                        "Description": f"txvmbot check {self.check_id}",
                        "TagSpecifications": R.tag_specs("security-group", self.check_id, self._now()),
                    },
                )
                return str(answer["GroupId"])
            except CloudError as e:
                if not R.is_duplicate(e):
                    raise
                found = await self.client.call(
                    "DescribeSecurityGroups", {"Filters": [{"Name": "group-name", "Values": [name]}]}
                )
                return str(found["SecurityGroups"][0]["GroupId"])

        self._group_id = await self._track(R.GROUP, name, lambda: ensureDeferred(creating()))
        ctx.saw(f"{self._group_id} {name}")

    async def _authorize(self, ctx: StepContext) -> None:
        cidr = self.spec.ssh_cidr
        group_id = self._group_id

        async def authorizing() -> str:
            try:
                await self.client.call(
                    "AuthorizeSecurityGroupIngress",
                    {"GroupId": group_id, "IpPermissions": R.ssh_permission(cidr)},
                )
            except CloudError as e:
                if not R.is_duplicate(e):
                    raise
            return f"{group_id}:{R.rule_name(cidr)}"

        await self._track(R.RULE, R.rule_name(cidr), lambda: ensureDeferred(authorizing()), group_id)
        ctx.saw(f"tcp/22 from {cidr}")

    async def _run_instances(self, ctx: StepContext, count: int) -> list[dict[str, Any]]:
        spec = self.spec
        # Each acquisition is its own request: a retry of it never starts
        # a second set, a later acquisition (a replacement) does.
        n = self._acquired
        self._acquired += 1
        suffix = f"-{n}" if n else ""
        params = {
            "ImageId": self._image["ImageId"],
            "MinCount": count,
            "MaxCount": count,
            "InstanceType": spec.instance_type,
            "KeyName": R.resource_name(self.check_id),
            "SecurityGroupIds": [self._group_id],
            "ClientToken": f"txvmbot-{self.check_id}{suffix}",
            "TagSpecifications": R.tag_specs("instance", self.check_id, self._now()),
        }
        if spec.user_data is not None:
            # Plain bytes: the client base64-encodes UserData.
            params["UserData"] = spec.user_data
        started: list[dict[str, Any]] = []

        async def running() -> str:
            answer = await self.client.call("RunInstances", params)
            started.extend(answer.get("Instances", []))
            self._instances.extend(started)
            return ",".join(i["InstanceId"] for i in started)

        name = R.resource_name(self.check_id) + suffix
        ids = await self._track(R.INSTANCES, name, lambda: ensureDeferred(running()))
        if len(started) != count:
            raise StepFailed("run-instances", f"asked for {count} instances, the cloud started {ids or 'none'}")
        ctx.saw(ids)
        return started

    async def _wait_running(self, ctx: StepContext, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [i["InstanceId"] for i in batch]
        t = self.spec.timeouts

        def probe() -> Deferred[Any]:
            return self.client.call("DescribeInstances", {"InstanceIds": ids})

        def by_id(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
            return {i["InstanceId"]: i for i in R.instances_of(answer)}

        def is_ready(answer: dict[str, Any]) -> bool:
            seen = by_id(answer)
            for iid in ids:
                inst = seen.get(iid)
                if inst is None:
                    return False
                state = inst["State"]["Name"]
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    raise StepFailed("wait-running", f"instance {iid} went {state}: {_reason(inst)}")
                if state != "running" or not valid_address(_address(inst)):
                    return False
            return True

        def describe(answer: dict[str, Any]) -> str:
            seen = by_id(answer)
            return ", ".join(
                f"{iid} {seen[iid]['State']['Name'] if iid in seen else 'unknown'}"
                f" address {(_address(seen[iid]) if iid in seen else None) or 'none'}"
                for iid in ids
            )

        answer = await poll(
            ctx, probe, is_ready, describe, interval=t.poll_interval, max_interval=t.poll_max_interval
        )
        ctx.saw(describe(answer))
        return [by_id(answer)[iid] for iid in ids]

    async def _attach_address(self, iid: str) -> str:
        """Allocate an address, journalled, and associate it with ``iid``.

        The address goes by its AllocationId if the cloud gave one, else (a
        classic address) by its public IP; the journal holds that id, and
        ``R.address_key`` tells which it is. A classic address is not
        tagged: EC2-Classic refused tags on one (and moto, given some, fails
        every later search by tag), so cleanup and ``txvmbot reap`` find it
        by its journalled IP.
        """
        holder: dict[str, str] = {}
        params: dict[str, Any] = {"Domain": self.spec.address_domain}
        if self.spec.address_domain == "vpc":
            params["TagSpecifications"] = R.tag_specs("elastic-ip", self.check_id, self._now())

        async def allocating() -> str:
            # Untagged, a classic address a lost answer's retry duplicated
            # could never be found: only retry what the cloud refused.
            answer = await self.client.call(
                "AllocateAddress", params, repeatable=self.spec.address_domain == "vpc"
            )
            holder["ip"] = answer["PublicIp"]
            return str(answer.get("AllocationId") or answer["PublicIp"])

        address = await self._track(
            R.ADDRESS, R.address_name(iid), lambda: ensureDeferred(allocating())
        )

        async def associating() -> str:
            answer = await self.client.call(
                "AssociateAddress", {R.address_key(address): address, "InstanceId": iid}
            )
            # A classic association has no id: the address's own stands in
            # (and tells the undo so, see R.Undoer._association).
            return str(answer.get("AssociationId") or address)

        await self._track(
            R.ASSOCIATION, f"{address}->{iid}", lambda: ensureDeferred(associating()), address
        )
        self._addresses[iid] = holder["ip"]
        return holder["ip"]

    def _index(self, inst: dict[str, Any]) -> int:
        """The instance's place among all the job's instances (``{index}``)."""
        ids = [i["InstanceId"] for i in self._instances]
        return ids.index(inst["InstanceId"])

    def _endpoint_for(self, inst: dict[str, Any], index: int) -> str:
        iid = inst["InstanceId"]
        values = {
            "public_ip": self._addresses.get(iid) or inst.get("PublicIpAddress") or "",
            "private_ip": inst.get("PrivateIpAddress") or "",
            "instance_id": iid,
            "index": str(index),
        }
        import string

        used = {f for _, f, _, _ in string.Formatter().parse(self.spec.ssh_endpoint) if f}
        empty = sorted(f for f in used if f in values and not values[f])
        if empty:
            raise StepFailed(
                "wait-ssh",
                f"instance {iid} has no {', '.join(empty)} for --ssh-endpoint "
                f"{self.spec.ssh_endpoint!r} (use --floating-ip, or {{private_ip}})",
            )
        try:
            return self.spec.ssh_endpoint.format(**values)
        except (KeyError, IndexError, ValueError) as e:
            raise StepFailed("wait-ssh", f"--ssh-endpoint {self.spec.ssh_endpoint!r}: unknown placeholder {e}") from e

    async def _wait_ssh(self, ctx: StepContext, machines: tuple[Machine, ...]) -> list[str]:
        from txvmbot import ssh

        t = self.spec.timeouts

        def waiting(machine: Machine) -> Deferred[str]:
            def progress(attempt: int, last: str) -> None:
                ctx.saw(f"{machine.name} via {machine.ssh_endpoint}: attempt {attempt}: {last}")

            return ssh.wait_for_ssh(
                self.reactor,
                machine.ssh_endpoint,
                machine.ssh_user,
                machine.key,
                connect_timeout=t.ssh_connect,
                bound=ssh_wait_bound(t.ssh),
                on_attempt=progress,
            )

        prints = await gather([waiting(m) for m in machines])
        self._host_keys.update((m.name, fp) for m, fp in zip(machines, prints, strict=True))
        ctx.saw(", ".join(f"{m.name} {fp}" for m, fp in zip(machines, prints, strict=True)))
        return prints

    async def _fetch_console(self, ctx: StepContext) -> list[tuple[str, str]]:
        found: list[tuple[str, str]] = []
        for inst in self._instances:
            iid = inst["InstanceId"]
            try:
                answer = await self.client.call("GetConsoleOutput", {"InstanceId": iid})
            except CloudError as e:
                found.append((iid, f"(console unavailable: {e})"))
                continue
            found.append((iid, str(answer.get("Output") or "")))
            ctx.saw(f"{iid}: {len(found[-1][1])} characters")
        return found


def _cloud_key(material: str) -> Any:
    """The private key the cloud just made for us. Validating an RSA key
    costs ~80 ms of CPU on the reactor thread (measured by
    bench/parallel_vs_boto3.py); a key the cloud generated for this check is
    not worth checking for maliciousness, so that step is skipped."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.conch.ssh.keys import BadKeyError, Key

    data = material.encode("ascii")
    try:
        return Key(load_pem_private_key(data, None, unsafe_skip_rsa_key_validation=True))
    except (ValueError, TypeError):
        try:
            return Key.fromString(data)  # OpenSSH format, or another type
        except BadKeyError as e:
            raise StepFailed("keypair", f"the cloud's key material is not a usable key: {e}") from e


def _address(inst: dict[str, Any]) -> str | None:
    return inst.get("PublicIpAddress") or inst.get("PrivateIpAddress")


def _reason(inst: dict[str, Any]) -> str:
    reason = inst.get("StateReason") or {}
    return str(reason.get("Message") or inst.get("StateTransitionReason") or "no reason given")


__all__ = ["CloudMachines", "valid_address"]
