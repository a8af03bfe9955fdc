"""Shared pytest fixtures: real servers on loopback, one per session."""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Iterator

import pytest

from tests.support.debian_fixtures import debian_image  # noqa: F401
from tests.support.pgserver import PostgresServer, choose_base_dir, running_server
from tests.support.qemu_fixtures import qemu_image  # noqa: F401
from tests.support.qemu_runs import short_dir  # noqa: F401
from tests.support.servers import Moto, moto_server
from tests.support.starts_servers import ServerUse

_HERE = pathlib.Path(__file__).resolve().parent


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
    """Mark every test by its folder: ``unit`` under tests/unit/,
    ``integration`` under tests/integration/ (they start real servers or
    processes), so that ``pytest -m unit`` (``bin/test --unit``) runs the
    unit tests alone. A test under tests/unit/ that starts a server
    (tests/support/starts_servers.py says how it knows) stops the run: it
    belongs in tests/integration/."""
    use = ServerUse()
    misplaced = []
    for item in items:
        kind = _kind(item)
        if kind is None:
            continue
        item.add_marker(getattr(pytest.mark, kind))
        if kind == "unit" and use.starts(item):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "these tests start a real server or process, so they belong in tests/integration/: "
            + ", ".join(misplaced)
        )


def _kind(item: pytest.Item) -> str | None:
    parts = item.path.relative_to(_HERE).parts if item.path.is_relative_to(_HERE) else ()
    return parts[0] if parts and parts[0] in ("unit", "integration") else None
