"""What the check and its undo send for floating IPs, VPC and classic, with
a scripted EC2 client: no network, no reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txvmbot.ec2 import resources as R
from txvmbot.errors import CloudError
from txvmbot.interfaces import IEC2Client
from txvmbot.jobs.smoke import Check
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckSpec, Cloud, JournalEntry

IP = "203.0.113.5"


@implementer(IEC2Client)
class ScriptedEC2:
    """Answers each operation from its queue (an exception fails the call;
    an empty queue answers ``{}``) and records every call."""

    endpoint = "http://127.0.0.1:1/"
    region = "r"
    signature_version = "v4"
    api_version = "2016-11-15"

    def __init__(self, **answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: The ``repeatable`` of the last call of each operation.
        self.repeatable: dict[str, bool] = {}

    def call(
        self, operation: str, params: dict[str, Any], *, repeatable: bool = True
    ) -> Deferred[Any]:
        self.calls.append((operation, params))
        self.repeatable[operation] = repeatable
        queue = self.answers.get(operation) or [{}]
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def entry(
    kind: str, resource_id: str | None, parent_id: str | None = None, name: str = "n"
) -> JournalEntry:
    return JournalEntry(
        check_id="c1",
        seq=1,
        kind=kind,
        name=name,
        endpoint="http://127.0.0.1:1/",
        region="r",
        created=0.0,
        resource_id=resource_id,
        parent_id=parent_id,
    )


BY_TAG = ("DescribeAddresses", {"Filters": [{"Name": "tag:txvmbot:check", "Values": ["c1"]}]})


class AddressKeyTests(SynchronousTestCase):
    def test_an_ip_is_a_public_ip_anything_else_an_allocation_id(self) -> None:
        self.assertEqual(R.address_key(IP), "PublicIp")
        self.assertEqual(R.address_key("2001:db8::7"), "PublicIp")
        self.assertEqual(R.address_key("eipalloc-0123abcd"), "AllocationId")
        self.assertEqual(R.address_key("eipalloc-1.2.3.4"), "AllocationId")


class UndoerAddressTests(SynchronousTestCase):
    def undo(self, client: ScriptedEC2, e: JournalEntry) -> bool:
        verifyObject(IEC2Client, client)
        return self.successResultOf(R.Undoer(client, Clock())(e))

    def test_classic_address_goes_by_its_public_ip(self) -> None:
        """No search by tag (a classic address has none, and a cloud may
        refuse the filter): by the journalled IP, detached and released."""
        attached = {"PublicIp": IP, "Domain": "standard", "InstanceId": "i-1"}
        client = ScriptedEC2(DescribeAddresses=[{"Addresses": [attached]}])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, IP, name=R.address_name("i-1"))))
        self.assertEqual(
            client.calls,
            [
                ("DescribeAddresses", {"PublicIps": [IP]}),
                ("DisassociateAddress", {"PublicIp": IP}),
                ("ReleaseAddress", {"PublicIp": IP}),
            ],
        )

    def test_classic_address_not_associated(self) -> None:
        free = {"PublicIp": IP, "Domain": "standard", "InstanceId": ""}
        client = ScriptedEC2(DescribeAddresses=[{"Addresses": [free]}])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, IP, name=R.address_name("i-1"))))
        self.assertEqual(
            client.calls,
            [("DescribeAddresses", {"PublicIps": [IP]}), ("ReleaseAddress", {"PublicIp": IP})],
        )

    def test_classic_address_already_gone(self) -> None:
        gone = CloudError("DescribeAddresses", "InvalidAddress.NotFound", f"Address '{IP}' not found.")
        client = ScriptedEC2(DescribeAddresses=[gone])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, IP)))
        self.assertEqual(client.calls, [("DescribeAddresses", {"PublicIps": [IP]})])

    def test_an_ip_now_tagged_for_another_check_is_left_alone(self) -> None:
        theirs = {
            "PublicIp": IP,
            "Domain": "standard",
            "InstanceId": "i-9",
            "Tags": [{"Key": R.TAG_CHECK, "Value": "c2"}],
        }
        client = ScriptedEC2(DescribeAddresses=[{"Addresses": [theirs]}])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, IP, name=R.address_name("i-9"))))
        self.assertEqual(client.calls, [("DescribeAddresses", {"PublicIps": [IP]})])

    def test_an_ip_now_attached_to_another_instance_is_left_alone(self) -> None:
        """This check released IP but never marked it done; the cloud gave
        it to another check, which attached it to its own instance."""
        theirs = {"PublicIp": IP, "Domain": "standard", "InstanceId": "i-9"}
        client = ScriptedEC2(DescribeAddresses=[{"Addresses": [theirs]}])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, IP, name=R.address_name("i-1"))))
        self.assertEqual(client.calls, [("DescribeAddresses", {"PublicIps": [IP]})])

    def test_vpc_address_goes_by_its_ids(self) -> None:
        vpc = {"PublicIp": IP, "AllocationId": "eipalloc-1", "AssociationId": "eipassoc-1",
               "InstanceId": "i-1"}
        client = ScriptedEC2(DescribeAddresses=[{"Addresses": []}, {"Addresses": [vpc]}])
        self.assertTrue(self.undo(client, entry(R.ADDRESS, "eipalloc-1")))
        self.assertEqual(
            client.calls,
            [
                BY_TAG,
                ("DescribeAddresses", {"AllocationIds": ["eipalloc-1"]}),
                ("DisassociateAddress", {"AssociationId": "eipassoc-1"}),
                ("ReleaseAddress", {"AllocationId": "eipalloc-1"}),
            ],
        )

    def test_classic_association_is_left_to_the_address_undo(self) -> None:
        client = ScriptedEC2()
        self.assertTrue(self.undo(client, entry(R.ASSOCIATION, IP, parent_id=IP)))
        self.assertEqual(client.calls, [])

    def test_vpc_association_goes_by_its_id(self) -> None:
        client = ScriptedEC2()
        self.assertTrue(self.undo(client, entry(R.ASSOCIATION, "eipassoc-1", "eipalloc-1")))
        self.assertEqual(client.calls, [("DisassociateAddress", {"AssociationId": "eipassoc-1"})])


class AttachAddressTests(SynchronousTestCase):
    """Check._attach_address follows the cloud's answer, not the asked domain."""

    def attach(self, client: ScriptedEC2, domain: Any) -> tuple[str, MemoryJournal]:
        journal = MemoryJournal()
        spec = CheckSpec(cloud=Cloud("http://127.0.0.1:1/", "r"), image="ami-1",
                         floating_ip=True, address_domain=domain)
        check = Check(Clock(), spec, journal=journal, client=client, check_id="c1")
        ip = self.successResultOf(Deferred.fromCoroutine(check.machines._attach_address("i-1")))
        return ip, journal

    def journalled(self, journal: MemoryJournal) -> list[tuple[str, str | None, str | None]]:
        return [(e.kind, e.resource_id, e.parent_id) for e in journal.entries]

    def test_classic_answer_associates_and_journals_by_public_ip(self) -> None:
        client = ScriptedEC2(AllocateAddress=[{"PublicIp": IP, "Domain": "standard"}])
        ip, journal = self.attach(client, "standard")
        self.assertEqual(ip, IP)
        # EC2-Classic refused tags on an address: none are sent; and as
        # nothing could find a duplicate, a maybe-acted allocation is not
        # repeated.
        self.assertEqual(client.calls[0], ("AllocateAddress", {"Domain": "standard"}))
        self.assertFalse(client.repeatable["AllocateAddress"])
        self.assertEqual(client.calls[1], ("AssociateAddress", {"PublicIp": IP, "InstanceId": "i-1"}))
        self.assertEqual(
            self.journalled(journal), [(R.ADDRESS, IP, None), (R.ASSOCIATION, IP, IP)]
        )

    def test_classic_answer_to_a_vpc_request_is_followed(self) -> None:
        client = ScriptedEC2(AllocateAddress=[{"PublicIp": IP}])
        self.attach(client, "vpc")
        self.assertEqual(client.calls[1], ("AssociateAddress", {"PublicIp": IP, "InstanceId": "i-1"}))

    def test_vpc_answer_goes_by_allocation_and_association_ids(self) -> None:
        client = ScriptedEC2(
            AllocateAddress=[{"PublicIp": IP, "AllocationId": "eipalloc-1"}],
            AssociateAddress=[{"AssociationId": "eipassoc-1"}],
        )
        ip, journal = self.attach(client, "vpc")
        allocate = client.calls[0][1]
        self.assertEqual(allocate["Domain"], "vpc")
        self.assertTrue(client.repeatable["AllocateAddress"])  # the tag sweep finds duplicates
        self.assertEqual(allocate["TagSpecifications"][0]["ResourceType"], "elastic-ip")
        self.assertEqual(
            client.calls[1], ("AssociateAddress", {"AllocationId": "eipalloc-1", "InstanceId": "i-1"})
        )
        self.assertEqual(
            self.journalled(journal),
            [(R.ADDRESS, "eipalloc-1", None), (R.ASSOCIATION, "eipassoc-1", "eipalloc-1")],
        )


class _Cloud:
    """Answers like EC2: InstanceIds with an unknown id fails the whole call;
    a filter does not."""

    def __init__(self) -> None:
        self.states = {"i-live": "shutting-down"}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, operation: str, params: dict[str, Any]) -> Deferred[Any]:
        self.calls.append((operation, params))
        if operation == "TerminateInstances":
            if "i-gone" in params["InstanceIds"]:
                raise CloudError(operation, "InvalidInstanceID.NotFound", "i-gone", 400)
            return succeed({})
        if "InstanceIds" in params:
            raise CloudError(operation, "InvalidInstanceID.NotFound", "i-gone", 400)
        (f,) = params["Filters"]
        found = [{"InstanceId": i, "State": {"Name": s}} for i, s in self.states.items()
                 if i in f["Values"]]
        self.states = {i: "terminated" for i in self.states}  # terminated by the next poll
        return succeed({"Reservations": [{"Instances": found}]})


def test_terminate_waits_for_the_live_instance_even_beside_an_unknown_one() -> None:
    cloud = _Cloud()
    clock = Clock()
    d = ensureDeferred(R.terminate_and_wait(cloud, clock, ["i-gone", "i-live"], 1.0, 4.0))  # type: ignore[arg-type]
    assert not d.called, "returned while i-live was still shutting down"
    clock.advance(1.0)
    assert d.called and d.result is None
    polls = [p for op, p in cloud.calls if op == "DescribeInstances"]
    assert len(polls) == 2 and all("Filters" in p for p in polls)
