"""What became of each test of a suite run: a command's outcome (its exit
status, or the subunit stream on its stdout) turned into test results, and
the feeder told which tests of the batch ended, timed out, or go back to
the queue. :class:`~txvmbot.jobs.suite.run.SuiteRun` drives the machines;
this module only keeps the books."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import attrs
from twisted.logger import Logger

from txvmbot.jobs.suite import results as R
from txvmbot.jobs.suite.feed import Batch, Feeder
from txvmbot.jobs.suite.spec import SuiteSpec

__all__ = ["Ledger"]

#: Marks, in a failing test's output, its command's own stdout and stderr.
_COMMAND_OUTPUT = b"\n--- the command's stdout and stderr ---\n"
#: At most this much of a command's own output goes with each test.
_OUTPUT_TAIL = 64 * 1024


def _tail(data: bytes) -> bytes:
    return data if len(data) <= _OUTPUT_TAIL else b"[...]\n" + data[-_OUTPUT_TAIL:]


def between_tests(results: Sequence[R.TestResult]) -> float:
    """Seconds between one test's end and the next one's start, summed over
    a batch: what the runner spends per test outside the tests (its
    loader, writing the results), which grows with the batch and is no
    part of a command's fixed cost."""
    ordered = sorted(results, key=lambda r: r.started)
    return sum(
        max(0.0, b.started - (a.started + a.duration)) for a, b in pairwise(ordered)
    )


class Ledger:
    """One result per test id (the last word on it), and how many times
    each test was handed out."""

    log = Logger()

    def __init__(
        self,
        spec: SuiteSpec,
        feeder: Feeder,
        wall: Callable[[], float],
        check_id: str,
        results: dict[str, R.TestResult],
        attempts: dict[str, int],
    ) -> None:
        """``results`` and ``attempts`` are the run's own (kept across the
        ledger's life: the run reports them even if it ends before its
        tests start)."""
        self.spec = spec
        self.feeder = feeder
        self.wall = wall
        self.check_id = check_id
        self.results = results
        self.attempts = attempts
        #: Seconds the runners spent between the tests of a batch, summed
        #: over the batches whose commands ended.
        self.between = 0.0

    def handed(self, batch: Batch) -> None:
        for t in batch.test_ids:
            self.attempts[t] = self.attempts.get(t, 0) + 1

    def record(self, result: R.TestResult) -> None:
        self.results[result.test_id] = result

    def ended(
        self, worker: str, batch: Batch, started: float, outcome: Any, report: bytes | str | None = None
    ) -> None:
        """The batch's command ended by itself with ``outcome`` (a
        CommandResult). ``report``: with ``--format junit``, the bytes of the
        JUnit XML it wrote, or why there are none."""
        feeder = self.feeder
        ids = batch.test_ids
        duration = self.wall() - started
        if not self.spec.batched and self.spec.format == "exit":
            (test,) = ids
            self.record(
                R.from_exit(
                    test,
                    worker,
                    started,
                    duration,
                    outcome.exit_status,
                    outcome.signal,
                    outcome.stdout,
                    outcome.stderr,
                    attempts=self.attempts[test],
                )
            )
            feeder.finished(batch, {test})
            return
        if self.spec.format == "junit":
            self._ended_junit(worker, batch, started, duration, outcome, report)
            return
        read = R.read_subunit(outcome.stdout, worker, ids, started=started)
        ended = self._record_read(read, ids)
        # The command ended by itself: a test it never reported did not run
        # (a bad id, a crash of the runner): that is the test's failure.
        why = f"not in the subunit output of {worker}'s command (exit status {outcome.exit_status})"
        tail = read.stray + outcome.stderr
        self._not_run(worker, started, ids, ended, why, tail, read.running, read.running_output)
        self._close(batch, duration, read.results)

    def _close(self, batch: Batch, took: float, results: Sequence[R.TestResult]) -> None:
        """Close a batch whose command ended: every test of it is over, and
        what they reported teaches the feeder."""
        ids = set(batch.test_ids)
        ours = [r for r in results if r.test_id in ids]
        times = {r.test_id: r.duration for r in ours}
        between = between_tests(ours)
        self.between += between
        self.feeder.finished(batch, ids, took=took, times=times, between=between)

    def _not_run(
        self,
        worker: str,
        started: float,
        ids: Sequence[str],
        ended: set[str],
        why: str,
        tail: bytes,
        running: str | None = None,
        running_output: bytes = b"",
    ) -> None:
        for test in ids:
            if test not in ended:
                output = running_output if test == running else tail
                self.record(
                    R.TestResult(
                        test_id=test,
                        outcome="failed",
                        duration=0.0,
                        worker=worker,
                        started=started,
                        output=output,
                        message=why,
                        attempts=self.attempts[test],
                    )
                )

    def _ended_junit(
        self, worker: str, batch: Batch, started: float, took: float, outcome: Any, report: bytes | str | None
    ) -> None:
        """Tests as the command's JUnit XML says; the command's own stdout and
        stderr go with every test that did not pass. No report, or a broken
        one, is the failure of every test of the batch, with the reason."""
        from txvmbot.jobs.suite.junit import JUnitError, read_junit

        ids = batch.test_ids
        own = _tail(outcome.stdout + outcome.stderr)
        status = f"exit status {outcome.exit_status}"
        results: tuple[R.TestResult, ...] = ()
        if isinstance(report, bytes):
            try:
                read = read_junit(report, worker, ids, started, where=f"the JUnit XML of {worker}'s command")
            except JUnitError as e:
                why = f"{e} ({status})"
            else:
                results = read.results
                why = f"not in the JUnit XML of {worker}'s command ({status})"
        else:
            why = f"{report or 'no JUnit XML'} ({status})"
        ended: set[str] = set()
        for r in results:
            if r.outcome not in ("passed", "skipped") and own:
                r = attrs.evolve(r, output=r.output + _COMMAND_OUTPUT + own)
            self.record(attrs.evolve(r, attempts=self.attempts.get(r.test_id, 1)))
            ended.add(r.test_id)
        self._not_run(worker, started, ids, ended, why, own)
        self._close(batch, took, results)

    def _record_read(self, read: R.SubunitRead, ids: tuple[str, ...]) -> set[str]:
        ended: set[str] = set()
        for r in read.results:
            if r.test_id in ids:
                self.record(attrs.evolve(r, attempts=self.attempts[r.test_id]))
                ended.add(r.test_id)
        return ended

    def timed_out(self, worker: str, batch: Batch, started: float, partial: Any) -> None:
        """The batch's command passed its bound; ``partial`` is what it printed."""
        feeder = self.feeder
        ids = batch.test_ids
        bound = self.spec.test_timeout
        if self.spec.format == "exit":
            (test,) = ids
            output = partial.stdout + partial.stderr
            self.record(R.timed_out(test, worker, started, bound, output, attempts=self.attempts[test]))
            feeder.timed_out(batch, test)
            return
        read = R.read_subunit(partial.stdout, worker, ids, started=started)
        ended = self._record_read(read, ids)
        left = [t for t in ids if t not in ended]
        if not left:
            # Every test reported; the command itself never exited (a child
            # or a thread kept it alive): no test to blame, the machine goes.
            self.log.warn(
                "Suite {check_id}: {worker}'s command reported all its tests but did not exit "
                "within {bound}s",
                check_id=self.check_id,
                worker=worker,
                bound=bound * len(ids),
            )
            feeder.finished(batch, ended)
            return
        running = read.running if read.running in ids else left[0]
        output = read.running_output if running == read.running else read.stray
        self.record(
            R.timed_out(
                running, worker, started, bound, output + partial.stderr, attempts=self.attempts[running]
            )
        )
        feeder.timed_out(batch, running, done=ended)

    def runner_died(self, worker: str, machine: str, batch: Batch, started: float, partial: Any, why: str) -> None:
        """The batch's long-lived runner ended in the middle of it. The test
        it was running failed (a test that kills its runner is that test's
        failure); the others that did not end go back to the queue. If no
        test was running, it is the machine's trouble, as :meth:`lost`."""
        ids = batch.test_ids
        read = R.read_subunit(partial.stdout, worker, ids, started=started)
        ended = self._record_read(read, ids)
        running = read.running
        if running is None or running not in ids or running in ended:
            self.lost(worker, machine, batch, started, partial, why)
            return
        self.record(
            R.TestResult(
                test_id=running,
                outcome="failed",
                duration=max(0.0, self.wall() - (read.running_started or started)),
                worker=worker,
                started=read.running_started or started,
                output=read.running_output + _COMMAND_OUTPUT + _tail(partial.stderr),
                message=f"{why} while this test ran",
                attempts=self.attempts[running],
            )
        )
        self.feeder.timed_out(batch, running, done=ended)

    def lost(self, worker: str, machine: str, batch: Batch, started: float, partial: Any, why: str) -> None:
        """The batch's machine died or stopped answering: its tests that did
        not end go back to the queue once, then are infrastructure trouble."""
        feeder = self.feeder
        ids = batch.test_ids
        ended: set[str] = set()
        output = b""
        if partial is not None and self.spec.format == "subunit":
            read = R.read_subunit(partial.stdout, worker, ids, started=started)
            ended = self._record_read(read, ids)
            output = read.running_output
        elif partial is not None:
            output = partial.stdout + partial.stderr
        closed = feeder.finished(batch, ended)
        duration = self.wall() - started
        for test in closed.gave_up:
            self.record(
                R.machine_lost(
                    test,
                    worker,
                    started,
                    duration,
                    output,
                    reason=f"{machine}: {why}",
                    attempts=self.attempts[test],
                )
            )
        self.log.warn(
            "Suite {check_id}: {worker} on {machine} was lost ({why}); {n} test(s) go to another machine",
            check_id=self.check_id,
            worker=worker,
            machine=machine,
            why=why,
            n=len(closed.requeued),
        )


def give_up_rest(
    results: dict[str, R.TestResult], tests: tuple[str, ...], attempts: dict[str, int], error: str, now: float
) -> None:
    """Tests no machine ended: infrastructure trouble with the reason."""
    why = error or "no machine was left to run it"
    for test in tests:
        if test not in results:
            results[test] = R.TestResult(
                test_id=test,
                outcome="infra",
                duration=0.0,
                worker="",
                started=now,
                message=f"not run: {why}",
                attempts=max(1, attempts.get(test, 1)),
            )
