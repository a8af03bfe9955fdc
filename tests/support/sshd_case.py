"""``SSHDTestCase``: a trial TestCase whose setUp starts a real OpenSSH sshd
on 127.0.0.1 (tests/support/sshd.py) that accepts a fresh key, stopped by
its pid at cleanup; ``run_`` runs commands on it."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tests.support.sshd import SSHD, sshd_server
from txvmbot.ssh import SSHOutcome, generate_key, public_openssh, run_commands

reactor: Any = _reactor


class SSHDTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.key = generate_key()
        self.stack = ExitStack()
        self.addCleanup(self.stack.close)
        self.sshd: SSHD = self.stack.enter_context(sshd_server([public_openssh(self.key)]))

    def run_(
        self, *commands: str, command_timeout: float = 10.0, **kw: Any
    ) -> Deferred[SSHOutcome]:
        args: dict[str, Any] = dict(
            endpoint=self.sshd.endpoint,
            user=self.sshd.user,
            key=self.key,
            command_timeout=command_timeout,
            connect_timeout=10.0,
        )
        args.update(kw)
        return run_commands(reactor, commands=commands, **args)
