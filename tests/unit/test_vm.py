"""Unit tests for one QEMU VM, with no QEMU: its argv and accelerator choice,
the launcher that ties it to its parent, its state machine, stop sequence,
incoming migration and record, on a fake process reactor and a fake clock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from txvmbot.errors import StepTimeout
from txvmbot.qemu.accel import AccelError, detect_accel
from txvmbot.qemu.argv import free_port, parent_death_launcher, qemu_argv
from txvmbot.qemu.boot import BootSpec, boot
from txvmbot.qemu.disk import (
    DiskFull,
    DiskImageError,
    check_free_disk,
    check_image,
    create_overlay,
)
from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.qmp import QMPProtocol
from txvmbot.qemu.recover import stop_from_record
from txvmbot.qemu.vm import (
    VM,
    QEMUExited,
    VMConfig,
    VMNotReady,
    VMState,
    VMStateError,
)

reactor: Any = _reactor


# -- doubles ----------------------------------------------------------------


class FakeImage:
    dir = "/images/test"
    kernel: str | None = "/images/test/vmlinux"
    initrd: str | None = "/images/test/initrd"
    disk: str | None = "/images/test/disk.qcow2"
    cmdline = "console=ttyS0 quiet"
    kernel_version = "6.1.0-test"


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)


class ProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that records spawnProcess calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, str, list[str], str | None]] = []

    def spawnProcess(
        self, proto: Any, executable: str, args: Any, env: Any = None, path: Any = None, **kw: Any
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, process, executable, list(args), path))
        proto.makeConnection(process)
        return process


def make_vm(
    vm_dir: str, incoming: str | None = None, launcher: tuple[str, ...] = ()
) -> tuple[VM, ProcessReactor, StringTransport]:
    r = ProcessReactor()
    argv = qemu_argv(
        binary="/usr/bin/qemu-system-x86_64",
        image=FakeImage(),
        vm_dir=vm_dir,
        disk=os.path.join(vm_dir, "disk.qcow2"),
        accel="tcg",
        machine="q35",
        memory_mb=256,
        cpus=1,
        ssh_port=2222,
        incoming=incoming,
    )
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
        argv=tuple(argv),
        incoming=incoming,
        launcher=launcher,
    )
    vm = VM(r, r, config)
    vm._spawn()
    qmp = QMPProtocol()
    transport = StringTransport()
    qmp.makeConnection(transport)
    vm.qmp = qmp
    return vm, r, transport


def sent(transport: StringTransport) -> list[str]:
    return [json.loads(line)["execute"] for line in transport.value().splitlines()]


def answer(vm: VM, transport: StringTransport, value: Any = None) -> None:
    """Answer the last command sent on the VM's QMP session."""
    last = json.loads(transport.value().splitlines()[-1])
    assert vm.qmp is not None
    vm.qmp.dataReceived(json.dumps({"return": value or {}, "id": last["id"]}).encode() + b"\r\n")


def end(vm: VM, r: ProcessReactor, reason: Failure) -> None:
    r.spawned[-1][0].processEnded(reason)


class TempDirMixin:
    def mktemp_dir(self) -> str:
        d = tempfile.mkdtemp(prefix="txvmbot-vm-")
        self.addCleanup(shutil.rmtree, d, True)  # type: ignore[attr-defined]
        return d


# -- unit tests -------------------------------------------------------------


class ArgvTests(SynchronousTestCase):
    def test_argv(self) -> None:
        argv = qemu_argv(
            binary="/usr/bin/qemu-system-x86_64",
            image=FakeImage(),
            vm_dir="/run/vms/a,b",
            disk="/run/vms/a,b/disk.qcow2",
            accel="tcg",
            machine="q35",
            memory_mb=256,
            cpus=2,
            ssh_port=2222,
            incoming="/run/tmpl/state file",
        )
        joined = " ".join(argv)
        for expected in (
            "-nodefaults",
            "-no-user-config",
            "-display none",
            "-machine q35,accel=tcg",
            "-m 256",
            "-smp 2",
            "-kernel /images/test/vmlinux",
            "-initrd /images/test/initrd",
            "-append console=ttyS0 quiet",
            "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
            "virtio-net-pci,netdev=n0",
            "virtio-rng-pci",
            "-pidfile /run/vms/a,b/qemu.pid",
        ):
            self.assertIn(expected, joined)
        # commas in paths are doubled inside QEMU options
        self.assertIn("file=/run/vms/a,,b/disk.qcow2,format=qcow2", joined)
        self.assertIn("node-name=disk0", joined)
        self.assertIn("unix:/run/vms/a,,b/qmp.sock,server=on,wait=off", joined)
        self.assertEqual(argv[argv.index("-incoming") + 1], "exec:cat '/run/tmpl/state file'")
        self.assertNotIn("-cpu", argv)

    def test_kvm_and_disk_boot(self) -> None:
        image = FakeImage()
        image.kernel = None
        argv = qemu_argv(
            binary="q",
            image=image,
            vm_dir="/v",
            disk="/v/d.qcow2",
            accel="kvm",
            machine="pc",
            memory_mb=512,
            cpus=1,
            ssh_port=1,
        )
        self.assertIn("-cpu", argv)
        self.assertNotIn("-kernel", argv)
        self.assertNotIn("-incoming", argv)

    def test_free_port(self) -> None:
        port = free_port()
        self.assertTrue(1024 <= port < 65536)


class AccelTests(TempDirMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp_dir()
        self.dev = os.path.join(self.dir, "kvm")
        open(self.dev, "w").close()

    def modules(self, *names: str) -> str:
        path = os.path.join(self.dir, "modules")
        with open(path, "w") as f:
            for n in names:
                f.write(f"{n} 1234 0 - Live 0x0000000000000000\n")
        return path

    def test_hardware_kvm(self) -> None:
        accel, reason = detect_accel("auto", self.modules("kvm_intel", "kvm"), self.dev)
        self.assertEqual(accel, "kvm")
        self.assertIn("kvm_intel loaded", reason)

    def test_software_kvm_module_is_not_kvm(self) -> None:
        accel, reason = detect_accel("auto", self.modules("kvm_pvm", "kvm"), self.dev)
        self.assertEqual(accel, "tcg")
        self.assertIn("neither kvm_intel nor kvm_amd", reason)
        self.assertIn("kvm_pvm", reason)

    def test_kvm_asked_for_without_module(self) -> None:
        e = self.assertRaises(AccelError, detect_accel, "kvm", self.modules("kvm_pvm"), self.dev)
        self.assertIn("accel kvm asked for, but neither kvm_intel nor kvm_amd", str(e))

    def test_dev_kvm_unusable(self) -> None:
        accel, reason = detect_accel("auto", self.modules("kvm_amd"), "/nonexistent/kvm")
        self.assertEqual(accel, "tcg")
        self.assertIn("kvm_amd loaded but /nonexistent/kvm", reason)
        self.assertRaises(AccelError, detect_accel, "kvm", self.modules("kvm_amd"), "/nonexistent")

    def test_no_proc_modules(self) -> None:
        accel, reason = detect_accel("auto", "/nonexistent/modules", self.dev)
        self.assertEqual(accel, "tcg")
        self.assertIn("unreadable", reason)

    def test_tcg_override_and_nonsense(self) -> None:
        self.assertEqual(
            detect_accel("tcg", self.modules("kvm_intel"), self.dev), ("tcg", "tcg asked for")
        )
        self.assertRaises(AccelError, detect_accel, "hvf")


class ParentDeathTests(TempDirMixin, SynchronousTestCase):
    """QEMU is started through ``setpriv --pdeathsig KILL`` so that it dies
    with its parent (tests/integration/test_local.py kills the parents for real)."""

    def setUp(self) -> None:
        parent_death_launcher.cache_clear()
        self.addCleanup(parent_death_launcher.cache_clear)

    def test_launcher_is_setpriv(self) -> None:
        if shutil.which("setpriv") is None:
            self.skipTest("no setpriv (util-linux) here")
        launcher = parent_death_launcher()
        self.assertEqual(launcher[1:], ("--pdeathsig", "KILL", "--"))
        self.assertEqual(os.path.basename(launcher[0]), "setpriv")
        self.assertTrue(os.path.isabs(launcher[0]))
        self.assertIs(parent_death_launcher(), launcher)

    def test_without_setpriv_qemu_runs_bare_with_a_warning(self) -> None:
        import txvmbot.qemu.argv as argv_module

        self.patch(argv_module.shutil, "which", lambda name, path=None: None)
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.assertEqual(parent_death_launcher(), ())
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("No setpriv (util-linux)", warnings[0])
        self.assertIn("until a daemon starts again", warnings[0])

    def test_spawned_through_the_launcher_and_recorded_as_qemu(self) -> None:
        d = self.mktemp_dir()
        launcher = ("/usr/bin/setpriv", "--pdeathsig", "KILL", "--")
        vm, r, _ = make_vm(d, launcher=launcher)
        [(_, _, executable, args, path)] = r.spawned
        self.assertEqual(executable, "/usr/bin/setpriv")
        self.assertEqual(args, [*launcher, *vm.config.argv])
        self.assertEqual(path, d)
        # setpriv execs QEMU: the pid is QEMU's and the record holds QEMU's
        # own command line, which is what stop_from_record compares.
        with open(os.path.join(d, "vm.json")) as f:
            record = json.load(f)
        self.assertEqual(record["argv"], list(vm.config.argv))
        self.assertEqual(record["argv"][0], "/usr/bin/qemu-system-x86_64")
        self.assertEqual(record["pid"], vm.pid)


class StateMachineTests(TempDirMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp_dir()
        self.vm, self.r, self.qmp = make_vm(self.dir)

    def console(self, data: bytes) -> None:
        self.r.spawned[-1][0].outReceived(data)

    def test_record_written_at_spawn(self) -> None:
        with open(os.path.join(self.dir, "vm.json")) as f:
            record = json.load(f)
        self.assertEqual(record["pid"], 1000)
        self.assertEqual(record["port"], 2222)
        self.assertEqual(record["argv"], list(self.vm.config.argv))
        self.assertIsInstance(record["started"], float)
        self.assertEqual(record["image_dir"], "/images/test")
        self.assertEqual(self.vm.pid, 1000)
        self.assertEqual(self.vm.ssh_endpoint, "tcp:host=127.0.0.1:port=2222")
        self.assertEqual(self.vm.facts["qemu_accel_reason"], "tcg asked for")

    def test_marker_split_across_chunks(self) -> None:
        d = self.vm.wait_ready(60)
        half = len(READY_MARKER) // 2
        self.console(b"booting...\r\n" + READY_MARKER[:half].encode())
        self.assertNoResult(d)
        self.assertIs(self.vm.state, VMState.BOOTING)
        self.console(READY_MARKER[half:].encode() + b" 6.1.0\r\n")
        self.successResultOf(d)
        self.assertIs(self.vm.state, VMState.READY)
        self.assertIn(READY_MARKER, self.vm.console_text())
        self.successResultOf(self.vm.wait_ready(1))
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_not_ready_at_bound(self) -> None:
        d = self.vm.wait_ready(30)
        self.console(b"Kernel panic - not syncing: no init\r\n")
        self.r.advance(29.9)
        self.assertNoResult(d)
        self.r.advance(0.1)
        e = self.failureResultOf(d, VMNotReady).value
        self.assertIsInstance(e, StepTimeout)
        self.assertIn("Kernel panic - not syncing", str(e))
        self.assertIn("30s", str(e))
        self.assertEqual(self.r.getDelayedCalls(), [])
        self.assertIs(self.vm.state, VMState.BOOTING)  # left for the caller

    def test_exit_while_waiting(self) -> None:
        d = self.vm.wait_ready(30)
        self.r.spawned[-1][0].errReceived(b"qemu-system-x86_64: something broke\n")
        end(self.vm, self.r, Failure(ProcessTerminated(exitCode=1)))
        e = self.failureResultOf(d, QEMUExited).value
        self.assertIn("exit status 1", str(e))
        self.assertIn("something broke", str(e))
        self.assertIs(self.vm.state, VMState.GONE)
        self.assertEqual(self.vm.ended_how, "exited")
        self.assertEqual(self.r.getDelayedCalls(), [])
        self.failureResultOf(self.vm.wait_ready(1), QEMUExited)
        with open(os.path.join(self.dir, "vm.json")) as f:
            self.assertEqual(json.load(f)["state"], "gone")

    def test_cancel_wait_ready(self) -> None:
        d = self.vm.wait_ready(30)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_illegal_transition(self) -> None:
        end(self.vm, self.r, Failure(ProcessDone(0)))
        self.assertRaises(VMStateError, self.vm._became_ready)  # gone -> ready
        self.failureResultOf(self.vm.save_state("/tmp/x"), VMStateError)


class StopSequenceTests(TempDirMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp_dir()
        self.vm, self.r, self.qmp = make_vm(self.dir)
        self.proto = self.r.spawned[-1][0]
        self.process = self.r.spawned[-1][1]
        self.proto.outReceived(READY_MARKER.encode() + b"\n")

    def test_powerdown(self) -> None:
        d = self.vm.stop(10)
        self.assertIs(self.vm.state, VMState.STOPPING)
        self.assertEqual(sent(self.qmp), ["system_powerdown"])
        answer(self.vm, self.qmp)
        self.r.advance(3)
        self.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(d), "powerdown")
        self.assertIs(self.vm.state, VMState.GONE)
        self.assertEqual(self.process.signals, [])
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_powerdown_then_quit_then_kill(self) -> None:
        d = self.vm.stop(10, quit_bound=5, kill_bound=5)
        answer(self.vm, self.qmp)
        self.r.advance(9.9)
        self.assertEqual(sent(self.qmp), ["system_powerdown"])
        self.r.advance(0.1)
        self.assertEqual(sent(self.qmp), ["system_powerdown", "quit"])
        answer(self.vm, self.qmp)
        self.r.advance(5)
        self.assertEqual(self.process.signals, ["KILL"])
        self.assertNoResult(d)
        self.proto.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(d), "kill")
        self.assertEqual(self.vm.exit_status, "killed by signal 9")
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_quit(self) -> None:
        d = self.vm.stop(10, keep=True)
        answer(self.vm, self.qmp)
        self.r.advance(10)
        answer(self.vm, self.qmp)
        self.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(d), "quit")
        self.assertIs(self.vm.state, VMState.KEPT)
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_unanswered_qmp_is_bounded(self) -> None:
        d = self.vm.stop(10, quit_bound=5, kill_bound=5)
        self.r.advance(5)  # system_powerdown never answered
        self.r.advance(10)
        self.r.advance(5)  # quit never answered
        self.r.advance(5)
        self.assertEqual(self.process.signals, ["KILL"])
        self.proto.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(d), "kill")
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_survives_kill(self) -> None:
        d = self.vm.kill(kill_bound=5)
        self.r.advance(5)
        self.assertIn("still there 5s after SIGKILL", str(self.failureResultOf(d).value))
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_cancel_kills(self) -> None:
        d = self.vm.stop(10)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.process.signals, ["KILL"])
        self.assertEqual(self.r.getDelayedCalls(), [])
        self.proto.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(self.vm.ended_how, "kill")

    def test_stop_after_exit(self) -> None:
        self.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(self.vm.stop(10)), "exited")

    def test_save_state(self) -> None:
        path = os.path.join(self.dir, "state")
        d = self.vm.save_state(path, poll=0.1)
        self.assertEqual(sent(self.qmp), ["stop"])
        answer(self.vm, self.qmp)
        answer(self.vm, self.qmp)  # migrate-set-parameters
        migrate = json.loads(self.qmp.value().splitlines()[-1])
        self.assertEqual(migrate["arguments"]["uri"], f"exec:cat > {path}.partial")
        open(path + ".partial", "w").close()
        answer(self.vm, self.qmp)
        answer(self.vm, self.qmp, {"status": "active"})
        self.r.advance(0.1)
        answer(self.vm, self.qmp, {"status": "completed", "total-time": 5})
        self.assertTrue(os.path.exists(path))
        self.assertEqual(sent(self.qmp)[-1], "quit")
        answer(self.vm, self.qmp)
        self.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.successResultOf(d), path)
        self.assertEqual(self.vm.ended_how, "quit")
        self.assertEqual(self.r.getDelayedCalls(), [])

    def test_save_state_failure_removes_partial(self) -> None:
        path = os.path.join(self.dir, "state")
        d = self.vm.save_state(path)
        answer(self.vm, self.qmp)
        answer(self.vm, self.qmp)
        open(path + ".partial", "w").close()
        answer(self.vm, self.qmp)
        answer(self.vm, self.qmp, {"status": "failed", "error-desc": "disk full"})
        self.assertIn("migration failed: disk full", str(self.failureResultOf(d).value))
        self.assertFalse(os.path.exists(path + ".partial"))


class IncomingTests(TempDirMixin, SynchronousTestCase):
    def test_paused_state_is_continued(self) -> None:
        d = self.mktemp_dir()
        vm, r, qmp = make_vm(d, incoming=os.path.join(d, "state"))
        task = Deferred.fromCoroutine(vm._resume_incoming(0.02))
        answer(vm, qmp, {"status": "inmigrate"})
        r.advance(0.02)
        answer(vm, qmp, {"status": "paused"})
        self.assertEqual(sent(qmp)[-1], "cont")
        answer(vm, qmp)
        answer(vm, qmp, {"status": "running"})
        self.successResultOf(task)
        self.assertIs(vm.state, VMState.READY)
        self.assertEqual(vm.facts["vm_start"], "incoming state")


class RecordTests(TempDirMixin, SynchronousTestCase):
    def test_refuses_a_pid_that_is_not_that_qemu(self) -> None:
        d = self.mktemp_dir()
        sleeper = subprocess.Popen(["sleep", "30"])
        self.addCleanup(sleeper.wait)
        self.addCleanup(sleeper.kill)
        argv = ["/usr/bin/qemu-system-x86_64", "-pidfile", os.path.join(d, "qemu.pid")]
        with open(os.path.join(d, "vm.json"), "w") as f:
            json.dump({"pid": sleeper.pid, "argv": argv}, f)
        self.assertFalse(stop_from_record(d))
        self.assertIsNone(sleeper.poll())
        # the argv of another directory: refused even if it matched
        with open(os.path.join(d, "vm.json"), "w") as f:
            json.dump({"pid": sleeper.pid, "argv": ["sleep", "30"]}, f)
        self.assertFalse(stop_from_record(d))
        self.assertIsNone(sleeper.poll())

    def test_no_record(self) -> None:
        self.assertFalse(stop_from_record(self.mktemp_dir()))


class DiskTests(TempDirMixin, TestCase):
    timeout = 60

    async def test_overlay_and_check(self) -> None:
        if shutil.which("qemu-img") is None:
            self.skipTest("no qemu-img")
        d = self.mktemp_dir()
        base = os.path.join(d, "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
        overlay = await create_overlay(reactor, base, os.path.join(d, "o.qcow2"))
        await check_image(reactor, overlay)
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", overlay], capture_output=True, check=True
        )
        self.assertEqual(json.loads(info.stdout)["backing-filename"], base)

    async def test_errors_name_the_file(self) -> None:
        d = self.mktemp_dir()
        try:
            await create_overlay(reactor, os.path.join(d, "missing.qcow2"), os.path.join(d, "o"))
        except DiskImageError as e:
            self.assertIn("missing.qcow2", str(e))
        else:
            self.fail("overlay on a missing base")
        junk = os.path.join(d, "junk.qcow2")
        with open(junk, "wb") as f:
            f.write(b"QFI\xfb" + b"\xff" * 1000)
        try:
            await check_image(reactor, junk)
        except DiskImageError as e:
            self.assertIn(junk, str(e))
            self.assertIsNotNone(e.status)
            self.assertTrue(e.output.strip())
        else:
            self.fail("junk passed qemu-img check")

    def test_free_disk_on_small_tmpfs(self) -> None:
        d = self.mktemp_dir()
        mnt = os.path.join(d, "small")
        os.makedirs(mnt)
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mnt], capture_output=True
        )
        if p.returncode != 0:
            self.skipTest(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", mnt], check=True)
        e = self.assertRaises(DiskFull, check_free_disk, os.path.join(mnt, "vm1"), 256)
        self.assertIn(os.path.join(mnt, "vm1"), str(e))
        self.assertIn("at least 256 MB", str(e))
        self.assertLessEqual(e.free_mb, 1.0)
        self.assertGreater(check_free_disk(mnt, 0.5), 0.5)
        # boot refuses before it creates anything or starts QEMU
        failure = self.failureResultOf(
            boot(
                reactor,
                BootSpec(
                    FakeImage(),
                    os.path.join(mnt, "vm1"),
                    accel="tcg",
                    memory_mb=256,
                    cpus=1,
                    min_free_mb=256,
                ),
            ),
            DiskFull,
        )
        self.assertFalse(os.path.exists(os.path.join(mnt, "vm1")))
        del failure
