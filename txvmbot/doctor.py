"""``txvmbot doctor``: checks of the installation an operator can act on.

It checks the daemon's SQLite files as every daemon start does
(:mod:`txvmbot.daemon.stores.sqlite.datafiles`), so an operator can look without
stopping a running daemon.

Seed 001 is why the first check exists: a missing or stale Twisted plugin
cache makes the first ``getPlugins`` call import every plugin module, and
one that imports the reactor at import time breaks whoever installs a
reactor next.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from attrs import frozen

REGENERATE = "python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'"


@frozen
class Finding:
    ok: bool
    what: str
    fix: str = ""


def plugin_dirs() -> list[str]:
    """Every directory Twisted searches for plugins that holds txvmbot's."""
    import twisted.plugins

    return [
        d
        for d in twisted.plugins.__path__
        if os.path.exists(os.path.join(d, "txvmbot_plugin.py"))
    ]


def _stale(directory: str) -> list[str]:
    cache = os.path.join(directory, "dropin.cache")
    cached = os.path.getmtime(cache)
    return [
        name
        for name in sorted(os.listdir(directory))
        if name.endswith(".py") and os.path.getmtime(os.path.join(directory, name)) > cached
    ]


def check_plugin_cache() -> Iterable[Finding]:
    dirs = plugin_dirs()
    if not dirs:
        yield Finding(
            False,
            "twistd cannot find the txvmbot plugin (twisted/plugins/txvmbot_plugin.py is on "
            "no directory of twisted.plugins.__path__)",
            "reinstall txvmbot (bin/setup), or run from a directory that has twisted/plugins/",
        )
        return
    for d in dirs:
        cache = os.path.join(d, "dropin.cache")
        if not os.access(d, os.W_OK):
            if not os.path.exists(cache) or _stale(d):
                yield Finding(
                    False,
                    f"the plugin cache in {d} is missing or stale and the directory is not "
                    "writable, so every process will import all plugins on first use",
                    f"as the owner of {d}: {REGENERATE}",
                )
                continue
        if not os.path.exists(cache):
            yield Finding(False, f"no plugin cache in {d}", f"txvmbot doctor --fix, or {REGENERATE}")
            continue
        stale = _stale(d)
        if stale:
            yield Finding(
                False,
                f"the plugin cache in {d} is older than {', '.join(stale)}",
                f"txvmbot doctor --fix, or {REGENERATE}",
            )
            continue
        yield Finding(True, f"plugin cache in {d} is up to date")


def check_twistd_plugin() -> Iterable[Finding]:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    names = [p.tapname for p in getPlugins(IServiceMaker)]
    if "txvmbot" in names:
        yield Finding(True, "twistd knows the txvmbot plugin")
    else:
        yield Finding(False, "twistd does not list the txvmbot plugin", "reinstall txvmbot")


def check_data_files(data_dir: str, shared: bool = False) -> Iterable[Finding]:
    """The check each daemon start runs on its SQLite files
    (:mod:`txvmbot.daemon.stores.sqlite.datafiles`), on the files in ``data_dir``."""
    from txvmbot.daemon.stores.sqlite.datafiles import DamagedFile, DataFileError, sqlite_files

    files = sqlite_files(shared)
    if not files:
        yield Finding(True, "the job store and journal are in the shared store: "
                      "no SQLite files to check")
        return
    for data_file in files:
        path = data_file.path(data_dir)
        if not os.path.exists(path):
            yield Finding(True, f"no {data_file.what} at {path} yet (the daemon creates it)")
            continue
        t0 = time.monotonic()
        try:
            data_file.check(data_dir)
        except DamagedFile as e:
            yield Finding(
                False,
                f"{e.what} {e.path} is damaged (SQLite: {e.said})",
                f"stop the daemon, then: {e.command} ; the daemon then starts with a new, "
                f"empty {e.what}, and loses {e.lost}",
            )
        except DataFileError as e:
            yield Finding(False, str(e), "run txvmbot doctor as the daemon's user")
        else:
            yield Finding(
                True,
                f"{data_file.what} {path} passes SQLite's quick_check "
                f"({os.path.getsize(path) / 2**20:.1f} MiB in {time.monotonic() - t0:.1f}s)",
            )


def regenerate() -> None:
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin))


def diagnose() -> list[Finding]:
    # The cache is looked at before anything calls getPlugins, which would
    # regenerate it as a side effect and hide what was wrong.
    findings = list(check_plugin_cache())
    findings.extend(check_twistd_plugin())
    return findings
