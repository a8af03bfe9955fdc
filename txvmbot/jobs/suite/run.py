"""A test suite fed to fresh machines from one queue (seed 002).

:class:`SuiteRun` takes its machines from any backend
(:class:`~txvmbot.machines.IMachines`), gets each ready (one ssh session
held open, uploads, setup commands; a machine whose setup fails is
replaced once), lists the tests if asked, then lets every machine pull the
next test or batch from a :class:`~txvmbot.jobs.suite.feed.Feeder`,
longest first, until none is left. A test past its bound fails with that
reason and its machine is replaced; a machine that dies gives its tests
back to the queue once (then they are infrastructure trouble, never test
failures). The whole run has a bound; cleanup always runs.
"""

from __future__ import annotations

import os
import secrets
import shlex
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.engine import StepContext, StepRunner, StepSequence
from txvmbot.errors import StepFailed, TxvmbotError
from txvmbot.evidence import save_evidence
from txvmbot.jobs.suite import results as R
from txvmbot.jobs.suite.feed import Batch, Feeder
from txvmbot.jobs.suite.ledger import Ledger, give_up_rest
from txvmbot.jobs.suite.serve import RunnerExited, RunnerFeed, runner_script
from txvmbot.jobs.suite.spec import RUNNER_PY, MachineTime, SuiteResult, SuiteSpec, command_for
from txvmbot.jobs.suite.spread import Timeline, summarize
from txvmbot.machines import IMachines, Machine
from txvmbot.model import CheckResult, StepEvent

__all__ = ["Progress", "SlotState", "SuiteRun"]

#: How often one slot may get a fresh machine after its first (a timeout,
#: a dead machine, a failed setup).
MAX_REPLACEMENTS = 3
#: Where a batch's id list and JUnit XML go on the machine.
REMOTE_DIR = "/tmp"
#: The largest JUnit XML read back from one command.
MAX_REPORT_BYTES = 64 * 1024 * 1024


@attrs.frozen
class _BatchFiles:
    """Paths on the machine for one command (empty: not used)."""

    tests_file: str
    junit: str


@attrs.frozen
class SlotState:
    worker: str
    machine: str
    state: str  # "setup", "running <test>", "idle", "replacing", "done", "lost"


@attrs.frozen
class Progress:
    """What the live line shows: counts, each machine's state, an ETA."""

    total: int
    done: int
    passed: int
    failed: int
    slots: tuple[SlotState, ...]
    eta: float | None


@attrs.define
class _Slot:
    worker: str
    machine: Machine
    session: Any = None
    #: the long-lived runner on this machine (``--runner``)
    runner: RunnerFeed | None = None
    state: str = "setup"
    start: float | None = None
    end: float | None = None
    busy: float = 0.0
    replacements: int = 0
    machines: list[str] = attrs.Factory(list)


class SuiteRun:
    """One run of a suite. ``run()`` fires with a SuiteResult and never
    errbacks for failing tests; ``cancel()`` stops the tests and cleans up."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        machines: IMachines,
        spec: SuiteSpec,
        *,
        durations: Mapping[str, float] | None = None,
        observer: Callable[[StepEvent], None] | None = None,
        progress: Callable[[Progress], None] | None = None,
        evidence_root: str | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.reactor = reactor
        self.machines = machines
        self.spec = spec
        self.check_id: str = machines.check_id
        self.durations = dict(durations or {})
        self.evidence_root = evidence_root
        self.steps = StepRunner(reactor, observer, wall)
        self.sequence = StepSequence(self.steps, f"suite {self.check_id}")
        self._progress = progress
        self._wall = wall
        self._slots: list[_Slot] = []
        self._results: dict[str, R.TestResult] = {}
        self._attempts: dict[str, int] = {}
        self._feeder: Feeder | None = None
        self._ledger: Ledger | None = None
        self._tests: tuple[str, ...] = ()
        self._waiting: list[Deferred[None]] = []
        self._released_console: list[tuple[str, str]] = []
        #: Why the run is stopping (a worker failed): no new machines.
        self._stopping: str | None = None
        self._t0 = 0.0

    def run(self) -> Deferred[SuiteResult]:
        return ensureDeferred(self._run())

    def cancel(self, reason: str) -> None:
        self.sequence.cancel(reason)
        self._wake()

    # -- the run ----------------------------------------------------------

    async def _run(self) -> SuiteResult:
        spec = self.spec
        # Known up front with --tests: reported even if the run ends before them.
        self._tests = spec.tests
        timer = self.reactor.callLater(
            spec.bound, self.cancel, f"the whole run passed its bound of {spec.bound:g}s"
        )
        try:
            error = await self.sequence.error_of(self._steps())
        finally:
            if timer.active():
                timer.cancel()
        give_up_rest(self._results, self._tests, self._attempts, error, self._wall())
        for slot in self._slots:
            await self._close_session(slot)
        ended = tuple(self._results.values())
        failing = any(t.outcome not in ("passed", "skipped") for t in ended)
        console: tuple[tuple[str, str], ...] = ()
        if error or failing:
            kept = dict(self._released_console)
            for name, text in await self.machines.console(self.steps):
                kept.setdefault(name, text)
            console = tuple(kept.items())
        errors = await self.machines.cleanup(self.steps)
        if errors and not error:
            error = "cleanup failed: " + "; ".join(errors)
        machine_side = CheckResult(
            check_id=self.check_id,
            passed=not error,
            steps=self.steps.results,
            facts=self.machines.facts(""),
            console=console,
            host_keys=self.machines.host_keys(),
            error=error,
        )
        result = SuiteResult(
            name=spec.name,
            tests=ended,
            machines=machine_side,
            spread=self._spread(ended),
            times=self._times(),
            error=error,
        )
        if error or failing:
            result = self._save_evidence(result)
        await self.machines.close()
        return result

    async def _steps(self) -> None:
        spec = self.spec
        await self.machines.prepare(self.sequence)
        got = await self.machines.acquire(self.sequence, spec.machines)
        self._slots = [_Slot(f"worker-{i + 1}", m, machines=[m.name]) for i, m in enumerate(got)]
        await self.sequence.step("setup", self._setup_bound(), self._setup_all)
        tests = spec.tests
        if not tests:
            listing = self._list if spec.list_command else self._runners_list
            tests = await self.sequence.step("list", spec.test_timeout, listing)
        self._tests = tuple(tests)
        self._feeder = Feeder(
            tests,
            self.durations,
            len(self._slots),
            batch=spec.batched,
            group=spec.group_key(),
            runner=bool(spec.runner),
        )
        self._ledger = Ledger(
            spec, self._feeder, self._wall, self.check_id, self._results, self._attempts
        )
        self._t0 = self._wall()
        await self.sequence.step("tests", spec.bound, self._feed_all)

    def _setup_bound(self) -> float:
        """Connect, uploads and setup commands, twice, and a replacement
        machine's own steps (each of its bounds) in between."""
        per = 60.0 + self.spec.test_timeout * (len(self.spec.uploads) + len(self.spec.setup))
        t = self.spec.target.timeouts
        acquire = sum(
            float(getattr(t, name, 0.0))
            for name in ("api_step", "running", "ssh", "boot", "shutdown")
        )
        return 2 * per + 3 * acquire + 60.0

    # -- getting machines ready -------------------------------------------

    async def _setup_all(self, ctx: StepContext) -> None:
        await self._together([self._ready(ctx, s, replace_once=True) for s in self._slots])
        ctx.saw(f"{len(self._slots)} machine(s) ready")

    async def _ready(self, ctx: StepContext, slot: _Slot, *, replace_once: bool) -> None:
        """Open the slot's session, upload, run the setup commands. With
        ``replace_once``, a machine that fails this is replaced once."""
        try:
            await self._prepare_machine(ctx, slot)
        except (TxvmbotError, OSError) as e:
            if not replace_once:
                raise
            ctx.saw(f"{slot.worker} on {slot.machine.name}: {e}; replacing it")
            self.log.warn(
                "Suite {check_id}: {worker} on {machine} failed its setup ({e}); replacing it",
                check_id=self.check_id,
                worker=slot.worker,
                machine=slot.machine.name,
                e=e,
            )
            await self._swap_machine(slot)
            await self._prepare_machine(ctx, slot)

    async def _prepare_machine(self, ctx: StepContext, slot: _Slot) -> None:
        from txvmbot import ssh

        spec = self.spec
        m = slot.machine
        slot.state = "setup"
        connect = getattr(getattr(spec.target, "timeouts", None), "ssh_connect", 10.0)
        slot.session = await ssh.open_session(
            self.reactor, m.ssh_endpoint, m.ssh_user, m.key, connect_timeout=connect
        )
        for up in spec.uploads:
            done = await slot.session.upload(up.source, up.dest, bound=spec.test_timeout)
            ctx.saw(f"{slot.worker}: {up.source} -> {up.dest} ({done.files} file(s), {done.bytes} bytes)")
        for command in spec.setup:
            r = await slot.session.run(command, spec.test_timeout)
            if not r.ok:
                out = (r.stdout + r.stderr).decode("utf-8", "replace").strip()[-2000:]
                how = f"signal {r.signal}" if r.signal else f"exit status {r.exit_status}"
                raise StepFailed(
                    "setup",
                    f"{slot.worker} on {m.name}: {command!r} ended with {how}" + (f": {out}" if out else ""),
                )
        if spec.runner:
            await self._start_runner(slot)
        slot.state = "idle"
        self._report()

    async def _start_runner(self, slot: _Slot) -> None:
        """Start the suite's runner on the slot's machine (after uploading
        txvmbot's own for ``{runner_py}``)."""
        spec = self.spec
        command = spec.runner
        if RUNNER_PY in command:
            path = f"{REMOTE_DIR}/txvmbot-{self.check_id}-{slot.worker}-{secrets.token_hex(4)}-runner.py"
            await slot.session.write_file(path, runner_script(), spec.test_timeout)
            command = command.replace(RUNNER_PY, shlex.quote(path))
        slot.runner = await RunnerFeed(self.reactor, slot.session, command).start()

    async def _swap_machine(self, slot: _Slot) -> None:
        """Give the slot's machine back and get a fresh one in its place."""
        slot.state = "replacing"
        self._report()
        await self._close_session(slot)
        old = slot.machine
        self._released_console.extend(
            (name, text) for name, text in await self.machines.console(self.steps) if name == old.name
        )
        await self.machines.release(old)
        stop = self.sequence.cancelled or self._stopping
        if stop is not None:  # the run gave up while this machine went back
            raise CancelledError(stop)
        (fresh,) = await self.machines.acquire(self.sequence, 1)
        slot.machine = fresh
        slot.machines.append(fresh.name)
        slot.replacements += 1

    async def _close_session(self, slot: _Slot) -> None:
        runner, slot.runner = slot.runner, None
        if runner is not None:
            try:
                await runner.stop()
            except Exception as e:
                self.log.info("Stopping {worker}'s runner: {e}", worker=slot.worker, e=e)
        session, slot.session = slot.session, None
        if session is not None:
            try:
                await session.close()
            except Exception as e:
                self.log.info("Closing {worker}'s session: {e}", worker=slot.worker, e=e)

    async def _list(self, ctx: StepContext) -> tuple[str, ...]:
        slot = self._slots[0]
        r = await slot.session.run(self.spec.list_command, self.spec.test_timeout)
        if not r.ok:
            err = (r.stderr or r.stdout).decode("utf-8", "replace").strip()[-2000:]
            raise StepFailed(
                "list", f"{self.spec.list_command!r} ended with exit status {r.exit_status}: {err}"
            )
        seen: dict[str, None] = {}
        for line in r.stdout.decode("utf-8", "replace").splitlines():
            if line.strip():
                seen.setdefault(line.strip(), None)
        if not seen:
            raise StepFailed("list", f"{self.spec.list_command!r} printed no test ids")
        ctx.saw(f"{len(seen)} test(s) on {slot.machine.name}")
        return tuple(seen)

    async def _runners_list(self, ctx: StepContext) -> tuple[str, ...]:
        """Every machine's runner lists the tests at once, so each has
        loaded every test module before its first batch, as stestr's and
        ``trial -j``'s workers have (and no listing command starts an
        interpreter of its own); the first machine's list is the run's. A
        runner that died listing is started again, and goes on without."""
        bound = self.spec.test_timeout
        slots = [s for s in self._slots if s.runner is not None]
        answers = await DeferredList(
            [s.runner.list(bound) for s in slots if s.runner is not None], consumeErrors=True
        )
        chosen: tuple[_Slot, tuple[str, ...]] | None = None
        failed: tuple[_Slot, BaseException] | None = None
        for slot, (ok, value) in zip(slots, answers, strict=True):
            if ok:
                if chosen is None:
                    chosen = (slot, value)
                elif value != chosen[1]:
                    self.log.warn(
                        "Suite {check_id}: {worker}'s runner listed {n} test(s), {first}'s {m}; using {first}'s",
                        check_id=self.check_id, worker=slot.worker, n=len(value),
                        first=chosen[0].worker, m=len(chosen[1]),
                    )  # fmt: skip
                continue
            assert isinstance(value, Failure)
            failed = failed or (slot, value.value)
            if isinstance(value.value, RunnerExited):
                try:
                    await self._start_runner(slot)
                except CancelledError:
                    raise
                except Exception as e:  # its first batch finds it gone
                    self.log.warn(
                        "Suite {check_id}: {worker}'s runner ended while listing and did not start again: {e}",
                        check_id=self.check_id, worker=slot.worker, e=e,
                    )  # fmt: skip
        if chosen is None:
            assert failed is not None
            raise StepFailed("list", f"{failed[0].worker} on {failed[0].machine.name}: {failed[1]}")
        slot, ids = chosen
        if not ids:
            raise StepFailed(
                "list", f"the runner {self.spec.runner!r} listed no tests on {slot.machine.name}"
            )
        ctx.saw(f"{len(ids)} test(s) listed by the runner on {slot.machine.name}")
        return ids

    # -- feeding ----------------------------------------------------------

    async def _feed_all(self, ctx: StepContext) -> None:
        await self._together([self._work(ctx, s) for s in self._slots])
        feeder = self._feeder
        assert feeder is not None
        ctx.saw(f"{feeder.done} of {feeder.total} test(s) ended")

    async def _together(self, work: list[Any]) -> None:
        """Run the machines' coroutines side by side. On the first failure,
        cancel the others (and let no machine be acquired from then on) and
        wait until every one of them has ended; then raise that failure.
        Cleanup never starts while a worker could still make something."""
        ds = [ensureDeferred(w) for w in work]
        failures: list[Failure] = []

        def failed(f: Failure) -> None:
            if not failures:
                failures.append(f)
                self._stopping = f.getErrorMessage()
                self._wake()
                for d in ds:
                    d.cancel()

        for d in ds:
            d.addErrback(failed)
        await DeferredList(ds, consumeErrors=True)
        if failures:
            failures[0].raiseException()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _live(self) -> bool:
        return any(s.state not in ("done", "lost") for s in self._slots)

    async def _work(self, ctx: StepContext, slot: _Slot) -> None:
        feeder = self._feeder
        assert feeder is not None
        try:
            while self.sequence.cancelled is None and self._stopping is None and slot.state != "lost":
                batch = feeder.take(slot.worker)
                if batch is None:
                    if feeder.empty or not feeder.handed_out:
                        break
                    # Others still run tests that may come back: wait for a change.
                    slot.state = "idle"
                    d: Deferred[None] = Deferred()
                    self._waiting.append(d)
                    await d
                    continue
                await self._run_batch(ctx, slot, batch)
        finally:
            if slot.state != "lost":
                slot.state = "done"
            slot.end = slot.end or self._wall()
            self._wake()
            self._report()

    async def _run_batch(self, ctx: StepContext, slot: _Slot, batch: Batch) -> None:
        from txvmbot import ssh

        ledger = self._ledger
        assert ledger is not None
        spec = self.spec
        ids = batch.test_ids
        ledger.handed(batch)
        slot.state = f"running {ids[0]}" + (f" (+{len(ids) - 1})" if len(ids) > 1 else "")
        self._report()
        started = self._wall()
        slot.start = slot.start if slot.start is not None else started
        files = self._files(slot, batch)
        command = command_for(spec.run, ids, tests_file=files.tests_file, junit=files.junit)
        replace = ""
        try:
            try:
                if slot.runner is not None:
                    # Only txvmbot's own runner knows to run a batch alone.
                    alone = batch.alone and RUNNER_PY in spec.runner
                    outcome = await slot.runner.batch(ids, spec.test_timeout * len(ids), alone=alone)
                    report = None
                else:
                    if files.tests_file:
                        listing = "".join(f"{t}\n" for t in ids).encode("utf-8")
                        await slot.session.write_file(files.tests_file, listing, spec.test_timeout)
                    outcome = await slot.session.run(command, spec.test_timeout * len(ids))
                    report = await self._report_of(slot, files.junit) if files.junit else None
            except ssh.SSHCommandTimeout as e:
                answering = await self._answers(slot)
                if answering:
                    ledger.timed_out(slot.worker, batch, started, e.partial)
                    replace = f"a test passed its bound of {spec.test_timeout:g}s"
                else:
                    # Not the test: the machine itself stopped answering.
                    why = f"it stopped answering (a new ssh login failed after {e})"
                    ledger.lost(slot.worker, slot.machine.name, batch, started, e.partial, why)
                    replace = why
            except RunnerExited as e:
                # The runner died under a test (or between tests): that test
                # failed, the rest go back; a fresh runner on this machine.
                ledger.runner_died(slot.worker, slot.machine.name, batch, started, e.partial, str(e))
                try:
                    await self._start_runner(slot)
                except CancelledError:
                    raise
                except Exception as restart:
                    replace = f"its runner ended and did not start again: {restart}"
            except (ssh.SSHCommandFailed, ssh.SSHConnectError, ssh.SSHFileError) as e:
                partial = getattr(e, "partial", None)
                ledger.lost(slot.worker, slot.machine.name, batch, started, partial, str(e))
                replace = f"it stopped answering: {e}"
            else:
                ledger.ended(slot.worker, batch, started, outcome, report)
            if files.tests_file and not replace:
                await self._forget(slot, files.tests_file)
        finally:
            slot.busy += self._wall() - started
            slot.end = self._wall()
            self._wake()
            self._report()
        if replace:
            await self._replace(ctx, slot, replace)

    def _files(self, slot: _Slot, batch: Batch) -> _BatchFiles:
        """Fresh paths on the machine for this command's id list and JUnit
        XML: named by the run, the worker, the batch and a random token, so
        that neither a stale file of an earlier batch nor another machine's
        (machines may share a file system) is ever read as this one's."""
        stem = f"{REMOTE_DIR}/txvmbot-{self.check_id}-{slot.worker}-{batch.seq}-{secrets.token_hex(4)}"
        return _BatchFiles(
            tests_file=f"{stem}.tests" if self.spec.uses_tests_file else "",
            junit=f"{stem}.xml" if self.spec.format == "junit" else "",
        )

    async def _report_of(self, slot: _Slot, path: str) -> bytes | str:
        """The JUnit XML the command wrote to ``path``, fetched and removed;
        or, when there is none to read, why. A lost connection is the
        machine's trouble, not the tests': it is raised."""
        from txvmbot import ssh

        try:
            data: bytes = await slot.session.read_file(
                path, self.spec.test_timeout, limit=MAX_REPORT_BYTES, remove=True
            )
        except ssh.SSHFileMissing:
            return f"the command wrote no JUnit XML to {path}"
        except ssh.SSHFileError as e:
            if e.lost:
                raise
            return f"cannot fetch the JUnit XML {path}: {e.reason}"
        return data

    async def _forget(self, slot: _Slot, path: str) -> None:
        """Remove a batch's id list; a machine that cannot is not a failure."""
        from txvmbot import ssh

        try:
            await slot.session.remove_file(path, self.spec.test_timeout)
        except ssh.SSHFileError as e:
            self.log.info("Suite {check_id}: cannot remove {path}: {e}", check_id=self.check_id, path=path, e=e)

    async def _answers(self, slot: _Slot) -> bool:
        """Whether the slot's machine still takes a new ssh login and runs
        ``true``: a test that hangs leaves it answering, a machine that
        hangs or died does not."""
        from txvmbot import ssh

        m = slot.machine
        connect = getattr(getattr(self.spec.target, "timeouts", None), "ssh_connect", 10.0)
        try:
            probe = await ssh.open_session(
                self.reactor, m.ssh_endpoint, m.ssh_user, m.key, connect_timeout=connect
            )
        except CancelledError:
            raise
        except Exception:
            return False
        try:
            await probe.run("true", connect)
            return True
        except CancelledError:
            raise
        except Exception:
            return False
        finally:
            try:
                await probe.close()
            except Exception:
                pass

    async def _replace(self, ctx: StepContext, slot: _Slot, why: str) -> None:
        if self.sequence.cancelled is not None:
            return
        feeder = self._feeder
        assert feeder is not None
        if slot.replacements >= MAX_REPLACEMENTS or (feeder.remaining == 0 and not feeder.handed_out):
            await self._close_session(slot)
            slot.state = "done" if slot.replacements < MAX_REPLACEMENTS else "lost"
            return
        ctx.saw(f"{slot.worker}: replacing {slot.machine.name}: {why}")
        try:
            await self._swap_machine(slot)
            await self._prepare_machine(ctx, slot)
        except CancelledError:
            raise
        except Exception as e:
            self.log.warn(
                "Suite {check_id}: {worker} could not get a fresh machine ({e}); it stops",
                check_id=self.check_id,
                worker=slot.worker,
                e=e,
            )
            slot.state = "lost"
            await self._close_session(slot)
            await self.machines.release(slot.machine)

    # -- figures ----------------------------------------------------------

    def _report(self) -> None:
        if self._progress is None or self._feeder is None:
            return
        counts = R.count_outcomes(self._results.values())
        feeder = self._feeder
        done = len(self._results)
        eta: float | None = None
        elapsed = self._wall() - self._t0
        if done and feeder.total > done:
            eta = elapsed / done * (feeder.total - done)
        try:
            self._progress(
                Progress(
                    total=feeder.total,
                    done=done,
                    passed=counts["passed"],
                    failed=counts["failed"] + counts["timeout"] + counts["infra"],
                    slots=tuple(SlotState(s.worker, s.machine.name, s.state) for s in self._slots),
                    eta=eta,
                )
            )
        except Exception:
            self.log.failure("The suite's progress callback failed")

    def _times(self) -> tuple[MachineTime, ...]:
        return tuple(
            MachineTime(s.worker, s.start or self._t0, s.end or s.start or self._t0, s.busy, tuple(s.machines))
            for s in self._slots
            if s.start is not None
        )

    def _spread(self, tests: tuple[R.TestResult, ...]) -> Any:
        times = self._times()
        if not times or not tests:
            return None
        costs = self._feeder.fixed_costs() if self._feeder is not None else {}
        return summarize(
            [Timeline(t.worker, self._t0, t.end, t.busy) for t in times],
            [t.duration for t in tests if t.outcome != "infra"],
            fixed_cost=statistics.median(costs.values()) if costs else 0.0,
            between=self._ledger.between if self._ledger is not None else 0.0,
        )

    # -- evidence ---------------------------------------------------------

    def _save_evidence(self, result: SuiteResult) -> SuiteResult:
        """The machine side's evidence (steps, facts, consoles) and, beside
        it, each failing test's output."""
        machines = save_evidence(self.evidence_root, result.machines, self.log)
        if machines.evidence_dir:
            try:
                tests_dir = os.path.join(machines.evidence_dir, "tests")
                os.makedirs(tests_dir, mode=0o700, exist_ok=True)
                for t in result.tests:
                    if t.outcome in ("passed", "skipped"):
                        continue
                    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in t.test_id)[:150]
                    with open(os.path.join(tests_dir, name + ".txt"), "wb") as f:
                        f.write(f"{t.test_id}: {t.outcome} on {t.worker}: {t.message}\n".encode())
                        f.write(t.output)
            except OSError as e:
                self.log.error(
                    "Suite {check_id}: cannot save its tests' evidence: {e}", check_id=self.check_id, e=e
                )
        return attrs.evolve(result, machines=machines)
