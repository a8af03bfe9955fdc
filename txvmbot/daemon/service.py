"""The daemon as a Twisted service: store, journal, worker pool, scheduler,
retention (:class:`~txvmbot.daemon.scheduling.upkeep.Pruner`) and AMP listeners, started
in that order and stopped in reverse.

One daemon owns a data dir (an exclusive lock on ``daemon.lock``): the
store and the journal have exactly one writer (seed 004).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import IO, Any

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger, globalLogPublisher, jsonFileLogObserver

from txvmbot.daemon.settings import DaemonSettings, loopback_web_port
from txvmbot.errors import ConfigError, TxvmbotError


class DataDirBusy(TxvmbotError):
    """Another daemon owns this data dir."""


def _prepare_data_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError("daemon.data_dir", f"cannot create {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError("daemon.data_dir", f"{path} is not writable by this user")


def _lock(path: str) -> IO[str]:
    f = open(os.path.join(path, "daemon.lock"), "a+")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise DataDirBusy(f"another txvmbot daemon is running on {path}") from None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a daemon that died: remove it if nothing
    answers on it (we hold the data dir lock, so nothing should)."""
    if not os.path.exists(path):
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1)
        s.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise DataDirBusy(f"something already answers on {path}")
    finally:
        s.close()


class _StartInterrupted(Exception):
    pass


class DaemonService(service.MultiService):
    """Everything the daemon runs. ``ready`` fires once it accepts work (or
    fails if it cannot start); it never fires if the daemon is told to stop
    while starting."""

    log = Logger()

    def __init__(self, settings: DaemonSettings, reactor: Any) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.ready: Deferred[None] = Deferred()
        self._starting: Deferred[None] | None = None
        self._stopping = False
        self._ports: list[Any] = []
        self._lockfile: IO[str] | None = None
        self._json_log: IO[str] | None = None
        self._json_observer: Any = None
        self.store: Any = None
        self.data_dir: Any = None
        self.journal: Any = None
        self.pool: Any = None
        self.scheduler: Any = None
        self.web: Any = None
        self.metrics: Any = None
        self._detach_metrics: Any = None
        self.db: Any = None
        self.cluster: Any = None
        self.writer: Any = None
        self.listener: Any = None
        self._web_ports: list[Any] = []

    def startService(self) -> None:
        super().startService()
        d = ensureDeferred(self._start())

        def started(_: object) -> None:
            if not self._stopping:
                self.ready.callback(None)

        def failed(f: Any) -> None:
            if self._stopping:
                # SIGTERM while starting: not a failure to start.
                self.log.info(
                    "txvmbot daemon start-up interrupted: told to stop ({why})",
                    why=f.getErrorMessage(),
                )
                return
            # ready first: under twistd, it prints the one line that says
            # why on stderr, before the traceback (txvmbot.tap).
            self.ready.errback(f)
            self.log.failure("txvmbot daemon failed to start", f)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

        self._starting = d.addCallbacks(started, failed)

    def _go_on(self) -> None:
        """Called by _start after each wait: stop starting if told to stop."""
        if self._stopping:
            raise _StartInterrupted("the daemon was told to stop while starting")

    async def _start(self) -> None:
        from txvmbot.daemon.api.server import AMPServerFactory
        from txvmbot.daemon.scheduling.scheduler import Scheduler
        from txvmbot.daemon.scheduling.upkeep import Pruner, make_cleaner, make_health_check
        from txvmbot.daemon.stores.sqlite.datafiles import sqlite_files
        from txvmbot.daemon.web.metrics import DaemonMetrics
        from txvmbot.daemon.workers.pool import AmpoulePool

        s = self.settings
        _prepare_data_dir(s.data_dir)
        self._lockfile = _lock(s.data_dir)
        if s.log_json:
            self._json_log = open(s.log_json, "a", encoding="utf-8")  # noqa: SIM115
            self._json_observer = jsonFileLogObserver(self._json_log)
            globalLogPublisher.addObserver(self._json_observer)
        # Before anything opens them: a damaged file stops the start here,
        # with what to do, instead of in the middle of a recovery.
        for data_file in sqlite_files(s.shared):
            data_file.check(s.data_dir)
        if s.shared:
            await self._open_shared()
        else:
            self._open_local()
        evidence = os.path.join(s.data_dir, "evidence")
        os.makedirs(evidence, mode=0o700, exist_ok=True)
        # Counted from the start (worker deaths, reaped resources), served
        # on the web listeners' /metrics.
        self.metrics = m = DaemonMetrics()
        self.pool = AmpoulePool(
            self.reactor,
            size=s.workers,
            recycle_after=s.recycle_after,
            evidence_root=evidence,
            env=dict(os.environ),
            on_worker_death=m.worker_died,
            on_api_calls=m.api_calls,
        )
        await self.pool.start()
        self._go_on()
        cleaner = make_cleaner(
            self.reactor, self.journal, on_reaped=m.resource_reaped, api_observer=m.api_call
        )
        local = Scheduler(
            self.reactor,
            self.writer if s.shared else self.store,
            self.pool,
            self.journal,
            cleaner=cleaner,
            caps={**{p.name: p.max_vms for p in s.pools_by_name.values()}, **dict(s.caps)},
            default_cap=s.default_cap,
            quarantine_after=s.quarantine_after,
            health_check=make_health_check(
                self.reactor, self.store, api_observer=m.api_call
            ),
            health_interval=s.health_interval,
            storage=None if self.data_dir is None else self.data_dir.storage,
            on_free=self.cluster.want_claim if s.shared else None,
            on_requeue=self.cluster.give_back if s.shared else None,
        )
        self.scheduler = local
        if s.shared:
            from txvmbot.daemon.scheduling.shared import SharedScheduler

            # Metrics count the jobs this daemon runs; clients see all.
            self._detach_metrics = m.attach(local, seed=False)
            self.scheduler = shared = SharedScheduler(
                self.reactor, self.db, local, self.writer, host=s.host
            )
            self.cluster.on_events = shared.job_events
            self.cluster.on_listening = shared.catch_up
            shared.on_queued = self.cluster.want_claim
            self.writer.on_fenced = lambda ids: local.abandon(
                "another daemon took it over", ids
            )
            caps = {**{p.name: p.max_vms for p in s.pools_by_name.values()}, **dict(s.caps)}
            await self.cluster.start(local, cleaner, self.journal, caps)
            self.listener.start()
        else:
            self._detach_metrics = m.attach(local)
            await local.recover()
        self._go_on()
        if s.keep_finished_days > 0:
            # A child service: stopped before the store and journal close.
            keep = s.keep_finished_days * 86400
            Pruner(self.reactor, self.store, self.journal, keep).setServiceParent(self)
        for pool in s.pools_by_name.values():
            await self._check_pool(pool)
            self._go_on()
        factory = AMPServerFactory(self.scheduler, pools=s.pools_by_name)
        for description in s.listen_endpoints:
            endpoint = self._server_endpoint(description)
            self._ports.append(await endpoint.listen(factory))
            self._go_on()
        if s.web:
            await self._start_web()
        self.log.info(
            "txvmbot daemon ready: {workers} workers, listening on {listen}, data in {data_dir}",
            workers=s.workers,
            listen=", ".join(s.listen_endpoints),
            data_dir=s.data_dir,
        )

    def _open_local(self) -> None:
        """The job store and journal in SQLite files in the data dir, whose
        writes are held through a full disk (txvmbot.daemon.stores.sqlite.held)."""
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

    async def _open_shared(self) -> None:
        """The shared PostgreSQL store: database, schema, journal, the
        write-behind of this daemon's jobs, its lease, and LISTEN."""
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

    async def _start_web(self) -> None:
        """The status page (and /metrics) on ``[daemon] web``."""
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
                endpoint = self._server_endpoint(description)
                site = self.web.site()
            self._web_ports.append(await endpoint.listen(site))
            self._go_on()
        self.log.info("txvmbot web page on {web}", web=", ".join(self.settings.web))

    async def _check_pool(self, pool: Any) -> None:
        """``qemu-img check`` of a local pool's base image when the pool
        starts (seed 003: a full disk corrupted VM images). A pool whose
        image is missing or damaged is drained, with the reason logged:
        its jobs wait for an operator instead of failing one by one."""
        from txvmbot.qemu.disk import check_image
        from txvmbot.qemu.image import load_image

        try:
            image = load_image(pool.image_dir)
            if image.disk:
                await check_image(self.reactor, image.disk)
        except TxvmbotError as e:
            self.log.error(
                "Local pool {pool} is drained: {error}; fix it (txvmbot image build), "
                "then txvmbot resume {pool}",
                pool=pool.name,
                error=e,
            )
            # This host's pool only: with a shared store the same pool name
            # on other hosts keeps running.
            local = getattr(self.scheduler, "local", self.scheduler)
            local.drain(pool.name)
        else:
            self.log.info("Local pool {pool}: image {image} checked", pool=pool.name,
                          image=pool.image_dir)

    def _server_endpoint(self, description: str) -> Any:
        from twisted.internet.endpoints import serverFromString

        kind = description.split(":", 1)[0].lower()
        if kind == "unix":
            path = description.split(":")[1]
            path = path[len("path=") :] if path.startswith("path=") else path
            _remove_stale_socket(path)
            return serverFromString(self.reactor, description)
        from txvmbot.daemon.api.tls import tls_server_endpoint

        assert self.settings.tls is not None  # checked when the settings were parsed
        return tls_server_endpoint(self.reactor, description, self.settings.tls)

    async def _stop_shared(self) -> None:
        """Send what this daemon still has to write (for a bounded time),
        end the lease, stop listening, close the database."""
        from twisted.internet.defer import DeferredList

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
        await self.db.stop()
        self.cluster = None

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop_scheduler(self) -> None:
        """Stop the scheduler, if there is one yet (idempotent)."""
        stop = getattr(self.scheduler, "stop", None)
        if stop is not None:
            await stop()

    async def _stop(self) -> None:
        self._stopping = True
        await super().stopService()
        pool_stopped = None
        if self._starting is not None and not self._starting.called:
            # Told to stop while starting (waiting for workers, recovering,
            # checking an image): the scheduler stops first, as always, then
            # the pool, and what start-up is waiting for is cancelled, so
            # start-up gives up at once (what recovery did not clean stays
            # in the journal for the next start), before what it made is
            # taken down.
            await self._stop_scheduler()
            if self.pool is not None:
                pool_stopped = self.pool.stop()
            self._starting.cancel()
            await self._starting
        for port in self._web_ports + self._ports:
            await port.stopListening()
        self._ports = []
        self._web_ports = []
        if self.web is not None:
            self.web.stop()
        if self._detach_metrics is not None:
            self._detach_metrics()
            self._detach_metrics = None
        await self._stop_scheduler()
        if pool_stopped is not None:
            await pool_stopped
        elif self.pool is not None:
            await self.pool.stop()
        if self.cluster is not None:
            await self._stop_shared()
        for thing in (self.store, self.journal):
            if thing is not None:
                thing.close()
        if self._json_observer is not None:
            globalLogPublisher.removeObserver(self._json_observer)
        if self._json_log is not None:
            self._json_log.close()
        if self._lockfile is not None:
            self._lockfile.close()
        self.log.info("txvmbot daemon stopped")
