"""The files in a VM's directory, which holds everything about one VM.

The qcow2 overlay (``disk.qcow2`` unless told otherwise), the serial console
(``console.log``, written as it arrives), the QMP socket (``qmp.sock``),
QEMU's pidfile (``qemu.pid``) and ``vm.json`` (pid, port, argv, start time,
image) so that a successor of a crashed daemon can find the QEMU and stop it
(``txvmbot.qemu.recover``).
"""

from __future__ import annotations

__all__ = ["CONSOLE", "DISK", "PIDFILE", "QMP_SOCKET", "RECORD"]

CONSOLE = "console.log"
QMP_SOCKET = "qmp.sock"
PIDFILE = "qemu.pid"
RECORD = "vm.json"
DISK = "disk.qcow2"
