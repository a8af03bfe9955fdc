"""The daemon's client commands against an in-process AMP server: a
``DrivenScheduler`` (a FakeScheduler that runs each job through a few steps
on the reactor) served on a unix socket in a temp dir by
``ClientCommandCase``, whose ``cli`` runs a command line in process."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import TestCase

from tests.support.fakes import FakeScheduler
from txvmbot.cli import _Streams, build_parser
from txvmbot.cli.client import connection_for, execute
from txvmbot.daemon.api.server import AMPServerFactory
from txvmbot.daemon.jobs import Job

reactor: Any = _reactor


class DrivenScheduler(FakeScheduler):
    """Runs each submitted job through a few steps on the reactor."""

    def __init__(self, outcome: str = "passed") -> None:
        super().__init__(now=reactor.seconds)
        self.outcome = outcome
        self.drive = False

    def submit_now(self, spec: Any) -> Job:
        job = super().submit_now(spec)
        if self.drive:
            steps = [
                (0.01, lambda: self.set_state(job.id, "running", started=self.now())),
                (0.02, lambda: self.step(job.id, "keypair", "running")),
                (0.025, lambda: self.step(job.id, "keypair", "running", "kp-1")),
                (0.027, lambda: self.step(job.id, "keypair", "running", "kp-1")),
                (0.03, lambda: self.step(job.id, "keypair", "passed", "kp-1")),
                (0.04, lambda: self.step(job.id, "wait-running", "running")),
                (0.05, lambda: self.finish(job.id, passed=self.outcome == "passed")),
            ]
            for delay, fn in steps:
                reactor.callLater(delay, fn)
        return job


class ClientCommandCase(TestCase):
    """A server with a DrivenScheduler on a unix socket in a temp dir, on the
    real reactor; ``cli`` runs a client command against it in process."""


    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock = os.path.join(self.dir, "txvmbot.sock")
        self.where = f"unix:path={self.sock}"
        self.sched = DrivenScheduler()
        d = serverFromString(reactor, f"unix:{self.sock}:mode=600").listen(
            AMPServerFactory(self.sched)
        )
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    async def cli(self, *argv: str, connect: bool = True) -> tuple[int, str, str]:
        args = build_parser().parse_args([*argv, *(["--connect", self.where] if connect else [])])
        out, err = io.StringIO(), io.StringIO()
        streams = _Streams(out, err, args.json)
        environ = {"HOME": self.dir}
        endpoint, tls = connection_for(args, environ)
        prepared = args.action.prepare(args, environ) if hasattr(args.action, "prepare") else None
        code = await execute(reactor, args, streams, endpoint, tls, prepared)
        return code, out.getvalue(), err.getvalue()
