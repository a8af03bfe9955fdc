"""The daemon's parts, each a child service of
:class:`~txvmbot.daemon.service.DaemonService`: the stores, the worker
pool, the scheduler, the AMP listeners and the web page.

The daemon opens them in that order, awaiting each :meth:`Part.open`, and
stops them in the reverse order, each after the one opened after it has
stopped. Where SQLite and PostgreSQL differ, the stores part says how
(:class:`LocalStores`, :class:`SharedStores`): the rest of the daemon
does not ask which it has.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.logger import Logger

from txvmbot.daemon.interfaces import IDispatcher, IScheduler
from txvmbot.daemon.settings import DaemonSettings, loopback_web_port
from txvmbot.errors import ConfigError


class Part(service.Service):
    """One part of the daemon: :meth:`open` makes it ready (the daemon
    awaits it before opening the next part); :meth:`stopService` undoes
    it, once, whether or not ``open`` finished."""

    log = Logger()

    async def open(self) -> None:
        """Make the part ready."""

    _closing: Deferred[None] | None = None

    def stopService(self) -> Deferred[None]:
        if self._closing is None:
            super().stopService()
            self._closing = ensureDeferred(self.close()).addErrback(
                lambda f: self.log.failure("Stopping the daemon's {part} failed", f,
                                           part=self.name)
            )
        # Each caller waits for the one close, without taking its result.
        done = Deferred[None]()

        def closed(result: object) -> object:
            done.callback(None)
            return result

        self._closing.addBoth(closed)
        return done

    async def close(self) -> None:
        """Undo :meth:`open` (called once, by :meth:`stopService`)."""


class LocalStores(Part):
    """The job store and journal in SQLite files in the data dir, their
    writes held through a full disk (txvmbot.daemon.stores.sqlite.held).
    The daemon is a cluster of one: what is submitted is its own."""

    name = "stores"
    #: Metrics learn the stored jobs' states when they attach.
    metrics_seed = True

    def __init__(self, reactor: Any, settings: DaemonSettings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.store: Any = None
        self.journal: Any = None
        self.data_dir: Any = None

    async def open(self) -> None:
        from txvmbot.daemon.stores.sqlite.held import DataDir, HeldJournal, HeldStore, WriteQueue
        from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
        from txvmbot.journal import SQLiteJournal

        s = self.settings
        self.data_dir = data = DataDir(s.data_dir, int(s.min_free_mb * 1024 * 1024))
        store = SQLiteJobStore(os.path.join(s.data_dir, "jobs.sqlite"))
        self.store = HeldStore(
            store, WriteQueue(self.reactor, data, f"job store {store.path}"), data
        )
        journal = SQLiteJournal(os.path.join(s.data_dir, "journal.sqlite"))
        self.journal = HeldJournal(
            journal, WriteQueue(self.reactor, data, f"journal {journal.path}")
        )

    @property
    def writes(self) -> Any:
        """Where the scheduler writes its jobs and events."""
        return self.store

    @property
    def storage(self) -> Any:
        """The data dir's free space and held writes (None: not watched)."""
        return self.data_dir.storage

    on_free: Callable[[int], object] | None = None
    on_requeue: Callable[..., object] | None = None

    async def serve(
        self, local: IDispatcher, cleaner: Any, caps: Mapping[str, int]
    ) -> IScheduler:
        """Recover what the last run left, and answer clients from the
        store and the dispatcher (a cluster of one)."""
        from txvmbot.daemon.scheduling.localqueue import LocalQueue
        from txvmbot.daemon.scheduling.scheduler import Scheduler

        await local.recover()
        return Scheduler.over(self.reactor, LocalQueue(self.store, local), local)

    async def close(self) -> None:
        try:
            if self.store is not None:
                await self.store.close()
        finally:
            if self.journal is not None:
                self.journal.close()


class SharedStores(Part):
    """The shared PostgreSQL store: database, schema, journal, the
    write-behind of this daemon's jobs, its lease and claims, and LISTEN."""

    name = "stores"
    #: The metrics count the jobs this daemon runs; clients see all.
    metrics_seed = False

    def __init__(self, reactor: Any, settings: DaemonSettings) -> None:
        self.reactor = reactor
        self.settings = settings
        self.store: Any = None
        self.journal: Any = None
        self.db: Any = None
        self.cluster: Any = None
        self.writer: Any = None
        self.listener: Any = None
        self._serving = False

    async def open(self) -> None:
        from txvmbot.daemon.cluster.listener import Listener
        from txvmbot.daemon.cluster.membership import Cluster
        from txvmbot.daemon.stores.postgres.db import Database, DatabaseError
        from txvmbot.daemon.stores.postgres.journal import PostgresJournal
        from txvmbot.daemon.stores.postgres.reads import SharedReads
        from txvmbot.daemon.stores.postgres.schema import migrate
        from txvmbot.daemon.stores.postgres.store import CHANNELS
        from txvmbot.daemon.stores.postgres.writer import JobWriter

        s = self.settings
        assert s.store_dsn is not None
        self.db = db = Database(self.reactor, s.store_dsn)
        db.start()
        try:
            found = await db.run(migrate, db.where)
        except DatabaseError as e:
            raise ConfigError("daemon.store", f"cannot use the shared store: {e}") from None
        self.log.info(
            "Shared store: {where} (schema version {found}, host {host}, lease {lease:g}s)",
            where=db.where,
            found=found,
            host=s.host,
            lease=s.lease,
        )
        self.journal = PostgresJournal(db, s.host)
        self.cluster = cluster = Cluster(self.reactor, db, host=s.host, lease=s.lease)
        self.writer = JobWriter(self.reactor, db, lambda: cluster.owner, s.host,
                                wall=time.time)
        cluster.flushed = self.writer.flushed
        self.store = SharedReads(db)
        self.listener = Listener(self.reactor, db, CHANNELS, cluster.notified,
                                 cluster.listening)

    @property
    def writes(self) -> Any:
        return self.writer

    @property
    def storage(self) -> Any:
        return None

    @property
    def on_free(self) -> Callable[[int], object]:
        return self.cluster.want_claim

    @property
    def on_requeue(self) -> Callable[..., object]:
        return self.cluster.give_back

    async def serve(
        self, local: IDispatcher, cleaner: Any, caps: Mapping[str, int]
    ) -> IScheduler:
        """Answer clients from the shared database, claim this daemon's
        share of its queue, take over daemons that died."""
        from txvmbot.daemon.scheduling.scheduler import Scheduler
        from txvmbot.daemon.scheduling.sharedqueue import SharedQueue

        queue = SharedQueue(self.reactor, self.db, local, self.writer, host=self.settings.host)
        self.cluster.on_events = queue.job_events
        self.cluster.on_listening = queue.catch_up
        queue.on_queued = self.cluster.want_claim
        self.writer.on_fenced = lambda ids: local.abandon("another daemon took it over", ids)
        self._serving = True
        await self.cluster.start(local, cleaner, self.journal, caps)
        self.listener.start()
        return Scheduler.over(self.reactor, queue, local)

    async def close(self) -> None:
        """Send what this daemon still has to write (for a bounded time),
        end the lease, stop listening, close the database."""
        if self._serving:
            flushed = self.writer.flushed()
            flushed.addTimeout(10, self.reactor)
            try:
                await flushed
            except Exception:
                self.log.error(
                    "Stopping with {n} job store writes not sent: the database did not take "
                    "them in 10s; the next takeover cleans up and retries these jobs",
                    n=self.writer.pending,
                )
            self.writer.close()
            await DeferredList([self.cluster.stop(), self.listener.stop()])
        if self.db is not None:
            await self.db.stop()
        for thing in (self.store, self.journal):
            if thing is not None:
                thing.close()


def stores_for(reactor: Any, settings: DaemonSettings) -> LocalStores | SharedStores:
    """The stores part ``[daemon] store`` asks for."""
    return SharedStores(reactor, settings) if settings.shared else LocalStores(reactor, settings)


class Workers(Part):
    """The worker processes (an ampoule pool)."""

    name = "workers"

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def open(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.stop()


class Scheduling(Part):
    """The dispatcher (the jobs this daemon runs), the metrics that follow
    it, and the front end clients drive (over this daemon's store, or the
    shared database)."""

    name = "scheduling"

    def __init__(self, stores: LocalStores | SharedStores, local: IDispatcher, metrics: Any,
                 cleaner: Any, caps: Mapping[str, int]) -> None:
        self.stores = stores
        self.local = local
        self.metrics = metrics
        self.cleaner = cleaner
        self.caps = caps
        self.front: Any = None
        self._detach: Callable[[], object] | None = None

    async def open(self) -> None:
        self._detach = self.metrics.attach(self.local, seed=self.stores.metrics_seed)
        self.front = await self.stores.serve(self.local, self.cleaner, self.caps)

    async def close(self) -> None:
        if self._detach is not None:
            self._detach()
            self._detach = None
        await self.local.stop()


class Listeners(Part):
    """Listening ports, stopped together."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ports: list[Any] = []

    async def listen(self, endpoint: Any, factory: Any) -> None:
        self.ports.append(await endpoint.listen(factory))

    async def close(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            await port.stopListening()


class WebPage(Listeners):
    """The status page (and /metrics) on ``[daemon] web``."""

    def __init__(self, reactor: Any, settings: DaemonSettings, scheduler: Any,
                 metrics: Any, server_endpoint: Callable[[str], Any]) -> None:
        super().__init__("web")
        self.reactor = reactor
        self.settings = settings
        self.scheduler = scheduler
        self.metrics = metrics
        self.server_endpoint = server_endpoint
        self.web: Any = None

    async def open(self) -> None:
        from txvmbot.daemon.web import WebUI

        self.web = WebUI(
            self.scheduler,
            self.reactor,
            metrics=self.metrics.resource(),
            failures=lambda by, since: self.scheduler.failures(by, since),
        )
        self.web.start()
        for description in self.settings.web:
            port = loopback_web_port(description)
            if port is not None:
                from twisted.internet.endpoints import TCP4ServerEndpoint

                # Built here, not from the string: 127.0.0.1 whatever it said.
                endpoint: Any = TCP4ServerEndpoint(self.reactor, port, interface="127.0.0.1")
                # A browser on this host may be led to it under another name
                # (DNS rebinding): the page answers to its own names only.
                site = self.web.site(allowed_hosts=(f"127.0.0.1:{port}", f"localhost:{port}"))
            else:
                endpoint = self.server_endpoint(description)
                site = self.web.site()
            await self.listen(endpoint, site)
        self.log.info("txvmbot web page on {web}", web=", ".join(self.settings.web))

    async def close(self) -> None:
        await super().close()
        if self.web is not None:
            self.web.stop()


def stop_in_reverse(parts: Iterable[service.IService]) -> Deferred[None]:
    """Stop ``parts`` last first, each once the one after it has stopped."""

    async def stop() -> None:
        for part in reversed(list(parts)):
            await (part.stopService() or succeed(None))

    return ensureDeferred(stop())
