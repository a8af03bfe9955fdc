"""A suite as a daemon job: the same :class:`~txvmbot.jobs.suite.run.SuiteRun`,
answering with a CheckResult like every other job (its steps, facts,
consoles, a one-line verdict) and leaving the test results as files in the
job's evidence directory: ``results.xml`` (JUnit), ``results.subunit`` (the
merged v2 stream) and ``results.json``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from txvmbot.engine import cleanup_failure_kind, new_check_id
from txvmbot.interfaces import IJournal
from txvmbot.jobs.suite.spec import SuiteResult, SuiteSpec
from txvmbot.model import CheckResult, FailureKind, StepEvent

__all__ = ["RESULT_FILES", "SuiteJob", "verdict", "write_result_files"]

#: The files a suite job leaves in its evidence directory.
RESULT_FILES = ("results.xml", "results.subunit", "results.json")


def verdict(result: SuiteResult) -> str:
    """One line saying why a suite did not pass ("" when it passed)."""
    if result.passed:
        return ""
    if result.error:
        return result.error
    bad = sorted((t for t in result.tests if t.outcome not in ("passed", "skipped")), key=lambda t: t.test_id)
    if not bad:
        return "the suite ran no test"
    names = ", ".join(f"{t.test_id} {t.outcome}" for t in bad[:10])
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    return f"{len(bad)} of {len(result.tests)} test(s) did not pass: {names}{more}"


def write_result_files(result: SuiteResult, directory: str) -> None:
    """JUnit XML, the merged subunit stream and JSON, each written whole
    and renamed into ``directory``."""
    from txvmbot.jobs.suite import results as R
    from txvmbot.jobs.suite.report import summary_dict

    os.makedirs(directory, mode=0o700, exist_ok=True)

    def put(name: str, write: Callable[[Any], Any]) -> None:
        path = os.path.join(directory, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)

    def json_doc(f: Any) -> None:
        import json

        f.write(json.dumps(R.to_json(result.tests, summary_dict(result)), indent=2).encode())

    put("results.xml", lambda f: R.write_junit(result.tests, f, result.name))
    put("results.subunit", lambda f: R.write_subunit(result.tests, f))
    put("results.json", json_doc)


class SuiteJob:
    """What the daemon's worker runs for a suite job: ``run()`` fires with a
    CheckResult; ``cancel()`` stops the tests and cleans up. Durations are
    kept in ``state_dir`` (by default the parent of ``evidence_root``, the
    daemon's state dir)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        spec: SuiteSpec,
        *,
        journal: IJournal,
        observer: Callable[[StepEvent], None] | None = None,
        evidence_root: str | None = None,
        check_id: str | None = None,
        state_dir: str | None = None,
        api_observer: Callable[[str, str, bool], object] | None = None,
    ) -> None:
        from txvmbot.jobs.backends import machines_for
        from txvmbot.jobs.suite import durations as D
        from txvmbot.jobs.suite.run import SuiteRun

        self.spec = spec
        self.journal = journal
        self.check_id = check_id or new_check_id()
        self.evidence_root = evidence_root
        self.state_dir = state_dir or (os.path.dirname(evidence_root) if evidence_root else None)
        known: dict[str, float] = {}
        if self.state_dir:
            try:
                known = D.load(self.state_dir, spec.name)
            except Exception as e:  # a corrupt file: run without the history, say so
                self.log.warn("Suite {name}: {e}", name=spec.name, e=e)
        machines = machines_for(
            reactor, spec.target, journal=journal, check_id=self.check_id, api_observer=api_observer
        )
        self.run_ = SuiteRun(
            reactor, machines, spec, durations=known, observer=observer, evidence_root=evidence_root
        )

    def run(self) -> Deferred[CheckResult]:
        return ensureDeferred(self._run())

    def cancel(self, reason: str) -> None:
        self.run_.cancel(reason)

    async def _run(self) -> CheckResult:
        from txvmbot.jobs.suite import durations as D

        result = await self.run_.run()
        machines = result.machines
        where = machines.evidence_dir
        if self.evidence_root and not where:
            where = os.path.join(self.evidence_root, self.check_id)
        if where:
            try:
                write_result_files(result, where)
            except OSError as e:
                self.log.error("Suite {name}: cannot write its results under {where}: {e}",
                               name=self.spec.name, where=where, e=e)
                where = machines.evidence_dir
        if self.state_dir:
            try:
                learnt = {
                    t.test_id: t.duration
                    for t in result.tests
                    if t.outcome in ("passed", "failed", "skipped")
                }
                D.save(self.state_dir, self.spec.name, learnt)
            except Exception as e:
                self.log.warn("Suite {name}: durations not kept: {e}", name=self.spec.name, e=e)
        return attrs.evolve(
            machines,
            passed=result.passed,
            error=verdict(result),
            evidence_dir=where,
            kind=self._kind(result),
        )

    def _kind(self, result: SuiteResult) -> FailureKind | None:
        """What kind of failure the run's was: the one its steps stopped
        with, or its cleanup's, or (machines fine, tests not) the tests'."""
        if result.passed:
            return None
        sequence = self.run_.sequence
        if result.error and sequence.kind is not None:
            return sequence.kind
        if result.error:  # the steps passed: its cleanup failed
            return cleanup_failure_kind(result.machines.steps)
        return FailureKind.TEST
