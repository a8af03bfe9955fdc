"""The seams between txvmbot's layers, as zope interfaces.

Data flows one way: a spec goes in, a scenario drives an API client and an
ssh runner step by step, the journal records what exists, results come out.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


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

    Callers take each answer through ``maybeDeferred``: the SQLite journal
    answers at once, the shared PostgreSQL one with Deferreds."""

    def intend(
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> Any:
        """Record, durably and before the create call, that a resource of
        ``kind`` named ``name`` is about to be created. Return the
        JournalEntry."""

    def created(entry: Any, resource_id: str) -> Any:
        """Record the id the cloud gave the resource; return the new entry."""

    def done(entry: Any) -> Any:
        """Record that the resource is gone (deleted, or never existed)."""

    def pending(check_id: str | None = None) -> Any:
        """Entries not yet done, newest first (the order to undo them in)."""

    def checks(older_than: float | None = None) -> Any:
        """Ids of checks with pending entries, optionally only those whose
        newest entry is older than ``older_than`` (epoch seconds)."""

    def prune(done_before: float, limit: int = 500) -> Any:
        """Forget up to ``limit`` done entries last written before
        ``done_before`` (epoch seconds) of checks with nothing pending;
        return how many went. Pending entries are never touched: cleanup
        and the reaper need them. Call again while it returns ``limit``."""
