"""Writes the daemon's host cannot take right now: held in order and
retried, so that a full disk is a fault the daemon rides out, not a bug
that strands a job half-way (seed 003: a full disk on the test host).

:class:`DataDir` watches the free space of the daemon's data dir and the
writes held, and says whether new jobs are refused and why.
:class:`HeldStore` and :class:`HeldJournal` wrap the SQLite job store and
journal: a write that fails with a fault of the host (SQLite's FULL, IOERR,
READONLY, CANTOPEN, or a lock held too long:
:func:`txvmbot._sqlite_errors.host_fault`) is kept in a queue, and so is
every write after it, in order; the queue is retried with backoff until it
drains. The state is logged once when writes are first held and once when
they go through again. Meanwhile the scheduler goes on from what it holds
in memory: running jobs end as they would have, and their final states
reach the file once there is room. Reads see the held writes (a job's
state, its events), so clients see what the scheduler sees.

Any other error (a bug, a damaged file) is raised at once, as before.
"""

from __future__ import annotations

import builtins
import os
from collections import deque
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot._sqlite_errors import host_fault
from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.stores.sqlite.store import AnsweredStore, SQLiteJobs, SQLiteJobStore
from txvmbot.errors import TxvmbotError
from txvmbot.interfaces import IJournal
from txvmbot.journal import MemoryJournal, SQLiteJournal
from txvmbot.model import JournalEntry

__all__ = [
    "BACKOFF",
    "DataDir",
    "HeldJobs",
    "HeldJournal",
    "HeldStore",
    "Storage",
    "SubmitsRefused",
    "WriteQueue",
]

T = TypeVar("T")

#: Seconds between tries of held writes: quick at first (a lock held a
#: moment), then every 30 s until the operator makes room.
BACKOFF = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)

_MB = 1024 * 1024


@frozen
class Storage:
    """The data dir, as the status shows it."""

    data_dir: str
    #: Free bytes for the daemon's user; -1 when it cannot be read.
    free: int
    #: Why writes are held ("" when none are).
    held: str
    #: Why new jobs are refused ("" when they are accepted).
    refusing: str


class SubmitsRefused(TxvmbotError):
    """New jobs are refused: the data dir is short of space or its writes
    are held. Says which, and that it passes by itself."""


def _mb(n: int) -> str:
    return f"{n / _MB:.1f} MB"


class DataDir:
    """The daemon's data dir: its free space and the writes held in it.

    :param min_free: bytes; below this new jobs are refused (0: never for
        lack of space).
    :param statvfs: ``os.statvfs``; a test passes its own.
    """

    def __init__(
        self,
        path: str,
        min_free: int,
        *,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.path = path
        self.min_free = min_free
        self._statvfs = statvfs
        # what (a file's name) -> the error that holds its writes
        self._held: dict[str, str] = {}

    def free(self) -> int:
        """Free bytes in the data dir for an unprivileged writer, -1 if
        unknown."""
        try:
            st = self._statvfs(self.path)
        except OSError:
            return -1
        return int(st.f_bavail) * int(st.f_frsize)

    def hold(self, what: str, error: str) -> None:
        self._held[what] = error

    def release(self, what: str) -> None:
        self._held.pop(what, None)

    def held(self) -> str:
        return "; ".join(f"{what}: {error}" for what, error in sorted(self._held.items()))

    def refusal(self, free: int | None = None) -> str:
        """Why a new job is refused now, "" if it is not."""
        free = self.free() if free is None else free
        held = self.held()
        if held:
            return (
                f"the daemon cannot write to its data dir {self.path} ({held}); "
                f"{_mb(max(free, 0))} free; new jobs are accepted again once its "
                "held writes go through"
            )
        if 0 <= free < self.min_free:
            return (
                f"the data dir {self.path} has {_mb(free)} free; new jobs are refused "
                f"below {_mb(self.min_free)} (daemon.min_free_mb) and accepted again "
                "once there is room"
            )
        return ""

    def storage(self) -> Storage:
        free = self.free()
        return Storage(self.path, free, self.held(), self.refusal(free))


def _said(e: Exception) -> str:
    """The error without the file's name, which the queue's name gives."""
    message = getattr(e, "message", None)
    return message if isinstance(message, str) else str(e)


@attrs.define
class _Held:
    what: str
    write: Callable[[], Any]
    done: Deferred[Any]
    settled: Callable[[], None]


class WriteQueue:
    """Writes to one file, in order; those the host refused are held and
    tried again with :data:`BACKOFF` until they go through.

    :param name: the file, for the log and :class:`DataDir`
        (``"job store /x/jobs.sqlite"``).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        data_dir: DataDir,
        name: str,
        *,
        backoff: Sequence[float] = BACKOFF,
    ) -> None:
        self._clock = clock
        self._data_dir = data_dir
        self.name = name
        self._backoff = tuple(backoff)
        self._queue: deque[_Held] = deque()
        self._tries = 0
        self._since: float | None = None
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def run(
        self,
        what: str,
        write: Callable[[], T],
        settled: Callable[[], None] = lambda: None,
    ) -> Deferred[T]:
        """Make ``write`` now, or after the writes held before it; call
        ``settled`` once it is made or dropped. Fires
        with its result once made. Raises at once (nothing held) an error
        that is no fault of the host."""
        if self._queue:
            d: Deferred[T] = Deferred()
            self._queue.append(_Held(what, write, d, settled))
            return d
        try:
            result = write()
        except Exception as e:
            if not host_fault(e):
                raise
            d = Deferred()
            self._queue.append(_Held(what, write, d, settled))
            self._start_holding(_said(e))
            return d
        settled()
        return succeed(result)

    def _start_holding(self, error: str) -> None:
        self._since = self._clock.seconds()
        self._tries = 0
        self._data_dir.hold(self.name, error)
        self.log.error(
            "Cannot write to the {name}: {error}. Its writes are held and tried again "
            "(first in {delay:g}s, then up to every {most:g}s); new jobs are refused "
            "until they go through.",
            name=self.name,
            error=error,
            delay=self._backoff[0],
            most=self._backoff[-1],
        )
        self._schedule()

    def _schedule(self) -> None:
        delay = self._backoff[min(self._tries, len(self._backoff) - 1)]
        self._tries += 1
        self._call = self._clock.callLater(delay, self.flush)

    def flush(self) -> bool:
        """Try the held writes, in order, until one is refused again;
        whether all went through."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        while self._queue:
            held = self._queue[0]
            try:
                result = held.write()
            except Exception as e:
                if host_fault(e):
                    self._data_dir.hold(self.name, _said(e))
                    self._schedule()
                    return False
                self._queue.popleft()
                held.settled()
                self.log.failure(
                    "A held write to the {name} failed ({what}); it is dropped",
                    Failure(),
                    name=self.name,
                    what=held.what,
                )
                held.done.errback(Failure())
                continue
            self._queue.popleft()
            held.settled()
            held.done.callback(result)
        if self._since is not None:
            self.log.info(
                "The {name} takes writes again: the held ones went through after {took:.1f}s",
                name=self.name,
                took=self._clock.seconds() - self._since,
            )
            self._since = None
        self._data_dir.release(self.name)
        return True

    def close(self) -> int:
        """Try the held writes once more; stop retrying. Returns how many
        are lost."""
        if self._queue:
            self.flush()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        lost = len(self._queue)
        if lost:
            self.log.error(
                "{lost} held writes to the {name} are lost at stop (first: {what}); "
                "the jobs they belong to are recovered as interrupted at the next start",
                lost=lost,
                name=self.name,
                what=self._queue[0].what,
            )
            self._queue.clear()
        self._data_dir.release(self.name)
        return lost


def _logged(failure: Failure) -> None:
    """A held write that failed for no fault of the host is logged by the
    queue; nothing waits on it here."""


class HeldJobs:
    """The SQLite job store, answering at once, whose ``update`` and
    ``add_event`` are held through a fault of the host (see the module
    docstring); ``add_many`` (a submit) is refused while
    :meth:`DataDir.refusal` says so. Reads see held writes."""

    def __init__(self, store: SQLiteJobs, queue: WriteQueue, data_dir: DataDir) -> None:
        self._store = store
        self._queue = queue
        self._data_dir = data_dir
        # The newest held value of each job, and each job's held events.
        self._jobs: dict[str, Job] = {}
        self._events: dict[str, list[JobEvent]] = {}

    @property
    def path(self) -> str:
        return str(self._store.path)

    def __repr__(self) -> str:
        return f"<HeldJobs {self._store!r}>"

    # --- writes -----------------------------------------------------------------

    def add(self, job: Job, event: JobEvent | None = None) -> None:
        if event is None:
            self._refuse_if_full()
            self._store.add(job)
            return
        self.add_many([(job, event)])

    def add_many(self, submits: Sequence[tuple[Job, JobEvent]]) -> None:
        self._refuse_if_full()
        self._store.add_many(submits)

    def _refuse_if_full(self) -> None:
        why = self._data_dir.refusal()
        if why:
            raise SubmitsRefused(f"new jobs are refused: {why}")

    def update(self, job: Job) -> None:
        def written() -> None:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

        d = self._queue.run(f"update job {job.id}", lambda: self._store.update(job), written)
        if not d.called:
            self._jobs[job.id] = job
            d.addErrback(_logged)

    def add_event(self, event: JobEvent) -> None:
        def written() -> None:
            held = self._events.get(event.job_id)
            if held and held[0] is event:
                held.pop(0)
                if not held:
                    del self._events[event.job_id]

        d = self._queue.run(
            f"add event {event.seq} of job {event.job_id}",
            lambda: self._store.add_event(event),
            written,
        )
        if not d.called:
            self._events.setdefault(event.job_id, []).append(event)
            d.addErrback(_logged)

    def prune(self, finished_before: float, limit: int = 500) -> int:
        if self._queue:
            return 0  # deletes need room in the file too; after the held writes
        return int(self._store.prune(finished_before, limit))

    def close(self) -> None:
        self._queue.close()
        self._jobs.clear()
        self._events.clear()
        self._store.close()

    # --- reads --------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        held = self._jobs.get(job_id)
        return held if held is not None else self._store.get(job_id)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[Job]:
        jobs: list[Job] = self._store.list(states=states, backend=backend, limit=limit, before=before)
        if not self._jobs:
            return jobs
        newer = [self._jobs.get(j.id, j) for j in jobs]
        if states is None:
            return newer
        keep = [j for j in newer if j.state in states]
        # Held jobs that moved into ``states`` (a job that passed while
        # the disk was full is still running in the file).
        seen = {j.id for j in keep}
        extra = [
            j
            for j in self._jobs.values()
            if j.id not in seen
            and j.state in states
            and (backend is None or j.spec.backend == backend)
        ]
        if before is not None and extra:
            anchor = self.get(before)
            extra = [j for j in extra if anchor is not None and j.submitted < anchor.submitted]
        if not extra:
            return keep
        return sorted([*keep, *extra], key=lambda j: j.submitted, reverse=True)[:limit]

    def unfinished(self) -> builtins.list[Job]:
        return list(self._store.unfinished())

    def events(self, job_id: str, after_seq: int = 0) -> builtins.list[JobEvent]:
        stored: builtins.list[JobEvent] = self._store.events(job_id, after_seq)
        held = [e for e in self._events.get(job_id, ()) if e.seq > after_seq]
        return stored + held

    def last_event_seq(self, job_id: str) -> int:
        held = self._events.get(job_id)
        if held:
            return held[-1].seq
        return int(self._store.last_event_seq(job_id))


class HeldStore(AnsweredStore):
    """The daemon's IJobStore over an SQLite file whose writes are held
    through a fault of the host (:class:`HeldJobs`), answered with
    Deferreds."""

    sync: HeldJobs

    def __init__(self, store: SQLiteJobStore, queue: WriteQueue, data_dir: DataDir) -> None:
        super().__init__(HeldJobs(store.sync, queue, data_dir))

    def __repr__(self) -> str:
        return f"<HeldStore {self.sync._store!r}>"


@implementer(IJournal)
class HeldJournal:
    """An IJournal whose writes (intend, created, done) are held through a
    fault of the host: the worker that asked waits for its answer, so it
    never creates a resource the journal has not recorded. Every answer is
    a Deferred; it makes (and retries) its writes through the SQLite
    journal's synchronous calls, and ``close`` closes at once."""

    def __init__(self, journal: SQLiteJournal | MemoryJournal, queue: WriteQueue) -> None:
        self._journal = journal
        self._queue = queue

    @property
    def path(self) -> str:
        return str(self._journal.path)

    def __repr__(self) -> str:
        return f"<HeldJournal {self._journal!r}>"

    def intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> Deferred[JournalEntry]:
        return self._held(
            f"record that check {check_id} creates {kind} {name}",
            lambda: self._journal._intend(check_id, kind, name, endpoint, region, parent_id),
        )

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        return self._held(
            f"record {entry.kind} {resource_id} of check {entry.check_id}",
            lambda: self._journal._created(entry, resource_id),
        )

    def done(self, entry: JournalEntry) -> Deferred[None]:
        return self._held(
            f"mark {entry.kind} {entry.resource_id or entry.name} done",
            lambda: self._journal._done(entry),
        )

    def _held(self, what: str, write: Callable[[], T]) -> Deferred[T]:
        # WriteQueue.run raises at once an error that is no fault of the
        # host (a bad argument, a missing entry): answered as a failure.
        try:
            return self._queue.run(what, write)
        except Exception:
            return fail()

    def pending(self, check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        return self._journal.pending(check_id)

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        return self._journal.checks(older_than)

    def prune(self, done_before: float, limit: int = 500) -> Deferred[int]:
        if self._queue:
            return succeed(0)
        return self._journal.prune(done_before, limit)

    def close(self) -> None:
        self._queue.close()
        self._journal.close()
