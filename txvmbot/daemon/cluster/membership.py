"""One daemon's part in the cluster: its lease, its claims from the shared
queue, and takeover of daemons that died.

The lease: a row in ``daemons`` with an expiry on the database's clock,
renewed every ``lease / 3`` seconds (the heartbeat). Every job a daemon
holds names it as ``owner``. A daemon whose lease expired more than
``grace`` seconds ago (a quarter of the lease, at most 5 s) is dead to the
others: every ``scan_interval`` (2 s at most) a daemon looks for such
leases and takes one over at a time (``store.take_over``): queued jobs go back to the shared
queue, running cloud jobs become its own to clean up (journal and tag) and
retry or end, as after a restart, and running local (QEMU) jobs of another
host fail with "host lost" (their VMs live on that host; its daemon stops
them when it comes back: :meth:`Cluster.start`).

Without the database a daemon keeps its running jobs going (their writes
wait in the :class:`~txvmbot.daemon.stores.postgres.writer.JobWriter`), claims
nothing, and tries again each heartbeat. If its own lease runs out before a
renewal gets through (a timer on its own clock, from the sending of the
last renewal that succeeded, so never later than the database's expiry,
and ``grace`` before the others act), it lets go of its jobs
(:meth:`~txvmbot.daemon.interfaces.IDispatcher.abandon`) so none runs twice,
and registers a new lease once the database answers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any
from uuid import uuid4

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.daemon.interfaces import IDispatcher
from txvmbot.daemon.jobs import Job
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import Database, DatabaseUnavailable
from txvmbot.interfaces import IHostJournal

__all__ = ["Cluster"]

#: The most expired leases one scan takes over.
TAKEOVERS_PER_BEAT = 5
#: Every how many scans to look for what this host's lost jobs left.
LEFTOVER_EVERY = 30


def new_owner(host: str) -> str:
    """A lease owner id: the host and a random part."""
    return f"{host}/{os.getpid()}/{uuid4().hex[:8]}"


class Cluster:
    """Lease, claims and takeovers of one daemon.

    :param reactor: clock of the loops and the lease timer; where
        Deferreds fire.
    :param host: this daemon's host name (local jobs belong to it).
    :param lease: seconds a lease lasts without a renewal.

    :meth:`start` is given the
    :class:`~txvmbot.daemon.interfaces.IDispatcher` (built with
    ``on_free=cluster.want_claim``), the cleaner (for what this host's lost
    local jobs left) and the journal. ``on_events`` and ``on_listening``
    are called with event notifications (a job id) and when LISTEN is
    connected again (the watchers catch up). ``claims`` and ``takeovers``
    count what this daemon did.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        db: Database,
        *,
        host: str,
        lease: float,
        wall: Callable[[], float] = time.time,
        claim_interval: float = 1.0,
    ) -> None:
        if lease < 3:
            raise ValueError(f"lease must be at least 3 seconds, not {lease!r}")
        self._reactor = reactor
        self._db = db
        self.host = host
        self.lease = lease
        self._wall = wall
        self._claim_interval = claim_interval
        self.owner = new_owner(host)
        self._scheduler: IDispatcher | None = None
        self.cleaner: Callable[[Job], Deferred[Any]] | None = None
        self.on_events: Callable[[str], object] = lambda job_id: None
        self.on_listening: Callable[[], object] = lambda: None
        #: Fires once this daemon's writes so far are in the database (the
        #: JobWriter's ``flushed``).
        self.flushed: Callable[[], Deferred[None]] = lambda: succeed(None)
        self._registered = False
        self._reachable = True
        self._claiming = False
        self._claim_again = False
        self._stopped = False
        self._beat: LoopingCall | None = None
        self._poll: LoopingCall | None = None
        self._scan: LoopingCall | None = None
        self._timer: Any = None
        self._scanning = False
        self._scans = 0
        self._journal: Any = None
        #: How long after a lease expired others take it over: the time its
        #: daemon, cut off, has to notice on its own clock and let go.
        self.grace = min(lease / 4, 5.0)
        #: How often to look for expired leases.
        self.scan_interval = min(2.0, lease / 3)
        self._beating = False
        # Cleanups of adopted jobs under way (kept referenced).
        self._tasks: set[Deferred[Any]] = set()
        self.takeovers = 0
        self.claims = 0

    @property
    def scheduler(self) -> IDispatcher:
        """The dispatcher :meth:`start` was given."""
        assert self._scheduler is not None, "the cluster has not started"
        return self._scheduler

    # --- start and stop ---------------------------------------------------------------

    async def start(
        self,
        scheduler: IDispatcher,
        cleaner: Callable[[Job], Deferred[Any]],
        journal: Any,
        caps: dict[str, int] | None = None,
    ) -> None:
        """Register the lease, store the configured ``caps``, follow the
        shared drain state, then heartbeat, scan for expired leases, claim,
        and clean up what this host's lost jobs left (in the background).
        Raises DatabaseUnavailable when the database does not answer at
        start-up."""
        self._scheduler = scheduler
        self.cleaner = cleaner
        self._journal = journal
        if caps:
            await self._db.run(store.set_caps, caps)
        await self._register()
        self._backends(await self._db.run(store.backends))
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self._reactor
        self._beat.start(self.lease / 3, now=False)
        self._scan = LoopingCall(self._scan_once)
        self._scan.clock = self._reactor
        self._scan.start(self.scan_interval, now=True)
        self._poll = LoopingCall(self.want_claim)
        self._poll.clock = self._reactor
        self._poll.start(self._claim_interval, now=True)

    async def _register(self) -> None:
        sent = self._reactor.seconds()
        await self._db.run(store.register, self.owner, self.host, os.getpid(), self.lease,
                           float(self._wall()))
        self._renewed(sent)
        self._registered = True
        self.log.info(
            "Joined the shared store as {owner} (lease {lease:g}s)", owner=self.owner,
            lease=self.lease,
        )

    async def _clean_host_leftovers(self, journal: IHostJournal) -> None:
        """Stop what local jobs of this host left that another daemon
        ended as "host lost" while this host's daemon was away."""
        checks = await journal.host_checks(self.host)
        for check_id in checks:
            job_id, _, attempt = check_id.rpartition("-")
            job = await self._db.run(store.get, job_id)
            if job is None or not job.final or not attempt.isdigit():
                continue  # still held: takeover or its daemon deals with it
            # The attempt the check id names (the cleaner cleans that one).
            job = attrs.evolve(job, attempts=int(attempt))
            self.log.info(
                "Job {job_id} ended as {state} while this host's daemon was away; "
                "cleaning up what it left here",
                job_id=job_id,
                state=job.state,
            )
            assert self.cleaner is not None
            try:
                await self.cleaner(job)
            except Exception:
                self.log.failure("While cleaning up after job {job_id}", job_id=job_id)

    def stop(self) -> Deferred[None]:
        """Stop claiming and beating; give queued jobs back and end the
        lease (running jobs stay held by it: the next takeover, by any
        daemon, cleans them up and retries them)."""
        self._stopped = True
        for loop in (self._beat, self._poll, self._scan):
            if loop is not None and loop.running:
                loop.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

        async def bye() -> None:
            if self._registered:
                try:
                    await self._db.run(store.unregister, self.owner)
                except Exception as e:
                    self.log.warn("Could not end the lease at stop: {e}", e=e)

        return ensureDeferred(bye())

    # --- claims ---------------------------------------------------------------------

    def want_claim(self, free: int | None = None) -> None:
        """Claim from the shared queue as many jobs as local workers are
        free (the scheduler's ``on_free``; also on a queue notification
        and every ``claim_interval``). One claim at a time; asks made
        meanwhile make one more."""
        if self._stopped or not self._registered or not self._reachable:
            return
        if self._claiming:
            self._claim_again = True
            return
        self._claiming = True
        self._claim_again = False
        d = ensureDeferred(self._claim())
        d.addErrback(self._claim_failed)
        d.addBoth(self._claimed)

    async def _claim(self) -> None:
        s = self.scheduler
        free = s.free_workers()
        if free < 1:
            return
        owner = self.owner
        got = await self._db.run(
            store.claim, owner, self.host, free, s.held_back(), float(self._wall())
        )
        if owner != self.owner or not self._registered:
            # The lease was lost while the claim was on its way: these jobs
            # are not ours to run (a takeover may have queued them again).
            if got:
                await self._db.run(store.release, owner, [c.job.id for c in got])
            return
        self.claims += len(got)
        for c in got:
            s.adopt(c.job, c.last_seq, c.cancel)

    def give_back(self, job: Job) -> Deferred[None]:
        """Put ``job`` (queued again here after an infrastructure failure,
        and forgotten by the local scheduler) back in the shared queue,
        once its "queued" write is in the database. Tried again with
        backoff while the database is away; given up when this daemon's
        lease is lost (the takeover of the old lease queues it then)."""
        owner = self.owner

        async def go() -> None:
            from twisted.internet.task import deferLater

            delay = 0.5
            while owner == self.owner and not self._stopped:
                try:
                    await self.flushed()
                    await self._db.run(store.release, owner, [job.id])
                    return
                except DatabaseUnavailable:
                    pass
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(10.0, delay * 2)

        d = ensureDeferred(go())
        d.addErrback(
            lambda f: self.log.failure("Giving job {job_id} back failed", f, job_id=job.id)
        )
        return d

    def _claim_failed(self, f: Failure) -> None:
        if f.check(DatabaseUnavailable):
            self._lost(f.getErrorMessage())
        else:
            self.log.failure("Claiming jobs failed", f)

    def _claimed(self, _: object) -> None:
        self._claiming = False
        if self._claim_again:
            self.want_claim()

    # --- heartbeat and takeover -------------------------------------------------------

    def _heartbeat(self) -> Deferred[None]:
        if self._beating:
            return succeed(None)
        self._beating = True
        d = ensureDeferred(self._beat_once())
        d.addErrback(lambda f: self.log.failure("Heartbeat failed", f))

        def done(_: object) -> None:
            self._beating = False

        return d.addBoth(done)

    async def _beat_once(self) -> None:
        sent = self._reactor.seconds()
        try:
            if not self._registered:
                await self._register()
                renewed = True
            else:
                owner = self.owner
                renewed = await self._db.run(store.renew, owner, self.lease)
                if owner != self.owner:
                    return  # lost meanwhile (the timer); registered anew next beat
        except DatabaseUnavailable as e:
            self._lost(str(e))
            return
        if not renewed:
            self._lease_lost("another daemon took over its lease")
            return
        self._renewed(sent)
        self._found()
        # Cancels asked of jobs held here whose notification was missed (not
        # waited for: the next renewal does not wait on it).
        d = self._db.run(store.cancels, self.owner)
        d.addCallbacks(self._cancel_asked, self._scan_failed)

    def _cancel_asked(self, asked: list[tuple[str, str]]) -> None:
        for job_id, reason in asked:
            if self.scheduler.holds(job_id):
                d = self.scheduler.cancel(job_id, f"{reason} (on another daemon)")
                d.addErrback(lambda f: None)

    def _renewed(self, sent: float) -> None:
        """A renewal sent at ``sent`` (this host's clock) got through: the
        lease holds until ``sent + lease`` at least; if no later renewal
        gets through by then, let the jobs go (:meth:`_lease_lost`)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = max(0.0, sent + self.lease - self._reactor.seconds())
        self._timer = self._reactor.callLater(delay, self._ran_out)

    def _ran_out(self) -> None:
        self._timer = None
        if self._registered and not self._stopped:
            self._lease_lost("its lease ran out before a renewal got through")

    def _scan_once(self) -> Deferred[None]:
        """Take over daemons whose lease expired more than ``grace`` ago;
        now and then, clean up what this host's lost local jobs left."""
        if self._scanning or self._stopped or not self._registered or not self._reachable:
            return succeed(None)
        self._scanning = True
        d = ensureDeferred(self._scan_body())
        d.addErrback(self._scan_failed)

        def done(_: object) -> None:
            self._scanning = False

        return d.addBoth(done)

    async def _scan_body(self) -> None:
        took = False
        for _ in range(TAKEOVERS_PER_BEAT):
            owner = self.owner
            taken = await self._db.run(
                store.take_over, owner, self.host, float(self._wall()), self.grace
            )
            if taken is None:
                break
            if owner != self.owner or not self._registered:
                # This daemon's own lease ran out meanwhile: what it took
                # is the old owner's, which another daemon takes over next.
                return
            took = True
            self._took_over(taken)
        self._scans += 1
        if took or self._scans % LEFTOVER_EVERY == 1:
            await self._clean_host_leftovers(self._journal)

    def _scan_failed(self, f: Failure) -> None:
        if f.check(DatabaseUnavailable):
            self._lost(f.getErrorMessage())
        else:
            self.log.failure("Looking for expired leases failed", f)

    def _took_over(self, t: store.TakenOver) -> None:
        self.takeovers += 1
        self.log.error(
            "Took over daemon {dead} on {host}, whose lease expired: {requeued} queued jobs "
            "back in the queue, {adopted} running jobs to clean up here, {lost} local jobs "
            "failed (host lost)",
            dead=t.dead,
            host=t.dead_host,
            requeued=len(t.requeued),
            adopted=len(t.adopted),
            lost=len(t.host_lost),
        )
        reason = f"daemon {t.dead} on {t.dead_host} lost (its lease expired)"
        for c in t.adopted:
            d = self.scheduler.adopt_interrupted(c.job, c.last_seq, reason, c.cancel)
            self._tasks.add(d)
            d.addBoth(self._task_done, d)
        self.want_claim()

    def _task_done(self, result: object, d: Deferred[Any]) -> object:
        self._tasks.discard(d)
        return result

    def _lease_lost(self, why: str) -> None:
        self.log.critical(
            "This daemon's lease {owner} is lost ({why}): its jobs are let go so that none "
            "runs twice; it joins again with a new lease",
            owner=self.owner,
            why=why,
        )
        self.scheduler.abandon(f"this daemon lost its lease: {why}")
        self._registered = False
        self.owner = new_owner(self.host)

    def _lost(self, why: str) -> None:
        if self._reachable:
            self._reachable = False
            self.log.error(
                "Lost the shared database ({why}): running jobs go on, no new jobs are "
                "claimed; trying again every {s:g}s",
                why=why,
                s=self.lease / 3,
            )

    def _found(self) -> None:
        if not self._reachable:
            self._reachable = True
            self.log.info("The shared database answers again: claiming jobs")
            self.want_claim()

    # --- notifications ----------------------------------------------------------------

    def notified(self, channel: str, payload: str) -> None:
        if channel == "txvmbot_queue":
            self.want_claim()
        elif channel == "txvmbot_events":
            self.on_events(payload)
        elif channel == "txvmbot_cancel":
            if self._scheduler is not None and self._scheduler.holds(payload):
                cancelled = self._scheduler.cancel(
                    payload, "cancelled by request (on another daemon)"
                )
                cancelled.addErrback(lambda f: None)
        elif channel == "txvmbot_backends":
            d = self._db.run(store.backends)
            d.addCallback(self._backends)
            d.addErrback(lambda f: self.log.warn("Reading backends failed: {f}", f=f.value))

    def _backends(self, draining: dict[str, bool]) -> None:
        for name, flag in draining.items():
            self.scheduler.set_draining(name, flag)

    def listening(self, up: bool, why: str) -> None:
        if up:
            self.log.info("Listening for notifications from the shared database")
            self.on_listening()
            # What changed while nothing was heard: drains, queued jobs.
            self.notified("txvmbot_backends", "")
            self.want_claim()
        else:
            self.log.warn("Notifications from the shared database lost: {why}", why=why)
