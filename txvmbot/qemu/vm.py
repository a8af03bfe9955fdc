"""One QEMU process per VM: its state machine, its QMP session and the
errors of a local VM.

A VM is started by ``txvmbot.qemu.boot`` from a command line built by
``txvmbot.qemu.argv``; it writes the files of its directory
(``txvmbot.qemu.vm_files``), among them ``vm.json`` (pid, port, argv, start
time, image) so that a successor of a crashed daemon can find the QEMU and
stop it (``txvmbot.qemu.recover``). QEMU does not outlive the process that
started it, though: it is started through ``setpriv --pdeathsig KILL``
(``parent_death_launcher``), so the kernel kills it when its parent (a
daemon's worker, ``txvmbot check --local``) dies, even by SIGKILL.

The process goes through an explicit state machine::

    booting --> ready --> stopping --> gone
       |          |                \\-> kept   (gone, directory kept as evidence)
       \\----------+--> stopping / gone / kept (QEMU may exit at any time)

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
from typing import IO, Any

from attrs import frozen
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


# -- the VM -------------------------------------------------------------


class VMState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"
    GONE = "gone"
    KEPT = "kept"


_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.BOOTING: frozenset({VMState.READY, VMState.STOPPING, VMState.GONE, VMState.KEPT}),
    VMState.READY: frozenset({VMState.STOPPING, VMState.GONE, VMState.KEPT}),
    VMState.STOPPING: frozenset({VMState.GONE, VMState.KEPT}),
    VMState.GONE: frozenset(),
    VMState.KEPT: frozenset(),
}


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
        self.state = VMState.BOOTING
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
        self._keep = False
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

    # -- state machine ---------------------------------------------------

    def _move(self, to: VMState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise VMStateError(f"VM {self.vm_dir}: cannot go from {self.state.value} to {to.value}")
        self.log.info(
            "VM {vm_dir}: {old} -> {new}", vm_dir=self.vm_dir, old=self.state.value, new=to.value
        )
        self.state = to

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
        self.ready_after = self._clock.seconds() - self._started
        self._move(VMState.READY)
        self.log.info(
            "VM {vm_dir} ready after {seconds:.2f}s", vm_dir=self.vm_dir, seconds=self.ready_after
        )
        waiters, self._ready_waiters = self._ready_waiters, []
        for d, timer in waiters:
            if timer.active():
                timer.cancel()
            d.callback(None)

    def _process_ended(self, reason: Failure) -> None:
        self.exit_status, self.exit_code, self.exit_signal = _status_text(reason)
        self.ended_how = self._phase or "exited"
        self._transport = None
        if self._console is not None:
            self._console.close()
            self._console = None
        if self.qmp is not None:
            self.qmp.close()
        if self._incoming_task is not None:
            self._incoming_task.cancel()
        self._move(VMState.KEPT if self._keep else VMState.GONE)
        self.log.info(
            "QEMU {pid} for {vm_dir} ended ({how}): {status}",
            pid=self._pid,
            vm_dir=self.vm_dir,
            how=self.ended_how,
            status=self.exit_status,
        )
        self._write_record()
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
        waiting only."""
        if self.state is VMState.READY:
            return succeed(None)
        if self.exit_status is not None:
            return _fail(self._exited_error("waiting for the ready marker"))
        if self.state is not VMState.BOOTING:
            return _fail(VMStateError(f"VM {self.vm_dir} is {self.state.value}, not booting"))

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
        if keep:
            self._keep = True
        if self.exit_status is not None:
            return self.ended_how or "exited"
        if self.state in (VMState.BOOTING, VMState.READY):
            self._move(VMState.STOPPING)
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
        if self.state is not VMState.READY:
            raise VMStateError(f"save_state: VM {self.vm_dir} is {self.state.value}, not ready")
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
        self._move(VMState.STOPPING)
        self._phase = "quit"
        try:
            await self._qmp_call("quit", None, quit_bound)
        except (TxvmbotError, DeferredTimeout):
            pass
        if not await self.wait_exited(quit_bound):
            await self._stop(None, 0.0, quit_bound, self._keep)
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
