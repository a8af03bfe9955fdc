"""Installs txvmbot and regenerates Twisted's plugin cache afterwards.

Seed 001: a stale or missing dropin.cache made Twisted import every plugin
at first use, inside ampoule workers. Generating the cache at install time
keeps that from happening.
"""

from setuptools import setup

setup(
    data_files=[],
)
