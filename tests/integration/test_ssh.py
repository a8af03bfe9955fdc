"""Integration tests for txvmbot.ssh against a real OpenSSH sshd on 127.0.0.1.

Each test starts its own sshd (tests/support/sshd_case.py, about 0.15 s)
on a free loopback port and stops it by pid. Nothing here connects anywhere
but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.protocols.portforward import ProxyFactory
from twisted.trial.unittest import TestCase

from tests.support.deferreds import failed
from tests.support.servers import free_port
from tests.support.sshd import SSHD, sshd_server
from tests.support.sshd_case import SSHDTestCase
from txvmbot.ssh import (
    SSHAuthenticationError,
    SSHCommandTimeout,
    SSHWaitTimeout,
    generate_key,
    public_openssh,
    wait_for_ssh,
)

reactor: Any = _reactor


class RunCommandsTests(SSHDTestCase):
    async def test_stdout_and_stderr_are_split(self) -> None:
        outcome = await self.run_("echo hi; echo err >&2")
        [r] = outcome.results
        self.assertEqual(
            (r.stdout, r.stderr, r.exit_status, r.signal), (b"hi\n", b"err\n", 0, None)
        )
        self.assertTrue(r.ok)

    async def test_exit_status_is_a_result(self) -> None:
        outcome = await self.run_("exit 3", "echo after")
        self.assertEqual([r.exit_status for r in outcome.results], [3, 0])
        self.assertFalse(outcome.results[0].ok)
        self.assertEqual(outcome.results[1].stdout, b"after\n")

    async def test_uname(self) -> None:
        outcome = await self.run_("uname -a")
        [r] = outcome.results
        self.assertEqual(r.exit_status, 0)
        self.assertTrue(r.stdout.startswith(os.uname().sysname.encode()), r.stdout)

    async def test_signal_reported(self) -> None:
        outcome = await self.run_("kill -9 $$")
        [r] = outcome.results
        self.assertEqual((r.exit_status, r.signal), (None, "KILL"))

    async def test_host_key_fingerprint_is_the_servers(self) -> None:
        outcome = await self.run_("true")
        self.assertEqual(outcome.host_key_fingerprint, self.sshd.host_key_fingerprint)
        self.assertEqual(outcome.host_key_type, "ssh-ed25519")

    async def test_one_connection_for_all_commands(self) -> None:
        outcome = await self.run_("echo 1", "echo 2", "echo 3")
        self.assertEqual([r.stdout for r in outcome.results], [b"1\n", b"2\n", b"3\n"])
        self.assertEqual(self.sshd.log().count("Accepted publickey"), 1)
        self.assertEqual(self.sshd.log().count("Starting session: command"), 3)

    async def test_stdin_is_at_eof(self) -> None:
        outcome = await self.run_("cat; echo done")
        self.assertEqual(outcome.results[0].stdout, b"done\n")

    async def test_large_output(self) -> None:
        outcome = await self.run_("head -c 3000000 /dev/zero")
        self.assertEqual(len(outcome.results[0].stdout), 3_000_000)

    async def test_command_timeout(self) -> None:
        d = self.run_("echo first", "echo started; sleep 3", "echo never", command_timeout=0.5)
        e = await failed(d, SSHCommandTimeout)
        self.assertEqual(e.command, "echo started; sleep 3")
        self.assertEqual(e.bound, 0.5)
        self.assertEqual(e.partial.stdout, b"started\n")
        self.assertIsNone(e.partial.exit_status)
        self.assertEqual([r.stdout for r in e.results], [b"first\n"])
        self.assertEqual(e.host_key_fingerprint, self.sshd.host_key_fingerprint)
        self.assertIn("'echo started; sleep 3' did not finish within 0.5s", str(e))
        self.assertIn(self.sshd.endpoint, str(e))

    async def test_rsa_client_key(self) -> None:
        # OpenSSH >= 8.8 refuses ssh-rsa (SHA-1) signatures: rsa-sha2 is used
        key = generate_key("rsa")
        with sshd_server([public_openssh(key)]) as sshd:
            outcome = await self.run_("echo rsa", key=key, endpoint=sshd.endpoint)
        self.assertEqual(outcome.results[0].stdout, b"rsa\n")

    async def test_wrong_key(self) -> None:
        d = self.run_("true", key=generate_key())
        e = await failed(d, SSHAuthenticationError)
        self.assertIn(self.sshd.endpoint, str(e))
        self.assertIn(f"as {self.sshd.user}", str(e))
        self.assertIn("authentication failed", str(e))

    async def test_wrong_user(self) -> None:
        d = self.run_("true", user="nobody-txvmbot")
        await failed(d, SSHAuthenticationError)

    async def test_cancel_mid_command(self) -> None:
        d = self.run_("sleep 3")
        reactor.callLater(0.3, d.cancel)
        await failed(d, CancelledError)
        await deferLater(reactor, 0.05)  # let the aborted connection go

    async def test_over_a_unix_endpoint(self) -> None:
        directory = tempfile.mkdtemp(prefix="txvmbot-ssh-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "ssh.sock")
        port = reactor.listenUNIX(path, ProxyFactory("127.0.0.1", self.sshd.port))
        self.addCleanup(port.stopListening)
        outcome = await self.run_("echo via unix", endpoint=f"unix:path={path}")
        self.assertEqual(outcome.results[0].stdout, b"via unix\n")
        self.assertEqual(outcome.host_key_fingerprint, self.sshd.host_key_fingerprint)


class WaitForSSHTests(TestCase):
    timeout = 60

    async def test_succeeds_when_sshd_starts_late(self) -> None:
        key = generate_key()
        port = free_port()
        stack = ExitStack()
        self.addCleanup(stack.close)
        started: list[SSHD] = []

        def start() -> None:
            # blocks the reactor ~0.15 s while sshd starts: fine in a test
            started.append(stack.enter_context(sshd_server([public_openssh(key)], port=port)))

        reactor.callLater(1.5, start)
        seen: list[tuple[int, str]] = []
        fingerprint = await wait_for_ssh(
            reactor,
            f"tcp:host=127.0.0.1:port={port}",
            _current_user(),
            key,
            connect_timeout=2,
            bound=20,
            initial_delay=0.2,
            max_delay=0.5,
            on_attempt=lambda n, err: seen.append((n, err)),
        )
        self.assertEqual(fingerprint, started[0].host_key_fingerprint)
        self.assertGreaterEqual(len(seen), 2)
        self.assertEqual(seen[0], (1, "connection refused"))

    async def test_wait_for_ssh_wrong_key_reports_auth(self) -> None:
        stack = ExitStack()
        self.addCleanup(stack.close)
        sshd = stack.enter_context(sshd_server([public_openssh(generate_key())]))
        d = wait_for_ssh(
            reactor,
            sshd.endpoint,
            sshd.user,
            generate_key(),
            connect_timeout=2,
            bound=1.0,
            initial_delay=0.2,
        )
        e = await failed(d, SSHWaitTimeout)
        self.assertIn("authentication failed", e.last_error)


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
