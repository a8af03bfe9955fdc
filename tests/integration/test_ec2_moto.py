"""The client against a real EC2 Query API server: moto on 127.0.0.1.

moto checks no signatures (tests/integration/test_ec2_signatures.py does) but serializes,
routes and answers like EC2. Nothing here connects to an address moto hands
out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support.deferreds import result_of
from tests.support.servers import Moto
from txvmbot.ec2 import ParamError, make_client
from txvmbot.errors import CloudError
from txvmbot.model import Cloud, Credentials, RetryPolicy

TAG_KEY = "txvmbot-test"


def moto_cloud(url: str) -> Cloud:
    return Cloud(
        endpoint=url,
        region="us-east-1",
        credentials=Credentials("testing", "testing"),
        retry=RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.2, request_timeout=20.0),
    )


class MotoRoundTripTests(TestCase):
    timeout = 120

    @pytest.fixture(autouse=True)
    def _moto(self, moto: Moto) -> None:
        self.moto = moto

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.client = make_client(reactor, moto_cloud(self.moto.url))
        self.addCleanup(self.client.close)

    async def _round_trip(self) -> None:
        c = self.client
        name = f"txvmbot-{uuid.uuid4().hex[:12]}"

        key = await c.call("CreateKeyPair", {"KeyName": name})
        self.assertEqual(key["KeyName"], name)
        self.assertIn("PRIVATE KEY", key["KeyMaterial"])
        self.assertTrue(key["KeyPairId"].startswith("key-"))

        images = await c.call(
            "DescribeImages",
            {
                "Filters": [
                    {"Name": "architecture", "Values": ["x86_64"]},
                    {"Name": "state", "Values": ["available"]},
                ]
            },
        )
        self.assertTrue(images["Images"])
        self.assertTrue(all(i["Architecture"] == "x86_64" for i in images["Images"]))
        image_id = images["Images"][0]["ImageId"]

        run = await c.call(
            "RunInstances",
            {
                "ImageId": image_id,
                "MinCount": 1,
                "MaxCount": 1,
                "InstanceType": "t3.micro",
                "KeyName": name,
                "UserData": "#!/bin/sh\necho txvmbot\n",
                "TagSpecifications": [
                    {"ResourceType": "instance", "Tags": [{"Key": TAG_KEY, "Value": name}]}
                ],
            },
        )
        [instance] = run["Instances"]
        iid = instance["InstanceId"]
        self.assertEqual(instance["ImageId"], image_id)
        self.assertEqual(instance["KeyName"], name)

        found = await c.call(
            "DescribeInstances", {"Filters": [{"Name": f"tag:{TAG_KEY}", "Values": [name]}]}
        )
        [reservation] = found["Reservations"]
        [described] = reservation["Instances"]
        self.assertEqual(described["InstanceId"], iid)
        self.assertIn(described["State"]["Name"], ("pending", "running"))
        self.assertIn({"Key": TAG_KEY, "Value": name}, described["Tags"])

        user_data = await c.call(
            "DescribeInstanceAttribute", {"InstanceId": iid, "Attribute": "userData"}
        )
        self.assertEqual(user_data["UserData"]["Value"], "IyEvYmluL3NoCmVjaG8gdHh2bWJvdAo=")

        console = await c.call("GetConsoleOutput", {"InstanceId": iid})
        self.assertEqual(console["InstanceId"], iid)
        self.assertIsInstance(console["Output"], str)
        self.assertIn("Linux version", console["Output"])  # moto's fixed console log, decoded

        gone = await c.call("TerminateInstances", {"InstanceIds": [iid]})
        self.assertEqual(gone["TerminatingInstances"][0]["InstanceId"], iid)
        self.assertIn(
            gone["TerminatingInstances"][0]["CurrentState"]["Name"], ("shutting-down", "terminated")
        )

        await c.call("DeleteKeyPair", {"KeyName": name})
        try:
            await c.call("DescribeKeyPairs", {"KeyNames": [name]})
        except CloudError as e:
            self.assertEqual(e.code, "InvalidKeyPair.NotFound")
            self.assertEqual(e.status, 400)
            self.assertIn(name, e.message)
        else:
            self.fail("the key pair was not deleted")

    def test_round_trip(self) -> Any:
        return ensureDeferred(self._round_trip())

    async def _errors(self) -> None:
        try:
            await self.client.call("TerminateInstances", {"InstanceIds": ["i-0123456789abcdef0"]})
        except CloudError as e:
            self.assertEqual(e.code, "InvalidInstanceID.NotFound")
            self.assertEqual(e.status, 400)
            self.assertTrue(e.request_id)
        else:
            self.fail("terminating a missing instance succeeded")
        try:
            await self.client.call("RunInstances", {"ImageId": "ami-1", "MinCount": 1})
        except ParamError as e:
            self.assertIn("MaxCount", str(e))
        else:
            self.fail("bad params were sent")

    def test_errors(self) -> Any:
        return ensureDeferred(self._errors())


class EvidenceTests(TestCase):
    """A check whose evidence cannot be written (a full or broken disk)
    still returns its result, cleaned up, and says why in the log."""

    timeout = 120

    @pytest.fixture(autouse=True)
    def _moto(self, moto: Moto) -> None:
        self.moto = moto

    async def test_unwritable_evidence_keeps_the_result(self) -> None:
        from twisted.internet import reactor
        from twisted.logger import LogLevel, capturedLogs

        from txvmbot.jobs.smoke import Check
        from txvmbot.journal import MemoryJournal
        from txvmbot.model import CheckSpec

        tmp = tempfile.mkdtemp(prefix="txvmbot-test-")
        self.addCleanup(shutil.rmtree, tmp)
        blocker = os.path.join(tmp, "file")
        with open(blocker, "w") as f:
            f.write("a file where the evidence directory's parent should be\n")
        root = f"{blocker}/evidence"  # makedirs fails, even for root
        spec = CheckSpec(cloud=moto_cloud(self.moto.url), image="ami-00000000", ssh=False)
        journal = MemoryJournal()
        check = Check(reactor, spec, journal=journal, evidence_root=root)
        with capturedLogs() as events:
            result = await check.run()
        self.assertFalse(result.passed)
        self.assertIn("image", result.error)
        self.assertIsNone(result.evidence_dir)
        self.assertEqual(result_of(journal.pending(check.check_id)), [])
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["root"], root)
        self.assertIsInstance(errors[0]["e"], NotADirectoryError)
