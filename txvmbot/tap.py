"""``twistd txvmbot``: options and the service maker.

twistd imports this module only when the plugin is used, after it has
installed the reactor; nothing here touches the reactor at import time.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage
from twisted.python.failure import Failure

from txvmbot.daemon import settings as _settings
from txvmbot.errors import ConfigError, TxvmbotError


class Options(usage.Options):
    synopsis = "[--config FILE] [--data-dir DIR] [--workers N] [--listen ENDPOINT]..."
    longdesc = (
        "Run the txvmbot daemon: an AMP API on a unix socket (mode 0600) in the data dir, "
        "a scheduler, and worker processes that run smoke-test jobs. With no options it "
        "uses the embedded default: data dir $XDG_STATE_HOME/txvmbot (or "
        "~/.local/state/txvmbot), 2 workers. Clients: `txvmbot submit`, `txvmbot status`."
    )
    optParameters = [
        ["config", "c", None, "TOML file with a [daemon] table (and [clouds.NAME] tables)"],
        ["data-dir", "d", None, "where the daemon keeps its state, socket and evidence"],
        ["workers", "w", None, "number of worker processes", int],
        ["log-json", None, None, "also write every log event as JSON lines to this file"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on this endpoint (repeatable): unix:PATH:mode=600, or
        ssl:PORT:interface=ADDR with TLS client certificates from --config."""
        self["listen"].append(endpoint)

    def postOptions(self) -> None:
        try:
            self.settings = build_settings(self, os.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def build_settings(options: Any, environ: Any) -> _settings.DaemonSettings:
    if options["config"]:
        s = _settings.load(options["config"], environ)
    else:
        s = _settings.embedded_default(environ)
    changes: dict[str, Any] = {}
    if options["data-dir"]:
        changes["data_dir"] = os.path.abspath(os.path.expanduser(options["data-dir"]))
    if options["workers"] is not None:
        if not 1 <= options["workers"] <= 256:
            raise ConfigError("--workers", f"must be from 1 to 256, got {options['workers']}")
        changes["workers"] = options["workers"]
    if options["listen"]:
        changes["listen"] = tuple(
            _settings.check_listen(e, s.tls is not None, "--listen") for e in options["listen"]
        )
    if options["log-json"]:
        changes["log_json"] = os.path.abspath(options["log-json"])
    return attrs.evolve(s, **changes)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from txvmbot.daemon.service import DaemonService

    service = DaemonService(options.settings, reactor)
    exit_status = _ExitStatus()
    service.ready.addErrback(exit_status.cannot_start)
    return service


def cannot_start_line(error: BaseException) -> str:
    """The line a failed start prints on stderr: what went wrong and, for
    txvmbot's own errors, what to do; the traceback is in the log."""
    why = str(error) if isinstance(error, TxvmbotError) else f"{type(error).__name__}: {error}"
    return f"txvmbot: cannot start: {why}"


class _ExitStatus:
    """Makes ``twistd txvmbot`` exit 1 when the daemon fails to start.

    twistd has no way for a service to set its exit status: it stops the
    reactor, removes its pid file and returns, and the process exits 0
    (systemd's ``Restart=on-failure`` and every script read that as a clean
    stop). So once the start has failed, the process ends with
    ``os._exit(1)`` from an atexit hook, after twistd has done all of that
    and Python has begun to exit. The hook is registered here, before the
    reactor runs, so that the atexit hooks registered later (by what the
    daemon imports) run before it; only those registered earlier are
    skipped.
    """

    def __init__(self) -> None:
        self.status = 0
        atexit.register(self._exit)

    def cannot_start(self, failure: Failure) -> None:
        """Print the one line on stderr (the daemon logs the traceback next)
        and exit 1 at the end."""
        self.status = 1
        stderr = sys.__stderr__
        if stderr is not None and failure.value is not None:
            stderr.write(cannot_start_line(failure.value) + "\n")
            stderr.flush()

    def _exit(self) -> None:
        if not self.status:
            return
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(self.status)
