"""The job queue of a daemon with its own (SQLite) store: :class:`LocalQueue`
provides IJobQueue over an IJobStore. The daemon is a cluster of one: a
submit is stored, then claimed by this daemon at once (handed to its
dispatcher); reads go to the store; a watch follows the dispatcher's live
events after the stored ones."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon.interfaces import IDispatcher, IJobQueue, IJobStore
from txvmbot.daemon.jobs import DaemonStatus, Job, JobEvent
from txvmbot.errors import UnknownJob

__all__ = ["LocalQueue"]

Listener = Callable[[JobEvent], object]


@implementer(IJobQueue)
class LocalQueue:
    """IJobQueue over ``store``, claimed by ``dispatcher`` (see the module
    docstring)."""

    log = Logger()

    def __init__(self, store: IJobStore, dispatcher: IDispatcher) -> None:
        self.store = store
        self._dispatcher = dispatcher

    def enqueue(self, new: Sequence[tuple[Job, JobEvent]]) -> Deferred[None]:
        """Store ``new`` with one commit, then have the dispatcher take them
        (a cluster of one claims at once)."""
        return self.store.add_many(new).addCallback(self._claim, new)

    def _claim(self, _: object, new: Sequence[tuple[Job, JobEvent]]) -> None:
        self._dispatcher.queue_new(new)

    def get(self, job_id: str) -> Deferred[Job | None]:
        return self.store.get(job_id)

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[Sequence[Job]]:
        return self.store.list(states=states, backend=backend, limit=limit, before=before)

    def watch(
        self, job_id: str, after_seq: int, listener: Listener
    ) -> Deferred[Callable[[], None]]:
        """Tell ``listener`` the job's events after ``after_seq``: the stored
        ones first, then new ones as they happen, up to and including the
        one that makes the job final. Fires, once the stored ones were
        told, with a callable that stops it; fails with UnknownJob. A
        listener that raises is logged and dropped.

        The watcher is subscribed before the stored events are read: an
        event that happens while the read is under way waits until the
        stored ones were told, and none is told twice (by seq)."""
        told = [after_seq]
        early: list[JobEvent] = []
        reading = [True]
        dropped = [False]

        def live(event: JobEvent) -> None:
            if reading[0]:
                early.append(event)
            elif event.seq > told[0]:
                told[0] = event.seq
                listener(event)

        unfollow = self._dispatcher.follow(job_id, live)
        held = unfollow is not None

        def stop() -> None:
            dropped[0] = True
            if unfollow is not None:
                unfollow()

        def exists(job: Job | None) -> Deferred[Sequence[JobEvent]]:
            if job is None and not held:
                raise UnknownJob(job_id)
            return self.store.events(job_id, after_seq)

        def replay(stored: Sequence[JobEvent]) -> Callable[[], None]:
            reading[0] = False
            for event in [*stored, *early]:
                if dropped[0]:
                    break
                if event.seq > told[0]:
                    told[0] = event.seq
                    if not self._tell(listener, event):
                        stop()
            return stop

        def failed(f: Failure) -> Failure:
            stop()
            return f

        first: Deferred[Job | None] = succeed(None) if held else self.store.get(job_id)
        return first.addCallback(exists).addCallbacks(replay, failed)

    def _tell(self, listener: Listener, event: JobEvent) -> bool:
        try:
            listener(event)
        except Exception:
            self.log.failure("Watcher of job {job_id} failed; it is dropped", job_id=event.job_id)
            return False
        return True

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> Deferred[Job]:
        """A job this daemon does not hold is final (or unknown): fire with
        it as stored; fail with UnknownJob."""

        def found(job: Job | None) -> Job:
            if job is None:
                raise UnknownJob(job_id)
            return job

        return self.store.get(job_id).addCallback(found)

    def set_draining(self, backend: str, draining: bool) -> Deferred[None]:
        """Nothing to share: the dispatcher's drain is the whole story."""
        return succeed(None)

    def status(self, mine: DaemonStatus) -> Deferred[DaemonStatus]:
        """This daemon's status is the whole queue's."""
        return succeed(mine)

    def notice(self, noticer: Callable[[str], object]) -> Callable[[], None]:
        """No other daemon stores events: ``noticer`` is never called."""
        return lambda: None
