"""SuiteRun, driven deterministically: a fake backend (IMachines), a fake ssh
layer whose commands end on a twisted Clock, and no real reactor.

The fakes behave as the real ones do where SuiteRun can tell: machines are
made inside a ``boot`` step of the job's sequence; ``Session.run`` fails
with SSHCommandTimeout after its ``timeout`` and with SSHCommandFailed when
the connection is lost (and every later command or connection to that
machine fails too); cancelling a command abandons it.
"""

from __future__ import annotations

import datetime
import io
import shlex
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from subunit.v2 import StreamResultToBytes
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from txvmbot import ssh
from txvmbot.errors import StepFailed
from txvmbot.jobs.suite.results import STRAY_HEADER, TestResult
from txvmbot.jobs.suite.run import SuiteRun
from txvmbot.jobs.suite.spec import SuiteResult, SuiteSpec, Upload
from txvmbot.machines import IMachines, Machine
from txvmbot.model import CheckSpec, Cloud, CommandResult, Facts

T0 = 1_700_000_000.0
TARGET = CheckSpec(cloud=Cloud(endpoint="http://127.0.0.1:1/", region="unit"), image="ami-1")
TWELVE = tuple(f"t{i:02d}" for i in range(1, 13))


# -- the fake ssh layer -------------------------------------------------------


@attrs.frozen
class Reply:
    """How a fake machine answers one command: ends ``after`` seconds with
    this status and output; or never ends (``hang``); or its connection is
    lost after ``after`` seconds (``die``), with the output so far."""

    after: float = 1.0
    exit_status: int | None = 0
    stdout: bytes = b""
    stderr: bytes = b""
    hang: bool = False
    die: bool = False


@attrs.define(eq=False)
class Ran:
    """One command a session was asked to run."""

    machine: str
    command: str
    start: float
    end: float | None = None

    @property
    def tests(self) -> tuple[str, ...]:
        """The test ids of a test command (``run-test X``, ``run-tests X Y``)."""
        words = shlex.split(self.command)
        return tuple(words[1:]) if words[0] in ("run-test", "run-tests") else ()


class Lab:
    """The machines' side of ssh. ``answer(machine, command)`` may return a
    Reply; else tests take ``test_time[id]`` (1 s by default) and pass, and
    other commands take 0.5 s and succeed."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.endpoints: dict[str, str] = {}  # endpoint -> machine name
        self.dead: set[str] = set()
        self.ran: list[Ran] = []
        self.running: list[Ran] = []
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.uploads: list[tuple[str, str, str]] = []
        #: One file system for all machines (as loopback machines share one).
        self.files: dict[str, bytes] = {}
        self.written: list[tuple[str, str]] = []  # (machine, path)
        self.removed: list[tuple[str, str]] = []
        self.processes: list[FakeProcess] = []
        self.crash_on = ""
        self.hang_on = ""
        #: What a runner answers ``#list`` with (after ``list_time`` s): its
        #: ids, or why it cannot list (``list_error``).
        self.listing: tuple[str, ...] = ()
        self.list_error = ""
        self.list_time = 2.0
        self.test_time: dict[str, float] = {}
        self.answer: Callable[[str, str], Reply | None] = lambda machine, command: None

    def reply(self, machine: str, command: str) -> Reply:
        special = self.answer(machine, command)
        if special is not None:
            return special
        ran = Ran(machine, command, 0.0)
        if ran.tests:
            return Reply(after=sum(self.test_time.get(t, 1.0) for t in ran.tests))
        return Reply(after=0.5)

    def open_session(
        self, reactor: Any, endpoint: str, user: str, key: Any, *, connect_timeout: float
    ) -> Deferred[FakeSession]:
        assert reactor is self.clock
        assert endpoint.startswith("tcp:host=127.0.0.1:")
        assert connect_timeout > 0
        machine = self.endpoints[endpoint]
        if machine in self.dead:
            return fail(ssh.SSHConnectError(endpoint, user, "connection refused"))
        self.opened.append(machine)
        return succeed(FakeSession(self, machine, endpoint, user))

    # What tests look at.

    def test_runs(self) -> list[Ran]:
        return [r for r in self.ran if r.tests]

    def started_tests(self) -> list[str]:
        return [t for r in self.test_runs() for t in r.tests]

    def machines_of(self, test: str) -> list[str]:
        return [r.machine for r in self.test_runs() if test in r.tests]


class FakeSession:
    """A Session whose commands end on the lab's clock."""

    def __init__(self, lab: Lab, machine: str, endpoint: str, user: str) -> None:
        self.lab = lab
        self.machine = machine
        self.endpoint = endpoint
        self.user = user

    @property
    def lost(self) -> bool:
        return self.machine in self.lab.dead

    def run(self, command: str, timeout: float) -> Deferred[CommandResult]:
        lab = self.lab
        ran = Ran(self.machine, command, lab.clock.seconds())
        lab.ran.append(ran)
        if self.lost:
            return fail(
                ssh.SSHCommandFailed(
                    self.endpoint,
                    self.user,
                    command,
                    "could not start: the connection was lost",
                    CommandResult(command, None),
                )
            )
        reply = lab.reply(self.machine, command)
        partial = CommandResult(command, None, reply.stdout, reply.stderr)
        timers: list[Any] = []

        def stop() -> None:
            for t in timers:
                if t.active():
                    t.cancel()
            lab.running.remove(ran)
            ran.end = lab.clock.seconds()

        def end(outcome: CommandResult | Exception) -> None:
            stop()
            if isinstance(outcome, Exception):
                d.errback(Failure(outcome))
            else:
                d.callback(outcome)

        def die() -> None:
            lab.dead.add(self.machine)
            end(
                ssh.SSHCommandFailed(
                    self.endpoint,
                    self.user,
                    command,
                    "was cut off: the connection was lost",
                    partial,
                )
            )

        d: Deferred[CommandResult] = Deferred(lambda _: stop())
        lab.running.append(ran)
        timers.append(
            lab.clock.callLater(
                timeout,
                lambda: end(
                    ssh.SSHCommandTimeout(self.endpoint, self.user, command, timeout, partial)
                ),
            )
        )
        if reply.die:
            timers.append(lab.clock.callLater(reply.after, die))
        elif not reply.hang:
            done = CommandResult(command, reply.exit_status, reply.stdout, reply.stderr)
            timers.append(lab.clock.callLater(reply.after, end, done))
        return d

    def upload(self, source: str, dest: str, *, bound: float) -> Deferred[ssh.UploadResult]:
        self.lab.uploads.append((self.machine, source, dest))
        return succeed(ssh.UploadResult(files=1, directories=0, bytes=10, seconds=0.0))

    def write_file(self, path: str, data: bytes, bound: float, mode: int = 0o600) -> Deferred[None]:
        assert bound > 0 and mode == 0o600
        if self.lost:
            return fail(ssh.SSHFileError(self.endpoint, self.user, "write", path, "lost", lost=True))
        self.lab.files[path] = data
        self.lab.written.append((self.machine, path))
        return succeed(None)

    def read_file(self, path: str, bound: float, *, limit: int, remove: bool = False) -> Deferred[bytes]:
        assert bound > 0 and limit > 0
        if path not in self.lab.files:
            return fail(ssh.SSHFileMissing(self.endpoint, self.user, "read", path, "No such file"))
        data = self.lab.files.pop(path) if remove else self.lab.files[path]
        if remove:
            self.lab.removed.append((self.machine, path))
        return succeed(data)

    def remove_file(self, path: str, bound: float) -> Deferred[None]:
        if self.lab.files.pop(path, None) is not None:
            self.lab.removed.append((self.machine, path))
        return succeed(None)

    def start(self, command: str, on_stdout: Callable[[bytes], None]) -> Deferred[FakeProcess]:
        if self.lost:
            return fail(ssh.SSHCommandFailed(self.endpoint, self.user, command, "lost", CommandResult(command, None)))
        process = FakeProcess(self, command, on_stdout)
        self.lab.processes.append(process)
        return succeed(process)

    def close(self) -> Deferred[None]:
        self.lab.closed.append(self.machine)
        return succeed(None)


class FakeProcess:
    """A runner (``--runner``) on a fake machine: for each batch on its
    stdin, after one second a test (``lab.test_time``), the batch's subunit
    and the end-of-batch packet. ``lab.crash_on`` makes it exit 1 in the
    middle of that test."""

    def __init__(self, session: FakeSession, command: str, on_stdout: Callable[[bytes], None]) -> None:
        self.session = session
        self.command = command
        self.on_stdout = on_stdout
        self.ended: Deferred[CommandResult] = Deferred()
        self.running = True
        self.pending = ""
        self.batches: list[tuple[str, ...]] = []
        self.alone: list[tuple[str, ...]] = []  # the batches sent with #alone
        self._alone = False

    def write(self, data: bytes) -> None:
        assert self.running
        self.pending += data.decode()
        *lines, self.pending = self.pending.split("\n")
        batch: list[str] = []
        for line in lines:
            if line.startswith("#end "):
                if self._alone:
                    self.alone.append(tuple(batch))
                    self._alone = False
                self._run(tuple(batch), line[len("#end "):])
                batch = []
            elif line == "#alone":
                self._alone = True
            elif line.startswith("#list "):
                self._list(line[len("#list ") :])
            else:
                batch.append(line)

    def _list(self, token: str) -> None:
        lab = self.session.lab
        self.batches.append(("#list",))
        out = io.BytesIO()
        packets = StreamResultToBytes(out)
        packets.status(
            test_id="not-a-listed-id", test_status="inprogress"
        )  # only exists packets count
        for tid in lab.listing:
            packets.status(test_id=tid, test_status="exists")
        if lab.list_error:
            packets.status(
                test_id="txvmbot:list-error:" + token,
                file_name="error",
                file_bytes=lab.list_error.encode(),
                eof=True,
            )
        packets.status(test_id="txvmbot:end-of-batch:" + token, test_status="exists")
        lab.clock.callLater(lab.list_time, self.on_stdout, b"stray text\n" + out.getvalue())

    def _run(self, ids: tuple[str, ...], token: str) -> None:
        lab = self.session.lab
        self.batches.append(ids)
        clock = lab.clock
        if lab.hang_on in ids:
            return  # never answers: the batch passes its bound
        crash = lab.crash_on if lab.crash_on in ids else None
        ran = ids[: ids.index(crash) + 1] if crash else ids
        stream = subunit_run(ran, clock.seconds(), "", "")
        if crash:
            stream = stream[: stream.rfind(b"\xb3")]  # cut before the crashing test's end
            clock.callLater(len(ran) - 0.5, self._crash, stream)
            return
        out = io.BytesIO()
        StreamResultToBytes(out).status(test_id="txvmbot:end-of-batch:" + token, test_status="exists")
        whole = stream + out.getvalue()
        half = len(whole) - 3  # the end packet's CRC comes in a later chunk
        clock.callLater(sum(lab.test_time.get(t, 1.0) for t in ids), self.on_stdout, whole[:half])
        clock.callLater(sum(lab.test_time.get(t, 1.0) for t in ids) + 0.01, self.on_stdout, whole[half:])

    def _crash(self, stream: bytes) -> None:
        self.on_stdout(stream)
        self.running = False
        self.ended.callback(CommandResult(self.command, 1, b"", b"Segmentation fault\n"))

    def stop(self, grace: float = 5.0) -> Deferred[None]:
        if self.running:
            self.running = False
            self.ended.callback(CommandResult(self.command, 0))
        return succeed(None)


# -- the fake backend ---------------------------------------------------------


@implementer(IMachines)
class FakeMachines:
    """Hands out machines m1, m2, ... from a ``boot`` step of the job's
    sequence and records what the job asked of it."""

    check_id = "suite-unit"

    def __init__(self, clock: Clock, lab: Lab, boot: float = 0.0) -> None:
        self.clock = clock
        self.lab = lab
        self.boot = boot
        self.acquired: list[int] = []  # the count of each acquire call
        self.handed: list[Machine] = []
        self.released: list[str] = []
        self.console_calls = 0
        self.cleanups = 0
        self.closed = 0

    def prepare(self, sequence: Any) -> Deferred[None]:
        return ensureDeferred(sequence.step("prepare", 10, lambda ctx: None))

    def acquire(
        self, sequence: Any, count: int, *, ssh: bool = True
    ) -> Deferred[tuple[Machine, ...]]:
        self.acquired.append(count)

        async def boot(ctx: Any) -> tuple[Machine, ...]:
            if self.boot:
                await deferLater(self.clock, self.boot)
            fresh = []
            for _ in range(count):
                n = len(self.handed) + 1
                m = Machine(f"m{n}", f"tcp:host=127.0.0.1:port={2200 + n}", "root", key=None)
                self.lab.endpoints[m.ssh_endpoint] = m.name
                self.handed.append(m)
                fresh.append(m)
            return tuple(fresh)

        return ensureDeferred(sequence.step("boot", 10 + self.boot, boot))

    def release(self, machine: Machine) -> Deferred[None]:
        self.released.append(machine.name)
        return succeed(None)

    def console(self, steps: Any) -> Deferred[tuple[tuple[str, str], ...]]:
        self.console_calls += 1
        return succeed(tuple((m.name, f"console of {m.name}\n") for m in self.handed))

    def keep(self, steps: Any, error: str) -> Deferred[bool]:
        return succeed(False)

    def cleanup(self, steps: Any) -> Deferred[tuple[str, ...]]:
        self.cleanups += 1
        return steps.run("cleanup", 10, lambda ctx: ())

    def host_keys(self) -> tuple[tuple[str, str], ...]:
        return tuple((m.name, m.host_key) for m in self.handed if m.host_key)

    def facts(self, guest_uname: str) -> Facts:
        return Facts(endpoint="fake", guest_uname=guest_uname)

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


# -- the rig ------------------------------------------------------------------


@attrs.define
class Rig:
    clock: Clock
    lab: Lab
    machines: FakeMachines

    def spec(self, **kw: Any) -> SuiteSpec:
        values: dict[str, Any] = {
            "target": TARGET,
            "name": "unit",
            "run": "run-test {test}",
            "machines": 3,
            "tests": TWELVE,
        }
        values.update(kw)
        return SuiteSpec(**values)

    def start(self, spec: SuiteSpec, **kw: Any) -> tuple[SuiteRun, Deferred[SuiteResult]]:
        run = SuiteRun(self.clock, self.machines, spec, wall=self.clock.seconds, **kw)
        return run, run.run()

    def finish(
        self,
        d: Deferred[SuiteResult],
        each: Callable[[], None] | None = None,
        step: float = 0.5,
        limit: int = 2000,
    ) -> SuiteResult:
        """Advance the clock ``step`` at a time (calling ``each`` after every
        step) until ``d`` fires; its result."""
        got: list[Any] = []
        d.addBoth(got.append)
        for _ in range(limit):
            if got:
                break
            self.clock.advance(step)
            if each is not None and not got:
                each()
        assert got, f"the run did not end within {limit * step}s"
        if isinstance(got[0], Failure):
            got[0].raiseException()
        result: SuiteResult = got[0]
        return result


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Rig:
    clock = Clock()
    clock.advance(T0)
    lab = Lab(clock)
    monkeypatch.setattr(ssh, "open_session", lab.open_session)
    return Rig(clock, lab, FakeMachines(clock, lab))


def by_id(result: SuiteResult) -> dict[str, TestResult]:
    return {t.test_id: t for t in result.tests}


def assert_tidy(rig: Rig) -> None:
    """Everything was given back: cleanup once, every session closed, no
    command left running, no timer left on the clock."""
    assert rig.machines.cleanups == 1
    assert rig.machines.closed == 1
    assert sorted(rig.lab.closed) == sorted(rig.lab.opened)
    assert rig.lab.running == []
    assert rig.clock.getDelayedCalls() == []


# -- tests --------------------------------------------------------------------


def test_fake_backend_provides_imachines(rig: Rig) -> None:
    assert verifyObject(IMachines, rig.machines)


def test_twelve_tests_on_three_machines_all_pass_and_no_machine_idles(rig: Rig) -> None:
    rig.lab.test_time.update({t: 1.0 + (i % 4) for i, t in enumerate(TWELVE)})
    _, d = rig.start(rig.spec(uploads=(Upload("suite.tar", "/tmp/suite.tar"),), setup=("untar",)))
    idle_with_work_left: list[float] = []

    def check() -> None:
        busy = {r.machine for r in rig.lab.running if r.tests}
        setting_up = any(not r.tests for r in rig.lab.running)
        if not setting_up and len(busy) < 3 and set(rig.lab.started_tests()) != set(TWELVE):
            idle_with_work_left.append(rig.clock.seconds() - T0)

    result = rig.finish(d, each=check)

    assert result.passed, result.error
    assert sorted(rig.lab.started_tests()) == list(TWELVE)  # each test once
    assert set(by_id(result)) == set(TWELVE)
    assert all(t.outcome == "passed" and t.attempts == 1 for t in result.tests)
    assert idle_with_work_left == []
    assert rig.machines.acquired == [3]
    assert rig.machines.released == []
    assert {r.machine for r in rig.lab.test_runs()} == {"m1", "m2", "m3"}
    assert sorted(m for m, _, _ in rig.lab.uploads) == ["m1", "m2", "m3"]
    assert [t.worker for t in result.times] == ["worker-1", "worker-2", "worker-3"]
    assert all(t.busy > 0 for t in result.times)
    # 12 tests, 30 s in all, on 3 machines: the run ends within one test of 10 s.
    assert result.spread is not None
    assert result.spread.total_test_time == pytest.approx(30.0)
    assert result.spread.end_spread <= 4.0
    assert_tidy(rig)


def test_tests_start_longest_recorded_first(rig: Rig) -> None:
    recorded = {t: float(i) for i, t in enumerate(reversed(TWELVE), start=1)}  # t01 longest
    rig.lab.test_time.update(recorded)
    _, d = rig.start(rig.spec(tests=tuple(sorted(TWELVE, key=lambda t: t[-1]))), durations=recorded)

    result = rig.finish(d)

    assert result.passed
    assert rig.lab.started_tests() == sorted(TWELVE, key=lambda t: -recorded[t])


def test_a_failing_test_fails_the_run_and_keeps_its_output(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: (
        Reply(exit_status=1, stdout=b"boom\n", stderr=b"trace\n") if c == "run-test t03" else None
    )
    _, d = rig.start(rig.spec())

    result = rig.finish(d)

    assert not result.passed
    assert result.error == ""
    t03 = by_id(result)["t03"]
    assert (t03.outcome, t03.message, t03.output) == ("failed", "exit status 1", b"boom\ntrace\n")
    assert result.counts["passed"] == 11
    assert rig.machines.console_calls == 1  # evidence of the failure
    assert_tidy(rig)


def test_a_hanging_test_times_out_and_its_machine_is_replaced(rig: Rig) -> None:
    rig.lab.test_time.update(dict.fromkeys(TWELVE, 2.0))
    rig.lab.answer = lambda m, c: (
        Reply(hang=True, stdout=b"waiting forever\n") if c == "run-test t01" else None
    )
    _, d = rig.start(rig.spec(test_timeout=5.0))

    result = rig.finish(d)

    t01 = by_id(result)["t01"]
    assert t01.outcome == "timeout"
    assert "5s" in t01.message
    assert b"waiting forever" in t01.output
    assert rig.lab.machines_of("t01") == ["m1"]
    assert rig.machines.released == ["m1"]
    assert rig.machines.acquired == [3, 1]
    assert "m4" in {r.machine for r in rig.lab.test_runs()}  # the fresh one ran tests
    assert all(t.outcome == "passed" for t in result.tests if t.test_id != "t01")
    assert not result.passed
    assert result.error == ""
    assert_tidy(rig)


def test_a_machine_that_stops_answering_is_not_a_test_failure(rig: Rig) -> None:
    """The command hangs and the machine takes no new login either: the
    machine hung, not the test; the test runs again elsewhere and passes."""

    def answer(machine: str, command: str) -> Reply | None:
        if machine == "m2" and command.startswith("run-"):
            rig.lab.dead.add("m2")  # from now on it takes no login
            return Reply(hang=True)
        return None

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(test_timeout=5.0))

    result = rig.finish(d)

    (first,) = [r for r in rig.lab.test_runs() if r.machine == "m2"]
    (test,) = first.tests
    assert rig.lab.machines_of(test) == ["m2", "m4"]
    assert by_id(result)[test].outcome == "passed" and by_id(result)[test].attempts == 2
    assert result.passed
    assert rig.machines.released == ["m2"]
    assert_tidy(rig)


def test_a_test_whose_machine_dies_runs_again_elsewhere(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: Reply(die=True) if m == "m3" and c.startswith("run-") else None
    _, d = rig.start(rig.spec())

    result = rig.finish(d)

    t03 = by_id(result)["t03"]
    assert rig.lab.machines_of("t03") == ["m3", "m4"]
    assert (t03.outcome, t03.attempts) == ("passed", 2)
    assert result.passed, result.error
    assert sorted(set(rig.lab.started_tests())) == list(TWELVE)
    assert rig.machines.released == ["m3"]
    assert rig.machines.acquired == [3, 1]
    assert_tidy(rig)


def test_a_test_whose_machine_dies_twice_is_infra_not_a_failure(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: Reply(die=True) if c == "run-test t03" else None
    _, d = rig.start(rig.spec())

    result = rig.finish(d)

    t03 = by_id(result)["t03"]
    assert rig.lab.machines_of("t03") == ["m3", "m4"]
    assert t03.outcome == "infra"
    assert not t03.is_failure
    assert "m4" in t03.message
    assert result.counts["failed"] == result.counts["timeout"] == 0
    assert result.counts["passed"] == 11
    assert not result.passed
    assert rig.machines.released == ["m3", "m4"]
    assert rig.machines.acquired == [3, 1, 1]
    assert_tidy(rig)


def test_a_test_given_up_after_two_machines_counts_two_attempts(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: Reply(die=True) if c == "run-test t03" else None
    _, d = rig.start(rig.spec())

    result = rig.finish(d)

    assert by_id(result)["t03"].attempts == 2


def test_a_machine_whose_setup_fails_is_replaced_once(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: (
        Reply(after=0.5, exit_status=1, stderr=b"disk full\n") if (m, c) == ("m2", "prep") else None
    )
    _, d = rig.start(rig.spec(setup=("prep",)))

    result = rig.finish(d)

    assert result.passed, result.error
    assert rig.machines.released == ["m2"]
    assert rig.machines.acquired == [3, 1]
    assert [t.machines for t in result.times] == [("m1",), ("m2", "m4"), ("m3",)]
    assert "m2" not in {r.machine for r in rig.lab.test_runs()}
    assert_tidy(rig)


def test_setup_failing_twice_fails_the_run_with_the_output(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: (
        Reply(after=0.5, exit_status=1, stderr=f"disk full on {m}\n".encode())
        if c == "prep" and m in ("m2", "m4")
        else None
    )
    _, d = rig.start(rig.spec(setup=("prep",)))

    result = rig.finish(d)

    assert not result.passed
    assert "worker-2 on m4" in result.error
    assert "disk full on m4" in result.error
    assert rig.lab.test_runs() == []
    assert rig.machines.released == ["m2"]
    assert rig.machines.acquired == [3, 1]
    assert_tidy(rig)


def test_tests_given_up_front_are_reported_when_setup_fails(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: (
        Reply(after=0.5, exit_status=1, stderr=b"disk full\n") if c == "prep" else None
    )
    _, d = rig.start(rig.spec(setup=("prep",)))

    result = rig.finish(d)

    assert "disk full" in result.error
    assert sorted(by_id(result)) == list(TWELVE)
    assert all(t.outcome == "infra" and "not run" in t.message for t in result.tests)


def test_the_whole_run_bound_cancels_and_cleans_up(rig: Rig) -> None:
    rig.lab.test_time.update(dict.fromkeys(TWELVE, 7.0))
    _, d = rig.start(rig.spec(bound=20.0))

    result = rig.finish(d)

    assert rig.clock.seconds() - T0 == pytest.approx(20.0)
    assert "cancelled" in result.error and "bound of 20s" in result.error
    tests = by_id(result)
    assert [t for t in TWELVE if tests[t].outcome == "passed"] == list(TWELVE[:6])
    for t in TWELVE[6:]:
        assert tests[t].outcome == "infra"
        assert tests[t].message.startswith("not run: cancelled")
    assert not result.passed
    assert_tidy(rig)


def test_cancel_mid_run_cleans_up_once_with_the_reason(rig: Rig) -> None:
    rig.lab.test_time.update(dict.fromkeys(TWELVE, 5.0))
    run, d = rig.start(rig.spec())
    rig.clock.advance(7.0)
    assert not d.called

    run.cancel("stopped by the user")

    result = rig.finish(d)  # fires without the clock moving
    assert rig.clock.seconds() - T0 == pytest.approx(7.0)
    assert result.error == "cancelled: stopped by the user"
    tests = by_id(result)
    assert {t for t in TWELVE if tests[t].outcome == "passed"} == {"t01", "t02", "t03"}
    assert all(
        tests[t].outcome == "infra" and "stopped by the user" in tests[t].message
        for t in TWELVE[3:]
    )
    assert_tidy(rig)


def test_list_command_runs_once_on_the_first_machine(rig: Rig) -> None:
    rig.lab.answer = lambda m, c: (
        Reply(after=0.5, stdout=b"t1\nt2\n\n  t3\nt2\n") if c == "list-tests" else None
    )
    _, d = rig.start(rig.spec(tests=(), list_command="list-tests"))

    result = rig.finish(d)

    assert [r.machine for r in rig.lab.ran if r.command == "list-tests"] == ["m1"]
    assert [t.test_id for t in result.tests] and set(by_id(result)) == {"t1", "t2", "t3"}
    assert sorted(rig.lab.started_tests()) == ["t1", "t2", "t3"]
    assert result.passed, result.error
    assert_tidy(rig)


# -- subunit batches ----------------------------------------------------------


def subunit_run(ids: tuple[str, ...], now: float, fail: str, noisy: str) -> bytes:
    """What ``run-tests`` prints: a subunit v2 stream, one second a test;
    ``fail`` fails, ``noisy`` prints bytes that are not subunit."""
    out = io.BytesIO()
    stream = StreamResultToBytes(out)

    def at(seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(now + seconds, tz=datetime.UTC)

    for i, t in enumerate(ids):
        stream.status(test_id=t, test_status="inprogress", timestamp=at(i))
        if t == noisy:
            out.write(b"garbage \x00\xff from " + t.encode() + b"\n")
        if t == fail:
            stream.status(
                test_id=t,
                file_name="traceback",
                file_bytes=b"AssertionError: boom\n",
                eof=True,
                mime_type="text/plain;charset=utf8",
                timestamp=at(i + 0.5),
            )
        stream.status(
            test_id=t, test_status="fail" if t == fail else "success", timestamp=at(i + 1)
        )
    return out.getvalue()


def test_subunit_batches_are_read_and_garbage_kept(rig: Rig) -> None:
    ids = tuple(f"pkg.tests.test_{i:02d}" for i in range(24))
    failing, noisy = ids[5], ids[7]

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-tests":
            return None
        batch = tuple(words[1:])
        stdout = subunit_run(batch, rig.clock.seconds(), failing, noisy)
        return Reply(
            after=float(len(batch)), exit_status=1 if failing in batch else 0, stdout=stdout
        )

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(run="run-tests {tests}", format="subunit", machines=2, tests=ids))

    result = rig.finish(d)

    assert any(len(r.tests) > 1 for r in rig.lab.test_runs())  # batches
    assert sorted(rig.lab.started_tests()) == sorted(ids)
    tests = by_id(result)
    assert set(tests) == set(ids)
    assert tests[failing].outcome == "failed"
    assert tests[failing].message == "AssertionError: boom"
    assert all(tests[t].outcome == "passed" for t in ids if t != failing)
    assert STRAY_HEADER in tests[noisy].output
    assert b"garbage \x00\xff from " + noisy.encode() in tests[noisy].output
    assert tests[noisy].duration == pytest.approx(1.0)
    assert not result.passed and result.error == ""
    assert_tidy(rig)


# -- from a review: a lost slot, a batch that never exits, no leak after the end


def test_a_slot_that_gets_no_fresh_machine_stops_and_the_others_finish(rig: Rig) -> None:
    """m1 dies and no replacement can be had: its worker stops; the
    healthy machines run every other test (no crash of the whole run)."""
    real = rig.machines.acquire

    def acquire(seq: Any, count: int, *, ssh: bool = True) -> Deferred[tuple[Machine, ...]]:
        if rig.machines.acquired:  # every replacement
            rig.machines.acquired.append(count)
            return fail(StepFailed("boot", "no capacity"))
        return real(seq, count, ssh=ssh)

    rig.machines.acquire = acquire  # type: ignore[method-assign]
    rig.lab.answer = lambda m, c: Reply(die=True) if m == "m1" and c.startswith("run-") else None
    _, d = rig.start(rig.spec())

    result = rig.finish(d)

    assert result.error == ""
    assert sorted(by_id(result)) == sorted(TWELVE)
    assert all(t.outcome == "passed" for t in result.tests), [(t.test_id, t.message) for t in result.tests]
    assert "m1" in rig.machines.released
    assert_tidy(rig)


def test_a_batch_that_reports_every_test_but_never_exits(rig: Rig) -> None:
    ids = tuple(f"p.t{i:02d}" for i in range(8))

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-tests":
            return None
        return Reply(hang=True, stdout=subunit_run(tuple(words[1:]), rig.clock.seconds(), "", ""))

    rig.lab.answer = answer
    _, d = rig.start(
        rig.spec(run="run-tests {tests}", format="subunit", machines=2, tests=ids, test_timeout=5.0)
    )

    result = rig.finish(d)

    assert result.error == ""
    assert sorted(by_id(result)) == list(ids)
    assert all(t.outcome == "passed" for t in result.tests)
    assert_tidy(rig)


def test_no_machine_is_acquired_after_the_run_gave_up(rig: Rig) -> None:
    """One machine's setup fails twice (the run fails) while another is
    being replaced: nothing is acquired once the run has given up, and
    cleanup runs after every worker ended."""
    rig.lab.answer = lambda m, c: (
        Reply(exit_status=1, stderr=b"disk full") if c == "prep" and m in ("m1", "m2", "m4") else None
    )
    quick = rig.machines.release

    def release(machine: Machine) -> Deferred[None]:
        if machine.name != "m2":
            return quick(machine)
        # m2 goes back slowly: the run gives up (m1 and m4 failed) meanwhile.
        # Like the real backends, a release never fails (not even cancelled).
        async def slowly() -> None:
            try:
                await deferLater(rig.clock, 8.0, lambda: None)
            except Exception:
                pass

        return ensureDeferred(slowly())

    rig.machines.release = release  # type: ignore[method-assign]
    _, d = rig.start(rig.spec(setup=("prep",)))

    result = rig.finish(d)

    assert "disk full" in result.error
    rig.clock.advance(120.0)
    # m4 replaced m1; m2's replacement was never started.
    assert [m.name for m in rig.machines.handed] == ["m1", "m2", "m3", "m4"]
    assert rig.machines.cleanups == 1
    assert_tidy(rig)


# -- {tests_file}, --format junit, groups ------------------------------------


def junit_xml(ids: tuple[str, ...], fail: str = "", extra: str = "") -> bytes:
    """What pytest writes for node ids ``tests/test_x.py::TestX::test_n``: one
    second a test; ``fail`` fails; ``extra`` is a testcase no id asked for."""
    cases = []
    for t in ids:
        path, cls, name = t.split("::")
        classname = path.removesuffix(".py").replace("/", ".") + "." + cls
        body = '<failure message="assert 1 == 2">tb of ' + name + "</failure>" if t == fail else ""
        cases.append(f'<testcase classname="{classname}" name="{name}" time="1.000">{body}</testcase>')
    if extra:
        cases.append(f'<testcase classname="tests.test_x.Extra" name="{extra}" time="0.5"/>')
    return (
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
        + "".join(cases)
        + "</testsuite></testsuites>"
    ).encode()


def pytest_ids(n: int) -> tuple[str, ...]:
    return tuple(f"tests/test_x.py::Test{i // 4}::test_{i:02d}" for i in range(n))


def test_tests_file_is_written_before_each_command_and_removed_after(rig: Rig) -> None:
    ids = tuple(f"pkg.mod.Case{i // 3}.test_{i}" for i in range(12))
    seen: list[tuple[str, tuple[str, ...]]] = []

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-list":
            return None
        listing = rig.lab.files[words[1]].decode().splitlines()
        seen.append((words[1], tuple(listing)))
        stdout = subunit_run(tuple(listing), rig.clock.seconds(), "", "")
        return Reply(after=float(len(listing)), stdout=stdout)

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(run="run-list {tests_file}", format="subunit", machines=2, tests=ids))

    result = rig.finish(d)

    assert result.passed, [(t.test_id, t.message) for t in result.tests]
    assert sorted(t for _, listing in seen for t in listing) == sorted(ids)
    paths = [path for path, _ in seen]
    assert len(set(paths)) == len(paths)  # a fresh path for every command
    assert all(p.startswith("/tmp/txvmbot-") and p.endswith(".tests") for p in paths)
    # Classes stay together, in order (only the last, more than a
    # machine's share of what was left, may be split).
    split = set()
    for _, listing in seen:
        for case in {t.rsplit(".", 1)[0] for t in listing}:
            mine = [t for t in listing if t.startswith(case + ".")]
            whole = [t for t in ids if t.startswith(case + ".")]
            assert mine == [t for t in whole if t in mine]
            if mine != whole:
                split.add(case)
    assert split <= {"pkg.mod.Case3"}
    assert rig.lab.files == {}  # every list removed
    assert_tidy(rig)


def test_junit_reports_are_read_mapped_to_ids_and_removed(rig: Rig) -> None:
    ids = pytest_ids(12)
    failing = ids[5]
    stale: list[str] = []

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-junit":
            return None
        out, batch = words[1], tuple(words[2:])
        assert out not in rig.lab.files  # fresh: never a stale report
        stale.append(out)
        extra = "test_unasked" if ids[0] in batch else ""
        rig.lab.files[out] = junit_xml(batch, failing, extra)
        return Reply(after=float(len(batch)), exit_status=1 if failing in batch else 0, stdout=b"pytest says hi\n")

    rig.lab.answer = answer
    _, d = rig.start(
        rig.spec(run="run-junit {junit} {tests}", format="junit", machines=2, tests=ids)
    )

    result = rig.finish(d)

    tests = by_id(result)
    assert set(tests) == set(ids) | {"tests.test_x.Extra.test_unasked"}
    assert tests[failing].outcome == "failed"
    assert tests[failing].message == "assert 1 == 2"
    assert b"tb of test_05" in tests[failing].output
    assert b"pytest says hi" in tests[failing].output  # the command's own output
    assert tests["tests.test_x.Extra.test_unasked"].outcome == "passed"
    assert all(tests[t].outcome == "passed" for t in ids if t != failing)
    assert tests[ids[0]].duration == pytest.approx(1.0)
    assert len(set(stale)) == len(stale) and all(p.endswith(".xml") for p in stale)
    assert rig.lab.files == {}  # every report removed once read
    assert not result.passed and result.error == ""
    assert_tidy(rig)


@pytest.mark.parametrize(
    ("writes", "says"),
    [
        (None, "the command wrote no JUnit XML to /tmp/txvmbot-"),
        (b"<testsuites><testsuite>", "JUnit XML"),
        (b"<html>not junit</html>", "JUnit XML"),
    ],
)
def test_a_missing_or_broken_junit_report_fails_its_batch_with_the_reason(
    rig: Rig, writes: bytes | None, says: str
) -> None:
    ids = pytest_ids(4)

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-junit":
            return None
        if writes is not None:
            rig.lab.files[words[1]] = writes
        return Reply(after=1.0, exit_status=4, stderr=b"ERROR: usage\n")

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(run="run-junit {junit} {tests}", format="junit", machines=1, tests=ids))

    result = rig.finish(d)

    assert result.error == ""
    assert sorted(by_id(result)) == sorted(ids)
    for t in result.tests:
        assert t.outcome == "failed"
        assert says in t.message and "exit status 4" in t.message
        assert b"ERROR: usage" in t.output
    assert rig.lab.files == {}
    assert_tidy(rig)


def test_an_id_with_no_testcase_did_not_run(rig: Rig) -> None:
    ids = pytest_ids(4)

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-junit":
            return None
        batch = tuple(t for t in words[2:] if t != ids[2])
        rig.lab.files[words[1]] = junit_xml(batch)
        return Reply(after=float(len(batch)))

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(run="run-junit {junit} {tests}", format="junit", machines=1, tests=ids))

    tests = by_id(rig.finish(d))

    assert tests[ids[2]].outcome == "failed"
    assert "not in the JUnit XML" in tests[ids[2]].message
    assert all(tests[t].outcome == "passed" for t in ids if t != ids[2])


def test_the_summary_counts_the_measured_cost_of_a_command(rig: Rig) -> None:
    """Every command costs 3 s besides its tests: the feeder learns it and
    the lower bound the summary prints includes it."""
    ids = tuple(f"pkg.mod.Case{i}.test" for i in range(40))

    def answer(machine: str, command: str) -> Reply | None:
        words = shlex.split(command)
        if words[0] != "run-tests":
            return None
        batch = tuple(words[1:])
        stdout = subunit_run(batch, rig.clock.seconds() + 3.0, "", "")
        return Reply(after=3.0 + len(batch), stdout=stdout)

    rig.lab.answer = answer
    _, d = rig.start(rig.spec(run="run-tests {tests}", format="subunit", machines=2, tests=ids))

    result = rig.finish(d)

    assert result.passed
    spread = result.spread
    assert spread is not None
    assert spread.fixed_cost == pytest.approx(3.0, abs=0.5)
    assert spread.lower_bound == pytest.approx(20.0 + spread.fixed_cost)
    # 3 s a command: no batch of the bulk is under 2 x 3 s of tests.
    sizes = [len(r.tests) for r in rig.lab.test_runs()]
    assert len(sizes) <= 8 and min(sizes[2:-1], default=6) >= 6


def test_a_runner_per_machine_is_fed_batch_after_batch(rig: Rig) -> None:
    ids = tuple(f"pkg.mod.Case{i // 2}.test_{i}" for i in range(20))
    _, d = rig.start(
        rig.spec(runner="cd src && python3 {runner_py} --trial", run="", format="subunit", machines=2, tests=ids)
    )

    result = rig.finish(d, step=0.25)

    assert result.passed, [(t.test_id, t.message) for t in result.tests]
    assert sorted(t.test_id for t in result.tests) == sorted(ids)
    processes = rig.lab.processes
    assert len(processes) == 2  # one runner a machine, for every batch
    assert all(not p.running for p in processes)  # stopped at the end
    assert sum(len(p.batches) for p in processes) > 2
    # txvmbot's own runner was uploaded and named in the command.
    for p in processes:
        script = p.command.split()[-2]
        assert script.startswith("/tmp/txvmbot-") and script.endswith("-runner.py")
        assert b"#end " in rig.lab.files[script]
    assert rig.lab.test_runs() == []  # no command per batch
    assert_tidy(rig)


def test_a_test_that_kills_its_runner_fails_and_the_rest_run_on_a_fresh_runner(rig: Rig) -> None:
    ids = tuple(f"pkg.mod.Case{i}.test" for i in range(6))
    rig.lab.crash_on = ids[1]
    _, d = rig.start(rig.spec(runner="runner", run="", format="subunit", machines=1, tests=ids))

    result = rig.finish(d, step=0.25)

    tests = by_id(result)
    assert tests[ids[1]].outcome == "failed"
    assert "ended (exit status 1) in the middle of a batch" in tests[ids[1]].message
    assert "its stderr ends: Segmentation fault while this test ran" in tests[ids[1]].message
    assert b"Segmentation fault" in tests[ids[1]].output
    assert all(tests[t].outcome == "passed" for t in ids if t != ids[1])
    assert len(rig.lab.processes) == 2  # a fresh runner on the same machine
    assert rig.machines.released == []
    # #alone is for txvmbot's own runner ({runner_py}) only.
    assert all(p.alone == [] for p in rig.lab.processes)
    assert_tidy(rig)


def test_a_runner_that_hangs_times_out_its_batch_and_its_machine_is_replaced(rig: Rig) -> None:
    ids = tuple(f"pkg.mod.Case{i}.test" for i in range(4))
    rig.lab.hang_on = ids[0]
    _, d = rig.start(
        rig.spec(runner="runner", run="", format="subunit", machines=1, tests=ids, test_timeout=5.0)
    )

    result = rig.finish(d, step=0.5)

    tests = by_id(result)
    assert tests[ids[0]].outcome == "timeout"
    assert all(tests[t].outcome == "passed" for t in ids[1:])
    assert rig.machines.released  # the hung machine went back
    assert all(not p.running for p in rig.lab.processes)  # every runner stopped
    assert_tidy(rig)


def test_with_neither_list_nor_tests_every_runner_lists_the_tests_before_its_first_batch(
    rig: Rig,
) -> None:
    ids = tuple(f"pkg.mod.Case{i // 3}.test_{i}" for i in range(12))
    rig.lab.listing = ids
    _, d = rig.start(
        rig.spec(
            runner="python3 {runner_py} --discover .",
            run="",
            format="subunit",
            machines=2,
            tests=(),
        )
    )

    result = rig.finish(d, step=0.25)

    assert result.passed, result.error
    assert sorted(t.test_id for t in result.tests) == sorted(ids)
    # Each machine's runner was asked once, first: all list at the same time,
    # so each loads the test modules before its first batch.
    processes = rig.lab.processes
    assert len(processes) == 2
    for p in processes:
        assert p.batches[0] == ("#list",)
        assert ("#list",) not in p.batches[1:]
    assert sum(len(b) for p in processes for b in p.batches[1:]) == len(ids)
    assert rig.lab.test_runs() == [] and not [r for r in rig.lab.ran if "list" in r.command]
    # The probes (the first test of each class) ran alone, before the rest.
    alone = [t for p in processes for b in p.alone for t in b]
    assert sorted(alone) == sorted(t for t in ids if int(t.rsplit("_", 1)[1]) % 3 == 0)
    steps = {s.name: s for s in result.machines.steps}
    assert steps["list"].outcome == "passed"
    assert steps["list"].duration == pytest.approx(
        2.0, abs=0.3
    )  # side by side, not one after the other
    assert_tidy(rig)


def test_a_runner_that_cannot_list_fails_the_run_with_its_reason(rig: Rig) -> None:
    rig.lab.list_error = (
        "nothing to list: give the runner --discover START (and -t TOP, -p PATTERN) or test names"
    )
    _, d = rig.start(
        rig.spec(runner="python3 {runner_py}", run="", format="subunit", machines=2, tests=())
    )

    result = rig.finish(d, step=0.25)

    assert not result.passed and result.tests == ()
    assert (
        "cannot list its tests: nothing to list: give the runner --discover START" in result.error
    )
    assert "worker-1 on m1" in result.error
    assert_tidy(rig)


def test_a_runner_that_lists_no_tests_fails_the_run(rig: Rig) -> None:
    _, d = rig.start(
        rig.spec(runner="python3 {runner_py} --discover empty", run="", format="subunit", tests=())
    )

    result = rig.finish(d, step=0.25)

    assert not result.passed
    assert "listed no tests on m1" in result.error
    assert_tidy(rig)
