"""What SQLite plans for a query: the tests that pin an index down read it."""

from __future__ import annotations

import sqlite3


def query_plan(conn: sqlite3.Connection, sql: str) -> str:
    """SQLite's plan for ``sql``, its steps' details on one line."""
    return " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))
