"""The daemon's settings: the embedded default, or a ``[daemon]`` table in
the same TOML file that holds ``[clouds.NAME]``.

Every error names the key (``daemon.workers``) and the file.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs
from attrs import frozen

from txvmbot.config import check_float
from txvmbot.errors import ConfigError
from txvmbot.qemu.model import LocalPool

_KEYS = (
    "data_dir",
    "listen",
    "workers",
    "recycle_after",
    "quarantine_after",
    "default_cap",
    "caps",
    "health_interval",
    "keep_finished_days",
    "min_free_mb",
    "tls",
    "log_json",
    "web",
    "web_insecure_loopback",
    "store",
    "store_dsn_env",
    "host",
    "lease",
)
_TLS_KEYS = ("ca", "cert", "key")


@frozen
class TLSFiles:
    """PEM files for a TCP listener: the daemon's certificate and key, and
    the CA that client certificates must be signed by."""

    ca: str
    cert: str
    key: str


@frozen
class DaemonSettings:
    data_dir: str
    listen: tuple[str, ...] = ()
    workers: int = 2
    recycle_after: int = 50
    quarantine_after: int = 3
    default_cap: int = 4
    caps: tuple[tuple[str, int], ...] = ()
    health_interval: float = 60.0
    #: Days to keep a finished job (with its events) and a done journal
    #: entry before the daemon prunes them; 0 keeps them forever.
    keep_finished_days: float = 30.0
    #: Below this much free space in data_dir (MB) the daemon refuses new
    #: jobs, so that the jobs it runs can still write their events.
    min_free_mb: float = 50.0
    tls: TLSFiles | None = None
    log_json: str | None = None
    config_path: str | None = None
    pools: tuple[LocalPool, ...] = ()
    #: Where the web status page (and /metrics) listens; off when empty.
    web: tuple[str, ...] = ()
    #: Allow a plain TCP web listener on 127.0.0.1 (a demo, a test, a
    #: browser on the daemon's own host): anyone on that host can read it.
    web_insecure_loopback: bool = False
    #: The shared PostgreSQL store's connection string (``[daemon] store``
    #: or the variable ``store_dsn_env`` names); None: SQLite in data_dir.
    #: Never shown: it may hold a password.
    store_dsn: str | None = attrs.field(default=None, repr=False)
    #: This daemon's host name in the shared store (local VMs belong to it).
    host: str = ""
    #: Seconds a daemon's lease lasts without a heartbeat (shared store).
    lease: float = 30.0

    @property
    def shared(self) -> bool:
        """Whether jobs live in a shared PostgreSQL store."""
        return self.store_dsn is not None

    @property
    def pools_by_name(self) -> dict[str, LocalPool]:
        """The local VM pools: the configured ones, else the embedded
        ``local`` pool on the image ``txvmbot image build`` makes."""
        if self.pools:
            return {p.name: p for p in self.pools}
        return {"local": default_pool(self.data_dir)}

    @property
    def socket_path(self) -> str:
        return os.path.join(self.data_dir, "txvmbot.sock")

    @property
    def listen_endpoints(self) -> tuple[str, ...]:
        """What to listen on: the configured endpoints, else the unix socket
        in the data dir, mode 0600."""
        if self.listen:
            return self.listen
        return (f"unix:{self.socket_path}:mode=600",)


def default_pool(data_dir: str, environ: Mapping[str, str] = os.environ) -> LocalPool:
    from txvmbot.qemu.image import default_image_dir

    return LocalPool(
        name="local", image_dir=default_image_dir(environ), run_dir=os.path.join(data_dir, "vms")
    )


def default_data_dir(environ: Mapping[str, str] = os.environ) -> str:
    """The same state dir ``txvmbot check`` uses, so clients find the
    daemon's socket without being told."""
    from txvmbot.config import state_dir_for

    return state_dir_for(None, None, environ)


def embedded_default(environ: Mapping[str, str] = os.environ) -> DaemonSettings:
    return DaemonSettings(data_dir=default_data_dir(environ))


def _where(key: str) -> str:
    return f"daemon.{key}"


def _int(key: str, value: object, src: str, minimum: int = 1, maximum: int = 10_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(_where(key), f"expected a whole number, found {value!r}{src}")
    if not minimum <= value <= maximum:
        raise ConfigError(_where(key), f"must be from {minimum} to {maximum}, got {value}{src}")
    return value


def _str(key: str, value: object, src: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(_where(key), f"expected a non-empty string, found {value!r}{src}")
    return value


def check_listen(endpoint: str, has_tls: bool, where: str = "daemon.listen", src: str = "") -> str:
    """Only unix sockets and TLS with client certificates may listen: a
    plain TCP listener would serve anyone who can reach the port."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind == "unix":
        # Whoever can write the socket can run jobs with the daemon's cloud
        # credentials: owner only, whatever the string said or left out.
        parts = [p for p in endpoint.split(":")[1:] if not p.startswith("mode=")]
        return ":".join(["unix", *parts, "mode=600"])
    if kind in ("tcp", "tcp6"):
        raise ConfigError(
            where,
            f"{endpoint!r}: a plain TCP listener would serve unauthenticated clients; "
            f"use ssl:PORT:interface=ADDR with a [daemon.tls] table (ca, cert, key){src}",
        )
    if kind == "ssl":
        if not has_tls:
            raise ConfigError(
                where, f"{endpoint!r} needs a [daemon.tls] table with ca, cert and key{src}"
            )
        return endpoint
    raise ConfigError(where, f"{endpoint!r}: listen on unix:PATH or ssl:PORT, not {kind!r}{src}")


#: The one plain TCP web listener there may be (with web_insecure_loopback).
LOOPBACK_WEB = re.compile(r"tcp:([0-9]{1,5}):interface=127\.0\.0\.1")


def loopback_web_port(endpoint: str) -> int | None:
    """The port of a ``tcp:PORT:interface=127.0.0.1`` web listener, else None."""
    m = LOOPBACK_WEB.fullmatch(endpoint)
    return int(m.group(1)) if m else None


def check_web_listen(
    endpoint: str, has_tls: bool, insecure_loopback: bool, src: str = ""
) -> str:
    """The web page listens like the AMP API (a unix socket, or TLS with
    client certificates); with ``web_insecure_loopback``, also plain TCP
    on 127.0.0.1, and nowhere else."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind == "tcp" and insecure_loopback:
        # Exactly this form: Twisted's own parser knows escapes and repeats
        # that a looser check would let past (to 0.0.0.0).
        if LOOPBACK_WEB.fullmatch(endpoint) is None:
            raise ConfigError(
                "daemon.web",
                f"{endpoint!r}: web_insecure_loopback allows exactly "
                f"tcp:PORT:interface=127.0.0.1 (127.0.0.1 only), nothing else{src}",
            )
        return endpoint
    if kind in ("tcp", "tcp6"):
        raise ConfigError(
            "daemon.web",
            f"{endpoint!r}: a plain TCP web listener would serve anyone who reaches the port; "
            f"use ssl:PORT with a [daemon.tls] table, or unix:PATH, or "
            f"web_insecure_loopback = true with tcp:PORT:interface=127.0.0.1{src}",
        )
    return check_listen(endpoint, has_tls, "daemon.web", src)


def parse_daemon_table(
    table: Mapping[str, Any], path: str, environ: Mapping[str, str] = os.environ
) -> DaemonSettings:
    src = f" (in {path})"
    base = os.path.dirname(path)
    for key in table:
        if key not in _KEYS:
            raise ConfigError(
                _where(key), f"unknown key; expected one of {', '.join(sorted(_KEYS))}{src}"
            )

    def rel(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.join(base, p)

    tls = None
    if "tls" in table:
        t = table["tls"]
        if not isinstance(t, Mapping):
            raise ConfigError("daemon.tls", f"expected a table with ca, cert and key{src}")
        for key in t:
            if key not in _TLS_KEYS:
                raise ConfigError(f"daemon.tls.{key}", f"unknown key; expected ca, cert, key{src}")
        missing = [k for k in _TLS_KEYS if k not in t]
        if missing:
            raise ConfigError(f"daemon.tls.{missing[0]}", f"required{src}")
        tls = TLSFiles(*(rel(_str(f"tls.{k}", t[k], src)) for k in _TLS_KEYS))

    listen: tuple[str, ...] = ()
    if "listen" in table:
        raw = table["listen"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            raise ConfigError("daemon.listen", f"expected endpoint strings, found {raw!r}{src}")
        listen = tuple(
            check_listen(_str("listen", e, src), tls is not None, "daemon.listen", src)
            for e in items
        )

    insecure = table.get("web_insecure_loopback", False)
    if not isinstance(insecure, bool):
        raise ConfigError("daemon.web_insecure_loopback", f"expected true or false{src}")
    web: tuple[str, ...] = ()
    if "web" in table:
        raw = table["web"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            raise ConfigError("daemon.web", f"expected endpoint strings, found {raw!r}{src}")
        web = tuple(
            check_web_listen(_str("web", e, src), tls is not None, insecure, src) for e in items
        )

    caps: dict[str, int] = {}
    if "caps" in table:
        c = table["caps"]
        if not isinstance(c, Mapping):
            raise ConfigError("daemon.caps", f"expected a table of backend = number{src}")
        for name, v in c.items():
            caps[name] = _int(f"caps.{name}", v, src)

    health = check_float("daemon.health_interval", table.get("health_interval", 60.0), src)
    keep = check_float(
        "daemon.keep_finished_days",
        table.get("keep_finished_days", 30.0),
        f" (0 keeps finished jobs forever){src}",
        positive=False,
        unit="days",
    )

    min_free = check_float(
        "daemon.min_free_mb",
        table.get("min_free_mb", 50.0),
        f" (0 turns the check off){src}",
        positive=False,
        unit="MB",
    )

    dsn = _store_dsn(table, src, environ)
    host = _str("host", table["host"], src) if "host" in table else socket.gethostname()
    lease = check_float("daemon.lease", table.get("lease", 30.0), src)
    if lease < 3:
        raise ConfigError("daemon.lease", f"must be at least 3 seconds, got {lease:g}{src}")

    return DaemonSettings(
        store_dsn=dsn,
        host=host,
        lease=lease,
        data_dir=rel(_str("data_dir", table["data_dir"], src))
        if "data_dir" in table
        else default_data_dir(environ),
        listen=listen,
        workers=_int("workers", table.get("workers", 2), src, maximum=256),
        recycle_after=_int("recycle_after", table.get("recycle_after", 50), src),
        quarantine_after=_int("quarantine_after", table.get("quarantine_after", 3), src),
        default_cap=_int("default_cap", table.get("default_cap", 4), src),
        caps=tuple(sorted(caps.items())),
        health_interval=health,
        keep_finished_days=keep,
        min_free_mb=min_free,
        tls=tls,
        log_json=rel(_str("log_json", table["log_json"], src)) if "log_json" in table else None,
        config_path=path,
        web=web,
        web_insecure_loopback=insecure,
    )


def _store_dsn(table: Mapping[str, Any], src: str, environ: Mapping[str, str]) -> str | None:
    """The shared store's DSN from ``store`` or ``store_dsn_env``; errors
    never quote it (it may hold a password)."""
    from txvmbot.daemon.stores.postgres.db import check_dsn

    if "store" in table and "store_dsn_env" in table:
        raise ConfigError("daemon.store", f"give store or store_dsn_env, not both{src}")
    if "store" in table:
        value = table["store"]
        where = "daemon.store"
    elif "store_dsn_env" in table:
        name = _str("store_dsn_env", table["store_dsn_env"], src)
        value = environ.get(name)
        where = f"daemon.store_dsn_env (the variable {name})"
        if not value:
            raise ConfigError(where, f"is not set in the daemon's environment{src}")
    else:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(where, f"expected a postgresql:// connection string{src}")
    if not value.startswith(("postgresql://", "postgres://")) and "=" not in value:
        raise ConfigError(
            where, f"expected a postgresql://user@host/db URI or a key=value string{src}"
        )
    return check_dsn(value, where)


def load(path: str, environ: Mapping[str, str] = os.environ) -> DaemonSettings:
    """The ``[daemon]`` table of the TOML file at ``path`` (the embedded
    defaults for whatever it leaves out)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    table = data.get("daemon", {})
    if not isinstance(table, Mapping):
        raise ConfigError("daemon", f"expected a [daemon] table (in {path})")
    settings = parse_daemon_table(table, path, environ)
    pools = data.get("pools", {})
    if not isinstance(pools, Mapping):
        raise ConfigError("pools", f"expected [pools.NAME] tables (in {path})")
    parsed = tuple(
        parse_pool_table(name, t, path, settings.data_dir, environ) for name, t in pools.items()
    )
    return attrs.evolve(settings, pools=parsed)


_POOL_TYPES: dict[str, type | tuple[type, ...]] = {
    "image": str,
    "image_dir": str,
    "run_dir": str,
    "accel": str,
    "max_vms": int,
    "memory_mb": int,
    "cpus": int,
    "min_free_mb": int,
    "fast_start": bool,
    "keep_on_failure": bool,
}


def parse_pool_table(
    name: str, table: object, path: str, data_dir: str, environ: Mapping[str, str] = os.environ
) -> LocalPool:
    """One ``[pools.NAME]`` table: a local VM pool."""
    src = f" (in {path})"
    where = f"pools.{name}"
    if not isinstance(table, Mapping):
        raise ConfigError(where, f"expected a table{src}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _POOL_TYPES:
            raise ConfigError(
                f"{where}.{key}",
                f"unknown key; expected one of {', '.join(sorted(_POOL_TYPES))}{src}",
            )
        want = _POOL_TYPES[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(
                f"{where}.{key}",
                f"expected {getattr(want, '__name__', want)}, found {value!r}{src}",
            )
        if want is int and value < 1:
            raise ConfigError(f"{where}.{key}", f"must be at least 1, got {value}{src}")
        values[key] = value
    if values.get("accel", "auto") not in ("auto", "kvm", "tcg"):
        raise ConfigError(
            f"{where}.accel", f"expected auto, kvm or tcg, found {values['accel']!r}{src}"
        )
    base = os.path.dirname(path)
    for key in ("image_dir", "run_dir"):
        if key in values:
            p = os.path.expanduser(values[key])
            values[key] = p if os.path.isabs(p) else os.path.join(base, p)
    if "image" in values:
        values["image_dir"] = _pool_image_dir(where, values, environ, src)
    default = default_pool(data_dir, environ)
    return attrs.evolve(default, name=name, **values)


def _pool_image_dir(
    where: str, values: dict[str, Any], environ: Mapping[str, str], src: str
) -> str:
    """``image = "NAME"``: the image of that name in the state dir, where
    ``image build`` and ``image import`` put them (``txvmbot image list``)."""
    from txvmbot.config import state_dir_for
    from txvmbot.qemu.image import ImageError
    from txvmbot.qemu.images import image_dir_for

    name = values.pop("image")
    if "image_dir" in values:
        raise ConfigError(f"{where}.image", f"give image (a name) or image_dir, not both{src}")
    if "/" in name:
        raise ConfigError(
            f"{where}.image", f"{name!r} is a path: use image_dir = {name!r} for a directory{src}"
        )
    try:
        return image_dir_for(name, state_dir_for(None, None, environ))
    except ImageError as e:
        raise ConfigError(f"{where}.image", f"{e}{src}") from None
