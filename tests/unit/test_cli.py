"""Unit tests for the command line, run in process (tests/support/cli_runs.py)
with a fake Check and reap: exit codes, flags, output."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from tests.support.cli_runs import run
from txvmbot import cli
from txvmbot.cli import _CheckRun, _Exit, _Streams, build_parser, spec_from_args, state_dir_for
from txvmbot.errors import ConfigError
from txvmbot.model import (
    CheckResult,
    CheckSpec,
    Cloud,
    Credentials,
    Facts,
    ReapReport,
    StepEvent,
    StepResult,
    Timeouts,
)

BASE = ["check", "--endpoint", "http://127.0.0.1:1/", "--region", "r", "--image", "ami-1"]


def make_result(check_id: str, passed: bool, evidence: str | None = None) -> CheckResult:
    steps = [StepResult("keypair", 1000.0, 0.5, "passed")]
    if not passed:
        steps.append(StepResult("wait-running", 1000.5, 3.0, "timeout", "last seen: pending"))
    return CheckResult(
        check_id=check_id,
        passed=passed,
        steps=tuple(steps),
        facts=Facts(),
        error="" if passed else "step 'wait-running' failed: last seen: pending",
        evidence_dir=evidence,
    )


@attrs.define
class World:
    """What the fake Check, journal and reap saw and will answer."""

    outcomes: list[bool | Exception] = attrs.Factory(list)
    checks: list[Any] = attrs.Factory(list)
    journals: list[Any] = attrs.Factory(list)
    reaps: list[dict[str, Any]] = attrs.Factory(list)
    reap_report: ReapReport = ReapReport()


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[World]:
    w = World()

    class FakeCheck:
        def __init__(
            self,
            reactor: Any,
            spec: CheckSpec,
            *,
            journal: Any,
            observer: Callable[[StepEvent], None] | None = None,
            evidence_root: str | None = None,
            check_id: str | None = None,
        ) -> None:
            self.reactor, self.spec, self.journal = reactor, spec, journal
            self.observer, self.evidence_root = observer, evidence_root
            self.check_id = check_id or f"fake{len(w.checks)}"
            self.cancelled: str | None = None
            w.checks.append(self)

        def run(self) -> Deferred[CheckResult]:
            outcome = w.outcomes.pop(0) if w.outcomes else True
            log = Logger(namespace="fake.check")
            log.info("fake info {n}", n=1)
            log.warn("fake warning {n}", n=2)
            if self.observer is not None:
                self.observer(StepEvent("keypair", "running", 1000.0))
                self.observer(StepEvent("keypair", "passed", 1000.5, "made it"))
            if isinstance(outcome, Exception):
                return fail(outcome)
            evidence = None if outcome else os.path.join(str(self.evidence_root), self.check_id)
            return succeed(make_result(self.check_id, outcome, evidence))

        def cancel(self, reason: str) -> None:
            self.cancelled = reason

    class FakeJournal:
        def __init__(self, path: str) -> None:
            self.path = path
            self.closed = False
            w.journals.append(self)

        def close(self) -> None:
            self.closed = True

    def reap(reactor: Any, cloud: Cloud, **kw: Any) -> Deferred[ReapReport]:
        w.reaps.append(dict(kw, cloud=cloud))
        return succeed(w.reap_report)

    scenario = types.ModuleType("txvmbot.jobs.smoke")
    scenario.Check = FakeCheck  # type: ignore[attr-defined]
    scenario.LocalCheck = FakeCheck  # type: ignore[attr-defined]
    journal = types.ModuleType("txvmbot.journal")
    journal.SQLiteJournal = FakeJournal  # type: ignore[attr-defined]
    reaper = types.ModuleType("txvmbot.ec2.reaper")
    reaper.reap = reap  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "txvmbot.jobs.smoke", scenario)
    monkeypatch.setitem(sys.modules, "txvmbot.journal", journal)
    monkeypatch.setitem(sys.modules, "txvmbot.ec2.reaper", reaper)
    yield w


# --- exit codes ------------------------------------------------------------


def test_passing_check_exits_0(world: World, tmp_path: Any) -> None:
    state = tmp_path / "state"
    r = run([*BASE, "--state-dir", str(state)], tmp_path)
    assert r.code == 0, r.stderr
    assert "PASSED check fake0" in r.stdout
    # The plain-line renderer saw the events: one line, the bare start held back.
    assert "keypair  passed (0.5s)  made it" in r.stdout
    assert "keypair  running" not in r.stdout
    (check,) = world.checks
    assert check.spec.image == "ami-1" and check.spec.cloud.endpoint == "http://127.0.0.1:1/"
    assert check.evidence_root == str(state / "evidence")
    assert world.journals[0].path == str(state / "journal.sqlite")
    assert world.journals[0].closed
    for d in (state, state / "evidence"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_failing_check_exits_1(world: World, tmp_path: Any) -> None:
    world.outcomes = [False]
    r = run([*BASE, "--state-dir", str(tmp_path / "s")], tmp_path)
    assert r.code == 1
    assert "FAILED check fake0" in r.stdout
    assert "failing step: wait-running (timeout after 3.0s)" in r.stdout
    assert "last seen: pending" in r.stdout
    assert f"evidence: {tmp_path / 's' / 'evidence' / 'fake0'}" in r.stdout


def test_broken_check_exits_1(world: World, tmp_path: Any) -> None:
    world.outcomes = [RuntimeError("a bug")]
    r = run([*BASE, "--state-dir", str(tmp_path / "s")], tmp_path)
    assert r.code == 1
    assert "internal error: a bug" in r.stdout
    assert "a bug" in r.stderr  # logged with its traceback


def test_logs_warnings_to_stderr_and_info_with_v(world: World, tmp_path: Any) -> None:
    r = run([*BASE, "--state-dir", str(tmp_path)], tmp_path)
    assert "fake warning 2" in r.stderr and "fake info" not in r.stderr
    assert "fake" not in r.stdout.replace("fake0", "")
    r = run([*BASE, "--state-dir", str(tmp_path), "-v"], tmp_path)
    assert "fake info 1" in r.stderr


def test_default_state_dir(world: World, tmp_path: Any) -> None:
    r = run(BASE, tmp_path, env={"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "x")})
    assert r.code == 0
    assert world.journals[0].path == str(tmp_path / "x" / "txvmbot" / "journal.sqlite")


@pytest.mark.parametrize(
    "extra, flag, words",
    [
        (["--parallel", "0"], "--parallel", "must be at least 1, got 0"),
        (["--repeat", "0"], "--repeat", "must be at least 1, got 0"),
        (["--timeout-running", "-5"], "--timeout-running", "greater than 0"),
        (["--timeout-ssh", "nan"], "--timeout-ssh", "finite"),
        (["--ssh-cidr", "10.0.0.300/8"], "--ssh-cidr", "CIDR"),
        (["--address-domain", "classic"], "--address-domain", '"vpc" or "standard"'),
        (["--ssh-endpoint", "tcp:host={ip}"], "--ssh-endpoint", "{public_ip}"),
        (["--endpoint", "ec2.example.com"], "--endpoint", "http(s) URL"),
        (["--command", ""], "--command", "non-empty"),
        (["--cloud", "prod"], "--cloud", "--config"),
        (["--config", "/nonexistent/c.toml"], "--config", "/nonexistent/c.toml"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    world: World, tmp_path: Any, extra: list[str], flag: str, words: str
) -> None:
    r = run([*BASE, "--state-dir", str(tmp_path), *extra], tmp_path)
    assert r.code == 2
    assert r.stderr.startswith(f"txvmbot check: error: {flag}: "), r.stderr
    assert words in r.stderr
    assert world.checks == []


def test_missing_endpoint_and_image(world: World, tmp_path: Any) -> None:
    r = run(["check", "--region", "r", "--image", "a"], tmp_path)
    assert (r.code, "--endpoint: required" in r.stderr) == (2, True)
    r = run(["check", "--endpoint", "http://h/", "--region", "r"], tmp_path)
    assert r.code == 2 and "--image: an image is required" in r.stderr


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["check", "--parallel", "x"],
        ["check", "--image", "a", "--image-name", "b"],
    ],
)
def test_usage_errors_exit_2(world: World, tmp_path: Any, argv: list[str]) -> None:
    r = run(argv, tmp_path)
    assert r.code == 2
    assert "usage: txvmbot" in r.stderr


def test_bad_config_key_exits_2(world: World, tmp_path: Any) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[clouds.prod]\nendpoint = "http://h/"\nregion = "r"\n[clouds.prod.timeouts]\nrunning = true\n'
    )
    r = run(["check", "--config", str(config), "--image", "a"], tmp_path)
    assert r.code == 2
    assert "clouds.prod.timeouts.running: expected a number of seconds" in r.stderr
    assert str(config) in r.stderr


# --- flags and config into a CheckSpec --------------------------------------


def spec_of(argv: list[str], environ: dict[str, str] | None = None) -> CheckSpec:
    args = build_parser().parse_args(argv)
    chosen, _ = cli._load_cloud_config(args)
    return spec_from_args(args, environ or {}, chosen)


def test_flags_to_check_spec() -> None:
    spec = spec_of(
        [
            "check",
            "--endpoint",
            "https://ec2.example.com/",
            "--region",
            "eu",
            "--image-name",
            "debian-*",
            "--image-owner",
            "123",
            "--instance-type",
            "m1.small",
            "--ssh-user",
            "debian",
            "--ssh-key",
            "/k",
            "--ssh-endpoint",
            "tcp:host=127.0.0.1:port=22",
            "--ssh-cidr",
            "203.0.113.7",
            "--command",
            "uname -a",
            "--command",
            "id",
            "--floating-ip",
            "--address-domain",
            "standard",
            "--parallel",
            "2",
            "--console",
            "--no-ssh",
            "--signature-version",
            "v2",
            "--profile",
            "p",
            "--timeout-running",
            "60",
            "--timeout-ssh",
            "30.5",
        ],
        {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"},
    )
    cloud = Cloud(
        endpoint="https://ec2.example.com/", region="eu", signature_version="v2", profile="p"
    )
    assert spec == CheckSpec(
        cloud=cloud,
        image_name="debian-*",
        image_owner="123",
        instance_type="m1.small",
        ssh_user="debian",
        ssh_key="/k",
        ssh_endpoint="tcp:host=127.0.0.1:port=22",
        ssh_cidr="203.0.113.7/32",
        commands=("uname -a", "id"),
        floating_ip=True,
        address_domain="standard",
        parallel=2,
        console=True,
        ssh=False,
        timeouts=Timeouts(running=60.0, ssh=30.5),
    )


def test_defaults_and_env_credentials() -> None:
    spec = spec_of(BASE, {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"})
    assert spec == CheckSpec(
        cloud=Cloud("http://127.0.0.1:1/", "r", credentials=Credentials("A", "S")), image="ami-1"
    )


def test_flags_override_config(tmp_path: Any) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(
            """
            state_dir = "st"
            [clouds.prod]
            endpoint = "https://prod.example/"
            region = "one"
            image_name = "deb-*"
            parallel = 4
            floating_ip = true
            address_domain = "standard"
            commands = ["a", "b"]
            [clouds.prod.timeouts]
            running = 900
            [clouds.other]
            region = "x"
            """
        )
    )
    argv = ["check", "--config", str(config), "--cloud", "prod"]
    spec = spec_of([*argv, "--image", "ami-2", "--no-floating-ip", "--region", "two"])
    assert spec.cloud.name == "prod" and spec.cloud.region == "two"
    assert spec.cloud.endpoint == "https://prod.example/"
    assert (spec.image, spec.image_name) == ("ami-2", None)
    assert (spec.parallel, spec.floating_ip, spec.commands) == (4, False, ("a", "b"))
    assert spec.address_domain == "standard"
    flagged = spec_of([*argv, "--image", "ami-2", "--address-domain", "vpc"])
    assert flagged.address_domain == "vpc"
    assert spec.timeouts.running == 900.0
    with pytest.raises(ConfigError) as info:
        spec_of(["check", "--config", str(config), "--image", "a"])
    assert info.value.where == "--cloud" and "prod, other" in info.value.message


def test_state_dir_for() -> None:
    assert state_dir_for("/a", "/b", {}) == "/a"
    assert state_dir_for(None, "/b", {}) == "/b"
    assert state_dir_for(None, None, {"XDG_STATE_HOME": "/x", "HOME": "/h"}) == "/x/txvmbot"
    # A relative XDG_STATE_HOME is ignored, as the spec says.
    assert state_dir_for(None, None, {"XDG_STATE_HOME": "x", "HOME": "/h"}) == (
        "/h/.local/state/txvmbot"
    )


# --- output ----------------------------------------------------------------


def test_json_to_stdout_keeps_stdout_machine_readable(world: World, tmp_path: Any) -> None:
    world.outcomes = [False]
    r = run([*BASE, "--state-dir", str(tmp_path), "--json", "-"], tmp_path)
    assert r.code == 1
    (doc,) = json.loads(r.stdout)
    assert doc["check_id"] == "fake0" and doc["passed"] is False
    assert doc["failed_step"] == "wait-running"
    assert [s["name"] for s in doc["steps"]] == ["keypair", "wait-running"]
    assert isinstance(doc["steps"][0]["started"], float)
    assert "FAILED check fake0" in r.stderr


def test_json_to_file(world: World, tmp_path: Any) -> None:
    out = tmp_path / "r.json"
    r = run([*BASE, "--state-dir", str(tmp_path), "--json", str(out)], tmp_path)
    assert r.code == 0
    assert json.loads(out.read_text())[0]["passed"] is True
    assert f"JSON results written to {out}" in r.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_repeat(world: World, tmp_path: Any) -> None:
    world.outcomes = [True, False, True]
    r = run([*BASE, "--state-dir", str(tmp_path), "--repeat", "3", "--json", "-"], tmp_path)
    assert r.code == 1
    assert [c.check_id for c in world.checks] == ["fake0", "fake1", "fake2"]
    assert [d["passed"] for d in json.loads(r.stdout)] == [True, False, True]
    assert "check 2/3 fake1" in r.stderr
    assert "2/3 checks passed (67%), 1 failed" in r.stderr
    assert "keypair" in r.stderr.split("checks passed")[1]  # the p50/p95 table


def test_repeat_all_pass(world: World, tmp_path: Any) -> None:
    r = run([*BASE, "--state-dir", str(tmp_path), "--repeat", "2"], tmp_path)
    assert r.code == 0 and "2/2 checks passed (100%)" in r.stdout


# --- reap ------------------------------------------------------------------


def test_reap(world: World, tmp_path: Any) -> None:
    world.reap_report = ReapReport(found=("keypair txvmbot-x",), dry_run=True)
    r = run(
        [
            "reap",
            "--endpoint",
            "http://h/",
            "--region",
            "r",
            "--state-dir",
            str(tmp_path),
            "--older-than",
            "3600",
            "--dry-run",
        ],
        tmp_path,
    )
    assert r.code == 0, r.stderr
    (call,) = world.reaps
    assert (call["older_than"], call["dry_run"]) == (3600.0, True)
    assert call["cloud"].endpoint == "http://h/"
    assert call["journal"] is world.journals[0] and world.journals[0].closed
    assert "keypair txvmbot-x" in r.stdout


def test_reap_errors_exit_1(world: World, tmp_path: Any) -> None:
    world.reap_report = ReapReport(found=("instance i-1",), errors=("instance i-1: denied",))
    r = run(
        [
            "reap",
            "--endpoint",
            "http://h/",
            "--region",
            "r",
            "--state-dir",
            str(tmp_path),
            "--json",
            "-",
        ],
        tmp_path,
    )
    assert r.code == 1
    assert json.loads(r.stdout)["errors"] == ["instance i-1: denied"]


def test_reap_bad_older_than(world: World, tmp_path: Any) -> None:
    r = run(["reap", "--endpoint", "http://h/", "--region", "r", "--older-than", "-1"], tmp_path)
    assert r.code == 2 and "--older-than: must be at least 0" in r.stderr


# --- help ------------------------------------------------------------------


def help_of(argv: list[str]) -> str:
    out = io.StringIO()
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"], stdout=out, stderr=io.StringIO())
    assert info.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("command", ["check", "reap"])
def test_help_explains_every_flag(command: str) -> None:
    text = help_of([command])
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = subparsers.choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text, flag
        if action.option_strings and action.dest not in ("help", "verbose", "image", "image_name"):
            helptext = action.help or ""
            assert "default" in helptext or "required" in helptext, action.option_strings


def test_top_level_help_has_examples() -> None:
    text = help_of([])
    assert "examples:" in text
    assert text.count("txvmbot check ") >= 2 and "txvmbot reap " in text
    assert "exit status: 0 passed, 1 failed" in text


# --- shutdown waits for cleanup ----------------------------------------------


class SlowCheck:
    """Runs until cancelled; then cleans up for 5 (clock) seconds."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.check_id = "slow"
        self.d: Deferred[CheckResult] = Deferred()
        self.cancelled: str | None = None

    def run(self) -> Deferred[CheckResult]:
        return self.d

    def cancel(self, reason: str) -> None:
        self.cancelled = reason
        result = attrs.evolve(make_result("slow", False), error=f"cancelled: {reason}")
        self.clock.callLater(5, self.d.callback, result)


def test_shutdown_cancels_and_waits_for_cleanup(world: World, monkeypatch: Any) -> None:
    clock = Clock()
    slow: list[SlowCheck] = []

    def make(*a: Any, **kw: Any) -> SlowCheck:
        slow.append(SlowCheck(clock))
        return slow[-1]

    monkeypatch.setattr(sys.modules["txvmbot.jobs.smoke"], "Check", make)
    out, err = io.StringIO(), io.StringIO()
    exit = _Exit()
    runner = _CheckRun(
        clock,
        spec_of(BASE),
        repeat=3,
        journal=None,
        evidence_root="/e",
        streams=_Streams(out, err, "-"),
        exit=exit,
        handle_signals=False,
    )
    done = ensureDeferred(runner.run())
    assert not done.called
    waiting = runner.before_shutdown()
    assert waiting is not None
    assert slow[0].cancelled == "SIGINT/SIGTERM received"
    assert "cancelling" in err.getvalue()
    clock.advance(4)
    assert not waiting.called  # cleanup still running: the reactor must not stop yet
    clock.advance(1)
    assert waiting.called and done.called
    assert len(slow) == 1  # no further repeat once stopping
    assert exit.code == 1
    assert "FAILED check slow" in err.getvalue()
    assert "interrupted: 1 of 3 checks ran" in err.getvalue()
    assert json.loads(out.getvalue())[0]["error"] == "cancelled: SIGINT/SIGTERM received"
    # After the run, a shutdown has nothing to wait for.
    assert runner.before_shutdown() is None
