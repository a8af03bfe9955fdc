"""Shared pytest fixtures: real servers on loopback, one per session."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from tests.debian_fixtures import debian_image  # noqa: F401
from tests.pgserver import PostgresServer, choose_base_dir, running_server
from tests.qemu_fixtures import qemu_image  # noqa: F401
from tests.servers import Moto, moto_server
from tests.starts_servers import ServerUse


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    with moto_server() as m:
        yield m


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server on a unix socket, for the whole session."""
    with running_server(*choose_base_dir(str(tmp_path_factory.mktemp("pg")))) as server:
        yield server


_pg_databases = itertools.count(1)


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> Iterator[str]:
    """The DSN of a fresh database (txvmbot_t1, txvmbot_t2, ...), dropped afterwards."""
    name = f"txvmbot_t{next(_pg_databases)}"
    dsn = pg_server.create_database(name)
    try:
        yield dsn
    finally:
        try:
            pg_server.drop_database(name)
        except Exception:
            # A test that restarted or stopped the server, or left a
            # connection that FORCE could not end, must not fail teardown.
            pass


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that starts a real server or process
    (tests/starts_servers.py says how it knows), so that
    ``pytest -m "not integration"`` runs only the unit tests."""
    use = ServerUse()
    for item in items:
        if use.starts(item):
            item.add_marker(pytest.mark.integration)
