"""The daemon as a Twisted service whose children are its parts
(:mod:`txvmbot.daemon.parts`): the stores, the worker pool, the scheduling,
retention (:class:`~txvmbot.daemon.scheduling.upkeep.Pruner`), the AMP
listeners and the web page, opened in that order and stopped in reverse.

One daemon owns a data dir (an exclusive lock on ``daemon.lock``): the
store and the journal have exactly one writer (seed 004).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import IO, Any

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger, globalLogPublisher, jsonFileLogObserver

from txvmbot.daemon.settings import DaemonSettings
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


class _Started(service.Service):
    """A plain child service among the parts: nothing to wait for when it
    opens (its startService did it)."""

    def __init__(self, child: service.Service) -> None:
        self.child = child
        self.name = child.name or type(child).__name__

    def startService(self) -> None:
        super().startService()
        self.child.startService()

    async def open(self) -> None:
        pass

    def stopService(self) -> Deferred[None] | None:
        if not self.running:
            return None
        super().stopService()
        return self.child.stopService()


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
        self._lockfile: IO[str] | None = None
        self._json_log: IO[str] | None = None
        self._json_observer: Any = None
        #: The parts opened so far, in order (txvmbot.daemon.parts).
        self.parts: list[service.IService] = []
        self.scheduling: Any = None
        self.workers: Any = None

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

    async def _open(self, part: Any) -> None:
        """Open the next part, a child service, once the ones before it are."""
        part.setServiceParent(self)
        self.parts.append(part)
        await part.open()
        self._go_on()

    async def _start(self) -> None:
        from txvmbot.daemon.api.server import AMPServerFactory
        from txvmbot.daemon.parts import Listeners, Scheduling, WebPage, Workers, stores_for
        from txvmbot.daemon.scheduling.dispatch import Dispatcher
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
        stores = stores_for(self.reactor, s)
        await self._open(stores)
        evidence = os.path.join(s.data_dir, "evidence")
        os.makedirs(evidence, mode=0o700, exist_ok=True)
        # Counted from the start (worker deaths, reaped resources), served
        # on the web listeners' /metrics.
        metrics = DaemonMetrics()
        self.workers = Workers(AmpoulePool(
            self.reactor,
            size=s.workers,
            recycle_after=s.recycle_after,
            evidence_root=evidence,
            env=dict(os.environ),
            on_worker_death=metrics.worker_died,
            on_api_calls=metrics.api_calls,
        ))
        await self._open(self.workers)
        cleaner = make_cleaner(
            self.reactor, stores.journal, on_reaped=metrics.resource_reaped,
            api_observer=metrics.api_call,
        )
        caps = {**{p.name: p.max_vms for p in s.pools_by_name.values()}, **dict(s.caps)}
        local = Dispatcher(
            self.reactor,
            stores.writes,
            self.workers.pool,
            stores.journal,
            cleaner=cleaner,
            caps=caps,
            default_cap=s.default_cap,
            quarantine_after=s.quarantine_after,
            health_check=make_health_check(
                self.reactor, stores.store, api_observer=metrics.api_call
            ),
            health_interval=s.health_interval,
            storage=stores.storage,
            on_free=stores.on_free,
            on_requeue=stores.on_requeue,
        )
        self.scheduling = Scheduling(stores, local, metrics, cleaner, caps)
        await self._open(self.scheduling)
        front = self.scheduling.front
        if s.keep_finished_days > 0:
            keep = s.keep_finished_days * 86400
            await self._open(_Started(Pruner(self.reactor, stores.store, stores.journal, keep)))
        for pool in s.pools_by_name.values():
            await self._check_pool(pool, local)
            self._go_on()
        amp = Listeners("amp")
        await self._open(amp)
        factory = AMPServerFactory(front, pools=s.pools_by_name)
        for description in s.listen_endpoints:
            await amp.listen(self._server_endpoint(description), factory)
            self._go_on()
        if s.web:
            await self._open(WebPage(self.reactor, s, front, metrics, self._server_endpoint))
        self.log.info(
            "txvmbot daemon ready: {workers} workers, listening on {listen}, data in {data_dir}",
            workers=s.workers,
            listen=", ".join(s.listen_endpoints),
            data_dir=s.data_dir,
        )

    async def _check_pool(self, pool: Any, local: Any) -> None:
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
            await local.drain(pool.name)
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

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        from txvmbot.daemon.parts import stop_in_reverse

        self._stopping = True
        service.Service.stopService(self)
        if self._starting is not None and not self._starting.called:
            # Told to stop while starting (waiting for workers, recovering,
            # checking an image): the scheduler stops first, as always, then
            # the pool, and what start-up is waiting for is cancelled, so
            # start-up gives up at once (what recovery did not clean stays
            # in the journal for the next start), before what it made is
            # taken down.
            if self.scheduling is not None:
                await self.scheduling.stopService()
            pool_stopped = self.workers.stopService() if self.workers is not None else None
            self._starting.cancel()
            await self._starting
            if pool_stopped is not None:
                await pool_stopped
        # Each part once, last opened first (a part already stopped above
        # answers at once).
        await stop_in_reverse(self.parts)
        if self._json_observer is not None:
            globalLogPublisher.removeObserver(self._json_observer)
        if self._json_log is not None:
            self._json_log.close()
        if self._lockfile is not None:
            self._lockfile.close()
        self.log.info("txvmbot daemon stopped")
