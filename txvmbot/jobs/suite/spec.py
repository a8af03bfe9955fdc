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
from txvmbot.model import CheckResult, CheckSpec
from txvmbot.qemu.model import LocalSpec

if TYPE_CHECKING:  # results imports python-subunit: only the suite path pays for it
    from txvmbot.jobs.suite.results import TestResult
    from txvmbot.jobs.suite.spread import Spread

__all__ = ["SuiteFormat", "SuiteResult", "SuiteSpec", "Upload", "command_for"]

SuiteFormat = Literal["exit", "subunit"]
FORMATS: tuple[SuiteFormat, ...] = ("exit", "subunit")

_PLACEHOLDER = re.compile(r"\{(tests?)\}")


@frozen
class Upload:
    """Copy the local file or tree ``source`` to ``dest`` on every machine."""

    source: str
    dest: str


@frozen
class SuiteSpec:
    """A whole suite across ``machines`` fresh machines.

    ``run`` holds ``{test}`` (one test id) or ``{tests}`` (a batch,
    shell-quoted and space-separated). With ``format`` ``exit`` each test
    is its own command and its exit status is its result; with ``subunit``
    the command's stdout is a subunit v2 stream. The ids come from
    ``tests`` or from ``list_command``, run once on the first ready
    machine. ``test_timeout`` bounds one test, ``bound`` the whole run.
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

    def __attrs_post_init__(self) -> None:
        check_suite_name(self.name)
        if self.format not in FORMATS:
            raise ConfigError("--format", f"must be exit or subunit, not {self.format!r}")
        found = set(_PLACEHOLDER.findall(self.run))
        if not found:
            raise ConfigError("--run", f"{self.run!r} names no {{test}} or {{tests}}")
        if self.format == "exit" and "tests" in found:
            raise ConfigError("--run", "{tests} (a batch) needs --format subunit; use {test}")
        if not 1 <= self.machines <= 100:
            raise ConfigError("--machines", f"must be from 1 to 100, got {self.machines}")
        if bool(self.tests) == bool(self.list_command):
            raise ConfigError("--tests", "give the test ids either with --tests FILE or --list CMD")
        if len(set(self.tests)) != len(self.tests):
            raise ConfigError("--tests", "a test id is listed twice")
        for what, value in (("--test-timeout", self.test_timeout), ("--bound", self.bound)):
            if not value > 0:
                raise ConfigError(what, f"must be a positive number of seconds, got {value}")

    @property
    def batched(self) -> bool:
        """Whether one command runs a batch of tests (``{tests}``)."""
        return "{tests}" in self.run


def command_for(template: str, test_ids: Sequence[str]) -> str:
    """``template`` with ``{test}``/``{tests}`` replaced by the shell-quoted ids;
    nothing else in it is touched (braces of the user's own shell stay)."""
    quoted = " ".join(shlex.quote(t) for t in test_ids)

    def fill(m: re.Match[str]) -> str:
        return quoted

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
