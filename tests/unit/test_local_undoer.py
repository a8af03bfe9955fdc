"""LocalUndoer without a VM: what the daemon's recovery does with a
``qemu-vm`` journal entry whose VM directory records a process that is not
(or no longer) that QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import SynchronousTestCase

from txvmbot.errors import StepFailed
from txvmbot.model import JournalEntry
from txvmbot.qemu import kept as K
from txvmbot.qemu.machines import VM_KIND, LocalUndoer, journal_endpoint


def entry(path: str, kind: str = VM_KIND) -> JournalEntry:
    return JournalEntry(
        check_id="c0ffee000001",
        seq=1,
        kind=kind,
        name=path,
        endpoint=journal_endpoint("local"),
        region=os.path.dirname(path),
        created=1.0,
    )


class LocalUndoerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="txl-undo-")
        self.addCleanup(shutil.rmtree, self.run_dir, True)
        self.vm_dir = os.path.join(self.run_dir, "c0ffee000001-abcdef")
        os.makedirs(self.vm_dir)
        for name in (K.OVERLAY_FILE, K.CONSOLE_FILE):
            with open(os.path.join(self.vm_dir, name), "w") as f:
                f.write("x")

    def live(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """A process that is not QEMU, stopped by its pid at cleanup."""
        p = subprocess.Popen(argv)
        self.addCleanup(p.wait, 10)
        self.addCleanup(p.kill)
        return p

    def record(self, pid: int, argv: list[str]) -> None:
        with open(os.path.join(self.vm_dir, "vm.json"), "w") as f:
            json.dump({"pid": pid, "argv": argv, "vm_dir": self.vm_dir}, f)

    def qemu_argv(self) -> list[str]:
        return ["/usr/bin/qemu-system-x86_64", "-name", "txvmbot-x",
                "-pidfile", os.path.join(self.vm_dir, "qemu.pid")]

    def undo(self) -> bool:
        # Blocking calls run at once here; the daemon runs them in a thread.
        undo = LocalUndoer(shutdown_bound=1.0, blocking=lambda f, *a: maybeDeferred(f, *a))
        return bool(self.successResultOf(undo(entry(self.vm_dir))))

    def test_recycled_pid_is_not_killed_and_the_dir_is_removed(self) -> None:
        """vm.json records a QEMU, but its pid is now a ``sleep``."""
        other = self.live(["sleep", "60"])
        self.record(other.pid, self.qemu_argv())
        self.assertTrue(self.undo())
        self.assertIsNone(other.poll())
        self.assertFalse(os.path.exists(self.vm_dir))

    def test_recycled_pid_is_not_killed_and_a_kept_dir_stays(self) -> None:
        other = self.live(["sleep", "60"])
        self.record(other.pid, self.qemu_argv())
        K.mark_kept(self.vm_dir, "c0ffee000001", "step 'commands' failed")
        self.assertTrue(self.undo())
        self.assertIsNone(other.poll())
        self.assertEqual(
            sorted(os.listdir(self.vm_dir)),
            sorted([K.CONSOLE_FILE, K.KEPT_FILE, K.OVERLAY_FILE, "vm.json"]),
        )
        self.assertEqual([k.vm_id for k in K.list_kept(self.run_dir)], [os.path.basename(self.vm_dir)])

    def test_a_record_of_a_non_qemu_command_line_is_not_killed(self) -> None:
        """Even when the live process's command line is exactly the recorded
        one, and names this directory's pidfile: it is not QEMU."""
        argv = [sys.executable, "-c", "import time; time.sleep(60)",
                "-pidfile", os.path.join(self.vm_dir, "qemu.pid")]
        other = self.live(argv)
        self.record(other.pid, argv)
        self.assertTrue(self.undo())
        self.assertIsNone(other.poll())
        self.assertFalse(os.path.exists(self.vm_dir))

    def test_dead_pid_and_no_record(self) -> None:
        gone = subprocess.Popen(["true"])
        gone.wait(10)
        self.record(gone.pid, self.qemu_argv())
        self.assertTrue(self.undo())
        self.assertFalse(os.path.exists(self.vm_dir))
        # A directory that was never made (crash between journal and mkdir).
        self.assertTrue(self.undo())

    def test_unknown_kind_is_refused(self) -> None:
        d = LocalUndoer(blocking=lambda f, *a: maybeDeferred(f, *a))(
            entry(self.vm_dir, kind="instance")
        )
        self.failureResultOf(d, StepFailed)
        self.assertTrue(os.path.exists(self.vm_dir))
