"""One QEMU process per VM: its lifecycle, its QMP session and the errors of
a local VM.

A VM is started by ``txvmbot.qemu.boot`` from a command line built by
``txvmbot.qemu.argv``; it writes the files of its directory
(``txvmbot.qemu.vm_files``), among them ``vm.json`` (pid, port, argv, start
time, image) so that a successor of a crashed daemon can find the QEMU and
stop it (``txvmbot.qemu.recover``). QEMU does not outlive the process that
started it, though: it is started through ``setpriv --pdeathsig KILL``
(``parent_death_launcher``), so the kernel kills it when its parent (a
daemon's worker, ``txvmbot check --local``) dies, even by SIGKILL.

The process goes through a state machine (automat), every transition
written down once in the table of ``_build_lifecycle``::

    booting --> ready --> stopping ----------> gone
       |          |          |
       |          \\--> stopping to keep ----> kept   (the directory kept as evidence)
       \\--> gone            (QEMU may exit in any state but gone and kept)

``stop(keep=True)`` goes to stopping to keep, from booting, ready or
stopping; ``VM.state`` shows both stopping states as ``stopping``. An input
a state has no row for is refused with VMStateError.

The guest prints READY_MARKER on the serial console once sshd listens; a VM
started from a saved state (``incoming``) was ready when it was saved, so it
is ready once QEMU runs it again.
"""

from __future__ import annotations

import enum
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, Protocol

from attrs import frozen
from automat import NoTransition, TypeMachine, TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.errors import StepTimeout, TxvmbotError
from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.qmp import QMPConnectionLost, QMPProtocol
from txvmbot.qemu.vm_files import CONSOLE, QMP_SOCKET, RECORD

__all__ = [
    "QEMUExited",
    "VM",
    "VMConfig",
    "VMError",
    "VMNotReady",
    "VMState",
    "VMStateError",
    "VMStopError",
]

_TAIL_BYTES = 64 * 1024
_STDERR_BYTES = 16 * 1024


# -- errors -------------------------------------------------------------


class VMError(TxvmbotError):
    """A local VM could not be started, made ready, saved or stopped."""


class QEMUExited(VMError):
    """QEMU ended while we still needed it: says during what, its exit
    status, the tail of its stderr and of the console."""

    def __init__(
        self, vm_dir: str, during: str, status: str, stderr_tail: str, console_tail: str
    ) -> None:
        parts = [f"QEMU for {vm_dir} exited while {during}: {status}"]
        if stderr_tail:
            parts.append(f"stderr: {stderr_tail}")
        if console_tail:
            parts.append(f"console tail:\n{console_tail}")
        super().__init__("; ".join(parts[:2]) + ("\n" + parts[2] if len(parts) > 2 else ""))
        self.vm_dir = vm_dir
        self.during = during
        self.status = status
        self.stderr_tail = stderr_tail
        self.console_tail = console_tail


class VMNotReady(StepTimeout):
    """The ready marker did not appear within the bound; carries the tail of
    the console (the only clue to a failed boot, seed 004)."""

    def __init__(
        self, vm_dir: str, bound: float, console_tail: str, marker: str = READY_MARKER
    ) -> None:
        StepTimeout.__init__(
            self,
            f"wait for {marker} on the console of {vm_dir}",
            bound,
            "\n" + console_tail if console_tail else "nothing on the console",
        )
        self.vm_dir = vm_dir
        self.console_tail = console_tail


class VMStopError(VMError):
    """QEMU did not go away even after SIGKILL within the bound."""


class VMStateError(VMError):
    """An operation was asked for in a state that does not allow it."""


# -- small helpers ------------------------------------------------------


def _tail_text(data: bytes, lines: int = 20, chars: int = 2000) -> str:
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    kept = "\n".join(text.rstrip("\n").split("\n")[-lines:])
    return kept[-chars:]


def _status_text(reason: Failure) -> tuple[str, int | None, int | None]:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit status 0", 0, None
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}", None, int(value.signal)
        return f"exit status {value.exitCode}", value.exitCode, None
    return f"ended: {reason.getErrorMessage()}", None, None


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# -- the lifecycle --------------------------------------------------------


class VMState(enum.Enum):
    """What ``VM.state`` shows of the lifecycle."""

    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"
    GONE = "gone"
    KEPT = "kept"


class _Lifecycle(Protocol):
    """The inputs of the lifecycle: what can happen to a VM. Only ``VM``
    calls them, never from inside an output (automat refuses to re-enter a
    machine for an input with a result, and postpones one without): an
    output fires no caller's Deferred; the VM does that once the input is
    over."""

    def became_ready(self) -> None:
        """The guest printed its ready marker, or its saved state runs."""

    def wait_ready(self, bound: float) -> Deferred[None]:
        """Someone waits (up to ``bound`` seconds) for the guest to be ready."""

    def stop(self) -> str | None:
        """End QEMU. None: go on and end it; else how it ended already."""

    def stop_to_keep(self) -> str | None:
        """End QEMU and keep its directory as evidence; as ``stop``."""

    def save_state(self) -> None:
        """``VM.save_state`` begins: only a ready guest can be saved."""

    def saved(self) -> None:
        """The guest's state is saved; QEMU is told to quit."""

    def exited(self, reason: Failure) -> None:
        """The QEMU process ended (on its own or because we ended it)."""


def _build_lifecycle() -> tuple[TypeMachine[_Lifecycle, VM], tuple[tuple[str, str, str], ...]]:
    """The lifecycle, every transition once: the state an input is legal in,
    the state it leads to and its output, a method of ``VM`` (``None``: no
    output; the input returns None). An input without a row in a state is
    illegal there (see ``_ILLEGAL``). Returns the machine and the table's
    ``(state, input, next state)`` names."""
    builder = TypeMachineBuilder(_Lifecycle, VM)
    booting = builder.state("booting")  # the first state is the initial one
    ready = builder.state("ready")
    stopping = builder.state("stopping")
    stopping_to_keep = builder.state("stopping to keep")
    gone = builder.state("gone")
    kept = builder.state("kept")
    shows = {
        booting: VMState.BOOTING,
        ready: VMState.READY,
        stopping: VMState.STOPPING,
        stopping_to_keep: VMState.STOPPING,
        gone: VMState.GONE,
        kept: VMState.KEPT,
    }
    L = _Lifecycle
    table: list[tuple[Any, Callable[..., Any], Any, Callable[..., Any] | None]]
    # fmt: off
    table = [
        # in state         upon             goes to           output (VM method)
        (booting,          L.became_ready,  ready,            VM._announce_ready),
        (booting,          L.wait_ready,    booting,          VM._wait_for_marker),
        (booting,          L.stop,          stopping,         None),
        (booting,          L.stop_to_keep,  stopping_to_keep, None),
        (booting,          L.exited,        gone,             VM._record_exit),

        (ready,            L.wait_ready,    ready,            VM._ready_already),
        (ready,            L.save_state,    ready,            None),
        (ready,            L.saved,         stopping,         None),
        (ready,            L.stop,          stopping,         None),
        (ready,            L.stop_to_keep,  stopping_to_keep, None),
        (ready,            L.exited,        gone,             VM._record_exit),

        (stopping,         L.stop,          stopping,         None),
        (stopping,         L.stop_to_keep,  stopping_to_keep, None),
        (stopping,         L.exited,        gone,             VM._record_exit),

        (stopping_to_keep, L.stop,          stopping_to_keep, None),
        (stopping_to_keep, L.stop_to_keep,  stopping_to_keep, None),
        (stopping_to_keep, L.exited,        kept,             VM._record_exit),

        (gone,             L.wait_ready,    gone,             VM._exited_already),
        (gone,             L.stop,          gone,             VM._how_it_ended),
        (gone,             L.stop_to_keep,  gone,             VM._how_it_ended),

        (kept,             L.wait_ready,    kept,             VM._exited_already),
        (kept,             L.stop,          kept,             VM._how_it_ended),
        (kept,             L.stop_to_keep,  kept,             VM._how_it_ended),
    ]
    # fmt: on
    for old, upon, new, output in table:
        old.upon(upon).to(new)(_output(old.name, new.name, shows[new], output))
    names = tuple((old.name, upon.__name__, new.name) for old, upon, new, _ in table)
    return builder.build(), names


#: What an input refused in a state raises (VMStateError), by input; ``state``
#: is what ``VM.state`` shows.
_ILLEGAL = {
    "became_ready": "VM {vm_dir}: cannot go from {state} to ready",
    "wait_ready": "VM {vm_dir} is {state}, not booting",
    "save_state": "save_state: VM {vm_dir} is {state}, not ready",
    "saved": "VM {vm_dir}: cannot go from {state} to stopping",
    "exited": "VM {vm_dir}: cannot go from {state} to {state}",
}


def _output(
    old: str, new: str, shows: VMState, then: Callable[..., Any] | None
) -> Callable[..., Any]:
    """The output of one row: log the move and show the new state in
    ``VM.state`` (automat keeps its own to itself), then run the row's VM
    method."""

    def output(life: _Lifecycle, vm: VM, *args: Any) -> Any:
        if new != old:
            vm.log.info("VM {vm_dir}: {old} -> {new}", vm_dir=vm.vm_dir, old=old, new=new)
            vm.state = shows
        return None if then is None else then(vm, *args)

    output.__name__ = then.__name__ if then is not None else "nothing"
    return output


# -- the VM -------------------------------------------------------------


@frozen
class VMConfig:
    """Everything fixed about one VM once it is started."""

    vm_dir: str
    image_dir: str
    disk: str | None
    accel: str
    accel_reason: str
    machine: str
    memory_mb: int
    cpus: int
    ssh_port: int
    qemu_binary: str
    qemu_version: str
    argv: tuple[str, ...]
    incoming: str | None = None
    kernel_version: str = ""
    #: what the guest prints on the console once ready; None: ready as soon
    #: as QEMU runs (wait for ssh instead).
    ready_marker: str | None = READY_MARKER
    #: the command QEMU's command line is run through (it execs QEMU, which
    #: keeps its pid and ``argv``): ``parent_death_launcher()``, or () for
    #: QEMU itself.
    launcher: tuple[str, ...] = ()


class _QEMUProcess(ProcessProtocol):
    def __init__(self, vm: VM) -> None:
        self.vm = vm

    def outReceived(self, data: bytes) -> None:
        self.vm._console_received(data)

    def errReceived(self, data: bytes) -> None:
        self.vm._stderr_received(data)

    def processEnded(self, reason: Failure) -> None:
        self.vm._process_ended(reason)


class VM:
    """One QEMU process. Made by ``boot``; not constructed directly."""

    log = Logger()

    def __init__(self, reactor: Any, clock: IReactorTime, config: VMConfig) -> None:
        self._reactor = reactor
        self._clock = clock
        self.config = config
        #: where the VM is in its lifecycle (set by the lifecycle's outputs).
        self.state = VMState.BOOTING
        self._life: _Lifecycle = _LifecycleMachine(self)
        #: how the process ended: "powerdown", "quit", "kill" (by us),
        #: "exited" (on its own), or None while it runs.
        self.ended_how: str | None = None
        #: "exit status N" / "killed by signal N" once it ended.
        self.exit_status: str | None = None
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        #: seconds from spawn to ready, once ready.
        self.ready_after: float | None = None
        self.qmp: QMPProtocol | None = None
        self._transport: Any = None
        self._pid: int | None = None
        self._started = 0.0
        self._started_wall = 0.0
        self._phase: str | None = None
        self._console: IO[bytes] | None = None
        self._console_tail = bytearray()
        self._scan = b""
        self._stderr_tail = bytearray()
        self._ready_waiters: list[tuple[Deferred[None], IDelayedCall]] = []
        self._exit_waiters: list[Deferred[None]] = []
        self._incoming_task: Deferred[None] | None = None

    # -- properties -----------------------------------------------------

    @property
    def vm_dir(self) -> str:
        return self.config.vm_dir

    @property
    def ssh_port(self) -> int:
        return self.config.ssh_port

    @property
    def ssh_endpoint(self) -> str:
        """Client endpoint string of the guest's sshd through the forward."""
        return f"tcp:host=127.0.0.1:port={self.config.ssh_port}"

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def console_path(self) -> str:
        return os.path.join(self.config.vm_dir, CONSOLE)

    @property
    def qmp_path(self) -> str:
        return os.path.join(self.config.vm_dir, QMP_SOCKET)

    @property
    def record_path(self) -> str:
        return os.path.join(self.config.vm_dir, RECORD)

    @property
    def running(self) -> bool:
        return self.exit_status is None and self._transport is not None

    def console_text(self) -> str:
        """The whole serial console so far (also after QEMU ended)."""
        if self._console is not None:
            self._console.flush()
        try:
            with open(self.console_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 20) -> str:
        return _tail_text(bytes(self._console_tail), lines)

    def stderr_tail(self) -> str:
        return _tail_text(bytes(self._stderr_tail), 10, 2000)

    @property
    def facts(self) -> dict[str, str]:
        """Facts to record with every result of this VM."""
        c = self.config
        facts = {
            "qemu_version": c.qemu_version,
            "qemu_accel": c.accel,
            "qemu_accel_reason": c.accel_reason,
            "qemu_machine": c.machine,
            "qemu_memory_mb": str(c.memory_mb),
            "qemu_cpus": str(c.cpus),
            "image_dir": c.image_dir,
            "vm_start": "incoming state" if c.incoming else "cold boot",
        }
        if c.kernel_version:
            facts["guest_kernel_version"] = c.kernel_version
        return facts

    # -- lifecycle ---------------------------------------------------------

    @contextmanager
    def _legal(self) -> Iterator[None]:
        """Around an input of the lifecycle: one that the current state has
        no row for raises VMStateError."""
        try:
            yield
        except NoTransition as e:
            message = _ILLEGAL.get(e.symbol, "VM {vm_dir}: {input} refused while {state}")
            raise VMStateError(
                message.format(vm_dir=self.vm_dir, state=self.state.value, input=e.symbol)
            ) from None

    # The lifecycle's outputs (see _build_lifecycle). They change this VM
    # only: a Deferred a caller waits on is fired after the input is over.

    def _announce_ready(self) -> None:
        self.ready_after = self._clock.seconds() - self._started
        self.log.info(
            "VM {vm_dir} ready after {seconds:.2f}s", vm_dir=self.vm_dir, seconds=self.ready_after
        )

    def _wait_for_marker(self, bound: float) -> Deferred[None]:
        def timed_out() -> None:
            self._ready_waiters = [(w, t) for w, t in self._ready_waiters if w is not d]
            d.errback(
                VMNotReady(
                    self.vm_dir, bound, self.console_tail(), self.config.ready_marker or "ready"
                )
            )

        def cancel(_: Deferred[None]) -> None:
            if timer.active():
                timer.cancel()
            self._ready_waiters = [(w, t) for w, t in self._ready_waiters if w is not d]

        d: Deferred[None] = Deferred(cancel)
        timer = self._clock.callLater(bound, timed_out)
        self._ready_waiters.append((d, timer))
        return d

    def _ready_already(self, bound: float) -> Deferred[None]:
        return succeed(None)

    def _exited_already(self, bound: float) -> Deferred[None]:
        return _fail(self._exited_error("waiting for the ready marker"))

    def _how_it_ended(self) -> str:
        return self.ended_how or "exited"

    def _record_exit(self, reason: Failure) -> None:
        self.exit_status, self.exit_code, self.exit_signal = _status_text(reason)
        self.ended_how = self._phase or "exited"
        self._transport = None
        if self._console is not None:
            self._console.close()
            self._console = None
        self.log.info(
            "QEMU {pid} for {vm_dir} ended ({how}): {status}",
            pid=self._pid,
            vm_dir=self.vm_dir,
            how=self.ended_how,
            status=self.exit_status,
        )
        self._write_record()

    # -- process --------------------------------------------------------

    def _spawn(self) -> None:
        c = self.config
        self._console = open(self.console_path, "ab")
        self._started = self._clock.seconds()
        self._started_wall = time.time()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        executable = c.launcher[0] if c.launcher else c.qemu_binary
        self._transport = self._reactor.spawnProcess(
            _QEMUProcess(self), executable, [*c.launcher, *c.argv], env=env, path=c.vm_dir
        )
        self._pid = self._transport.pid
        self.log.info(
            "Started QEMU pid {pid} for {vm_dir}, ssh forward 127.0.0.1:{port}",
            pid=self._pid,
            vm_dir=c.vm_dir,
            port=c.ssh_port,
        )
        self._write_record()

    def _write_record(self) -> None:
        c = self.config
        record: dict[str, Any] = {
            "pid": self._pid,
            "port": c.ssh_port,
            "argv": list(c.argv),
            "started": self._started_wall,
            "image_dir": c.image_dir,
            "vm_dir": c.vm_dir,
            "disk": c.disk,
            "incoming": c.incoming,
            "state": self.state.value,
        }
        if self.exit_status is not None:
            record.update(ended=self.ended_how, exit_status=self.exit_status, ended_at=time.time())
        try:
            _write_json(self.record_path, record)
        except OSError:
            self.log.failure("Could not write {path}", path=self.record_path)

    def _console_received(self, data: bytes) -> None:
        if self._console is not None:
            self._console.write(data)
            self._console.flush()
        self._console_tail += data
        if len(self._console_tail) > _TAIL_BYTES:
            del self._console_tail[: len(self._console_tail) - _TAIL_BYTES]
        if self.state is VMState.BOOTING and not self.config.incoming and self.config.ready_marker:
            marker = self.config.ready_marker.encode("utf-8")
            window = self._scan + data
            if marker in window:
                self._became_ready()
            self._scan = window[-(len(marker) - 1) :]

    def _stderr_received(self, data: bytes) -> None:
        self._stderr_tail += data
        if len(self._stderr_tail) > _STDERR_BYTES:
            del self._stderr_tail[: len(self._stderr_tail) - _STDERR_BYTES]
        self.log.info(
            "QEMU {pid} stderr: {text}", pid=self._pid, text=data.decode("utf-8", "replace").strip()
        )

    def _became_ready(self) -> None:
        """The guest is ready: booting -> ready, then wake who waits."""
        with self._legal():
            self._life.became_ready()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.callback(None)

    def _process_ended(self, reason: Failure) -> None:
        """QEMU ended: -> gone (or kept), then end what still waits on it."""
        with self._legal():
            self._life.exited(reason)
        if self.qmp is not None:
            self.qmp.close()
        if self._incoming_task is not None:
            self._incoming_task.cancel()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.errback(self._exited_error("waiting for the ready marker"))
        exits, self._exit_waiters = self._exit_waiters, []
        for e in exits:
            e.callback(None)

    def _exited_error(self, during: str) -> QEMUExited:
        return QEMUExited(
            self.vm_dir,
            during,
            self.exit_status or "still running",
            self.stderr_tail(),
            self.console_tail(),
        )

    def _why_not_connect(self) -> str | None:
        return f"QEMU ended: {self.exit_status}" if self.exit_status is not None else None

    def _signal(self, name: str) -> None:
        if self._transport is not None:
            try:
                self._transport.signalProcess(name)
            except Exception:  # ProcessExitedAlready, OSError
                self.log.debug("signal {name} to {pid} failed", name=name, pid=self._pid)

    def wait_exited(self, bound: float) -> Deferred[bool]:
        """Fire True once QEMU has ended, or False if it still runs after
        ``bound`` seconds. Cancellable."""
        if self._transport is None:
            return succeed(True)
        inner: Deferred[None] = Deferred(lambda d: self._exit_waiters.remove(d))
        self._exit_waiters.append(inner)

        def timed_out() -> None:
            self._exit_waiters.remove(inner)
            outer.callback(False)

        timer = self._clock.callLater(bound, timed_out)

        def cancel(_: Deferred[bool]) -> None:
            if timer.active():
                timer.cancel()
            if inner in self._exit_waiters:
                self._exit_waiters.remove(inner)

        outer: Deferred[bool] = Deferred(cancel)

        def exited(_: None) -> None:
            if timer.active():
                timer.cancel()
            outer.callback(True)

        inner.addCallback(exited)
        return outer

    async def _qmp_call(self, command: str, arguments: dict[str, Any] | None, bound: float) -> Any:
        if self.qmp is None:
            raise QMPConnectionLost(command, "no QMP session")
        d = self.qmp.execute(command, arguments)
        d.addTimeout(bound, self._clock)
        return await d

    # -- public operations ----------------------------------------------

    def wait_ready(self, bound: float) -> Deferred[None]:
        """Fire once the guest is ready (READY_MARKER on the console, or an
        incoming state running again). Fails with VMNotReady at ``bound``
        (with the console tail; the VM is left running for the caller to
        stop or keep), or QEMUExited if QEMU ends first. Cancelling stops
        waiting only. Fails with VMStateError if the VM is stopping."""
        try:
            with self._legal():
                return self._life.wait_ready(bound)
        except VMStateError as e:
            return _fail(e)

    def stop(
        self,
        bound_powerdown: float,
        *,
        quit_bound: float = 5.0,
        kill_bound: float = 5.0,
        keep: bool = False,
    ) -> Deferred[str]:
        """End QEMU: ACPI powerdown and up to ``bound_powerdown`` seconds for
        the guest to power off; then QMP ``quit`` (``quit_bound``); then
        SIGKILL (``kill_bound``). Fire with how it ended: ``"powerdown"``,
        ``"quit"``, ``"kill"``, or ``"exited"`` if it had ended already.
        ``keep`` ends in state kept (the directory is evidence) instead of
        gone. Fails with VMStopError only if QEMU survives SIGKILL past its
        bound. Cancelling kills QEMU at once."""
        return self._guarded(self._stop(bound_powerdown, quit_bound, kill_bound, keep))

    def kill(self, *, kill_bound: float = 5.0, keep: bool = False) -> Deferred[str]:
        """SIGKILL QEMU now; fire with ``"kill"`` once it is gone (or how it
        ended, if it already had)."""
        return self._guarded(self._stop(None, 0.0, kill_bound, keep))

    def save_state(
        self, path: str, *, bound: float = 120.0, quit_bound: float = 5.0, poll: float = 0.1
    ) -> Deferred[str]:
        """Save the running guest to the file ``path`` for later VMs started
        with ``incoming=path``, then end this QEMU; fire with ``path``.

        QMP ``stop`` (the guest stays paused, its disk overlay no longer
        changes), ``migrate`` to ``exec:cat > path.partial`` (QEMU 7.2 has no
        ``file:`` URI), ``query-migrate`` every ``poll`` seconds until
        completed (``bound``), rename into place, then QMP ``quit`` (SIGKILL
        after ``quit_bound``). A later VM must use the same image, machine,
        memory and cpus, and a disk whose content is this VM's overlay as it
        is now (an overlay backed by it): see ``boot``.
        """
        return self._guarded(self._save_state(path, bound, quit_bound, poll))

    # -- implementations -------------------------------------------------

    def _guarded(self, coro: Any) -> Deferred[Any]:
        """Run ``coro``; if it is cancelled, SIGKILL QEMU (every exit path
        ends with the process gone)."""
        d: Deferred[Any] = Deferred.fromCoroutine(coro)

        def on_cancel(f: Failure) -> Failure:
            if f.check(CancelledError):
                self._phase = "kill"
                self._signal("KILL")
            return f

        d.addErrback(on_cancel)
        return d

    async def _stop(
        self, bound_powerdown: float | None, quit_bound: float, kill_bound: float, keep: bool
    ) -> str:
        ended = self._life.stop_to_keep() if keep else self._life.stop()
        if ended is not None:
            return ended
        if bound_powerdown is not None and self.qmp is not None:
            self._phase = "powerdown"
            try:
                await self._qmp_call("system_powerdown", None, quit_bound)
            except (TxvmbotError, DeferredTimeout) as e:
                self.log.warn("system_powerdown on {vm_dir}: {e}", vm_dir=self.vm_dir, e=e)
            if await self.wait_exited(bound_powerdown):
                return self.ended_how or "powerdown"
            self.log.warn(
                "VM {vm_dir}: no power-off {bound}s after ACPI powerdown; QMP quit",
                vm_dir=self.vm_dir,
                bound=bound_powerdown,
            )
            self._phase = "quit"
            try:
                await self._qmp_call("quit", None, quit_bound)
            except (TxvmbotError, DeferredTimeout) as e:
                self.log.info("quit on {vm_dir}: {e}", vm_dir=self.vm_dir, e=e)
            if await self.wait_exited(quit_bound):
                return self.ended_how or "quit"
            self.log.warn("VM {vm_dir}: QMP quit did not end QEMU; SIGKILL", vm_dir=self.vm_dir)
        self._phase = "kill"
        self._signal("KILL")
        if await self.wait_exited(kill_bound):
            return self.ended_how or "kill"
        raise VMStopError(
            f"QEMU pid {self._pid} for {self.vm_dir} still there {kill_bound:g}s after SIGKILL"
        )

    async def _save_state(self, path: str, bound: float, quit_bound: float, poll: float) -> str:
        with self._legal():
            self._life.save_state()
        path = os.path.abspath(path)
        partial = path + ".partial"
        start = self._clock.seconds()
        try:
            await self._qmp_call("stop", None, quit_bound)
            # The default bandwidth cap (32 MiB/s in 7.2) only slows a
            # local save of a paused guest.
            await self._qmp_call("migrate-set-parameters", {"max-bandwidth": 2**40}, quit_bound)
            await self._qmp_call(
                "migrate", {"uri": "exec:cat > " + shlex.quote(partial)}, quit_bound
            )
            status: dict[str, Any] = {}
            while True:
                status = await self._qmp_call("query-migrate", None, quit_bound)
                state = status.get("status")
                if state == "completed":
                    break
                if state in ("failed", "cancelled"):
                    raise VMError(
                        f"save_state of {self.vm_dir} to {path}: migration {state}: "
                        f"{status.get('error-desc', 'no reason given')}"
                    )
                if self._clock.seconds() - start > bound:
                    raise VMError(
                        f"save_state of {self.vm_dir} to {path}: not completed within "
                        f"{bound:g}s; last status {status}"
                    )
                await _sleep(self._clock, poll)
            os.replace(partial, path)
            ram = status.get("ram", {})
            self.log.info(
                "Saved VM {vm_dir} to {path} in {ms} ms ({mb:.1f} MB)",
                vm_dir=self.vm_dir,
                path=path,
                ms=status.get("total-time"),
                mb=ram.get("transferred", 0) / 1e6,
            )
        except BaseException:
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
            raise
        with self._legal():
            self._life.saved()
        self._phase = "quit"
        try:
            await self._qmp_call("quit", None, quit_bound)
        except (TxvmbotError, DeferredTimeout):
            pass
        if not await self.wait_exited(quit_bound):
            await self._stop(None, 0.0, quit_bound, False)
        return path

    async def _resume_incoming(self, poll: float) -> None:
        """For a VM started from a saved state: once the state is loaded,
        continue it if it was saved paused, and call it ready when it runs."""
        while self.state is VMState.BOOTING and self.qmp is not None:
            status = await self._qmp_call("query-status", None, 10.0)
            state = status.get("status")
            if state == "running":
                self._became_ready()
                return
            if state in ("paused", "postmigrate", "prelaunch"):
                await self._qmp_call("cont", None, 10.0)
                continue
            await _sleep(self._clock, poll)


_LifecycleMachine, LIFECYCLE = _build_lifecycle()
"""The machine of a VM's lifecycle, and its table as ``(state, input, next
state)`` names."""


def _fail(e: BaseException) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(e)
    return d


def _sleep(clock: IReactorTime, seconds: float) -> Deferred[None]:
    calls: list[IDelayedCall] = []

    def cancel(_: Deferred[None]) -> None:
        if calls and calls[0].active():
            calls[0].cancel()

    d: Deferred[None] = Deferred(cancel)
    calls.append(clock.callLater(seconds, d.callback, None))
    return d
