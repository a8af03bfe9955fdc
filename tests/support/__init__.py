"""Fixtures and helpers the tests share; the ones that start servers say so in starts_servers.py."""
