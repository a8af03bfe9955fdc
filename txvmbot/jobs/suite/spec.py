"""What a suite run is asked to do, and what it found: frozen values.

A :class:`SuiteSpec` names the machines (a cloud check's or a local pool's
spec, whose commands are not used), how many, what to copy and run on each
before the tests, where the test ids come from, and how one test (or a
batch) is run and judged.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from attrs import frozen

from txvmbot.errors import ConfigError
from txvmbot.jobs.suite.durations import check_suite_name
from txvmbot.jobs.suite.groups import GroupKey, grouping
from txvmbot.model import CheckResult, CheckSpec
from txvmbot.qemu.model import LocalSpec

if TYPE_CHECKING:  # results imports python-subunit: only the suite path pays for it
    from txvmbot.jobs.suite.results import TestResult
    from txvmbot.jobs.suite.spread import Spread

__all__ = ["SuiteFormat", "SuiteResult", "SuiteSpec", "Upload", "command_for"]

SuiteFormat = Literal["exit", "subunit", "junit"]
FORMATS: tuple[SuiteFormat, ...] = ("exit", "subunit", "junit")

#: What ``--run`` may hold: the ids, one (``{test}``) or shell-quoted
#: (``{tests}``), the path of a file on the machine with the ids, one a line
#: (``{tests_file}``), and the path where the command writes its JUnit XML
#: (``{junit}``).
_PLACEHOLDER = re.compile(r"\{(test|tests|tests_file|junit)\}")
#: In ``--runner``: the path of txvmbot's own runner on the machine.
RUNNER_PY = "{runner_py}"


@frozen
class Upload:
    """Copy the local file or tree ``source`` to ``dest`` on every machine."""

    source: str
    dest: str


@frozen
class SuiteSpec:
    """A whole suite across ``machines`` fresh machines.

    ``run`` holds ``{test}`` (one test id), ``{tests}`` (a batch,
    shell-quoted and space-separated) or ``{tests_file}`` (a batch: the path
    of a file on the machine, one id a line, as stestr's and
    zope.testrunner's ``--load-list`` read it). With ``format`` ``exit``
    each test is its own command and its exit status is its result; with
    ``subunit`` the command's stdout is a subunit v2 stream; with ``junit``
    the command writes JUnit XML to the path ``{junit}`` stands for (a fresh
    one for every command). The ids come from ``tests``, from
    ``list_command``, run once on the first ready machine, or (with
    ``runner`` and neither) from the runners themselves. Batches keep
    groups of tests together: by class unless ``group_regex`` (stestr's
    meaning) says otherwise, or not at all without ``group``. Instead of
    ``run``, ``runner`` is a long-lived command started once per machine
    and fed batch after batch on its stdin (:mod:`txvmbot.jobs.suite.serve`);
    ``{runner_py}`` in it is the path of txvmbot's own Python runner,
    uploaded to the machine. ``test_timeout`` bounds one test, ``bound``
    the whole run.
    """

    target: CheckSpec | LocalSpec
    name: str
    run: str
    machines: int = 1
    format: SuiteFormat = "exit"
    tests: tuple[str, ...] = ()
    list_command: str = ""
    uploads: tuple[Upload, ...] = ()
    setup: tuple[str, ...] = ()
    test_timeout: float = 300.0
    bound: float = 3600.0
    group_regex: str | None = None
    group: bool = True
    runner: str = ""

    def __attrs_post_init__(self) -> None:
        check_suite_name(self.name)
        if self.format not in FORMATS:
            raise ConfigError("--format", f"must be exit, subunit or junit, not {self.format!r}")
        if self.runner:
            self._check_runner()
        else:
            self._check_run()
        if self.group_regex is not None:
            if not self.group:
                raise ConfigError("--group-regex", "cannot be given with --no-group")
            grouping(self.group_regex)  # raises ConfigError for a bad regex
        if not 1 <= self.machines <= 100:
            raise ConfigError("--machines", f"must be from 1 to 100, got {self.machines}")
        if self.tests and self.list_command:
            raise ConfigError(
                "--tests", "give the test ids either with --tests FILE or --list CMD, not both"
            )
        if not self.tests and not self.list_command and not self.runner:
            raise ConfigError(
                "--tests",
                "give the test ids with --tests FILE or --list CMD (or let a --runner list them)",
            )
        if len(set(self.tests)) != len(self.tests):
            raise ConfigError("--tests", "a test id is listed twice")
        for what, value in (("--test-timeout", self.test_timeout), ("--bound", self.bound)):
            if not value > 0:
                raise ConfigError(what, f"must be a positive number of seconds, got {value}")

    def _check_runner(self) -> None:
        if self.run:
            raise ConfigError("--runner", "give the test command either with --run or with --runner")
        if self.format != "subunit":
            raise ConfigError("--runner", "a runner writes subunit: it needs --format subunit")
        named = set(_PLACEHOLDER.findall(self.runner))
        if named:
            names = ", ".join(f"{{{n}}}" for n in sorted(named))
            raise ConfigError("--runner", f"{names}: a runner reads its test ids on stdin")

    def _check_run(self) -> None:
        found = set(_PLACEHOLDER.findall(self.run))
        ids = found & {"test", "tests", "tests_file"}
        if not ids:
            raise ConfigError("--run", f"{self.run!r} names no {{test}}, {{tests}} or {{tests_file}}")
        if len(ids) > 1:
            names = ", ".join(f"{{{n}}}" for n in sorted(ids))
            raise ConfigError("--run", f"{self.run!r} names {names}: use one of them")
        if self.format == "exit" and ids != {"test"}:
            raise ConfigError(
                "--run", "{tests} and {tests_file} (a batch) need --format subunit or junit; use {test}"
            )
        if self.format == "junit" and "junit" not in found:
            raise ConfigError("--run", "--format junit needs {junit}: the path the command writes its XML to")
        if self.format != "junit" and "junit" in found:
            raise ConfigError("--run", "{junit} is only for --format junit")

    @property
    def batched(self) -> bool:
        """Whether one command runs a batch of tests (``{tests}`` or
        ``{tests_file}``)."""
        return bool(self.runner) or "{tests}" in self.run or "{tests_file}" in self.run

    @property
    def uses_tests_file(self) -> bool:
        """Whether each command reads its ids from a file on the machine."""
        return "{tests_file}" in self.run

    def group_key(self) -> GroupKey:
        """Which tests this suite keeps together in a batch."""
        return grouping(self.group_regex, self.group)


def command_for(
    template: str, test_ids: Sequence[str], *, tests_file: str = "", junit: str = ""
) -> str:
    """``template`` with ``{test}``/``{tests}`` replaced by the shell-quoted
    ids, ``{tests_file}`` and ``{junit}`` by the shell-quoted paths; nothing
    else in it is touched (braces of the user's own shell stay)."""
    values = {
        "test": " ".join(shlex.quote(t) for t in test_ids),
        "tests_file": shlex.quote(tests_file),
        "junit": shlex.quote(junit),
    }
    values["tests"] = values["test"]

    def fill(m: re.Match[str]) -> str:
        return values[m.group(1)]

    return _PLACEHOLDER.sub(fill, template)


@frozen
class MachineTime:
    """One machine slot of the run: when it started and ended its tests and
    how long it was busy running them."""

    worker: str
    start: float
    end: float
    busy: float
    machines: tuple[str, ...]


@frozen
class SuiteResult:
    """What a suite run found. ``machines`` is the machine side as a
    CheckResult (its steps, facts, console and error, and where its
    evidence went); ``tests`` one result per test id."""

    name: str
    tests: tuple[TestResult, ...]
    machines: CheckResult
    spread: Spread | None
    times: tuple[MachineTime, ...] = ()
    error: str = ""

    @property
    def passed(self) -> bool:
        return (
            not self.error
            and bool(self.tests)
            and all(t.outcome in ("passed", "skipped") for t in self.tests)
        )

    @property
    def counts(self) -> dict[str, int]:
        from txvmbot.jobs.suite.results import count_outcomes

        return {str(k): v for k, v in count_outcomes(self.tests).items()}
