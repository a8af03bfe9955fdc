"""Shared pytest fixtures: real servers on loopback, one per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.qemu_fixtures import qemu_image  # noqa: F401
from tests.servers import Moto, moto_server


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    with moto_server() as m:
        yield m
