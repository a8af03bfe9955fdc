"""The shared store as the daemon's upkeep reads and prunes it (retention
and the health check): each call a Deferred."""

from __future__ import annotations

from collections.abc import Collection

from twisted.internet.defer import Deferred

from txvmbot.daemon.jobs import Job
from txvmbot.daemon.stores.postgres import store
from txvmbot.daemon.stores.postgres.db import Database

__all__ = ["SharedReads"]


class SharedReads:
    """``list``, ``get`` and ``prune`` of the shared job store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def list(
        self,
        states: Collection[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[list[Job]]:
        return self._db.run(store.list_jobs, states, backend, limit, before)

    def get(self, job_id: str) -> Deferred[Job | None]:
        return self._db.run(store.get, job_id)

    def prune(self, finished_before: float, limit: int = 500) -> Deferred[int]:
        """Finished jobs older than ``finished_before``, a batch at a time
        (several daemons pruning at once skip each other's rows)."""
        return self._db.run(store.prune, finished_before, limit)

    def close(self) -> None:
        """The database is closed by the daemon."""

    def __repr__(self) -> str:
        return f"<SharedReads {self._db.where}>"

