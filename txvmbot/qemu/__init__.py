"""Local VMs with QEMU: a test image built offline from Debian packages, a
fresh qcow2 overlay per job, QMP over a unix socket, the serial console kept
as evidence, and everything a job started found and stopped again from the
journal after a crash."""
