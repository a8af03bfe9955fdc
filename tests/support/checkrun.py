"""Run ``txvmbot`` as a real subprocess against moto, and ask moto what is
left. Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import attrs

REGION = "us-east-1"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_CONFIG_FILE": os.devnull,
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("AWS_"):
            del e[k]
    e.update(ENV)
    return e


def txvmbot_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "txvmbot", *args]


@attrs.frozen
class Run:
    code: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None

    @property
    def check_id(self) -> str:
        assert self.result is not None, self.stderr
        return str(self.result["check_id"])

    def failed_step(self) -> str | None:
        assert self.result is not None, self.stderr
        for s in self.result["steps"]:
            if s["outcome"] in ("failed", "timeout") and not s["name"].startswith("cleanup"):
                return str(s["name"])
        return None


def check(url: str, state_dir: str, args: Sequence[str], timeout: float = 240.0) -> Run:
    """``txvmbot check`` against ``url``; its JSON result parsed."""
    out = os.path.join(state_dir, "result.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = txvmbot_cmd(
        "check",
        "--endpoint",
        url,
        "--region",
        REGION,
        "--state-dir",
        state_dir,
        "--json",
        out,
        *args,
    )
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    result = None
    if os.path.exists(out):
        with open(out) as f:
            data = json.load(f)
        result = data[0] if isinstance(data, list) else data
    return Run(p.returncode, p.stdout, p.stderr, result)


def ec2(url: str) -> Any:
    import boto3

    return boto3.client(
        "ec2",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def leftovers(url: str, check_id: str | None = None) -> list[str]:
    """Everything txvmbot created on moto that is not terminated or deleted.
    With ``check_id``, only that check's."""
    c = ec2(url)
    mine = (
        [{"Name": "tag:txvmbot:check", "Values": [check_id]}]
        if check_id
        else [{"Name": "tag-key", "Values": ["txvmbot:check"]}]
    )
    left = []
    for r in c.describe_instances(Filters=mine)["Reservations"]:
        for i in r["Instances"]:
            if i["State"]["Name"] != "terminated":
                left.append(f"instance {i['InstanceId']} {i['State']['Name']}")
    prefix = f"txvmbot-{check_id}" if check_id else "txvmbot-"
    for k in c.describe_key_pairs()["KeyPairs"]:
        if k["KeyName"].startswith(prefix):
            left.append(f"keypair {k['KeyName']}")
    for g in c.describe_security_groups()["SecurityGroups"]:
        if g["GroupName"].startswith(prefix):
            left.append(f"group {g['GroupId']} {g['GroupName']}")
    for a in c.describe_addresses(Filters=mine)["Addresses"]:
        left.append(f"address {a.get('AllocationId')} {a.get('PublicIp')}")
    return left


def ssh_keypair(directory: str) -> tuple[str, str]:
    """An ed25519 key made by ssh-keygen: (private key path, public line)."""
    path = os.path.join(directory, "id_ed25519")
    if not os.path.exists(path):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, timeout=30
        )
    with open(path + ".pub") as f:
        return path, f.read().strip()
