"""``txvmbot check`` end to end: the real command against a real moto server
and a real OpenSSH sshd, both on loopback, started here and stopped by pid.

moto hands out instance addresses that are not ours; ssh is always pointed
at the loopback sshd through ``--ssh-endpoint``, never at them.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence

import pytest

from tests.support import checkrun
from tests.support.faultproxy import fault_proxy, read_log
from tests.support.servers import Moto, free_port
from tests.support.sshd import SSHD, sshd_server


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return checkrun.ssh_keypair(str(tmp_path_factory.mktemp("key")))


@pytest.fixture(scope="module")
def sshd(key: tuple[str, str]) -> Iterator[SSHD]:
    with sshd_server([key[1]]) as s:
        yield s


@pytest.fixture
def image(moto: Moto) -> str:
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


def ssh_args(key: tuple[str, str], endpoint: str) -> list[str]:
    return [
        "--ssh-key",
        key[0],
        "--ssh-user",
        os.environ.get("USER", "root") or "root",
        "--ssh-endpoint",
        endpoint,
    ]


FAST = ["--timeout-ssh", "20", "--timeout-running", "60"]


def test_full_lifecycle_passes_and_leaves_nothing(
    moto: Moto, sshd: SSHD, key: tuple[str, str], image: str, tmp_path: object
) -> None:
    state = str(tmp_path)
    run = checkrun.check(
        moto.url,
        state,
        [
            "--image",
            image,
            *ssh_args(key, sshd.endpoint),
            "--ssh-user",
            sshd.user,
            "--floating-ip",
            "--parallel",
            "2",
            "--command",
            "echo hello-from-guest",
            "--command",
            "id -u",
            *FAST,
        ],
    )
    assert run.code == 0, run.stderr
    assert run.result is not None and run.result["passed"] is True
    names = [s["name"] for s in run.result["steps"]]
    for step in (
        "keypair",
        "image",
        "security-group",
        "authorize-ssh",
        "run-instances",
        "wait-running",
        "floating-ip",
        "wait-ssh",
        "commands",
    ):
        assert step in names
    assert any(n.startswith("cleanup instances") for n in names)
    outputs = [c["stdout"] for c in run.result["commands"]]
    assert outputs.count("hello-from-guest\n") == 2
    facts = run.result["facts"]
    assert facts["guest_uname"].startswith("Linux")
    assert facts["endpoint"] == moto.url and facts["image_id"] == image
    assert facts["twisted_version"] and facts["botocore_version"] and facts["host_kernel"]
    assert {fp for _, fp in run.result["host_keys"]} == {sshd.host_key_fingerprint}
    assert checkrun.leftovers(moto.url, run.check_id) == []


def test_api_only_with_cloud_created_keypair(moto: Moto, image: str, tmp_path: object) -> None:
    run = checkrun.check(moto.url, str(tmp_path), ["--image", image, "--no-ssh", "--console"])
    assert run.code == 0, run.stderr
    assert run.result is not None
    # --console keeps the console log even when the check passes.
    assert run.result["console"] and run.result["evidence_dir"]
    assert os.listdir(run.result["evidence_dir"])
    assert checkrun.leftovers(moto.url, run.check_id) == []


def assert_failed_at(run: checkrun.Run, step: str, moto: Moto, console: bool = True) -> None:
    assert run.code == 1, (run.code, run.stderr)
    assert run.result is not None and run.result["passed"] is False
    assert run.failed_step() == step, run.result["steps"]
    assert step in run.result["error"]
    evidence = run.result["evidence_dir"]
    assert evidence and evidence in run.stdout + run.stderr
    if console:
        assert run.result["console"], "console log should be kept on failure"
        logs = [f for f in os.listdir(evidence) if f.startswith("console-")]
        assert logs
        with open(os.path.join(evidence, logs[0])) as f:
            assert f.read().strip()
    with open(os.path.join(evidence, "steps.txt")) as f:
        assert step in f.read()
    assert checkrun.leftovers(moto.url, run.check_id) == []


def test_unknown_image_fails_at_image_step(moto: Moto, tmp_path: object) -> None:
    run = checkrun.check(moto.url, str(tmp_path), ["--image", "ami-00000000", "--no-ssh"])
    assert_failed_at(run, "image", moto, console=False)


def test_refused_ssh_fails_at_wait_ssh(
    moto: Moto, key: tuple[str, str], image: str, tmp_path: object
) -> None:
    closed = f"tcp:host=127.0.0.1:port={free_port()}"
    run = checkrun.check(
        moto.url,
        str(tmp_path),
        ["--image", image, *ssh_args(key, closed), "--timeout-ssh", "3"],
    )
    assert_failed_at(run, "wait-ssh", moto)
    assert run.result is not None and "attempt" in run.result["error"]


def test_failing_command_fails_at_commands(
    moto: Moto, sshd: SSHD, key: tuple[str, str], image: str, tmp_path: object
) -> None:
    run = checkrun.check(
        moto.url,
        str(tmp_path),
        [
            "--image",
            image,
            *ssh_args(key, sshd.endpoint),
            "--ssh-user",
            sshd.user,
            "--command",
            "echo oops >&2; exit 7",
            *FAST,
        ],
    )
    assert_failed_at(run, "commands", moto)
    assert run.result is not None
    assert "exit status 7" in run.result["error"] and "oops" in run.result["error"]
    with open(os.path.join(run.result["evidence_dir"], "ssh-output.txt")) as f:
        assert "oops" in f.read()


def test_command_past_its_bound_times_out_at_commands(
    moto: Moto, sshd: SSHD, key: tuple[str, str], image: str, tmp_path: object
) -> None:
    # (moto answers "running" on the first poll, so wait-running cannot be
    # made to overrun here; a command that outlives its bound can.)
    run = checkrun.check(
        moto.url, str(tmp_path),
        ["--image", image, *ssh_args(key, sshd.endpoint), "--ssh-user", sshd.user,
         "--command", "echo started; sleep 60", "--timeout-command", "1.5", *FAST],
    )
    assert_failed_at(run, "commands", moto)
    assert run.result is not None
    assert "sleep 60" in run.result["error"] and "1.5" in run.result["error"]
    step = [s for s in run.result["steps"] if s["name"] == "commands"][0]
    assert step["duration"] < 30


def _wait_for_instances(url: str, deadline: float) -> list[str]:
    c = checkrun.ec2(url)
    while time.monotonic() < deadline:
        found = [
            i["Tags"]
            for r in c.describe_instances(
                Filters=[
                    {"Name": "tag-key", "Values": ["txvmbot:check"]},
                    {"Name": "instance-state-name", "Values": ["pending", "running"]},
                ]
            )["Reservations"]
            for i in r["Instances"]
        ]
        if found:
            return [t["Value"] for tags in found for t in tags if t["Key"] == "txvmbot:check"]
        time.sleep(0.2)
    raise AssertionError("the check never started an instance")


def _wait_for_associated_address(url: str, deadline: float) -> None:
    c = checkrun.ec2(url)
    while time.monotonic() < deadline:
        if any(a.get("InstanceId") for a in c.describe_addresses()["Addresses"]):
            return
        time.sleep(0.2)
    raise AssertionError("the check never associated an address")


def _start_hanging_check(
    moto: Moto, key: tuple[str, str], image: str, state: str, extra: Sequence[str] = ()
) -> subprocess.Popen[str]:
    closed = f"tcp:host=127.0.0.1:port={free_port()}"
    return subprocess.Popen(
        checkrun.txvmbot_cmd(
            "check",
            "--endpoint",
            moto.url,
            "--region",
            checkrun.REGION,
            "--state-dir",
            state,
            "--image",
            image,
            *ssh_args(key, closed),
            "--timeout-ssh",
            "120",
            *extra,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=checkrun.env(),
    )


@pytest.fixture
def fresh_moto(moto: Moto) -> Iterator[Moto]:
    """These tests look at everything txvmbot left, so start from nothing."""
    moto.reset()
    yield moto


@pytest.mark.parametrize(
    "extra", [[], ["--floating-ip", "--address-domain", "standard"]], ids=["plain", "classic-ip"]
)
def test_sigkill_then_reap_leaves_nothing(
    fresh_moto: Moto, key: tuple[str, str], tmp_path: object, extra: list[str]
) -> None:
    moto = fresh_moto
    image = sorted(
        i["ImageId"] for i in checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    )[0]
    state = str(tmp_path)
    proc = _start_hanging_check(moto, key, image, state, extra)
    try:
        _wait_for_instances(moto.url, time.monotonic() + 60)
        if extra:
            _wait_for_associated_address(moto.url, time.monotonic() + 60)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert checkrun.leftovers(moto.url), "the killed check should have left resources behind"
    if extra:
        assert all_addresses(moto.url), "and its classic address"
    reap = subprocess.run(
        checkrun.txvmbot_cmd(
            "reap", "--endpoint", moto.url, "--region", checkrun.REGION, "--state-dir", state
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env=checkrun.env(),
    )
    assert reap.returncode == 0, reap.stderr
    assert checkrun.leftovers(moto.url) == []
    # A classic address carries no tag: the journal's IP found it.
    assert all_addresses(moto.url) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_cleans_up_before_exit(
    fresh_moto: Moto, key: tuple[str, str], tmp_path: object, sig: signal.Signals
) -> None:
    moto = fresh_moto
    image = sorted(
        i["ImageId"] for i in checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    )[0]
    proc = _start_hanging_check(moto, key, image, str(tmp_path))
    try:
        _wait_for_instances(moto.url, time.monotonic() + 60)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode != 0
    assert "cancel" in (out + err).lower()
    assert checkrun.leftovers(moto.url) == []


def test_reap_dry_run_lists_without_removing(
    fresh_moto: Moto, key: tuple[str, str], tmp_path: object
) -> None:
    moto = fresh_moto
    c = checkrun.ec2(moto.url)
    c.create_key_pair(KeyName="txvmbot-orphan")
    reap = subprocess.run(
        checkrun.txvmbot_cmd(
            "reap",
            "--endpoint",
            moto.url,
            "--region",
            checkrun.REGION,
            "--state-dir",
            str(tmp_path),
            "--dry-run",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env=checkrun.env(),
    )
    assert reap.returncode == 0, reap.stderr
    assert "txvmbot-orphan" in reap.stdout + reap.stderr
    assert checkrun.leftovers(moto.url) == ["keypair txvmbot-orphan"]


@pytest.mark.parametrize("faults", ["throttle:6,503:9,drop:11,lost:4", "lost:2"])
def test_faulty_cloud_check_passes_and_leaks_nothing(
    moto: Moto, sshd: SSHD, key: tuple[str, str], image: str, tmp_path: object, faults: str
) -> None:
    """Throttling, 503s, dropped connections and answers lost after moto
    acted: retries carry the check through, each retry is logged, and what a
    lost answer made twice (moto ignores ClientToken) is cleaned up too."""
    log = os.path.join(str(tmp_path), "proxy.log")
    with fault_proxy(moto.url, faults, log_path=log) as url:
        run = checkrun.check(
            url, str(tmp_path),
            ["--image", image, *ssh_args(key, sshd.endpoint), "--ssh-user", sshd.user,
             "--floating-ip", "--command", "true", *FAST],
        )
    assert run.code == 0, run.stderr
    faulted = [entry for entry in read_log(log) if entry[1] != "forward"]
    assert faulted, "the proxy should have injected faults"
    assert run.stderr.count("retrying in") >= len(faulted) - 1
    # Whatever the proxy's lost answers made moto create twice is gone too:
    # look at moto directly, not through the proxy.
    assert checkrun.leftovers(moto.url, run.check_id) == []


# --- classic (EC2-Classic, Eucalyptus) addresses --------------------------------
#
# moto answers AllocateAddress Domain=standard with a PublicIp and no
# AllocationId, as Eucalyptus does. A classic address carries no tag, so
# checkrun.leftovers (by tag) cannot see it: these tests start from a fresh
# moto and look at every address it holds.


def all_addresses(url: str) -> list[str]:
    return [
        f"address {a.get('AllocationId')} {a['PublicIp']} {a.get('InstanceId')}"
        for a in checkrun.ec2(url).describe_addresses()["Addresses"]
    ]


def first_image(url: str) -> str:
    images = checkrun.ec2(url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


CLASSIC = ["--floating-ip", "--address-domain", "standard"]


def classic_ip_of(run: checkrun.Run) -> str:
    """The public IP the check journalled for its address: the only id a
    classic address has, shown in the name of its cleanup step."""
    assert run.result is not None, run.stderr
    steps = {s["name"]: s for s in run.result["steps"]}
    (name,) = [n for n in steps if n.startswith("cleanup address ")]
    ip = name.split()[-1]
    ipaddress.ip_address(ip)  # not an allocation id
    assert steps[name]["outcome"] == "passed", steps[name]
    assert steps[f"cleanup association {ip}"]["outcome"] == "passed"
    assert steps["floating-ip"]["outcome"] == "passed"
    assert steps["floating-ip"]["detail"].startswith(f"{ip} -> i-")
    return ip


def test_classic_floating_ip_lifecycle_leaves_nothing(fresh_moto: Moto, tmp_path: object) -> None:
    moto = fresh_moto
    run = checkrun.check(
        moto.url, str(tmp_path), ["--image", first_image(moto.url), "--no-ssh", *CLASSIC]
    )
    assert run.code == 0, run.stderr
    assert run.result is not None and run.result["passed"] is True, run.result
    classic_ip_of(run)
    assert checkrun.leftovers(moto.url, run.check_id) == []
    assert all_addresses(moto.url) == []


def test_classic_floating_ip_undone_after_failing_command(
    fresh_moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object
) -> None:
    moto = fresh_moto
    run = checkrun.check(
        moto.url,
        str(tmp_path),
        [
            "--image",
            first_image(moto.url),
            *ssh_args(key, sshd.endpoint),
            "--ssh-user",
            sshd.user,
            *CLASSIC,
            "--command",
            "exit 3",
            *FAST,
        ],
    )
    assert_failed_at(run, "commands", moto)
    classic_ip_of(run)
    assert all_addresses(moto.url) == []
