"""A real PostgreSQL server for the tests, on a unix socket only.

The server lives in one temporary directory: ``data/`` (made by ``initdb``
once), ``sock/`` (the socket, ``listen_addresses=''`` so no TCP port) and
``server.log``.  ``postgres`` is started directly, not through ``pg_ctl``, so
we hold its pid and stop it by that pid.  initdb and postgres refuse to run as
root, so as root they run as Debian's ``postgres`` system user.

psycopg is imported inside the functions that use it, so importing this module
(conftest does) costs nothing.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PACKAGE = "postgresql"
SERVER_USER = "postgres"
SUPERUSER = "postgres"
PORT = 5432
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
INITDB_TIMEOUT = 120.0
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_SOCKET_NAME = f".s.PGSQL.{PORT}"
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresServerError(RuntimeError):
    """The test PostgreSQL server could not be found, set up, started or used."""


def find_bindir(pattern: str = "/usr/lib/postgresql/*/bin") -> str:
    """The newest PostgreSQL ``bin`` directory holding ``initdb`` and ``postgres``."""

    def version(path: str) -> tuple[int, ...]:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(p) for p in re.findall(r"\d+", name))

    for bindir in sorted(glob.glob(pattern), key=version, reverse=True):
        if all(os.access(os.path.join(bindir, exe), os.X_OK) for exe in ("initdb", "postgres")):
            return bindir
    raise PostgresServerError(
        f"no PostgreSQL server binaries (initdb, postgres) under {pattern}: "
        f"install the Debian package {PACKAGE!r} (apt-get install {PACKAGE}, or run bin/setup)"
    )


def socket_path_fits(socket_dir: str) -> bool:
    """Whether the server's socket file under ``socket_dir`` fits in ``sun_path``."""
    path = os.path.join(socket_dir, _SOCKET_NAME)
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def _reachable_by(path: str, uid: int) -> bool:
    """Whether every directory above ``path`` lets ``uid`` traverse it."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(parent)
        if st.st_uid != uid and not st.st_mode & stat.S_IXOTH:
            return False
        up = os.path.dirname(parent)
        if up == parent:
            return True
        parent = up


def choose_base_dir(candidate: str) -> tuple[str, bool]:
    """A base directory for the server: ``candidate`` if usable, else a new one in /tmp.

    ``candidate`` is unusable when the socket path under it would be too long,
    or (as root) when the server user cannot traverse its parents: pytest's
    ``/tmp/pytest-of-root`` is mode 0700.  Returns the directory and whether
    the caller must remove it at the end.
    """
    usable = socket_path_fits(os.path.join(candidate, "sock"))
    if usable and os.geteuid() == 0:
        usable = _reachable_by(candidate, _server_user().pw_uid)
    if usable:
        return candidate, False
    return tempfile.mkdtemp(prefix="txpg", dir="/tmp"), True


def _server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresServerError(
            f"running as root, initdb and postgres must run as the system user "
            f"{SERVER_USER!r}, which does not exist: install the Debian package {PACKAGE!r}"
        ) from None


class PostgresServer:
    """One PostgreSQL server in ``base_dir``, reached by the DSNs of :meth:`dsn`.

    ``start``, ``stop`` and ``restart`` keep the data directory and the socket
    directory, so a DSN stays valid across a restart.
    """

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = os.path.join(self.base_dir, "sock")
        self.log_path = os.path.join(self.base_dir, "server.log")
        if not socket_path_fits(self.socket_dir):
            raise PostgresServerError(
                f"socket path {os.path.join(self.socket_dir, _SOCKET_NAME)!r} is longer than "
                f"{MAX_SOCKET_PATH} bytes: use a shorter base directory"
            )
        self._proc: subprocess.Popen[bytes] | None = None
        self._bindir: str | None = None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while the server runs, else ``None``."""
        return self._proc.pid if self._proc is not None else None

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq URI for ``dbname`` as the superuser, over the unix socket."""
        host = urllib.parse.quote(self.socket_dir, safe="")
        db = urllib.parse.quote(dbname, safe="")
        return f"postgresql://{SUPERUSER}@/{db}?host={host}&port={PORT}"

    # -- lifecycle

    def start(self) -> None:
        """initdb if needed, start postgres, and wait until it accepts connections."""
        if self._proc is not None:
            return
        self._bindir = self._bindir or find_bindir()
        self._prepare_dirs()
        if not os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            self._initdb()
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(
                [
                    os.path.join(self._bindir, "postgres"),
                    "-D",
                    self.data_dir,
                    "-p",
                    str(PORT),
                    "-k",
                    self.socket_dir,
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "unix_socket_permissions=0777",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **self._as_server_user(),
            )
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by pid, SIGKILL if that takes too long; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop, then start on the same data and socket directories."""
        self.stop()
        self.start()

    # -- databases

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> Any:
        """An autocommit psycopg connection to ``dbname``."""
        import psycopg

        return psycopg.connect(self.dsn(dbname), autocommit=True, **kwargs)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its DSN."""
        from psycopg import sql

        _check_db_name(name)
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE ``name`` if it exists, closing connections still open to it."""
        from psycopg import sql

        _check_db_name(name)
        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- helpers

    def _as_server_user(self) -> dict[str, Any]:
        """Popen arguments: a small environment and, as root, the server user."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "HOME": self.base_dir,
        }
        kwargs: dict[str, Any] = {"env": env, "cwd": self.base_dir}
        if os.geteuid() == 0:
            # Popen switches uid/gid in the child right before exec (like
            # setpriv), so the pid we hold is the postmaster's own.
            user = _server_user()
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        return kwargs

    def _prepare_dirs(self) -> None:
        os.makedirs(self.socket_dir, mode=0o755, exist_ok=True)
        if os.geteuid() == 0:
            user = _server_user()
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            if os.path.exists(self.log_path):
                os.chown(self.log_path, user.pw_uid, user.pw_gid)

    def _initdb(self) -> None:
        assert self._bindir is not None
        argv = [
            os.path.join(self._bindir, "initdb"),
            "-D",
            self.data_dir,
            "--auth=trust",
            "-U",
            SUPERUSER,
            "--no-locale",
            "--encoding=UTF8",
            "--no-sync",
        ]
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=INITDB_TIMEOUT,
                **self._as_server_user(),
            )
        except subprocess.TimeoutExpired as e:
            raise PostgresServerError(
                f"initdb in {self.data_dir} did not finish within {INITDB_TIMEOUT}s"
            ) from e
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace")[-2000:]
            raise PostgresServerError(
                f"initdb in {self.data_dir} exited with {done.returncode}:\n{out}"
            )

    def _wait_ready(self) -> None:
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PostgresServerError(
                    f"postgres exited with {self._proc.returncode} before accepting "
                    f"connections on {self.socket_dir}; log tail:\n{self._log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last = e
                time.sleep(0.05)
        raise PostgresServerError(
            f"postgres (pid {self.pid}) did not accept connections on {self.socket_dir} "
            f"within {START_TIMEOUT}s; last error: {last}; log tail:\n{self._log_tail()}"
        )

    def _log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log at {self.log_path}: {e})"


@contextmanager
def running_server(base: str, remove: bool) -> Iterator[PostgresServer]:
    """A started PostgresServer in ``base``, stopped by its pid when done
    (also on failure); ``base`` removed afterwards if ``remove``."""
    server = PostgresServer(base)
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            if remove:
                shutil.rmtree(base, ignore_errors=True)


def _check_db_name(name: str) -> None:
    if not _DB_NAME.match(name):
        raise PostgresServerError(
            f"database name {name!r} is not a plain lowercase identifier (a-z, 0-9, _)"
        )
