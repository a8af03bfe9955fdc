"""Integration tests for one QEMU VM: the accelerator this machine offers, and
real QEMU under TCG booting the session's test image (``qemu_image``). At
most two VMs run at once; every QEMU started here is stopped by its pid in
the test's cleanup, and its only network is a forward from 127.0.0.1
(restrict=on)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.processes import kill_qemu_pid
from txvmbot.qemu.accel import qemu_version
from txvmbot.qemu.argv import free_port
from txvmbot.qemu.boot import BootSpec, boot
from txvmbot.qemu.disk import (
    check_image,
    create_overlay,
)
from txvmbot.qemu.model import READY_MARKER
from txvmbot.qemu.recover import stop_from_record
from txvmbot.qemu.vm import (
    VM,
    QEMUExited,
    VMNotReady,
    VMState,
)
from txvmbot.ssh import SSHOutcome, load_private_key, run_commands

reactor: Any = _reactor


class AccelTests(SynchronousTestCase):
    def test_qemu_version(self) -> None:
        if shutil.which("qemu-system-x86_64") is None:
            self.skipTest("no QEMU")
        v = qemu_version("qemu-system-x86_64")
        self.assertRegex(v, r"^\d+\.\d+")
        self.assertIs(qemu_version("qemu-system-x86_64"), v)


# -- real QEMU ----------------------------------------------------------------


@pytest.fixture(scope="class")
def _image_for_class(request: pytest.FixtureRequest, qemu_image: Any) -> Iterator[None]:
    request.cls.image = qemu_image
    yield


@pytest.mark.usefixtures("_image_for_class")
class RealVMTests(TestCase):
    """Real QEMU under TCG on the test image."""

    timeout = 90
    image: Any

    def setUp(self) -> None:
        # Short: the QMP socket path must fit in 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="txvm-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.key = load_private_key(self.image.ssh_key)

    async def boot(self, name: str, **kw: Any) -> VM:
        kw.setdefault("accel", "auto")
        kw.setdefault("memory_mb", 256)
        kw.setdefault("cpus", 1)
        vm = await boot(reactor, BootSpec(self.image, os.path.join(self.dir, name), **kw))
        self.addCleanup(kill_qemu_pid, vm.pid)
        self.addCleanup(vm.kill)
        return vm

    def ssh(self, vm: VM, *commands: str) -> Deferred[SSHOutcome]:
        return run_commands(
            reactor,
            vm.ssh_endpoint,
            "root",
            self.key,
            commands,
            command_timeout=10,
            connect_timeout=5,
        )

    async def test_boot_ssh_and_powerdown(self) -> None:
        t0 = time.monotonic()
        vm = await self.boot("a")
        await vm.wait_ready(60)
        ready = time.monotonic() - t0
        outcome = await self.ssh(vm, "uname -a")
        to_ssh = time.monotonic() - t0
        [r] = outcome.results
        self.assertEqual(r.exit_status, 0)
        self.assertIn(b"Linux", r.stdout)
        self.assertEqual(vm.facts["qemu_accel"], "tcg")  # no kvm_intel/kvm_amd here
        self.assertIn(READY_MARKER, vm.console_text())
        how = await vm.stop(10)
        self.assertEqual(how, "powerdown")
        self.assertEqual(vm.exit_status, "exit status 0")
        self.assertIs(vm.state, VMState.GONE)
        print(f"\nboot-to-ready {ready:.2f}s, boot-to-ssh {to_ssh:.2f}s")

    async def test_never_ready(self) -> None:
        # /bin/sh as init: the guest sits at a prompt, no marker, no acpid.
        vm = await self.boot("a", append=self.image.cmdline + " rdinit=/bin/sh")
        try:
            await vm.wait_ready(8)
        except VMNotReady as e:
            self.assertTrue(e.console_tail)
            self.assertIn(e.console_tail, str(e))
            self.assertIn("8s", str(e))
        else:
            self.fail("became ready without its marker")
        # no acpid in the guest: powerdown does nothing, quit ends it
        self.assertEqual(await vm.stop(1.0), "quit")

    async def test_bad_argument(self) -> None:
        try:
            await self.boot("a", extra_args=["-no-such-option"])
        except QEMUExited as e:
            self.assertIn("exit status 1", str(e))
            self.assertIn("-no-such-option", e.stderr_tail)
        else:
            self.fail("QEMU started with a bad argument")

    async def test_port_taken_is_retried(self) -> None:
        import socket

        import txvmbot.qemu.boot as boot_module

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1], free_port()]
        self.patch(boot_module, "free_port", lambda: ports.pop(0))
        vm = await self.boot("a")
        self.assertEqual(ports, [])
        self.assertNotEqual(vm.ssh_port, taken.getsockname()[1])
        self.assertEqual(await vm.kill(), "kill")

    async def test_stop_from_record(self) -> None:
        vm = await self.boot("a")
        self.assertTrue(stop_from_record(vm.vm_dir))
        self.assertTrue(await vm.wait_exited(10))
        self.assertIs(vm.state, VMState.GONE)
        self.assertEqual(vm.ended_how, "exited")
        self.assertFalse(stop_from_record(vm.vm_dir))

    async def test_two_at_once(self) -> None:
        vms: list[VM] = await gatherResults(
            [Deferred.fromCoroutine(self.boot("a")), Deferred.fromCoroutine(self.boot("b"))]
        )
        self.assertNotEqual(vms[0].ssh_port, vms[1].ssh_port)
        await gatherResults([vm.wait_ready(60) for vm in vms])
        outcomes = await gatherResults([self.ssh(vm, "hostname") for vm in vms])
        self.assertEqual([o.results[0].exit_status for o in outcomes], [0, 0])
        self.assertEqual(await gatherResults([vm.stop(10) for vm in vms]), ["powerdown"] * 2)

    async def test_template(self) -> None:
        template = await self.boot("tmpl")
        await template.wait_ready(60)
        state = os.path.join(self.dir, "state")
        t = time.monotonic()
        await template.save_state(state)
        saved = time.monotonic() - t
        self.assertIs(template.state, VMState.GONE)
        self.assertEqual(template.ended_how, "quit")
        # The template's guest mounted /dev/vda before its snapshot, so each
        # clone's disk is an overlay on the template's (now frozen) overlay.
        assert template.config.disk is not None
        await check_image(reactor, template.config.disk)
        clone_dir = os.path.join(self.dir, "clone")
        os.makedirs(clone_dir)
        disk = await create_overlay(
            reactor, template.config.disk, os.path.join(clone_dir, "d.qcow2")
        )
        t = time.monotonic()
        clone = await self.boot("clone", incoming=state, disk=disk)
        await clone.wait_ready(30)
        outcome = await self.ssh(
            clone, "uname -a; cat /data/README >/dev/null && echo ok > /data/job"
        )
        to_ssh = time.monotonic() - t
        self.assertEqual(outcome.results[0].exit_status, 0)
        self.assertEqual(clone.facts["vm_start"], "incoming state")
        self.assertEqual(await clone.stop(10), "powerdown")
        await check_image(reactor, disk)
        print(f"\nsave_state {saved:.2f}s, template-to-ssh {to_ssh:.2f}s")
