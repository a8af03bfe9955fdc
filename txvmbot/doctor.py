"""``txvmbot doctor``: checks of the installation an operator can act on.

Seed 001 is why the first check exists: a missing or stale Twisted plugin
cache makes the first ``getPlugins`` call import every plugin module, and
one that imports the reactor at import time breaks whoever installs a
reactor next.
"""

from __future__ import annotations

import os
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


def regenerate() -> None:
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin))


def diagnose() -> list[Finding]:
    # The cache is looked at before anything calls getPlugins, which would
    # regenerate it as a side effect and hide what was wrong.
    findings = list(check_plugin_cache())
    findings.extend(check_twistd_plugin())
    return findings
