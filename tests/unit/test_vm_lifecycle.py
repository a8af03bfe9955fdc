"""The lifecycle of a VM (``txvmbot.qemu.vm``) on a fake process reactor and
a fake clock, no QEMU: every transition of its table, walked through the
VM's own entry points, and every input a state refuses, with the error it
gives (VMStateError, naming the VM and its state)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.qmp import QMPProtocol
from txvmbot.qemu.vm import (
    LIFECYCLE,
    VM,
    QEMUExited,
    VMConfig,
    VMNotReady,
    VMState,
    VMStateError,
)

# -- the table ----------------------------------------------------------------

#: The lifecycle as this file expects it: (state, input, next state).
TABLE = [
    ("booting", "became_ready", "ready"),
    ("booting", "wait_ready", "booting"),
    ("booting", "stop", "stopping"),
    ("booting", "stop_to_keep", "stopping to keep"),
    ("booting", "exited", "gone"),
    ("ready", "wait_ready", "ready"),
    ("ready", "save_state", "ready"),
    ("ready", "saved", "stopping"),
    ("ready", "stop", "stopping"),
    ("ready", "stop_to_keep", "stopping to keep"),
    ("ready", "exited", "gone"),
    ("stopping", "stop", "stopping"),
    ("stopping", "stop_to_keep", "stopping to keep"),
    ("stopping", "exited", "gone"),
    ("stopping to keep", "stop", "stopping to keep"),
    ("stopping to keep", "stop_to_keep", "stopping to keep"),
    ("stopping to keep", "exited", "kept"),
    ("gone", "wait_ready", "gone"),
    ("gone", "stop", "gone"),
    ("gone", "stop_to_keep", "gone"),
    ("kept", "wait_ready", "kept"),
    ("kept", "stop", "kept"),
    ("kept", "stop_to_keep", "kept"),
]
STATES = ["booting", "ready", "stopping", "stopping to keep", "gone", "kept"]
INPUTS = ["became_ready", "wait_ready", "stop", "stop_to_keep", "save_state", "saved", "exited"]
#: What VM.state shows in each state of the machine.
SHOWN = {
    "booting": VMState.BOOTING,
    "ready": VMState.READY,
    "stopping": VMState.STOPPING,
    "stopping to keep": VMState.STOPPING,
    "gone": VMState.GONE,
    "kept": VMState.KEPT,
}
ILLEGAL = [(s, i) for s in STATES for i in INPUTS if not any(r[:2] == (s, i) for r in TABLE)]


def test_the_table_is_the_one_these_tests_walk() -> None:
    assert sorted(LIFECYCLE) == sorted(TABLE)
    assert len(set(LIFECYCLE)) == len(LIFECYCLE)
    assert {s for s, _, _ in LIFECYCLE} | {n for _, _, n in LIFECYCLE} == set(STATES)
    assert {i for _, i, _ in LIFECYCLE} | {i for _, i in ILLEGAL} == set(INPUTS)


# -- doubles -------------------------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock whose spawnProcess connects the protocol to a
    FakeProcess."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess]] = []

    def spawnProcess(self, proto: Any, executable: str, args: Any, **kw: Any) -> FakeProcess:
        process = FakeProcess(4000 + len(self.spawned))
        self.spawned.append((proto, process))
        proto.makeConnection(process)
        return process


class Rig:
    """A spawned VM, its QMP session on a StringTransport, and ways to put
    it in each state of its lifecycle and give it each input."""

    def __init__(self, vm_dir: str) -> None:
        self.reactor = ProcessReactor()
        config = VMConfig(
            vm_dir=vm_dir,
            image_dir="/images/test",
            disk=os.path.join(vm_dir, "disk.qcow2"),
            accel="tcg",
            accel_reason="tcg asked for",
            machine="q35",
            memory_mb=256,
            cpus=1,
            ssh_port=2222,
            qemu_binary="/usr/bin/qemu-system-x86_64",
            qemu_version="7.2.22",
            argv=("/usr/bin/qemu-system-x86_64", "-nodefaults"),
        )
        self.vm = VM(self.reactor, self.reactor, config)
        self.vm._spawn()
        self.qmp_out = StringTransport()
        self.qmp = QMPProtocol()
        self.qmp.makeConnection(self.qmp_out)
        self.vm.qmp = self.qmp
        self.proto, self.process = self.reactor.spawned[-1]
        self.pending: list[Deferred[Any]] = []

    # QMP and the process

    def sent(self) -> list[str]:
        return [json.loads(line)["execute"] for line in self.qmp_out.value().splitlines()]

    def answer(self, value: Any = None, command: str | None = None) -> None:
        """Answer the last command sent (or the last ``command``)."""
        lines = [json.loads(line) for line in self.qmp_out.value().splitlines()]
        last = [c for c in lines if command in (None, c["execute"])][-1]
        assert self.vm.qmp is not None
        reply = {"return": value or {}, "id": last["id"]}
        self.vm.qmp.dataReceived(json.dumps(reply).encode() + b"\r\n")

    def end(self, reason: BaseException | None = None) -> None:
        """QEMU ends; the VM closes its QMP session, which the socket's end
        then fails (as a reactor would tell the protocol)."""
        self.proto.processEnded(Failure(reason or ProcessDone(0)))
        if self.qmp_out.disconnecting and self.qmp.transport is self.qmp_out:
            self.qmp.connectionLost(Failure(ConnectionDone()))
            self.qmp.transport = None

    def record_state(self) -> str:
        with open(self.vm.record_path) as f:
            state: str = json.load(f)["state"]
        return state

    # states

    def put_in(self, state: str) -> None:
        """From booting into ``state``, the way a VM gets there."""
        if state in ("ready", "stopping", "stopping to keep"):
            self.proto.outReceived(READY_MARKER.encode() + b"\n")
        if state in ("stopping", "gone"):
            self.pending.append(self.vm.stop(10))
        if state in ("stopping to keep", "kept"):
            self.pending.append(self.vm.stop(10, keep=True))
        if state in ("gone", "kept"):
            self.end()
        assert self.vm.state is SHOWN[state]

    def machine_state(self) -> str:
        """The machine's state, as far as the VM shows it: the two stopping
        states differ in where QEMU's end takes them (this ends it)."""
        if self.vm.state is not VMState.STOPPING:
            return self.vm.state.value
        self.end()
        return {VMState.GONE: "stopping", VMState.KEPT: "stopping to keep"}[self.vm.state]

    # inputs, through the VM's own entry points

    def save_state_until_saved(self) -> Deferred[str]:
        """save_state up to the point where the state is saved and QMP
        ``quit`` is next (the input ``saved``)."""
        path = os.path.join(self.vm.vm_dir, "state")
        d = self.vm.save_state(path, poll=0.1)
        self.answer()  # stop
        self.answer()  # migrate-set-parameters
        open(path + ".partial", "w").close()
        self.answer()  # migrate
        self.answer({"status": "completed", "total-time": 5})  # query-migrate
        return d

    def give(self, upon: str) -> Any:
        """Give the VM the input ``upon`` as its callers do; return what the
        entry point returned."""
        vm = self.vm
        if upon == "became_ready":
            # The console scan only looks for the marker while booting; boot
            # and the resume of a saved state call this.
            vm._became_ready()
            return None
        if upon == "wait_ready":
            return vm.wait_ready(5)
        if upon == "stop":
            return vm.stop(10)
        if upon == "stop_to_keep":
            return vm.stop(10, keep=True)
        if upon == "save_state":
            return vm.save_state(os.path.join(vm.vm_dir, "state"))
        if upon == "saved":
            # Only save_state gives it, once the guest is saved: which it
            # can only be in a ready VM. Elsewhere, ask the machine itself.
            if vm.state is VMState.READY:
                return self.save_state_until_saved()
            with vm._legal():
                vm._life.saved()
            return None
        if upon == "exited":
            self.end()
            return None
        raise AssertionError(upon)


def result_of(d: Deferred[Any]) -> Any:
    """The result a Deferred has already; raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no result yet"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def has_result(d: Deferred[Any]) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return bool(out)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(str(tmp_path))


# -- every transition -----------------------------------------------------------


@pytest.mark.parametrize("state, upon, goes_to", TABLE)
def test_transition(rig: Rig, state: str, upon: str, goes_to: str) -> None:
    rig.put_in(state)
    returned = rig.give(upon)
    assert rig.vm.state is SHOWN[goes_to]
    assert rig.machine_state() == goes_to
    for d in [returned, *rig.pending]:
        if isinstance(d, Deferred):
            d.addErrback(lambda f: None)  # what each returns: the tests below


def test_booting_becomes_ready_on_the_marker(rig: Rig) -> None:
    waiting = rig.vm.wait_ready(60)
    rig.reactor.advance(2.5)
    rig.proto.outReceived(b"[ 0.1] booting\r\n" + READY_MARKER.encode())
    assert rig.vm.state is VMState.READY
    assert result_of(waiting) is None
    assert rig.vm.ready_after == 2.5
    assert rig.reactor.getDelayedCalls() == []
    assert rig.record_state() == "booting"  # vm.json is written at spawn and at the end


def test_wait_ready_answers_by_state(rig: Rig) -> None:
    booting = rig.vm.wait_ready(5)
    assert not has_result(booting)
    rig.reactor.advance(5)
    with pytest.raises(VMNotReady):
        result_of(booting)
    assert rig.vm.state is VMState.BOOTING  # left for the caller to stop or keep

    rig.put_in("ready")
    assert result_of(rig.vm.wait_ready(5)) is None
    rig.put_in("gone")
    with pytest.raises(QEMUExited, match="exited while waiting for the ready marker: exit"):
        result_of(rig.vm.wait_ready(5))


def test_kept_answers_wait_ready_with_how_qemu_ended(rig: Rig) -> None:
    rig.put_in("kept")
    with pytest.raises(QEMUExited, match="exit status 0"):
        result_of(rig.vm.wait_ready(5))


def test_stop_from_booting_and_ready_begins_the_stop_sequence(rig: Rig) -> None:
    stopping = rig.vm.stop(10)
    assert rig.vm.state is VMState.STOPPING
    assert rig.sent() == ["system_powerdown"]
    rig.answer()
    rig.end()
    assert result_of(stopping) == "powerdown"
    assert rig.vm.state is VMState.GONE
    assert rig.record_state() == "gone"


def test_stop_again_while_stopping_goes_on(rig: Rig) -> None:
    rig.put_in("stopping")
    again = rig.vm.kill(kill_bound=5)
    assert rig.process.signals == ["KILL"]
    rig.end(ProcessTerminated(signal=9))
    assert result_of(again) == "kill"
    assert [result_of(d) for d in rig.pending] == ["kill"]
    assert rig.vm.state is VMState.GONE


def test_keep_asked_for_while_stopping_ends_in_kept(rig: Rig) -> None:
    rig.put_in("stopping")
    rig.pending.append(rig.vm.stop(10, keep=True))
    rig.pending.append(rig.vm.stop(10))  # a later stop does not undo the keep
    rig.end()
    assert rig.vm.state is VMState.KEPT
    assert rig.record_state() == "kept"
    assert [result_of(d) for d in rig.pending] == ["powerdown"] * 3


@pytest.mark.parametrize("state", ["gone", "kept"])
def test_stop_once_ended_says_how_it_ended(rig: Rig, state: str) -> None:
    rig.put_in(state)  # stopped (by stop) during the powerdown
    assert result_of(rig.vm.stop(10)) == "powerdown"
    assert result_of(rig.vm.kill(keep=True)) == "powerdown"
    assert rig.vm.state is SHOWN[state]
    assert rig.process.signals == []


def test_save_state_keeps_the_vm_ready_until_saved_then_quits(rig: Rig) -> None:
    rig.put_in("ready")
    path = os.path.join(rig.vm.vm_dir, "state")
    saving = rig.vm.save_state(path, poll=0.1)
    assert rig.sent() == ["stop"]
    rig.answer()
    rig.answer()  # migrate-set-parameters
    open(path + ".partial", "w").close()
    rig.answer()  # migrate
    rig.answer({"status": "active"})  # query-migrate
    rig.reactor.advance(0.1)
    assert rig.vm.state is VMState.READY
    rig.answer({"status": "completed"})
    assert os.path.exists(path)
    assert rig.vm.state is VMState.STOPPING
    assert rig.sent()[-1] == "quit"
    rig.answer()
    rig.end()
    assert result_of(saving) == path
    assert rig.vm.ended_how == "quit"
    assert rig.vm.state is VMState.GONE


@pytest.mark.parametrize("keep", [False, True])
def test_saved_while_stopping_is_refused(rig: Rig, keep: bool) -> None:
    """A stop that comes while save_state runs wins: save_state, once its
    state is written, may not go on to end QEMU itself."""
    rig.put_in("ready")
    path = os.path.join(rig.vm.vm_dir, "state")
    saving = rig.vm.save_state(path)
    stopping = rig.vm.stop(10, keep=keep)
    assert rig.sent() == ["stop", "system_powerdown"]
    rig.answer(command="stop")
    rig.answer()  # migrate-set-parameters
    open(path + ".partial", "w").close()
    rig.answer()  # migrate
    rig.answer({"status": "completed"})
    with pytest.raises(VMStateError, match=f"VM {rig.vm.vm_dir}: cannot go from stopping to "):
        result_of(saving)
    rig.end()
    assert rig.vm.state is (VMState.KEPT if keep else VMState.GONE)
    stopping.addErrback(lambda f: None)


@pytest.mark.parametrize("state", ["booting", "ready", "stopping", "stopping to keep"])
def test_exit_in_any_live_state_records_it_and_ends_what_waits(rig: Rig, state: str) -> None:
    rig.put_in(state)
    ready = rig.vm.wait_ready(30) if state == "booting" else None
    exited = rig.vm.wait_exited(30)
    rig.proto.errReceived(b"qemu-system-x86_64: it broke\n")
    rig.end(ProcessTerminated(exitCode=1))
    assert rig.vm.exit_status == "exit status 1"
    assert rig.vm.exit_code == 1
    assert not rig.vm.running
    assert result_of(exited) is True
    if ready is not None:
        with pytest.raises(QEMUExited, match="it broke"):
            result_of(ready)
    kept = state == "stopping to keep"
    assert rig.vm.state is (VMState.KEPT if kept else VMState.GONE)
    assert rig.record_state() == ("kept" if kept else "gone")
    for d in rig.pending:
        assert result_of(d) == "powerdown"  # ended during the powerdown wait
    assert rig.reactor.getDelayedCalls() == []
    how = "powerdown" if state.startswith("stopping") else "exited"
    assert rig.vm.ended_how == how
    assert result_of(rig.vm.stop(10)) == how


# -- callers' callbacks may use the VM at once ---------------------------------


def test_a_ready_waiter_may_stop_the_vm_from_its_callback(rig: Rig) -> None:
    """Outputs fire no Deferred: a caller's callback runs after the input
    is over, so it may give the next one (automat refuses re-entry)."""
    stopped: list[Deferred[str]] = []
    rig.vm.wait_ready(60).addCallback(lambda _: stopped.append(rig.vm.stop(10)))
    rig.proto.outReceived(READY_MARKER.encode())
    assert rig.vm.state is VMState.STOPPING
    assert rig.sent() == ["system_powerdown"]
    rig.end()
    assert result_of(stopped[0]) == "powerdown"


def test_an_exit_waiter_may_use_the_vm_from_its_callback(rig: Rig) -> None:
    seen: list[Any] = []

    def exited(_: bool) -> None:
        seen.append(result_of(rig.vm.stop(10, keep=True)))
        seen.append(rig.vm.wait_ready(1))

    rig.vm.wait_exited(30).addCallback(exited)
    rig.end()
    assert seen[0] == "exited"
    with pytest.raises(QEMUExited):
        result_of(seen[1])


# -- every refused input -------------------------------------------------------


def refusal(vm_dir: str, state: str, upon: str) -> str:
    """The message VMStateError gives (as before the lifecycle was a
    machine): the VM's directory and the state VM.state shows."""
    shown = SHOWN[state].value
    return {
        "became_ready": f"VM {vm_dir}: cannot go from {shown} to ready",
        "wait_ready": f"VM {vm_dir} is {shown}, not booting",
        "save_state": f"save_state: VM {vm_dir} is {shown}, not ready",
        "saved": f"VM {vm_dir}: cannot go from {shown} to stopping",
        "exited": f"VM {vm_dir}: cannot go from {shown} to {shown}",
    }[upon]


def test_every_state_refuses_something_but_stop() -> None:
    assert sorted({i for _, i in ILLEGAL}) == sorted(set(INPUTS) - {"stop", "stop_to_keep"})
    assert {s for s, _ in ILLEGAL} == set(STATES)


@pytest.mark.parametrize("state, upon", ILLEGAL)
def test_refused(rig: Rig, state: str, upon: str) -> None:
    rig.put_in(state)
    before = (rig.vm.state, rig.vm.ready_after, rig.vm.exit_status, rig.vm.ended_how)
    record = rig.record_state()
    try:
        returned = rig.give(upon)
    except VMStateError as e:
        # The process's and the console's inputs raise ...
        assert upon in ("became_ready", "saved", "exited")
        error = e
    else:
        # ... the operations that return a Deferred fail it.
        assert upon in ("wait_ready", "save_state")
        with pytest.raises(VMStateError) as caught:
            result_of(returned)
        error = caught.value
    assert str(error) == refusal(rig.vm.vm_dir, state, upon)
    assert (rig.vm.state, rig.vm.ready_after, rig.vm.exit_status, rig.vm.ended_how) == before
    assert rig.record_state() == record
    if upon == "save_state":
        assert "stop" not in rig.sent()
    assert rig.machine_state() == state  # and it still works as before
    for d in rig.pending:
        d.addErrback(lambda f: None)


# -- the log -------------------------------------------------------------------


def test_each_move_is_logged_once(rig: Rig) -> None:
    lines: list[str] = []
    observer: ILogObserver = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        rig.put_in("ready")
        rig.vm.wait_ready(1)
        stopping = rig.vm.stop(10)
        rig.vm.stop(10, keep=True)
        rig.vm.stop(10)
        rig.end()
    finally:
        globalLogPublisher.removeObserver(observer)
    d = rig.vm.vm_dir
    moves = [line for line in lines if line.startswith(f"VM {d}: ")]
    assert moves == [
        f"VM {d}: booting -> ready",
        f"VM {d}: ready -> stopping",
        f"VM {d}: stopping -> stopping to keep",
        f"VM {d}: stopping to keep -> kept",
    ]
    assert result_of(stopping) == "powerdown"
