"""A badly behaved third-party Twisted plugin, for tests/integration/test_pool.py (seed 001).

It imports the reactor at import time, as much Twisted code does. Whoever
makes the plugin system import it (``getPlugins`` with no up-to-date
``dropin.cache``) installs the default reactor as a side effect; a later
``installReactor`` then fails with ReactorAlreadyInstalledError. That is what
killed ampoule's workers; txvmbot's workers never ask the plugin system.

This directory is put on the workers' PYTHONPATH by the tests only. It has
no ``__init__.py`` files: ``twisted.plugins`` finds ``twisted/plugins``
directories on the path by themselves.
"""

from twisted.internet import reactor  # noqa: F401  (the point of this file)
from twisted.plugin import IPlugin
from zope.interface import provider


@provider(IPlugin)
class EvilPlugin:
    """Provides nothing anyone asks for."""
