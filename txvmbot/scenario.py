"""The euca-style smoke check of an EC2-API cloud, step by step.

keypair, image, security group, ingress rule, run instances, wait for
running, floating IP, wait for ssh, commands, console, then cleanup in
reverse from the journal on every exit path. Each step is bounded; a failure
names its step, keeps the console log and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger

from txvmbot import facts as _facts
from txvmbot.ec2 import resources as R
from txvmbot.engine import Cleanup, StepContext, StepRunner, poll, track
from txvmbot.errors import CloudError, StepFailed, TxvmbotError
from txvmbot.evidence import save_evidence
from txvmbot.interfaces import IEC2Client, IJournal
from txvmbot.model import (
    CheckResult,
    CheckSpec,
    CommandResult,
    StepEvent,
)
from txvmbot.smoke import (
    UNAME,
    StepSequence,
    commands_bound,
    cut_off,
    judge,
    new_check_id,
    ssh_wait_bound,
)

log = Logger()


def valid_address(address: str | None) -> bool:
    """Euca says "running" before the instance has an address; 0.0.0.0 and
    empty are not addresses."""
    return bool(address) and address not in ("0.0.0.0", "::")


class Check:
    """One smoke check against one cloud. ``run()`` fires with a
    CheckResult and never errbacks for a failing check; ``cancel()`` stops
    at the current step and cleans up."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        spec: CheckSpec,
        *,
        journal: IJournal,
        observer: Callable[[StepEvent], None] | None = None,
        evidence_root: str | None = None,
        check_id: str | None = None,
        client: IEC2Client | None = None,
    ) -> None:
        self.reactor = reactor
        self.spec = spec
        self.journal = journal
        self.evidence_root = evidence_root
        self.check_id = check_id or new_check_id()
        self.steps = StepRunner(reactor, observer)
        self.sequence = StepSequence(self.steps, f"check {self.check_id}")
        self._client = client
        self._own_client = client is None
        # What the check learnt, as it goes.
        self._image: dict[str, Any] = {}
        self._key: Any = None
        self._group_id: str | None = None
        self._instances: list[dict[str, Any]] = []
        self._addresses: dict[str, str] = {}
        self._commands: list[CommandResult] = []
        self._host_keys: list[tuple[str, str]] = []
        self._console: list[tuple[str, str]] = []
        self._guest_uname = ""

    # -- public -----------------------------------------------------------

    def run(self) -> Deferred[CheckResult]:
        return ensureDeferred(self._run())

    def cancel(self, reason: str) -> None:
        self.sequence.cancel(reason)

    # -- the flow ---------------------------------------------------------

    @property
    def client(self) -> IEC2Client:
        if self._client is None:
            from txvmbot.ec2 import make_client

            self._client = make_client(self.reactor, self.spec.cloud)
        return self._client

    async def _step(self, name: str, bound: float, action: Callable[[StepContext], Any]) -> Any:
        return await self.sequence.step(name, bound, action)

    async def _run(self) -> CheckResult:
        spec = self.spec
        t = spec.timeouts
        error = ""
        try:
            await self._step("keypair", t.api_step, self._keypair)
            await self._step("image", t.api_step, self._find_image)
            await self._step("security-group", t.api_step, self._security_group)
            await self._step("authorize-ssh", t.api_step, self._authorize)
            await self._step("run-instances", t.api_step, self._run_instances)
            await self._step("wait-running", t.running, self._wait_running)
            if spec.floating_ip:
                await self._step("floating-ip", t.api_step, self._floating_ip)
            if spec.ssh:
                await self._step("wait-ssh", t.ssh, self._wait_ssh)
                bound = commands_bound(t.command, len(spec.commands), t.ssh_connect)
                await self._step("commands", bound, self._run_commands)
        except CancelledError:
            error = f"cancelled: {self.sequence.cancelled or 'cancelled'}"
        except TxvmbotError as e:
            error = str(e)
        except Exception as e:  # a bug of ours: report it, still clean up
            self.log.failure("Unexpected error in check {check_id}", check_id=self.check_id)
            error = f"internal error: {e!r}"
        passed = not error
        if (not passed or spec.console) and self._instances:
            try:
                await self.steps.run("console", t.api_step, self._fetch_console)
            except Exception as e:  # recorded as a failed step already
                self.log.info("Console fetch failed: {e}", e=e)
        cleanup_errors = await self._cleanup()
        if cleanup_errors and passed:
            passed = False
            error = "cleanup failed: " + "; ".join(cleanup_errors)
        result = self._result(passed, error)
        if not passed or spec.console:
            result = save_evidence(self.evidence_root, result, self.log)
        if self._own_client and self._client is not None:
            close = getattr(self._client, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    self.log.failure("Check {check_id}: closing its EC2 client", check_id=self.check_id)
        return result

    async def _cleanup(self) -> tuple[str, ...]:
        t = self.spec.timeouts
        undo = R.Undoer(self.client, self.reactor, t.poll_interval, t.poll_max_interval)
        bound = max(t.terminate, t.api_step)
        return await Cleanup(self.journal, undo, self.steps, bound).run(self.check_id)

    def _result(self, passed: bool, error: str) -> CheckResult:
        spec = self.spec
        facts = _facts.collect(
            endpoint=spec.cloud.endpoint,
            region=spec.cloud.region,
            signature_version=spec.cloud.signature_version,
            api_version=getattr(self._client, "api_version", "") or "",
            image_id=self._image.get("ImageId", spec.image or ""),
            image_name=self._image.get("Name", ""),
            instance_type=spec.instance_type,
            guest_uname=self._guest_uname,
        )
        return CheckResult(
            check_id=self.check_id,
            passed=passed,
            steps=self.steps.results,
            facts=facts,
            commands=tuple(self._commands),
            console=tuple(self._console),
            host_keys=tuple(self._host_keys),
            error=error,
        )

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

    async def _run_instances(self, ctx: StepContext) -> None:
        spec = self.spec
        n = spec.parallel
        params = {
            "ImageId": self._image["ImageId"],
            "MinCount": n,
            "MaxCount": n,
            "InstanceType": spec.instance_type,
            "KeyName": R.resource_name(self.check_id),
            "SecurityGroupIds": [self._group_id],
            "ClientToken": f"txvmbot-{self.check_id}",
            "TagSpecifications": R.tag_specs("instance", self.check_id, self._now()),
        }

        async def running() -> str:
            answer = await self.client.call("RunInstances", params)
            self._instances = list(answer.get("Instances", []))
            return ",".join(i["InstanceId"] for i in self._instances)

        ids = await self._track(R.INSTANCES, R.resource_name(self.check_id), lambda: ensureDeferred(running()))
        if len(self._instances) != n:
            raise StepFailed("run-instances", f"asked for {n} instances, the cloud started {ids or 'none'}")
        ctx.saw(ids)

    async def _wait_running(self, ctx: StepContext) -> None:
        ids = [i["InstanceId"] for i in self._instances]
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
        self._instances = [by_id(answer)[iid] for iid in ids]
        ctx.saw(describe(answer))

    async def _floating_ip(self, ctx: StepContext) -> None:
        for inst in self._instances:
            ip = await self._attach_address(inst["InstanceId"])
            ctx.saw(f"{ip} -> {inst['InstanceId']}")

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

    async def _wait_ssh(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        t = self.spec.timeouts

        def waiting(index: int, inst: dict[str, Any]) -> Deferred[str]:
            endpoint = self._endpoint_for(inst, index)

            def progress(attempt: int, last: str) -> None:
                ctx.saw(f"{inst['InstanceId']} via {endpoint}: attempt {attempt}: {last}")

            return ssh.wait_for_ssh(
                self.reactor,
                endpoint,
                self.spec.ssh_user,
                self._key,
                connect_timeout=t.ssh_connect,
                bound=ssh_wait_bound(t.ssh),
                on_attempt=progress,
            )

        prints = await _gather([waiting(i, inst) for i, inst in enumerate(self._instances)])
        self._host_keys = [(inst["InstanceId"], fp) for inst, fp in zip(self._instances, prints, strict=True)]
        ctx.saw(", ".join(f"{iid} {fp}" for iid, fp in self._host_keys))

    async def _run_commands(self, ctx: StepContext) -> None:
        from txvmbot import ssh

        t = self.spec.timeouts
        commands = [UNAME, *self.spec.commands]

        def running(index: int, inst: dict[str, Any]) -> Deferred[Any]:
            return ssh.run_commands(
                self.reactor,
                self._endpoint_for(inst, index),
                self.spec.ssh_user,
                self._key,
                commands,
                command_timeout=t.command,
                connect_timeout=t.ssh_connect,
            )

        try:
            outcomes = await _gather([running(i, inst) for i, inst in enumerate(self._instances)])
        except ssh.SSHCommandFailed as e:
            kept, error = cut_off(e)
            self._commands.extend(kept)
            raise error from e
        failures: list[str] = []
        for inst, outcome in zip(self._instances, outcomes, strict=True):
            iid = inst["InstanceId"]
            done = judge(outcome.results)
            self._guest_uname = self._guest_uname or done.uname
            self._commands.extend(done.results)
            failures.extend(f"{iid}: {f}" for f in done.failures)
        if failures:
            raise StepFailed("commands", "; ".join(failures))
        ctx.saw(f"{len(commands) - 1} command(s) passed on {len(outcomes)} instance(s)")

    async def _fetch_console(self, ctx: StepContext) -> None:
        for inst in self._instances:
            iid = inst["InstanceId"]
            try:
                answer = await self.client.call("GetConsoleOutput", {"InstanceId": iid})
            except CloudError as e:
                self._console.append((iid, f"(console unavailable: {e})"))
                continue
            self._console.append((iid, str(answer.get("Output") or "")))
            ctx.saw(f"{iid}: {len(self._console[-1][1])} characters")


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


async def _gather(ds: list[Deferred[Any]]) -> list[Any]:
    """Wait for all; fail with the first failure; cancel the rest on cancel."""
    dl = DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
    try:
        results = await dl
    except CancelledError:
        for d in ds:
            d.cancel()
        raise
    except Exception as e:  # FirstError
        for d in ds:
            d.cancel()
        sub = getattr(e, "subFailure", None)
        if sub is not None:
            sub.raiseException()
        raise
    return [value for _ok, value in results]


__all__ = ["Check", "new_check_id", "valid_address"]
