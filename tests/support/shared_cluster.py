"""Several real daemons (``twistd -n txvmbot``) on one real PostgreSQL,
started by a test and stopped by their pids; and what the tests read back
from the database itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import attrs
import psycopg

from tests.support import checkrun, paths
from tests.support import real_daemon as D

ROOT = paths.ROOT


@attrs.define
class Member:
    """One daemon of the cluster."""

    name: str
    host: str
    config: str
    data_dir: str
    proc: subprocess.Popen[bytes] | None = None
    daemon: D.Daemon | None = None

    @property
    def d(self) -> D.Daemon:
        assert self.daemon is not None
        return self.daemon

    def start(self, log_name: str = "twistd.log") -> None:
        proc, d = D.start(self.data_dir, ["--config", self.config, "--data-dir", self.data_dir],
                          log_name=log_name)
        self.proc, self.daemon = proc, d

    def stop(self) -> None:
        if self.proc is not None:
            D.stop(self.proc)

    def kill(self) -> None:
        """SIGKILL the daemon (its workers die with their pipes)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def write_config(path: str, dsn: str, host: str, *, workers: int, lease: float,
                 caps: Mapping[str, int] = {}, default_cap: int = 4,  # noqa: B006
                 extra: str = "", keys: Sequence[str] = ()) -> None:
    lines = [
        "[daemon]",
        'store_dsn_env = "TXVMBOT_TEST_DSN"',
        f'host = "{host}"',
        f"lease = {lease}",
        f"workers = {workers}",
        f"default_cap = {default_cap}",
        "quarantine_after = 1000",
        *keys,
    ]
    if caps:
        lines.append("[daemon.caps]")
        lines += [f'"{k}" = {v}' for k, v in caps.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)


@contextmanager
def cluster(
    dsn: str, workdir: str, n: int, *, workers: int = 2, lease: float = 6,
    caps: Mapping[str, int] = {}, default_cap: int = 4, hosts: Sequence[str] = (),  # noqa: B006
    extra: Sequence[str] = (), keys: Sequence[Sequence[str]] = (),
) -> Iterator[list[Member]]:
    """``n`` daemons on the database ``dsn`` (given in the environment, as
    ``store_dsn_env`` says), each with its own data dir and host name;
    ``keys[i]`` are more ``[daemon]`` keys of daemon i, ``extra[i]`` is
    appended to its config (its ``[pools.NAME]``)."""
    os.environ["TXVMBOT_TEST_DSN"] = dsn
    members = []
    for i in range(n):
        name = "abcdefgh"[i]
        base = os.path.join(workdir, name)
        data = os.path.join(base, "data")
        os.makedirs(data, exist_ok=True)
        cfg = os.path.join(base, "txvmbot.toml")
        host = hosts[i] if i < len(hosts) else f"host-{name}"
        write_config(cfg, dsn, host, workers=workers, lease=lease, caps=caps,
                     default_cap=default_cap, extra=extra[i] if i < len(extra) else "",
                     keys=keys[i] if i < len(keys) else ())
        members.append(Member(name, host, cfg, data))
    try:
        for m in members:
            m.start()
        yield members
    finally:
        for m in members:
            with suppress(Exception):
                m.stop()


def submit_script(connects: Sequence[str], doc: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                  count: int, timeout: float = 300) -> list[str]:
    """Submit ``count`` jobs to the daemons at ``connects`` in turn (job i
    to daemon i mod n), pipelined; job i is ``doc``, or ``doc[i mod m]``
    for a list of m. The job ids, in order."""
    docs = [doc] if isinstance(doc, Mapping) else list(doc)
    script = (
        "import json, sys\n"
        "from twisted.internet import task\n"
        "from twisted.internet.defer import ensureDeferred, gatherResults\n"
        "from txvmbot.daemon.api.client import connect\n"
        "args = json.loads(sys.argv[1])\n"
        "async def main(reactor):\n"
        "    clients = [await connect(reactor, c) for c in args['connects']]\n"
        "    n = len(clients)\n"
        "    docs = args['docs']\n"
        "    jobs = await gatherResults([clients[i % n].submit(docs[i % len(docs)])\n"
        "                                for i in range(args['count'])])\n"
        "    print(json.dumps([j.id for j in jobs]))\n"
        "    for c in clients:\n"
        "        await c.close()\n"
        "task.react(lambda r: ensureDeferred(main(r)))\n"
    )
    import json

    p = subprocess.run(
        [sys.executable, "-c", script, json.dumps({"connects": list(connects), "docs": docs,
                                                   "count": count})],
        cwd=ROOT, timeout=timeout, capture_output=True, text=True, env=checkrun.env(),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ids: list[str] = json.loads(p.stdout.strip().splitlines()[-1])
    return ids


def query(dsn: str, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return list(conn.execute(sql, args).fetchall())


def wait_until_final(dsn: str, ids: Sequence[str], timeout: float) -> dict[str, str]:
    """Poll the database until every job in ``ids`` is final (bounded)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = dict(query(dsn, "SELECT id, state FROM jobs WHERE id = ANY(%s)", (list(ids),)))
        if len(states) == len(ids) and all(
            s in ("passed", "failed", "cancelled", "error") for s in states.values()
        ):
            return states
        time.sleep(0.5)
    return states
