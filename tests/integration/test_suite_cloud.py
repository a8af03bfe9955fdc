"""``txvmbot suite`` end to end on the cloud backend: the real command against
a real moto server, every machine's ssh pointed at a real OpenSSH sshd on
loopback (never at an address moto hands out). The suite is a Python
unittest suite run with ``python -m subunit.run``, uploaded over SFTP; the
merged stream is read back with python-subunit's own tools and the JUnit
XML with ElementTree."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from tests.support import checkrun
from tests.support.servers import Moto
from tests.support.sshd import SSHD, sshd_server
from tests.support.suite_runs import subunit_stats

SAMPLE = '''
import sys
import unittest


class Arithmetic(unittest.TestCase):
    def test_add(self):
        self.assertEqual(1 + 1, 2)

    def test_sub(self):
        self.assertEqual(3 - 1, 2)

    def test_wrong(self):
        self.assertEqual(2 * 2, 5, "two times two")


class Noisy(unittest.TestCase):
    def test_prints_to_stdout(self):
        # Seed 002: stdout is global state; these bytes are not subunit.
        sys.stdout.buffer.write(b"garbage \\xb3\\x00 on stdout\\n")
        sys.stdout.flush()

    def test_skip(self):
        self.skipTest("not here")

    def test_mul(self):
        self.assertEqual(2 * 3, 6)
'''

LISTER = (
    "import unittest\n"
    "def walk(s):\n"
    "    for t in s:\n"
    "        yield from (walk(t) if isinstance(t, unittest.TestSuite) else [t.id()])\n"
    "print('\\n'.join(walk(unittest.defaultTestLoader.discover('.'))))\n"
)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return checkrun.ssh_keypair(str(tmp_path_factory.mktemp("key")))


@pytest.fixture(scope="module")
def sshd(key: tuple[str, str]) -> Iterator[SSHD]:
    with sshd_server([key[1]]) as s:
        yield s


def image_of(moto: Moto) -> str:
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


def suite_cli(moto: Moto, sshd: SSHD, key: tuple[str, str], state: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        checkrun.txvmbot_cmd(
            "suite",
            "--endpoint",
            moto.url,
            "--region",
            checkrun.REGION,
            "--image",
            image_of(moto),
            "--ssh-key",
            key[0],
            "--ssh-user",
            sshd.user,
            "--ssh-endpoint",
            sshd.endpoint,
            "--timeout-ssh",
            "20",
            "--timeout-running",
            "60",
            "--state-dir",
            state,
            "--test-timeout",
            "60",
            *args,
        ),
        env=checkrun.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_subunit_suite_on_the_cloud_backend(
    moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object
) -> None:
    base = str(tmp_path)
    src = os.path.join(base, "src")
    os.makedirs(src)
    with open(os.path.join(src, "test_sample.py"), "w") as f:
        f.write(textwrap.dedent(SAMPLE))
    with open(os.path.join(src, "lister.py"), "w") as f:
        f.write(LISTER)
    # The "machines" are sshd on this host: each gets its own upload dir.
    remote = os.path.join(base, "remote")
    os.makedirs(remote)
    py = shlex.quote(sys.executable)
    dest = os.path.join(remote, "suite")
    state = os.path.join(base, "state")
    out = {n: os.path.join(base, n) for n in ("r.json", "r.subunit", "r.xml")}
    proc = suite_cli(
        moto, sshd, key, state,
        "--name", "sample",
        "--machines", "2",
        "--upload", f"{src}:{dest}",
        "--setup", f"test -f {shlex.quote(dest)}/test_sample.py",
        "--list", f"cd {shlex.quote(dest)} && {py} lister.py",
        "--run", f"cd {shlex.quote(dest)} && {py} -m subunit.run {{tests}}",
        "--format", "subunit",
        "--json", out["r.json"],
        "--subunit", out["r.subunit"],
        "--junit", out["r.xml"],
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_wrong fails
    with open(out["r.json"]) as f:
        doc = json.load(f)
    by_id = {t["test_id"]: t for t in doc["tests"]}
    ids = {f"test_sample.{c}.{m}" for c, m in (
        ("Arithmetic", "test_add"),
        ("Arithmetic", "test_sub"),
        ("Arithmetic", "test_wrong"),
        ("Noisy", "test_prints_to_stdout"),
        ("Noisy", "test_skip"),
        ("Noisy", "test_mul"),
    )}
    assert set(by_id) == ids
    assert by_id["test_sample.Arithmetic.test_wrong"]["outcome"] == "failed"
    assert "two times two" in by_id["test_sample.Arithmetic.test_wrong"]["output"]
    assert by_id["test_sample.Noisy.test_skip"]["outcome"] == "skipped"
    noisy = by_id["test_sample.Noisy.test_prints_to_stdout"]
    assert noisy["outcome"] == "passed" and "garbage" in noisy["output"]
    for t in ("test_add", "test_sub"):
        assert by_id[f"test_sample.Arithmetic.{t}"]["outcome"] == "passed"
    assert {t["worker"] for t in doc["tests"]} <= {"worker-1", "worker-2"}
    assert doc["summary"]["counts"]["failed"] == 1
    assert "end_spread" in doc["summary"] and doc["summary"]["makespan"] > 0
    assert "end spread" in proc.stdout

    # The merged stream, read back by python-subunit's own tools.
    subunit_bin = os.path.join(os.path.dirname(sys.executable), "subunit-ls")
    with open(out["r.subunit"], "rb") as f:
        listed = subprocess.run(
            [subunit_bin], stdin=f, capture_output=True, text=True, timeout=60
        ).stdout.split()  # it exits 1: the stream has a failure
    assert set(listed) == ids
    figures = subunit_stats(out["r.subunit"])
    assert figures["Total tests"] == "6" and figures["Failed tests"] == "1"
    assert figures["Seen tags"] in ("worker-1, worker-2", "worker-1", "worker-2")

    # JUnit XML, as Jenkins reads it.
    root = ET.parse(out["r.xml"]).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 6
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["test_wrong"]
    assert all(float(c.get("time") or "-1") >= 0 for c in cases)

    # The durations were kept for the next run, and nothing is left on moto.
    with open(os.path.join(state, "suites", "sample.durations.json")) as f:
        assert set(json.load(f)["durations"]) == ids
    assert checkrun.leftovers(moto.url, doc["summary"]["check_id"]) == []
    # The failing test's evidence is kept.
    evidence = doc["summary"]["evidence_dir"]
    assert evidence and os.listdir(os.path.join(evidence, "tests"))


PYTEST_SAMPLE = '''
import pytest


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


class TestMath:
    def test_add(self):
        assert 1 + 1 == 2

    def test_wrong(self):
        assert 2 * 2 == 5, "two times two"

    @pytest.mark.parametrize("a, b", [(1, 2), (3, 4)])
    def test_pairs(self, a, b):
        assert a < b

    def test_setup_error(self, broken):
        pass


class TestMore:
    def test_skip(self):
        pytest.skip("not here")

    def test_prints(self):
        print("hello from a test")


def test_function():
    assert True
'''


def test_a_pytest_suite_through_junit_xml(
    moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object
) -> None:
    """A real pytest run per batch, its ids in a file ({tests_file}, read by
    pytest's @file), its results read back from the JUnit XML it writes to
    {junit}, fetched over SFTP."""
    base = str(tmp_path)
    # The "machines" are sshd on this host and share its file system: the
    # suite is written where both find it (an --upload of one tree to one
    # place twice would nest the second copy).
    src = os.path.join(base, "remote", "suite")
    os.makedirs(os.path.join(src, "tests"))
    with open(os.path.join(src, "tests", "test_sample.py"), "w") as f:
        f.write(textwrap.dedent(PYTEST_SAMPLE))
    py = shlex.quote(sys.executable)
    dest = shlex.quote(src)
    out = os.path.join(base, "r.json")
    xml = os.path.join(base, "r.xml")
    proc = suite_cli(
        moto, sshd, key, os.path.join(base, "state"),
        "--name", "pysample",
        "--machines", "2",
        "--list", f"cd {dest} && {py} -m pytest -p no:cacheprovider --collect-only -q | grep ::",
        "--run", f"cd {dest} && {py} -m pytest -p no:cacheprovider -q --junitxml={{junit}} @{{tests_file}}",
        "--format", "junit",
        "--no-group",
        "--json", out,
        "--junit", xml,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # test_wrong fails
    with open(out) as f:
        doc = json.load(f)
    by_id = {t["test_id"]: t for t in doc["tests"]}
    base_id = "tests/test_sample.py::"
    expected = {
        "TestMath::test_add": "passed",
        "TestMath::test_wrong": "failed",
        "TestMath::test_pairs[1-2]": "passed",
        "TestMath::test_pairs[3-4]": "passed",
        "TestMath::test_setup_error": "failed",
        "TestMore::test_skip": "skipped",
        "TestMore::test_prints": "passed",
        "test_function": "passed",
    }
    assert {k: v["outcome"] for k, v in by_id.items()} == {base_id + k: v for k, v in expected.items()}
    wrong = by_id[base_id + "TestMath::test_wrong"]
    assert "two times two" in wrong["message"] + wrong["output"]
    assert "fixture broke" in by_id[base_id + "TestMath::test_setup_error"]["output"]
    assert {t["worker"] for t in doc["tests"]} == {"worker-1", "worker-2"}
    # Every report was fetched and removed; no id list is left behind.
    assert not [n for n in os.listdir("/tmp") if n.startswith(f"txvmbot-{doc['summary']['check_id']}")]
    # JUnit out: pytest's names, as Jenkins shows them.
    cases = {(c.get("classname"), c.get("name")) for c in ET.parse(xml).getroot().iter("testcase")}
    assert ("tests.test_sample.TestMath", "test_pairs[1-2]") in cases
    assert ("tests.test_sample", "test_function") in cases
    assert checkrun.leftovers(moto.url, doc["summary"]["check_id"]) == []


def test_a_junit_command_that_writes_no_report_fails_its_tests_with_the_reason(
    moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object
) -> None:
    base = str(tmp_path)
    tests_path = os.path.join(base, "ids")
    with open(tests_path, "w") as f:
        f.write("a.b.C.test_one\na.b.C.test_two\n")
    out = os.path.join(base, "r.json")
    proc = suite_cli(
        moto, sshd, key, os.path.join(base, "state"),
        "--tests", tests_path,
        "--run", "echo would write {junit} for {tests}; exit 3",
        "--format", "junit",
        "--json", out,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    with open(out) as f:
        doc = json.load(f)
    assert {t["test_id"] for t in doc["tests"]} == {"a.b.C.test_one", "a.b.C.test_two"}
    for t in doc["tests"]:
        assert t["outcome"] == "failed"
        assert "the command wrote no JUnit XML to /tmp/txvmbot-" in t["message"]
        assert "exit status 3" in t["message"]
        assert "would write /tmp/txvmbot-" in t["output"]


TRIAL_SAMPLE = '''
from twisted.internet import defer, task
from twisted.trial import unittest


class Deferreds(unittest.TestCase):
    def test_fires(self):
        return task.deferLater(__import__("twisted.internet.reactor").internet.reactor, 0.01, lambda: None)

    def test_fails(self):
        return defer.fail(ValueError("deferred went wrong"))

    def test_skipped(self):
        raise unittest.SkipTest("not today")


class Plain(unittest.SynchronousTestCase):
    def test_one(self):
        self.assertEqual(1, 1)

    def test_two(self):
        self.assertTrue(True)
'''


@pytest.mark.parametrize("kind", ["unittest", "trial", "pytest"])
def test_a_long_lived_runner_per_machine(
    moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object, kind: str
) -> None:
    """--runner with txvmbot's own runner ({runner_py}), uploaded over SFTP
    and started once a machine; batches go in on its stdin (for pytest: one
    session a machine, collected once, as an xdist worker)."""
    base = str(tmp_path)
    src = os.path.join(base, "remote", "suite")
    os.makedirs(src)
    module = {"unittest": "test_sample", "trial": "test_trialsample", "pytest": "tests/test_sample.py:"}[kind]
    sample = {"unittest": SAMPLE, "trial": TRIAL_SAMPLE, "pytest": PYTEST_SAMPLE}[kind]
    path = os.path.join(src, "tests", "test_sample.py") if kind == "pytest" else os.path.join(src, f"{module}.py")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(sample))
    py = shlex.quote(sys.executable)
    flag = {"unittest": "", "trial": " --trial", "pytest": " --pytest tests"}[kind]
    if kind == "pytest":
        names = [":TestMath::test_add", ":TestMath::test_wrong", ":TestMath::test_pairs[3-4]",
                 ":TestMath::test_setup_error", ":TestMore::test_skip", ":TestMore::test_prints"]
        outcomes = ["passed", "failed", "passed", "failed", "skipped", "passed"]
    elif kind == "unittest":
        names = ["Arithmetic.test_add", "Arithmetic.test_sub", "Arithmetic.test_wrong",
                 "Noisy.test_prints_to_stdout", "Noisy.test_skip", "Noisy.test_mul"]
        outcomes = ["passed", "passed", "failed", "passed", "skipped", "passed"]
    else:
        names = ["Deferreds.test_fires", "Deferreds.test_fails", "Deferreds.test_skipped",
                 "Plain.test_one", "Plain.test_two"]
        outcomes = ["passed", "failed", "skipped", "passed", "passed"]
    if kind == "pytest":
        ids = [f"{module}{n}" for n in names] + [f"{module}:Nowhere::test_missing"]
    else:
        ids = [f"{module}.{n}" for n in names] + [f"{module}.Nowhere.test_missing"]
    tests_path = os.path.join(base, "ids")
    with open(tests_path, "w") as f:
        f.write("\n".join(ids) + "\n")
    out = os.path.join(base, "r.json")
    proc = suite_cli(
        moto, sshd, key, os.path.join(base, "state"),
        "--name", f"runner-{kind}",
        "--machines", "2",
        "--tests", tests_path,
        "--runner", f"cd {shlex.quote(src)} && {py} {{runner_py}}{flag}",
        "--format", "subunit",
        "--json", out,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    with open(out) as f:
        doc = json.load(f)
    by_id = {t["test_id"]: t for t in doc["tests"]}
    assert {i: by_id[i]["outcome"] for i in ids} == dict(
        zip(ids, [*outcomes, "failed"], strict=True)
    ), proc.stdout
    assert "Nowhere" in by_id[ids[-1]]["output"]  # the loader's own error
    # Every runner was stopped and its script removed with nothing left behind.
    check = doc["summary"]["check_id"]
    assert not [n for n in os.listdir("/tmp") if n.startswith(f"txvmbot-{check}") and n.endswith(".tests")]
    assert checkrun.leftovers(moto.url, check) == []


@pytest.mark.parametrize("kind", ["unittest", "trial", "pytest"])
def test_the_runners_list_the_tests_themselves(
    moto: Moto, sshd: SSHD, key: tuple[str, str], tmp_path: object, kind: str
) -> None:
    """--runner with neither --list nor --tests: every machine's runner
    lists the tests (unittest discovery, the names after --trial, what
    pytest collects) before the first batch, and all of them run."""
    base = str(tmp_path)
    src = os.path.join(base, "remote", "suite")
    files = {
        "unittest": ("test_sample.py", SAMPLE, "--discover ."),
        "trial": ("test_trialsample.py", TRIAL_SAMPLE, "--trial test_trialsample"),
        "pytest": ("tests/test_sample.py", PYTEST_SAMPLE, "--pytest tests"),
    }
    name, sample, args = files[kind]
    os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
    with open(os.path.join(src, name), "w") as f:
        f.write(textwrap.dedent(sample))
    out = os.path.join(base, "r.json")
    proc = suite_cli(
        moto, sshd, key, os.path.join(base, "state"),
        "--name", f"listing-{kind}",
        "--machines", "2",
        "--runner", f"cd {shlex.quote(src)} && {shlex.quote(sys.executable)} {{runner_py}} {args}",
        "--format", "subunit",
        "--json", out,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr  # each sample has a failing test
    with open(out) as f:
        doc = json.load(f)
    outcomes = {t["test_id"]: t["outcome"] for t in doc["tests"]}
    expected = {
        "unittest": {
            "test_sample.Arithmetic.test_add": "passed",
            "test_sample.Arithmetic.test_sub": "passed",
            "test_sample.Arithmetic.test_wrong": "failed",
            "test_sample.Noisy.test_mul": "passed",
            "test_sample.Noisy.test_prints_to_stdout": "passed",
            "test_sample.Noisy.test_skip": "skipped",
        },
        "trial": {
            "test_trialsample.Deferreds.test_fails": "failed",
            "test_trialsample.Deferreds.test_fires": "passed",
            "test_trialsample.Deferreds.test_skipped": "skipped",
            "test_trialsample.Plain.test_one": "passed",
            "test_trialsample.Plain.test_two": "passed",
        },
    }
    if kind == "pytest":
        assert len(outcomes) >= 6 and all(t.startswith("tests/test_sample.py::") for t in outcomes)
        assert outcomes["tests/test_sample.py::TestMath::test_wrong"] == "failed"
        assert outcomes["tests/test_sample.py::test_function"] == "passed"
    else:
        assert outcomes == expected[kind], proc.stdout
    assert checkrun.leftovers(moto.url, doc["summary"]["check_id"]) == []
