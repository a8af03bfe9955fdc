"""``PoolTestBase``: a trial TestCase for the worker pool with real worker
processes against the session's moto (the ``moto`` fixture), a journal
that records the order of its calls, and helpers to wait for a job's step
events; ``closed_port`` for jobs that must hang at wait-ssh."""

from __future__ import annotations

import os
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support import checkrun
from tests.support.deferreds import result_of
from tests.support.servers import Moto
from txvmbot.daemon import codec
from txvmbot.daemon.jobs import Job
from txvmbot.daemon.workers.pool import AmpoulePool
from txvmbot.journal import SQLiteJournal
from txvmbot.model import JournalEntry, StepEvent


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordingJournal:
    """The daemon's journal (SQLite, on disk), recording the order of calls."""

    def __init__(self, path: str) -> None:
        self.inner = SQLiteJournal(path)
        self.path = path
        self.calls: list[tuple[str, str, int]] = []

    def intend(self, check_id: str, kind: str, name: str, *rest: Any) -> Deferred[JournalEntry]:
        def record(entry: JournalEntry) -> JournalEntry:
            self.calls.append(("intend", check_id, entry.seq))
            return entry

        return self.inner.intend(check_id, kind, name, *rest).addCallback(record)

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        self.calls.append(("created", entry.check_id, entry.seq))
        return self.inner.created(entry, resource_id)

    def done(self, entry: JournalEntry) -> Deferred[None]:
        self.calls.append(("done", entry.check_id, entry.seq))
        return self.inner.done(entry)

    def pending(self, check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        return self.inner.pending(check_id)

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        return self.inner.checks(older_than)

    def rows(self, check_id: str) -> list[tuple[int, str, str | None, int]]:
        with sqlite3.connect(self.path) as db:
            return list(
                db.execute(
                    "SELECT seq, kind, resource_id, done FROM entries WHERE check_id = ?"
                    " ORDER BY seq",
                    (check_id,),
                )
            )


class PoolTestBase(TestCase):
    timeout = 60

    @pytest.fixture(autouse=True)
    def _moto(self, moto: Moto) -> None:
        self.moto = moto

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="txvmbot-pool-")
        self.journal = RecordingJournal(os.path.join(self.tmp, "journal.sqlite"))
        self.addCleanup(self.journal.inner.close)
        images = checkrun.ec2(self.moto.url).describe_images(Owners=["amazon"])["Images"]
        self.image = sorted(i["ImageId"] for i in images)[0]
        self.events: dict[str, list[StepEvent]] = {}
        self.waiters: list[tuple[str, Callable[[StepEvent], bool], Deferred[StepEvent]]] = []
        self.log_events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.log_events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def pool(self, size: int = 1, recycle_after: int = 0, **kw: Any) -> AmpoulePool:
        from twisted.internet import reactor

        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_SHARED_CREDENTIALS_FILE="/dev/null",
            AWS_CONFIG_FILE="/dev/null",
        )
        env.update(kw.pop("env", {}))
        pool = AmpoulePool(
            reactor,
            size=size,
            recycle_after=recycle_after,
            evidence_root=os.path.join(self.tmp, "evidence"),
            env=env,
            python=sys.executable,
            stop_timeout=10.0,
            **kw,
        )
        self.addCleanup(pool.stop)
        return pool

    def job(self, **spec: Any) -> Job:
        table: dict[str, Any] = {
            "endpoint": self.moto.url,
            "region": "us-east-1",
            "image": self.image,
            "ssh": False,
            "timeouts": {"poll_interval": 0.2, "poll_max_interval": 0.5},
        }
        table.update(spec)
        return Job(
            id=uuid.uuid4().hex[:10],
            spec=codec.spec_from_dict(table),
            state="running",
            submitted=time.time(),
        )

    def hanging_job(self) -> Job:
        """A job that waits at wait-ssh (a closed loopback port) for 60 s."""
        return self.job(
            ssh=True,
            ssh_endpoint=f"tcp:host=127.0.0.1:port={closed_port()}",
            timeouts={"poll_interval": 0.2, "poll_max_interval": 0.5, "ssh": 60},
        )

    def on_event(self, job: Job) -> Callable[[StepEvent], None]:
        def seen(event: StepEvent) -> None:
            self.events.setdefault(job.id, []).append(event)
            for w in list(self.waiters):
                if w[0] == job.id and w[1](event):
                    self.waiters.remove(w)
                    w[2].callback(event)

        return seen

    def wait_event(self, job: Job, name: str, state: str = "running") -> Deferred[StepEvent]:
        d: Deferred[StepEvent] = Deferred()
        self.waiters.append((job.id, lambda e: (e.name, e.state) == (name, state), d))
        return d

    def assert_clean(self, check_id: str) -> None:
        self.assertEqual(checkrun.leftovers(self.moto.url, check_id), [])
        self.assertEqual(result_of(self.journal.pending(check_id)), [])

    def assert_journalled_before_created(self, check_id: str) -> None:
        calls = [(op, seq) for op, c, seq in self.journal.calls if c == check_id]
        seqs = {seq for _, seq in calls}
        self.assertTrue(seqs)
        for seq in seqs:
            ops = [op for op, s in calls if s == seq]
            self.assertEqual(ops[0], "intend", f"entry {seq}: {ops}")
            if "created" in ops:
                self.assertLess(ops.index("intend"), ops.index("created"))
