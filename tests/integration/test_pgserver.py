"""The PostgreSQL test fixtures against the real server they start."""

from __future__ import annotations

import os
import pathlib
import shutil

import psycopg
import pytest

from tests.support.pgserver import PostgresServer, PostgresServerError, choose_base_dir, find_bindir


def test_select_one(pg_dsn: str) -> None:
    """A connection to a fresh database runs a query."""
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_dsn_is_a_unix_socket_uri(pg_server: PostgresServer) -> None:
    """The DSN names the socket directory, percent-encoded, and psycopg reads it back."""
    dsn = pg_server.dsn("postgres")
    assert dsn.startswith("postgresql://postgres@/postgres?host=%2F")
    with psycopg.connect(dsn) as conn:
        assert conn.info.host == pg_server.socket_dir
        assert conn.info.dbname == "postgres"
        assert conn.info.user == "postgres"


def test_two_databases_are_distinct(pg_server: PostgresServer, pg_dsn: str) -> None:
    """Two pg_dsn databases differ: a table made in one is absent from the other."""
    other = pg_server.create_database("txvmbot_other")
    try:
        assert other != pg_dsn
        with (
            psycopg.connect(pg_dsn, autocommit=True) as a,
            psycopg.connect(other, autocommit=True) as b,
        ):
            name_a = a.execute("SELECT current_database()").fetchone()
            name_b = b.execute("SELECT current_database()").fetchone()
            assert name_a != name_b
            a.execute("CREATE TABLE only_here (x int)")
            assert b.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    finally:
        pg_server.drop_database("txvmbot_other")


def test_pg_dsn_counter_gives_fresh_names(pg_dsn: str) -> None:
    """pg_dsn databases are named txvmbot_tN and start empty."""
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None and row[0].startswith("txvmbot_t")
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)


def test_drop_database_closes_open_connections(pg_server: PostgresServer) -> None:
    """drop_database works while a connection to the database is still open."""
    dsn = pg_server.create_database("txvmbot_dropme")
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        pg_server.drop_database("txvmbot_dropme")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5).close()
    finally:
        conn.close()


def test_restart_keeps_data_and_ends_old_connections(
    pg_server: PostgresServer, pg_dsn: str
) -> None:
    """Data survives restart(); an old connection fails after it, a new one works."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (1), (2), (3)")
    before = psycopg.connect(pg_dsn, autocommit=True)
    old_pid = pg_server.pid
    try:
        pg_server.restart()
        assert pg_server.pid is not None and pg_server.pid != old_pid
        with pytest.raises(psycopg.OperationalError):
            before.execute("SELECT 1")
    finally:
        before.close()
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT n FROM kept ORDER BY n").fetchall()
        assert rows == [(1,), (2,), (3,)]


def _tcp_listen_inodes() -> set[str]:
    """Socket inodes of every TCP socket in LISTEN state (state 0A) on this host."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A":
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    return inodes


def test_no_tcp_port(pg_server: PostgresServer) -> None:
    """listen_addresses is empty and the postmaster holds no listening TCP socket."""
    with psycopg.connect(pg_server.dsn()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
    assert pg_server.pid is not None
    fd_dir = f"/proc/{pg_server.pid}/fd"
    held = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[len("socket:[") : -1])
    assert held, "the postmaster holds no sockets at all; its unix socket is missing"
    assert not held & _tcp_listen_inodes()


def test_stop_is_idempotent_and_missing_binaries_are_named() -> None:
    """stop() before start() does nothing; absent binaries name the Debian package."""
    server = PostgresServer("/tmp/txpg-never-started")
    server.stop()
    server.stop()
    assert server.pid is None
    with pytest.raises(PostgresServerError, match="'postgresql'"):
        find_bindir("/nonexistent/postgresql/*/bin")


def test_too_long_socket_path_is_refused() -> None:
    """A base directory whose socket path would overflow sun_path is refused up front."""
    with pytest.raises(PostgresServerError, match="longer than 107 bytes"):
        PostgresServer("/tmp/" + "x" * 100)


def test_failed_start_reports_the_log_tail(tmp_path: pathlib.Path) -> None:
    """A server that cannot start raises with its log; no process is left behind."""
    base, remove = choose_base_dir(str(tmp_path))
    try:
        server = PostgresServer(base)
        os.makedirs(server.data_dir, mode=0o700)
        with open(os.path.join(server.data_dir, "PG_VERSION"), "w") as f:
            f.write("15\n")  # a data directory without postgresql.conf: postgres refuses it
        if os.geteuid() == 0:
            shutil.chown(server.data_dir, "postgres", "postgres")
        with pytest.raises(PostgresServerError, match="log tail") as caught:
            server.start()
        # The tail is the server's own log, not just our summary.
        assert "postgresql.conf" in str(caught.value)
        assert server.pid is None
    finally:
        if remove:
            shutil.rmtree(base, ignore_errors=True)
