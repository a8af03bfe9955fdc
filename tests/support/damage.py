"""Real job stores and journals, written by txvmbot's own classes, and the
damage an operator meets on a host: a block of random bytes inside the
file, a truncated file, a garbage header. Deterministic: the "random"
bytes come from a seeded generator."""

from __future__ import annotations

import os
import random

from tests.support.deferreds import result_of
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.journal import SQLiteJournal
from txvmbot.testing import make_job_spec

PAGE = 4096


def make_journal(path: str, checks: int = 300) -> None:
    """A journal of ``checks`` checks with one instance each, two of three
    done: about 15 pages."""
    journal = SQLiteJournal(path)
    try:
        for i in range(checks):
            entry = result_of(journal.intend(f"check-{i}", "instance", f"txvmbot-{i}",
                                   "http://127.0.0.1:1", "us-east-1"))
            entry = result_of(journal.created(entry, f"i-{i:08x}"))
            if i % 3:
                result_of(journal.done(entry))
    finally:
        journal.close()


def make_store(path: str, jobs: int = 200) -> None:
    """A job store of ``jobs`` queued jobs, each with its first event."""
    spec = make_job_spec("b")
    store = SQLiteJobStore(path)
    try:
        store.add_many([
            (Job(id=f"job-{i}", spec=spec, state="queued", submitted=1000.0 + i),
             JobEvent(job_id=f"job-{i}", seq=1, at=1000.0 + i, kind="state", state="queued"))
            for i in range(jobs)
        ])
    finally:
        store.close()


def scribble(path: str, page: int = 3) -> None:
    """4 KiB of random bytes over page ``page`` (1-based), as
    ``dd if=/dev/urandom of=PATH bs=4096 seek=PAGE-1 count=1 conv=notrunc``."""
    assert os.path.getsize(path) >= page * PAGE, "the file is too small to damage there"
    with open(path, "r+b") as f:
        f.seek((page - 1) * PAGE)
        f.write(random.Random(16).randbytes(PAGE))


def truncate_half(path: str) -> None:
    """Cut the file to half its size, mid-page, as ``truncate -s``."""
    os.truncate(path, os.path.getsize(path) // 2 + 100)


def garbage_header(path: str) -> None:
    """100 random bytes over the header (where "SQLite format 3" was)."""
    with open(path, "r+b") as f:
        f.write(random.Random(16).randbytes(100))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
