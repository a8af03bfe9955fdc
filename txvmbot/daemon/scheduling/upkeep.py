"""What the daemon does on its own behalf: clean up after a job whose worker
died (from the journal, and by tag), check a quarantined backend's health
before it gets jobs again, and prune what it no longer needs to keep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from txvmbot.daemon.interfaces import IJobStore
from txvmbot.daemon.jobs import Job, check_id_for
from txvmbot.errors import TxvmbotError
from txvmbot.interfaces import IJournal
from txvmbot.model import Cloud, JournalEntry
from txvmbot.qemu.model import LocalSpec

log = Logger()

#: How long the daemon's own cleanup of one resource may take.
CLEANUP_BOUND = 300.0
#: How long a health check may take.
HEALTH_BOUND = 60.0
#: How often the daemon prunes, after once at start-up.
PRUNE_INTERVAL = 3600.0
#: The most jobs (or journal entries) one prune transaction deletes.
PRUNE_BATCH = 500


def make_cleaner(
    reactor: Any,
    journal: IJournal,
    *,
    on_reaped: Callable[[str], object] | None = None,
    api_observer: Callable[[str, str, bool], object] | None = None,
) -> Callable[[Job], Deferred[tuple[str, ...]]]:
    """Clean up what the current attempt of a job left, in the daemon
    process: from the journal (reverse order), and by the check's tag.

    ``on_reaped`` is called with an entry's kind for each journal entry
    cleaned (its resource removed, or found gone); ``api_observer`` is
    given to the EC2 client (both for the daemon's metrics).
    """

    def counted(
        undo: Callable[[JournalEntry], Deferred[bool]],
    ) -> Callable[[JournalEntry], Deferred[bool]]:
        if on_reaped is None:
            return undo
        tell = on_reaped

        def undo_counted(entry: JournalEntry) -> Deferred[bool]:
            def gone(answer: bool) -> bool:
                if answer:
                    try:
                        tell(entry.kind)
                    except Exception:
                        log.failure("The cleaner's on_reaped hook failed")
                return answer

            return maybeDeferred(undo, entry).addCallback(gone)

        return undo_counted

    def clean(job: Job) -> Deferred[tuple[str, ...]]:
        async def go() -> tuple[str, ...]:
            from txvmbot.ec2 import make_client
            from txvmbot.ec2.resources import Undoer
            from txvmbot.engine import Cleanup, StepRunner

            check_id = check_id_for(job)
            spec = job.spec.machines
            steps = StepRunner(reactor)
            if isinstance(spec, LocalSpec):
                from txvmbot.qemu.machines import LocalUndoer

                local = LocalUndoer(spec.timeouts.shutdown)
                errors = await Cleanup(journal, counted(local), steps, CLEANUP_BOUND).run(
                    check_id
                )
            else:
                client = make_client(reactor, spec.cloud, api_observer=api_observer)
                try:
                    t = spec.timeouts
                    undo = Undoer(client, reactor, t.poll_interval, t.poll_max_interval)
                    errors = await Cleanup(journal, counted(undo), steps, CLEANUP_BOUND).run(
                        check_id
                    )
                finally:
                    await client.close()
            if errors:
                log.error(
                    "Cleanup after job {job_id} (check {check_id}) left errors: {errors}",
                    job_id=job.id,
                    check_id=check_id,
                    errors="; ".join(errors),
                )
            else:
                log.info("Cleaned up after job {job_id} (check {check_id})", job_id=job.id,
                         check_id=check_id)
            return errors

        return ensureDeferred(go())

    return clean


def make_health_check(
    reactor: Any,
    store: IJobStore,
    *,
    api_observer: Callable[[str, str, bool], object] | None = None,
) -> Callable[[str], Deferred[bool]]:
    """A backend is healthy when its cloud answers a cheap API call. The
    cloud is taken from the backend's newest job. ``api_observer`` is given
    to the EC2 client (for the daemon's metrics)."""

    def check(backend: str) -> Deferred[bool]:
        async def go() -> bool:
            from txvmbot.ec2 import make_client

            jobs = await store.list(backend=backend, limit=1)
            machines = jobs[0].spec.machines if jobs else None
            if machines is None or isinstance(machines, LocalSpec):
                return True
            cloud: Cloud = machines.cloud
            client = make_client(reactor, cloud, api_observer=api_observer)
            try:
                d = client.call("DescribeAvailabilityZones", {})
                d.addTimeout(HEALTH_BOUND, reactor)
                await d
            except Exception as e:
                log.warn("Health check of {backend} failed: {error}", backend=backend, error=e)
                return False
            finally:
                await client.close()
            return True

        return ensureDeferred(go())

    return check


class Pruner(service.Service):
    """Forgets finished jobs (with their events) and done journal entries
    older than ``keep`` seconds: at start-up, then every ``interval``.

    Each ``prune`` call on the store or the journal deletes at most
    ``batch`` rows in one short transaction; while a call deletes a full
    batch the pruner calls again on the next reactor turn, so clients are
    served between batches however much there is to prune. A StoreError or
    JournalError is logged and tried again at the next interval.

    :param clock: schedules the rounds and the batches; its ``seconds()``
        are the epoch seconds the cutoff is counted from.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IJobStore,
        journal: IJournal,
        keep: float,
        *,
        interval: float = PRUNE_INTERVAL,
        batch: int = PRUNE_BATCH,
    ) -> None:
        if keep <= 0 or interval <= 0 or batch < 1:
            raise ValueError(
                f"keep and interval must be > 0 and batch >= 1, got {keep}, {interval}, {batch}"
            )
        self._clock = clock
        self._store = store
        self._journal = journal
        self._keep = keep
        self._interval = interval
        self._batch = batch
        self._loop: LoopingCall | None = None
        self._done: Deferred[LoopingCall] | None = None
        self._turn: Deferred[None] | None = None
        self._stopped = False

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        self._loop = LoopingCall(self.prune)
        self._loop.clock = self._clock
        # prune() never fails (it logs), so this fires when stopService stops it.
        self._done = self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None]:
        """Stop the rounds, and a round between two batches at once."""
        super().stopService()
        self._stopped = True
        loop, self._loop = self._loop, None
        done, self._done = self._done, None
        if loop is not None and loop.running:
            loop.stop()
        if self._turn is not None:
            self._turn.cancel()
        if done is None:
            return succeed(None)
        return done.addCallback(lambda _: None)

    def prune(self) -> Deferred[None]:
        """One round: prune the store, then the journal, a batch a turn."""
        return Deferred.fromCoroutine(self._round())

    async def _round(self) -> None:
        cutoff = self._clock.seconds() - self._keep
        jobs = await self._batches("finished jobs", self._store.prune, cutoff)
        entries = 0
        if not self._stopped:
            entries = await self._batches("done journal entries", self._journal_prune, cutoff)
        if jobs or entries:
            self.log.info(
                "Pruned {jobs} finished jobs (with their events) and {entries} done journal "
                "entries older than {days:g} days",
                jobs=jobs,
                entries=entries,
                days=self._keep / 86400,
            )

    def _journal_prune(self, cutoff: float, limit: int) -> Deferred[int]:
        return self._journal.prune(cutoff, limit)

    async def _batches(
        self, what: str, prune: Callable[[float, int], Deferred[int]], cutoff: float
    ) -> int:
        """Call ``prune`` once a reactor turn while it deletes a full batch;
        return how many rows went, also when a call failed (logged) or the
        pruner was stopped between two calls."""
        total = 0
        while True:
            try:
                n = await prune(cutoff, self._batch)
            except TxvmbotError as e:
                self.log.error(
                    "Cannot prune {what}: {error}; trying again in {interval:g}s",
                    what=what,
                    error=e,
                    interval=self._interval,
                )
                return total
            except Exception:
                self.log.failure("While pruning {what}", what=what)
                return total
            total += n
            if n < self._batch:
                return total
            self._turn = deferLater(self._clock, 0, lambda: None)
            try:
                await self._turn
            except CancelledError:
                return total  # stopService
            finally:
                self._turn = None
