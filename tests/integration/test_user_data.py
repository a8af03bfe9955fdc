"""``--user-data FILE`` end to end against moto on loopback: through
``txvmbot check`` and through the daemon (``txvmbot submit``), the
instance's UserData (DescribeInstanceAttribute userData) is the file,
byte for byte; a file over EC2's 16 KB limit stops before any request."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import checkrun
from tests.support import real_daemon as D
from tests.support.servers import Moto

FAST = ["--no-ssh", "--timeout-poll-interval", "0.2", "--timeout-poll-max-interval", "0.5"]


@pytest.fixture
def image(moto: Moto) -> str:
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


def user_data_of(url: str, check_id: str) -> list[bytes]:
    """The UserData of every instance of the check, decoded."""
    c = checkrun.ec2(url)
    found = c.describe_instances(Filters=[{"Name": "tag:txvmbot:check", "Values": [check_id]}])
    out = []
    for r in found["Reservations"]:
        for i in r["Instances"]:
            attr = c.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")
            out.append(base64.b64decode(attr["UserData"]["Value"]))
    return out


def test_check_sends_the_file_as_user_data(moto: Moto, image: str, tmp_path: Path) -> None:
    ud = tmp_path / "init.yaml"
    ud.write_bytes("#cloud-config\nruncmd:\n  - [echo, 'héllo']\n".encode())
    run = checkrun.check(
        moto.url, str(tmp_path), ["--image", image, "--parallel", "2", "--user-data", str(ud), *FAST]
    )
    assert run.code == 0, run.stderr
    assert user_data_of(moto.url, run.check_id) == [ud.read_bytes()] * 2
    assert checkrun.leftovers(moto.url, run.check_id) == []


def test_check_refuses_a_file_over_16_kb_before_any_request(
    moto: Moto, image: str, tmp_path: Path
) -> None:
    ud = tmp_path / "big.sh"
    ud.write_bytes(b"#!/bin/sh\n" + b"#" * 16400)
    run = checkrun.check(moto.url, str(tmp_path), ["--image", image, "--user-data", str(ud), *FAST])
    assert run.code == 2, (run.code, run.stderr)
    assert run.result is None
    assert f"--user-data: {ud}: 16410 bytes is over the user data limit of 16384" in run.stderr
    missing = tmp_path / "nope"
    run = checkrun.check(moto.url, str(tmp_path), ["--image", image, "--user-data", str(missing)])
    assert run.code == 2 and f"--user-data: cannot read {missing}" in run.stderr


def test_submit_carries_user_data_through_the_daemon(
    moto: Moto, image: str, tmp_path: Path
) -> None:
    """Binary (gzip) user data survives the client, the job store and the
    worker: the daemon's instance gets the same bytes."""
    ud = tmp_path / "init.gz"
    ud.write_bytes(gzip.compress(b"#!/bin/sh\necho from-the-daemon\n", mtime=0))
    data = str(tmp_path / "data")
    with D.daemon(data, ["--workers", "1"]) as d:
        p = d.client("submit", "--wait", "--json", "-", "--endpoint", moto.url, "--region",
                     checkrun.REGION, "--image", image, "--user-data", str(ud), *FAST)
        assert p.returncode == 0, p.stdout + p.stderr
        job = json.loads(p.stdout)
        assert job["spec"]["user_data_base64"] == base64.b64encode(ud.read_bytes()).decode()
        check_id = job["result"]["check_id"]
        assert user_data_of(moto.url, check_id) == [ud.read_bytes()]
        # A file over the limit is refused by the client, naming the flag.
        big = tmp_path / "big"
        big.write_bytes(b"x" * 20000)
        p = d.client("submit", "--endpoint", moto.url, "--region", checkrun.REGION,
                     "--image", image, "--user-data", str(big))
        assert p.returncode == 2 and f"--user-data: {big}: 20000 bytes" in p.stderr, p.stderr
    assert checkrun.leftovers(moto.url, check_id) == []


def test_submit_to_a_local_pool_needs_text(tmp_path: Path) -> None:
    """Checked by the client before it connects: nothing listens here."""
    ud = tmp_path / "bin"
    ud.write_bytes(b"\x00\xff\xfe")
    p = subprocess.run(
        checkrun.txvmbot_cmd("submit", "--pool", "local", "--user-data", str(ud),
                             "--connect", f"unix:path={tmp_path}/none.sock"),
        capture_output=True, text=True, timeout=60, env=checkrun.env(),
    )
    assert p.returncode == 2, p.stderr
    assert f"--user-data: {ud} is not UTF-8 text" in p.stderr
    assert not os.path.exists(tmp_path / "none.sock")


def test_submit_to_a_pool_does_not_take_an_image(tmp_path: Path) -> None:
    """The pool's image is the daemon's (``image = "NAME"``), not the job's."""
    p = subprocess.run(
        checkrun.txvmbot_cmd("submit", "--pool", "local", "--image", "deb",
                             "--connect", f"unix:path={tmp_path}/none.sock"),
        capture_output=True, text=True, timeout=60, env=checkrun.env(),
    )
    assert p.returncode == 2 and "--image: set in the daemon's [pools.NAME]" in p.stderr, p.stderr
