"""The seams between txvmbot's layers, as zope interfaces.

Data flows one way: a spec goes in, a scenario drives an API client and an
ssh runner step by step, the journal records what exists, results come out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from txvmbot.model import JournalEntry


class IEC2Client(Interface):
    """Sends EC2 Query API calls and returns their parsed answers."""

    endpoint = Attribute("The endpoint URL (str).")
    region = Attribute("The region name (str).")
    signature_version = Attribute("'v4' or 'v2'.")
    api_version = Attribute("The EC2 API version of the botocore model (str).")

    def call(operation: str, params: dict[str, Any], *, repeatable: bool = True) -> Any:
        """Call ``operation`` (e.g. ``"RunInstances"``) with botocore-shaped
        ``params``; return a Deferred that fires with the parsed answer (a
        dict without ``ResponseMetadata``) or fails with CloudError or
        TransportError after transient errors were retried (with
        ``repeatable=False``, only those that say the cloud did not act)."""


class IJournal(Interface):
    """Durable record of every resource a check creates (the undo stack).

    Every method but ``close`` returns a Deferred, also where the answer is
    known at once (the SQLite and memory journals answer with ``succeed()``
    or ``fail()``; the shared PostgreSQL one and a worker's, over AMP,
    later), so a caller never asks whether it got one. ``close`` stays
    synchronous: every journal closes at once (the PostgreSQL one leaves its
    database to whoever made it)."""

    def intend(
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> Deferred[JournalEntry]:
        """Record, durably and before the create call, that a resource of
        ``kind`` named ``name`` is about to be created. Fire with the
        JournalEntry."""

    def created(entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        """Record the id the cloud gave the resource; fire with the new entry."""

    def done(entry: JournalEntry) -> Deferred[None]:
        """Record that the resource is gone (deleted, or never existed)."""

    def pending(check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        """Entries not yet done, newest first (the order to undo them in)."""

    def checks(older_than: float | None = None) -> Deferred[Sequence[str]]:
        """Ids of checks with pending entries, optionally only those whose
        newest entry is older than ``older_than`` (epoch seconds)."""

    def prune(done_before: float, limit: int = 500) -> Deferred[int]:
        """Forget up to ``limit`` done entries last written before
        ``done_before`` (epoch seconds) of checks with nothing pending;
        fire with how many went. Pending entries are never touched: cleanup
        and the reaper need them. Call again while it fires with ``limit``."""

    def close() -> None:
        """Close the journal, at once; later calls fail with JournalError
        (those of a journal that closes nothing of its own may go on)."""


class IHostJournal(IJournal):
    """A journal shared by the daemons of a cluster, which knows the host
    of the daemon that wrote each entry (the PostgreSQL journal)."""

    def host_checks(host: str) -> Deferred[Sequence[str]]:
        """Ids of checks with pending entries written by a daemon on
        ``host``, by id: a daemon restarted on that host stops the local
        machines such checks left there."""
