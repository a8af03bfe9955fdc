"""A PostgreSQL database used from the reactor without ever blocking it.

psycopg 3's synchronous API runs in a Twisted thread pool of the database's
own (``deferToThreadPool``), with connections from a psycopg-pool
:class:`~psycopg_pool.ConnectionPool` sized like the thread pool, so a
thread always finds a connection. Each :meth:`Database.run` is one
transaction on one connection: committed when the function returns,
rolled back when it raises.

The DSN may hold a password. It is never logged nor put in an error:
:func:`describe_dsn` is what messages say instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from txvmbot.errors import ConfigError, TxvmbotError

__all__ = ["Database", "DatabaseError", "DatabaseUnavailable", "check_dsn", "describe_dsn"]

T = TypeVar("T")

#: How long a transaction waits for a connection (the database down: then
#: DatabaseUnavailable, and the caller tries again later).
CONNECT_TIMEOUT = 3.0


#: Every connection's settings: nothing waits on the database for long. A
#: statement gives up after 30 s and a lock wait after 5 s; the server ends
#: a session idle inside a transaction for 10 s (its client died mid-way:
#: its locks go with it, so a claim or a takeover is not held up by a
#: dead daemon); TCP keepalives and a user timeout notice a silent network
#: within about 10 s (ignored on a unix socket).
SESSION: dict[str, Any] = {
    "connect_timeout": int(CONNECT_TIMEOUT),
    "options": "-c statement_timeout=30000 -c lock_timeout=5000"
    " -c idle_in_transaction_session_timeout=10000",
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}


class DatabaseError(TxvmbotError):
    """The database refused a statement (a bug, or a damaged schema)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"job store {where}: {message}")
        self.where = where
        self.message = message


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (down, restarting, network): the
    caller tries again later."""


def describe_dsn(dsn: str) -> str:
    """``dsn`` without its password, for logs and errors: ``postgresql
    database D as user U on H``. Never raises."""
    try:
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(dsn)
    except Exception:
        return "postgresql database (DSN not shown)"
    host = str(parts.get("host") or "the default socket")
    port = f":{parts['port']}" if parts.get("port") else ""
    user = parts.get("user")
    db = parts.get("dbname") or user or "(default)"
    as_user = f" as {user}" if user else ""
    return f"postgresql database {db}{as_user} on {host}{port}"


def check_dsn(dsn: str, where: str) -> str:
    """``dsn`` if libpq can parse it; else ConfigError naming ``where``
    (and never the DSN itself, which may hold a password)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(dsn)
    except Exception as e:
        # libpq's message quotes no password, but may quote the DSN: say less.
        kind = type(e).__name__
        raise ConfigError(where, f"is not a PostgreSQL connection string ({kind})") from None
    return dsn


def _is_unavailable(e: BaseException) -> bool:
    import psycopg
    import psycopg_pool

    return isinstance(
        e, psycopg.OperationalError | psycopg_pool.PoolTimeout | psycopg.InterfaceError
    )


class Database:
    """One PostgreSQL database, used from the reactor.

    :param reactor: where Deferreds fire.
    :param dsn: libpq connection string or URI.
    :param size: threads and connections (transactions at once).
    """

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, *, size: int = 4) -> None:
        from psycopg_pool import ConnectionPool

        self.reactor = reactor
        self.dsn = dsn
        self.where = describe_dsn(dsn)
        self._threads = ThreadPool(minthreads=0, maxthreads=size, name="txvmbot-db")
        self._pool = ConnectionPool(
            dsn,
            min_size=0,
            max_size=size,
            open=False,
            timeout=CONNECT_TIMEOUT,
            # A connection the server dropped (restart) is found and
            # replaced before it is handed out.
            check=ConnectionPool.check_connection,
            kwargs=SESSION,
            name="txvmbot",
        )
        self._started = False

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._threads.start()
        self._pool.open(wait=False)

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """``fn(conn, *args)`` in one transaction in a database thread.

        Fails with DatabaseUnavailable when the database cannot be reached
        (the transaction's outcome is then unknown only if the connection
        broke at commit; every writer here is written to be repeatable),
        with DatabaseError for anything else the database refused."""
        if not self._started:
            raise RuntimeError("Database.start() first")
        return deferToThreadPool(self.reactor, self._threads, self._transaction, fn, args)

    def _transaction(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        import psycopg

        try:
            with self._pool.connection() as conn:
                return fn(conn, *args)
        except psycopg.Error as e:
            if _is_unavailable(e):
                raise DatabaseUnavailable(self.where, _first_line(e)) from None
            raise DatabaseError(self.where, f"{type(e).__name__}: {_first_line(e)}") from None
        except Exception as e:
            if _is_unavailable(e):
                raise DatabaseUnavailable(self.where, _first_line(e)) from None
            raise

    def connect(self) -> Any:
        """A new connection of its own (autocommit), outside the pool: for
        LISTEN, in a thread of the caller's. Blocking."""
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True, **SESSION)

    def stop(self) -> Deferred[None]:
        """Close the connections and stop the threads (waits for running
        transactions)."""
        if not self._started:
            from twisted.internet.defer import succeed

            return succeed(None)
        self._started = False

        def close() -> None:
            self._pool.close(timeout=5.0)

        d: Deferred[None] = deferToThreadPool(self.reactor, self._threads, close)

        def stopped(result: Any) -> Any:
            self._threads.stop()
            return result

        return d.addBoth(stopped)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
