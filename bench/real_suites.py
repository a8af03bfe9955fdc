#!/usr/bin/env python
"""Benchmark: real test suites by other projects, each run by its own
parallel runner and by ``txvmbot suite`` on the same number of machines, in
one run (issue 15, item 5).

The suites, installed from PyPI (pinned: REQUIREMENTS below) into one
virtual environment of an unprivileged user (--user, created if missing;
never root: Twisted's own suite, run as root, chmods the host's /dev/null),
made from Debian's /usr/bin/python3 and cached under --cache, keyed by what
it holds (the first run makes it: about 5 minutes, not timed):

  trial     Twisted 26.10.0 (with its [test,tls] extras): twisted.test,
            twisted.python.test and twisted.protocols.test, 2,751 test ids
            (2,770 results: a few test classes are imported by two modules
            and run twice under one id; counted once here; 63 skip); native:
            ``python -m twisted.trial -jN --reporter=subunit`` (the reporter
            only makes its outcomes readable per test)
  pytest    python-dateutil 4.0.0's tests/ from its sdist (5,343 tests, run
            offline; 3 fail on this host's tzdata, as natively); native:
            ``pytest -n N`` (pytest-xdist) and plain ``pytest``, both with
            ``--junitxml``
  unittest  python-openstackclient 10.5.0's unit tests from its sdist (3,298
            testtools/unittest tests; the project runs them with stestr and
            ships the .stestr.conf whose test_path and group_regex are used
            here); native: ``stestr run --concurrency N``, first with a
            fresh .stestr repository (no recorded times), then again with
            the times of that run (stestr's own second run)

Everything a suite runs, native or txvmbot's, runs in an ssh session as that
user to ONE OpenSSH sshd the bench starts on 127.0.0.1 (logging in as that
user only), with the same shell prefix (the venv first on PATH, cd into the
suite's directory), so both sides see the same environment (HOME, who you
are, no terminal). Its ``python`` runs with no network: in a network
namespace of its own with only a loopback (an unprivileged user namespace,
mapped back to the user's uid; ~0.05 s a start), so no suite reaches
anything but itself (openstackclient's tests name a 192.168.x auth URL that
only their mocks may see); 15 of Twisted's tests skip for it, on both
sides. A native wall time is that of its ssh command, the session's setup
included (~0.1 s); its per-test report (stestr last, the JUnit file) is
fetched afterwards, untimed.

The txvmbot side is the real CLI, ``.venv/bin/txvmbot suite`` as a
subprocess, cloud backend against a moto server the bench starts on
127.0.0.1, --machines N (default 2), every machine's ssh endpoint pointed at
that sshd (so the N "machines" are N ssh sessions to this host, as in
bench/suite_spread.py; nothing is uploaded but txvmbot's own runner: the
suite is already there). Its wall time is the whole command: instances on
moto, ssh, listing the tests, every batch, cleanup. It runs in each of
--modes: ``runner``, one long-lived runner per machine fed batch after
batch on its stdin (``--runner 'python {runner_py} --trial PACKAGES |
--pytest ARGS | --discover DIR -t ./'``, subunit), whose runners list the
tests themselves (no --list: every runner loads its test modules while it
lists), and ``run``, a fresh command per batch (``--run`` with the batch's
ids in ``{tests_file}``: trial and subunit.run through subunit, pytest
through ``--format junit``), with --list on the first machine. In each mode the suite
runs twice with one fresh --state-dir: first with no recorded durations,
then with those the first recorded (<state>/suites/NAME.durations.json).
Each suite's flags, native and txvmbot's, are in one place below ("the
suites").

Figures per suite: the wall time of each native run and of both txvmbot
runs of each mode (median of --rounds rounds, default 1, and their range;
the order of the sides alternates between rounds); txvmbot / native
parallel (a txvmbot first run against the native runner's first run, a
second run against the runner's own second run where it keeps times,
stestr; trial and pytest keep none, so both compare with their one run);
second / first; passed / failed / skipped on each side (native: its
subunit v2 stream or JUnit XML read per test; txvmbot: its --json), checked
in every round, with each test whose outcome differs named; and txvmbot's
own summary (makespan, lower bound, the measured fixed cost per command,
end spread). Goals (issue 15):
txvmbot <= 1.10x the native parallel runner on every suite and both runs;
the second run at most 5% slower than the first; counts equal; judged per
mode (a RESULT line each, and one naming the modes that meet them all).
Outcomes are counted in txvmbot's words on both sides: an expected failure
(subunit's xfail; pytest's, which its JUnit XML writes as <skipped
type="pytest.xfail">) is passed, an unexpected success failed.

Machines here are the 2 cores of this host, shared by both "machines" and
the bench (and by whatever else runs on the host): wall times of the same
run vary by ~10-20% between runs, so one round is a rough figure; --rounds
3 takes about 20 minutes. Only 127.0.0.1 is used; sshd and moto are stopped
by their pid; every command is bounded (--timeout).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import _suites_env as E  # noqa: E402
from bench._common import REGION, pick_image, reproduce_line, table  # noqa: E402
from tests.support import checkrun  # noqa: E402
from tests.support.servers import Moto, moto_server  # noqa: E402
from tests.support.sshd import SSHD, sshd_server  # noqa: E402

WALL_GOAL = 1.10
SECOND_GOAL = 1.05

#: What is installed. Pinned: the runners and the suites, so that figures
#: of two runs compare; the suites' own test dependencies are left to pip.
REQUIREMENTS = E.Requirements(
    packages=(
        # [test]: hamcrest, hypothesis, ... (else 8 modules fail to import);
        # [tls]: pyOpenSSL, so that the TLS tests run instead of skipping
        "twisted[test,tls]==26.10.0",
        "pytest==9.2.0",
        "pytest-xdist==3.8.0",
        "stestr==4.2.1",
        "python-subunit==1.4.6",
        # python-dateutil's requirements-dev.txt (pytest-cov for its marks)
        "freezegun",
        "hypothesis",
        "pytest-cov",
        # python-openstackclient's test-requirements.txt, less tempest and
        # the coverage tools (its functional tests, not run here)
        "fixtures",
        "requests-mock",
        "testtools",
        "ddt",
        "osprofiler",
        "wrapt",
        "hacking>=8.0.0",
    ),
    sdists=("python-dateutil==4.0.0", "python-openstackclient==10.5.0"),
)

#: The packages whose versions name the suites in the output.
VERSIONED = ("twisted", "python-dateutil", "python-openstackclient")
TRIAL_PACKAGES = "twisted.test twisted.python.test twisted.protocols.test"


@attrs.frozen
class Native:
    """A native run: its label, the timed command, and the untimed command
    that prints its per-test report afterwards (or None when the timed one
    prints it: a subunit stream on stdout); ``read`` names the report's
    format. ``parallel``: the runner the goals compare with. ``second``:
    the runner's own second run, with what its first recorded."""

    label: str
    command: str
    read: str  # "subunit" or "junit"
    report: str | None = None
    parallel: bool = True
    second: bool = False


#: How txvmbot runs a batch: "run", a fresh command per batch (--run), or
#: "runner", one long-lived runner per machine fed batch after batch on its
#: stdin (--runner).
MODES = ("runner", "run")


@attrs.frozen
class Txvmbot:
    """The flags of ``txvmbot suite`` for a suite in one mode, less the
    target's: --list, the command (``--run`` or ``--runner``), --format and
    anything else (``flags``)."""

    list: str
    command: tuple[str, str]  # ("--run", CMD) or ("--runner", CMD)
    format: str
    flags: tuple[str, ...] = ()


@attrs.frozen
class Suite:
    """A suite: its --suites key, a title ({versions} filled in), the
    directory every command of it runs in, its native runs and its txvmbot
    flags."""

    key: str
    title: str
    directory: Callable[[E.Env], str]
    native: Callable[[E.Env, int], tuple[Native, ...]]
    txvmbot: Callable[[E.Env], dict[str, Txvmbot]]  # by mode
    #: a txvmbot test id as the native report names that test (pytest's
    #: node ids as its JUnit XML names them); the id itself by default
    key_of_id: Callable[[str], str] = attrs.field(default=str)


# --- the suites: each one's commands, native and txvmbot's, in one place ---------


def _trial_native(env: E.Env, n: int) -> tuple[Native, ...]:
    return (
        Native(
            f"trial -j{n}",
            f"rm -rf _trial_temp* && python -m twisted.trial -j{n} --reporter=subunit {TRIAL_PACKAGES} | subunit-1to2",
            "subunit",
        ),
    )


def _trial_txvmbot(env: E.Env) -> dict[str, Txvmbot]:
    listing = f"python -m twisted.trial --reporter=subunit -n {TRIAL_PACKAGES} | subunit-1to2 | subunit-ls --exists"
    return {
        "run": Txvmbot(
            listing,
            ("--run", "xargs -d '\\n' -a {tests_file} python -m twisted.trial --reporter=subunit | subunit-1to2"),
            "subunit",
        ),
        # the runners list the tests themselves (no --list)
        "runner": Txvmbot("", ("--runner", f"python {{runner_py}} --trial {TRIAL_PACKAGES}"), "subunit"),
    }


def _pytest_native(env: E.Env, n: int) -> tuple[Native, ...]:
    out = os.path.join(env.work, "pytest-native.xml")
    report = f"cat {shlex.quote(out)} && rm -f {shlex.quote(out)}"
    base = f"python -m pytest -q -p no:cacheprovider --junitxml={shlex.quote(out)}"
    return (
        Native(f"pytest -n {n}", f"{base} -n {n} tests", "junit", report),
        Native("pytest (plain)", f"{base} tests", "junit", report, parallel=False),
    )


def _pytest_txvmbot(env: E.Env) -> dict[str, Txvmbot]:
    listing = "python -m pytest --collect-only -q -p no:cacheprovider tests | grep '::'"
    return {
        "run": Txvmbot(
            listing,
            ("--run", "python -m pytest -q -p no:cacheprovider --junitxml={junit} @{tests_file}"),
            "junit",
        ),
        # one pytest session a machine: collects once, runs what it is sent
        "runner": Txvmbot("", ("--runner", "python {runner_py} --pytest -p no:cacheprovider tests"), "subunit"),
    }


def _unittest_native(env: E.Env, n: int) -> tuple[Native, ...]:
    # python -m: stestr starts its workers with its own interpreter, so
    # they run without network too (bench/_suites_env.py).
    run = f"python -m stestr run --concurrency {n} >/dev/null"
    last = "python -m stestr last --subunit"
    return (
        Native(f"stestr --concurrency {n}", f"rm -rf .stestr && {run}", "subunit", last),
        Native(f"stestr --concurrency {n}, 2nd", run, "subunit", last, second=True),
    )


#: python-openstackclient's .stestr.conf: test_path and group_regex.
OSC_TESTS = "./openstackclient/tests/unit"
OSC_GROUP = r"([^\.]+\.)+"


def _unittest_txvmbot(env: E.Env) -> dict[str, Txvmbot]:
    listing = f"python -m subunit.run discover -t ./ {OSC_TESTS} --list | subunit-ls --exists"
    group = ("--group-regex", OSC_GROUP)
    return {
        # Named ids load only their modules; --load-list would discover (and
        # import) the whole tree in every batch (~3 s here).
        "run": Txvmbot(listing, ("--run", "xargs -d '\\n' -a {tests_file} python -m subunit.run"), "subunit", group),
        "runner": Txvmbot("", ("--runner", f"python {{runner_py}} --discover {OSC_TESTS} -t ./"), "subunit", group),
    }


SUITES = {
    s.key: s
    for s in (
        Suite(
            "trial",
            f"Twisted {{twisted}} trial: {TRIAL_PACKAGES}",
            lambda env: os.path.join(env.work, "trial"),
            _trial_native,
            _trial_txvmbot,
        ),
        Suite(
            "pytest",
            "python-dateutil {python-dateutil} tests/ (pytest)",
            lambda env: env.source("python-dateutil==4.0.0"),
            _pytest_native,
            _pytest_txvmbot,
            E.pytest_junit_key,
        ),
        Suite(
            "unittest",
            "python-openstackclient {python-openstackclient} unit tests (unittest, stestr upstream)",
            lambda env: env.source("python-openstackclient==10.5.0"),
            _unittest_native,
            _unittest_txvmbot,
        ),
    )
}


# --- running -------------------------------------------------------------------


@attrs.frozen
class Measured:
    """One run of one side: its label, wall time, outcomes per test (keyed
    as the native report names tests), and txvmbot's summary if it is one."""

    label: str
    wall: float
    outcomes: dict[str, str]
    native: Native | None = None
    summary: dict[str, Any] | None = None
    mode: str | None = None  # txvmbot's: "run" or "runner"
    which: str = ""  # txvmbot's: "1st" or "2nd"

    @property
    def counts(self) -> E.Counts:
        return E.Counts.of(self.outcomes)


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        env: E.Env,
        remote: E.Remote,
        sshd: SSHD | None,
        moto: Moto | None,
        image: str | None,
        tmp: str,
    ) -> None:
        self.args = args
        self.env = env
        self.remote = remote
        self.sshd = sshd
        self.moto = moto
        self.image = image
        self.tmp = tmp
        self.check_ids: list[str] = []

    def native(self, suite: Suite, run: Native) -> Measured:
        prefix = self.env.session(suite.directory(self.env))
        print(f"  {suite.key}: {run.label} ...", end="", flush=True)
        ran = self.remote.run(prefix + run.command, timeout=self.args.timeout)
        report = ran.stdout
        if run.report is not None:
            got = self.remote.run(prefix + run.report, timeout=120)
            report = got.stdout
            if got.code != 0 or not report:
                raise E.BenchError(f"{suite.key} {run.label}: no report (exit {got.code}):\n{got.tail()}")
        outcomes, results = (E.subunit_outcomes if run.read == "subunit" else E.junit_outcomes)(report)
        if not outcomes:
            raise E.BenchError(f"{suite.key} {run.label}: no test ran (exit {ran.code}):\n{ran.tail()}")
        print(f" {ran.wall:.1f}s, exit {ran.code}, {results} results for {len(outcomes)} test ids", flush=True)
        return Measured(run.label, ran.wall, outcomes, native=run)

    def round(self, suite: Suite, native_first: bool) -> list[Measured]:
        """Every run of ``suite`` once: the native runs, then txvmbot's
        first and second run on a fresh state dir (or txvmbot first, to
        even out drift across rounds); returned natives first either way."""
        natives: list[Measured] = []
        ours: list[Measured] = []

        def run_natives() -> None:
            if "native" in self.args.sides:
                natives.extend(self.native(suite, n) for n in suite.native(self.env, self.args.machines))

        def run_ours() -> None:
            if "txvmbot" in self.args.sides:
                for mode in self.args.modes:
                    state = tempfile.mkdtemp(prefix=f"state-{suite.key}-{mode}-", dir=self.tmp)
                    ours.append(self.txvmbot(suite, mode, state, "1st"))
                    ours.append(self.txvmbot(suite, mode, state, "2nd"))

        for step in (run_natives, run_ours) if native_first else (run_ours, run_natives):
            step()
        return natives + ours

    def txvmbot(self, suite: Suite, mode: str, state: str, which: str) -> Measured:
        assert self.sshd is not None and self.moto is not None and self.image is not None
        flags = suite.txvmbot(self.env)[mode]
        prefix = self.env.session(suite.directory(self.env))
        out = os.path.join(self.tmp, f"{suite.key}-{mode}-{which}.json")
        name = f"bench-{suite.key}-{mode}"
        durations = os.path.join(state, "suites", f"{name}.durations.json")
        had = os.path.exists(durations)
        exe = os.path.join(os.path.dirname(sys.executable), "txvmbot")
        cmd = [
            exe if os.path.exists(exe) else sys.executable,
            *([] if os.path.exists(exe) else ["-m", "txvmbot"]),
            "suite",
            "--endpoint", self.moto.url,
            "--region", REGION,
            "--image", self.image,
            "--ssh-user", self.sshd.user,
            "--ssh-key", self.remote.key,
            "--ssh-endpoint", self.sshd.endpoint,
            "--timeout-ssh", "30",
            "--timeout-running", "60",
            "--timeout-poll-interval", "0.2",
            "--timeout-poll-max-interval", "1",
            "--state-dir", state,
            "--name", name,
            "--machines", str(self.args.machines),
            *(["--list", prefix + flags.list] if flags.list else []),
            flags.command[0], prefix + flags.command[1],
            "--format", flags.format,
            *flags.flags,
            "--test-timeout", "300",
            "--bound", str(self.args.timeout),
            "--json", out,
        ]  # fmt: skip
        label = f"txvmbot {flags.command[0]} {which}"
        print(f"  {suite.key}: {label} ({'with' if had else 'no'} recorded durations) ...", end="", flush=True)
        env = dict(checkrun.env(), AWS_DEFAULT_REGION=REGION)
        start = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=self.args.timeout + 120)
        except subprocess.TimeoutExpired as e:
            raise E.BenchError(f"{suite.key} {label}: txvmbot suite did not end within its bound") from e
        wall = time.perf_counter() - start
        if not os.path.exists(out):
            raise E.BenchError(f"{suite.key} {label}: exit {p.returncode}, no JSON:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        with open(out) as f:
            doc = json.load(f)
        summary = doc.get("summary", {})
        self.check_ids.append(str(summary.get("check_id")))
        if summary.get("error"):
            print(f" error: {summary['error']}", flush=True)
        outcomes = {suite.key_of_id(t): o for t, o in E.txvmbot_outcomes(doc).items()}
        print(f" {wall:.1f}s, exit {p.returncode}, {len(outcomes)} tests", flush=True)
        if self.args.verbose:
            print(p.stdout[-2000:], p.stderr[-2000:], sep="\n")
        if self.args.keep:
            os.makedirs(self.args.keep, exist_ok=True)
            shutil.copy(out, os.path.join(self.args.keep, os.path.basename(out)))
            with open(os.path.join(self.args.keep, f"{suite.key}-{mode}-{which}.out"), "w") as f:
                f.write(p.stdout + p.stderr)
        return Measured(label, wall, outcomes, summary=summary, mode=mode, which=which)


# --- figures -------------------------------------------------------------------


@attrs.frozen
class Verdict:
    """The goals on one suite for one way of running txvmbot (``mode``)."""

    suite: str
    mode: str
    lines: tuple[str, ...]
    met: bool


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def judge(
    suite: Suite, rounds: Sequence[Sequence[Measured]]
) -> tuple[list[list[object]], list[Verdict], list[str]]:
    """The suite's table rows, its verdicts on the goals (one per txvmbot
    mode) and notes. ``rounds``: the same runs (same labels, same order) once per
    round; wall times are judged on their medians, counts in every round."""
    labels = [m.label for m in rounds[0]]
    by_label = {label: [r[k] for r in rounds] for k, label in enumerate(labels)}
    wall = {label: _median([m.wall for m in ms]) for label, ms in by_label.items()}
    sample = rounds[0]
    parallel = [m for m in sample if m.native is not None and m.native.parallel]
    first = next((m.label for m in parallel if m.native is not None and not m.native.second), None)
    second = next((m.label for m in parallel if m.native is not None and m.native.second), first)

    def base_of(m: Measured) -> str | None:
        """What ``m`` is compared with: a txvmbot 2nd run with the native
        runner's 2nd run (if it keeps times), anything else with the native
        parallel runner's first run."""
        return second if m.which == "2nd" else first

    rows: list[list[object]] = []
    for m in sample:
        ms = by_label[m.label]
        c = ms[-1].counts
        varied = len({x.counts for x in ms}) > 1
        base = base_of(m)
        walls = sorted(x.wall for x in ms)
        summaries = [x.summary for x in ms if x.summary]

        def summary(field: str, summaries: list[dict[str, Any]] = summaries) -> float:
            return _median([float(x[field]) for x in summaries if field in x])

        rows.append(
            [
                suite.key,
                m.label,
                wall[m.label],
                f"{walls[0]:.1f}-{walls[-1]:.1f}" if len(walls) > 1 else "",
                f"{wall[m.label] / wall[base]:.2f}x" if base is not None else "-",
                f"{c.passed}{'*' if varied else ''}",
                c.failed,
                c.skipped,
                c.other,
                summary("makespan"),
                summary("lower_bound"),
                summary("fixed_cost"),
                summary("end_spread"),
            ]
        )
    modes = list(dict.fromkeys(m.mode for m in sample if m.mode is not None))
    if first is None:
        return rows, [Verdict(suite.key, mode, ("no native parallel run",), False) for mode in modes], []
    of = f" (medians of {len(rounds)} rounds)" if len(rounds) > 1 else ""
    verdicts = []
    for mode in modes:
        ours = [m for m in sample if m.mode == mode]
        lines: list[str] = []
        met = len(ours) == 2
        for m in ours:
            base = base_of(m)
            assert base is not None
            ratio = wall[m.label] / wall[base]
            ok = ratio <= WALL_GOAL
            met &= ok
            lines.append(
                f"{m.label} {wall[m.label]:.1f}s = {ratio:.2f}x {base} {wall[base]:.1f}s{of} "
                f"(goal <= {WALL_GOAL:.2f}x: {'MET' if ok else 'MISSED'})"
            )
            for k, one in enumerate(rounds):
                mine = next(x for x in one if x.label == m.label)
                native = next(x for x in one if x.label == first)
                diff = E.differences(native.outcomes, mine.outcomes)
                same = mine.counts.triple() == native.counts.triple() and mine.counts.other == 0
                met &= same
                if not same or diff or k == len(rounds) - 1:
                    lines.append(
                        f"{m.label}{f' round {k + 1}' if len(rounds) > 1 else ''} passed/failed/skipped "
                        f"{mine.counts.triple()} vs {first} {native.counts.triple()} "
                        f"(goal equal: {'MET' if same else 'MISSED'}); {len(diff)} test(s) differ"
                        + (": " + E.short([f"{t} {a}->{b}" for t, a, b in diff], 8) if diff else "")
                    )
                    if any(a == "xfail" and b == "skipped" for _, a, b in diff):
                        lines.append(
                            "  why xfail->skipped: pytest writes an expected failure in JUnit XML as "
                            '<skipped type="pytest.xfail">, and txvmbot\'s --format junit reads it as '
                            "skipped, where its subunit path (--runner) counts an xfail passed"
                        )
        if len(ours) == 2:
            later = wall[ours[1].label] / wall[ours[0].label]
            ok = later <= SECOND_GOAL
            met &= ok
            lines.append(
                f"txvmbot {ours[0].label.split()[1]} 2nd / 1st = {later:.3f}{of} "
                f"(goal <= {SECOND_GOAL:.2f}: {'MET' if ok else 'MISSED'})"
            )
        verdicts.append(Verdict(suite.key, mode, tuple(lines), met))
    notes = []
    for one in rounds:
        native = next(x for x in one if x.label == first)
        for m in one:
            if m.native is not None and m is not native:
                d = E.differences(native.outcomes, m.outcomes)
                if d:
                    notes.append(
                        f"note: native runs differ among themselves, {m.label} vs {first}: {len(d)} test(s): "
                        + E.short([f"{t} {a}->{b}" for t, a, b in d], 5)
                    )
    return rows, verdicts, notes


# --- main ----------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suites", default="trial,pytest,unittest", help="which, comma-separated (default: all three)")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="how txvmbot runs batches: runner (one long-lived runner per machine, --runner), run (a "
        f"fresh command per batch, --run), comma-separated (default: {','.join(MODES)})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="rounds of every run; wall times are judged on their medians (default: 1; "
        "each round of everything takes about 6 minutes here)",
    )
    p.add_argument("--machines", type=int, default=2, help="machines, and the native runners' N (default: 2)")
    p.add_argument(
        "--sides",
        default="native,txvmbot",
        help="native, txvmbot or both, comma-separated (default: both; the goals need both)",
    )
    p.add_argument("--user", default=E.USER, help=f"the unprivileged user the suites run as (default: {E.USER})")
    p.add_argument(
        "--cache",
        default=E.CACHE,
        help=f"where the user's home and the environments are kept between runs (default: {E.CACHE})",
    )
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="keep txvmbot's --json and output of every run in DIR (default: thrown away)",
    )
    p.add_argument("--rebuild-env", action="store_true", help="make the environment anew even if cached")
    p.add_argument("--timeout", type=float, default=600.0, help="bound of one run of one side, s (default: 600)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the end of txvmbot's output")
    args = p.parse_args(argv[1:])
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    args.sides = {s.strip() for s in args.sides.split(",") if s.strip()}
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes: choose among {', '.join(MODES)}")
    if not args.suites or set(args.suites) - set(SUITES):
        p.error(f"--suites: choose among {', '.join(SUITES)}")
    if not args.sides or args.sides - {"native", "txvmbot"}:
        p.error("--sides: native, txvmbot or both")
    if args.machines < 1 or args.rounds < 1:
        p.error("--machines and --rounds must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        E.check_host()
        owner = E.ensure_user(args.user, os.path.join(args.cache, "home"))
    except E.BenchError as e:
        print(f"real_suites: {e}", file=sys.stderr)
        return 2
    all_rows: list[list[object]] = []
    verdicts: list[Verdict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="txvmbot-bench-") as tmp:
        key_path, public = checkrun.ssh_keypair(tmp)
        with sshd_server([public], user=args.user) as sshd:
            remote = E.Remote(sshd.user, sshd.port, key_path)
            print(
                f"sshd {sshd.endpoint} (pid {sshd.pid}) logs in as {sshd.user} only "
                f"(uid {owner.pw_uid}, home {owner.pw_dir})",
                flush=True,
            )
            try:
                env = E.prepare_env(remote, args.cache, REQUIREMENTS, owner, args.rebuild_env)
            except E.BenchError as e:
                print(f"real_suites: {e}", file=sys.stderr)
                return 2
            try:
                cost = E.install_offline_python(env, remote, owner)
            except E.BenchError as e:
                print(f"real_suites: {e}", file=sys.stderr)
                return 2
            print(f"no network for the suites: {env.offline}/python (one start {cost:.2f}s over ssh)", flush=True)
            for gone in E.remove_stale_envs(args.cache, env):
                print(f"removed the stale environment {gone}")
            versions = env.versions(remote)
            print(
                "versions: "
                + ", ".join(
                    f"{k} {versions.get(k, '?')}"
                    for k in ("twisted", "pytest", "pytest-xdist", "stestr", "python-subunit",
                              "python-dateutil", "python-openstackclient", "hypothesis")
                )  # fmt: skip
                + f"; python {system_python_version(remote)}",
                flush=True,
            )
            with contextlib.ExitStack() as stack:
                moto = stack.enter_context(moto_server()) if "txvmbot" in args.sides else None
                image = pick_image(moto) if moto is not None else None
                if moto is not None:
                    print(
                        f"txvmbot: {args.machines} machines of the cloud backend on moto {moto.url} "
                        f"(pid {moto.pid}), image {image}; every machine's ssh endpoint is that sshd",
                        flush=True,
                    )
                bench = Bench(args, env, remote, sshd, moto, image, tmp)
                done: dict[str, list[list[Measured]]] = {key: [] for key in args.suites}
                failed: dict[str, str] = {}
                for r in range(args.rounds):
                    for key in args.suites:
                        if key in failed:
                            continue
                        suite = SUITES[key]
                        title = suite.title.format(**{k: versions.get(k, "?") for k in VERSIONED})
                        where = f"round {r + 1}/{args.rounds}, " if args.rounds > 1 else ""
                        print(f"\n{key}: {title} ({where}in {suite.directory(env)})", flush=True)
                        try:
                            done[key].append(bench.round(suite, native_first=r % 2 == 0))
                        except E.BenchError as e:
                            print(f"\n{key}: {e}", flush=True)
                            failed[key] = str(e).splitlines()[0]
                for key in args.suites:
                    if key in failed or not done[key]:
                        why = (f"did not finish: {failed.get(key)}",)
                        verdicts.extend(Verdict(key, mode, why, False) for mode in args.modes)
                        continue
                    rows, found, more = judge(SUITES[key], done[key])
                    all_rows.extend(rows)
                    verdicts.extend(found)
                    notes.extend(f"{key}: {n}" for n in more)
                if moto is not None:
                    left = checkrun.leftovers(moto.url)
                    print(f"\nmoto leftovers of the {len(bench.check_ids)} txvmbot runs: {', '.join(left) or 'none'}")
    print()
    print(
        table(
            ["suite", "run", "wall s", "range", "vs native par", "passed", "failed", "skipped", "other",
             "makespan", "lower bnd", "fixed/cmd", "end spread"],
            all_rows,
        )  # fmt: skip
    )
    print(
        "\nvs native par: wall / the native parallel runner's (a txvmbot 2nd run: / the native 2nd run where "
        "the runner keeps times, stestr); 'other': txvmbot's timeout and infra outcomes; makespan, lower "
        "bound (with the measured fixed cost per command), fixed/cmd and end spread: txvmbot's own summary"
    )
    print()
    for v in verdicts:
        for line in v.lines:
            print(f"  {v.suite}: {line}")
    for n in notes:
        print(f"  {n}")
    if "native" in args.sides and "txvmbot" in args.sides:
        goals = (
            f"goals: txvmbot <= {WALL_GOAL:.2f}x the native parallel runner on both runs, "
            f"2nd <= {SECOND_GOAL:.2f}x 1st, counts equal"
        )
        for mode in args.modes:
            mine = [v for v in verdicts if v.mode == mode]
            verdict = "all goals MET" if all(v.met for v in mine) else "goals MISSED"
            each = ", ".join(f"{v.suite} {'MET' if v.met else 'MISSED'}" for v in mine)
            print(f"RESULT txvmbot --{mode}: {verdict} ({each})")
        met = [m for m in args.modes if all(v.met for v in verdicts if v.mode == m)]
        print(
            f"RESULT: {'MET with --' + ' and --'.join(met) if met else 'MISSED'} "
            f"on {', '.join(args.suites)} ({goals})"
        )
    else:
        print(f"RESULT: goals not judged: only the {', '.join(sorted(args.sides))} side ran")
    print(f"wall time of the whole benchmark: {time.monotonic() - started:.0f}s")
    print(reproduce_line(argv))
    return 0


def system_python_version(remote: E.Remote) -> str:
    ran = remote.run(f"{E.SYSTEM_PYTHON} -c 'import platform; print(platform.python_version())'", timeout=30)
    return ran.text().strip() or "?"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
