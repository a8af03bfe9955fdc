"""``twistd txvmbot``: options and the service maker.

twistd imports this module only when the plugin is used, after it has
installed the reactor; nothing here touches the reactor at import time.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage

from txvmbot.daemon import settings as _settings
from txvmbot.errors import ConfigError


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

    return DaemonService(options.settings, reactor)
