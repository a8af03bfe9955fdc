"""Unit tests for suite specs: their validation, their JSON form in a daemon
job (what a client sends and the store keeps), and the live line on a
terminal."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.suite_specs import LOCAL, suite
from txvmbot.daemon import codec
from txvmbot.daemon.jobs import JobSpec
from txvmbot.errors import ConfigError
from txvmbot.jobs.suite.spec import Upload, command_for
from txvmbot.model import CheckSpec, Cloud

CLOUD = CheckSpec(cloud=Cloud("http://127.0.0.1:1/", "r", name="b"), image="ami-1")


def test_command_for_quotes_ids_and_leaves_other_braces() -> None:
    assert command_for("t={test}; echo ${t#*_}", ["a b"]) == "t='a b'; echo ${t#*_}"
    assert command_for("run {tests}", ["x", "y;z"]) == "run x 'y;z'"


def test_command_for_fills_the_paths_of_a_batch() -> None:
    got = command_for(
        "pytest --junitxml={junit} @{tests_file} {other}",
        ["a"],
        tests_file="/tmp/a b.tests",
        junit="/tmp/r.xml",
    )
    assert got == "pytest --junitxml=/tmp/r.xml @'/tmp/a b.tests' {other}"


def test_placeholders_say_how_a_batch_runs() -> None:
    assert suite(run="x {tests_file}", format="subunit").batched
    assert suite(run="x {tests_file}", format="subunit").uses_tests_file
    assert suite(run="x {tests} > {junit}", format="junit").batched
    assert not suite(run="x {test} > {junit}", format="junit").batched
    assert suite().group_key()("pkg.mod.C.t") == "pkg.mod.C"
    assert suite(group=False).group_key()("pkg.mod.C.t") is None
    assert suite(group_regex="pkg").group_key()("pkg.mod.C.t") == "pkg"


@pytest.mark.parametrize(
    "kw, where",
    [
        ({"run": "no placeholder"}, "--run"),
        ({"run": "run {tests}", "format": "exit"}, "--run"),
        ({"machines": 0}, "--machines"),
        ({"tests": (), "list_command": ""}, "--tests"),
        ({"list_command": "ls"}, "--tests"),
        ({"tests": ("a", "a")}, "--tests"),
        ({"test_timeout": 0.0}, "--test-timeout"),
        ({"name": "../x"}, "suite name"),
        ({"format": "tap"}, "--format"),
        ({"run": "run {tests_file}", "format": "exit"}, "--run"),
        ({"run": "run {tests} {tests_file}", "format": "subunit"}, "--run"),
        ({"run": "run {tests}", "format": "junit"}, "--run"),
        ({"run": "run {tests} {junit}", "format": "subunit"}, "--run"),
        ({"run": "run {tests}", "format": "subunit", "group_regex": "("}, "--group-regex"),
        ({"run": "run {tests}", "format": "subunit", "group_regex": "x", "group": False}, "--group-regex"),
    ],
)
def test_bad_suites_name_what_is_wrong(kw: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as e:
        suite(**kw)
    assert e.value.where == where


def test_a_runner_may_list_the_tests_itself() -> None:
    """With --runner and neither --tests nor --list, the runners list them;
    a --run suite still needs one of the two, and says how to give them."""
    s = suite(
        tests=(),
        list_command="",
        run="",
        runner="python3 {runner_py} --discover .",
        format="subunit",
    )
    assert (s.tests, s.list_command) == ((), "")
    with pytest.raises(ConfigError) as e:
        suite(tests=(), list_command="")
    assert "give the test ids with --tests FILE or --list CMD (or let a --runner list them)" in str(
        e.value
    )


@pytest.mark.parametrize("target", [CLOUD, LOCAL])
def test_a_suite_job_round_trips_through_its_json_form(target: Any) -> None:
    s = suite(
        target=target,
        machines=3,
        format="subunit",
        run="python -m subunit.run {tests}",
        uploads=(Upload("/src", "/dest"),),
        setup=("make",),
        test_timeout=12.5,
        bound=99.0,
        group_regex=r"^[^.]+\.[^.]+",
    )
    backend = "local" if target is LOCAL else "b"
    job = JobSpec(check=s, backend=backend, priority=3, bound=99.0)
    doc = codec.loads(codec.dumps(codec.spec_to_dict(job)), "spec")
    back = codec.spec_from_dict(doc)
    assert back == job
    assert back.instances == 3 and back.machines == target
    assert back.target.startswith("suite s on 3 x ")


def test_a_suite_without_groups_round_trips() -> None:
    job = JobSpec(check=suite(run="x {tests_file}", format="subunit", group=False), backend="local")
    assert codec.spec_from_dict(codec.loads(codec.dumps(codec.spec_to_dict(job)), "s")) == job


@given(st.lists(st.text(min_size=1, max_size=20).filter(lambda t: t.strip() == t and "\x00" not in t),
                min_size=1, max_size=20, unique=True))
def test_any_test_ids_survive_the_json_form(ids: list[str]) -> None:
    job = JobSpec(check=suite(tests=tuple(ids)), backend="local")
    assert codec.spec_from_dict(codec.loads(codec.dumps(codec.spec_to_dict(job)), "s")) == job


@pytest.mark.parametrize(
    "change, where",
    [
        ({"run": 3}, "job.suite.run"),
        ({"run": "nothing"}, "job.suite.run"),
        ({"machines": "3"}, "job.suite.machines"),
        ({"tests": "a"}, "job.suite.tests"),
        ({"uploads": [["only-one"]]}, "job.suite.uploads[0]"),
        ({"colour": "red"}, "job.suite.colour"),
        ({"format": "tap"}, "job.suite.format"),
        ({"group": "no"}, "job.suite.group"),
        ({"group_regex": "("}, "job.suite.group_regex"),
    ],
)
def test_bad_suite_tables_name_the_key(change: dict[str, Any], where: str) -> None:
    doc = codec.spec_to_dict(JobSpec(check=suite(), backend="local"))
    doc["suite"].update(change)
    with pytest.raises(ConfigError) as e:
        codec.spec_from_dict(doc)
    assert e.value.where == where


def test_a_suite_table_that_is_not_a_table() -> None:
    doc = codec.spec_to_dict(JobSpec(check=LOCAL, backend="local"))
    doc["suite"] = ["x"]
    with pytest.raises(ConfigError) as e:
        codec.spec_from_dict(doc)
    assert e.value.where == "job.suite"


class _Terminal:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_the_live_line_rewrites_one_line_on_a_terminal_only() -> None:
    from txvmbot.cli.suite import _LiveLine
    from txvmbot.jobs.suite.run import Progress, SlotState

    slots = (SlotState("worker-1", "i-1", "running t01"), SlotState("worker-2", "i-2", "idle"))
    term = _Terminal(tty=True)
    live = _LiveLine(term)  # type: ignore[arg-type]
    live(Progress(total=10, done=4, passed=3, failed=1, slots=slots, eta=12.4))
    live(Progress(total=10, done=5, passed=4, failed=1, slots=slots, eta=None))
    live.end()
    lines = term.text.split("\r")
    assert lines[1].startswith("4/10 done, 3 passed, 1 failed, ETA 12s | 1:running t01 2:idle")
    assert lines[2].startswith("5/10 done, 4 passed, 1 failed | ")
    assert term.text.endswith("\n") and term.text.count("\n") == 1

    pipe = _Terminal(tty=False)
    quiet = _LiveLine(pipe)  # type: ignore[arg-type]
    quiet(Progress(total=1, done=0, passed=0, failed=0, slots=slots, eta=None))
    quiet.end()
    assert pipe.text == ""
