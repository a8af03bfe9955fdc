"""Integration tests: real servers started by the tests on loopback (moto, OpenSSH sshd, PostgreSQL, QEMU, headless Chromium, the daemon)."""
