"""Installs txvmbot, its twistd plugin, and Twisted's plugin cache.

Seed 001: a stale or missing dropin.cache made Twisted import every plugin
on first use, inside ampoule workers, where one that imported the reactor
killed them. txvmbot's workers no longer depend on the cache (they install
their reactor without plugin discovery), but the cache is still generated
here when Twisted is importable at build time, by bin/setup after install,
and checked by ``txvmbot doctor``.
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class build_py_with_plugin_cache(build_py):
    def run(self):
        super().run()
        plugins = os.path.join(self.build_lib, "twisted", "plugins")
        try:
            import sys

            sys.path.insert(0, self.build_lib)
            try:
                from twisted.plugin import IPlugin, getPlugins

                import twisted.plugins

                if plugins not in twisted.plugins.__path__:
                    twisted.plugins.__path__.insert(0, plugins)
                list(getPlugins(IPlugin, twisted.plugins))
            finally:
                sys.path.remove(self.build_lib)
        except ImportError:
            # Isolated builds have no Twisted; bin/setup and `txvmbot doctor
            # --fix` generate the cache after install instead.
            pass


setup(
    packages=find_packages(include=["txvmbot", "txvmbot.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["txvmbot_plugin.py"], "txvmbot.qemu": ["guest/*"],
                  "txvmbot.daemon.web": ["static/*"]},
    cmdclass={"build_py": build_py_with_plugin_cache},
)
