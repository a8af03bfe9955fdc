"""The TOML config file and the layering of settings: flags over config over defaults.

A config file names clouds::

    state_dir = "/var/lib/txvmbot"          # optional
    connect = "unix:path=/var/lib/txvmbot/txvmbot.sock"   # optional: where the daemon is

    [tls]                                    # for connect = "tcp:host=H:port=P"
    ca = "ca.pem"                            # the CA that signed the daemon's certificate
    cert = "client.pem"                      # our client certificate, signed by the
    key = "client.key"                       #   daemon's CA, and its key
    server_name = "daemon.example.com"       # optional: default the host= of connect

    [clouds.prod]
    endpoint = "https://ec2.example.com/services/compute"
    region = "RegionOne"
    signature_version = "v2"                 # "v4" (default) or "v2"
    access_key = "AKIA..."
    secret_key_env = "PROD_EC2_SECRET"       # or secret_key = "..."
    image_name = "debian-12-*"
    commands = ["uname -a", "cat /etc/os-release"]

    [clouds.prod.timeouts]
    running = 600

    [clouds.prod.retry]
    max_attempts = 4

Parsing is strict and pure: every unknown key, wrong type or bad value is a
:class:`~txvmbot.errors.ConfigError` whose ``where`` is the dotted key path
(``clouds.prod.timeouts.running``) and whose message says what was expected,
what was found and in which file. Reading the file is the only I/O here;
environment variables are looked up in a mapping the caller passes.

Settings are first collected as *partial* values (:class:`CloudSettings`,
:class:`CheckSettings`: ``None`` means "not given here"), one from the config
and one from the command line; :func:`build_cloud` and
:func:`build_check_spec` lay the flags over the config over the model's
defaults and build the frozen :mod:`txvmbot.model` values.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from attrs import frozen

from txvmbot.errors import ConfigError
from txvmbot.model import ADDRESS_DOMAINS, CheckSpec, Cloud, Credentials, RetryPolicy, Timeouts

__all__ = [
    "CheckSettings",
    "ClientTLSSettings",
    "CloudConfig",
    "CloudSettings",
    "Config",
    "build_check_spec",
    "build_cloud",
    "check_address_domain",
    "check_cidr",
    "check_endpoint",
    "check_float",
    "check_int",
    "key_path",
    "load_config",
    "parse_config",
    "parse_config_text",
    "timeout_flag",
]

_T = TypeVar("_T")

TIMEOUT_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(Timeouts))
RETRY_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(RetryPolicy))
SIGNATURE_VERSIONS = ("v4", "v2")

# The check settings a cloud table may carry, with their TOML type.
_STR_CHECK_KEYS = (
    "image",
    "image_name",
    "image_owner",
    "instance_type",
    "ssh_user",
    "ssh_key",
    "ssh_endpoint",
    "ssh_cidr",
)
_BOOL_CHECK_KEYS = ("floating_ip", "console", "ssh")
_CLOUD_KEYS = (
    "endpoint",
    "region",
    "signature_version",
    "profile",
    "access_key",
    "secret_key",
    "secret_key_env",
    "session_token",
)
_CLOUD_TABLE_KEYS = frozenset(
    _CLOUD_KEYS
    + _STR_CHECK_KEYS
    + _BOOL_CHECK_KEYS
    + ("address_domain", "commands", "parallel", "timeouts", "retry")
)


# --- value checks, shared by the config parser and the CLI -----------------


def _describe(value: object) -> str:
    """How a found value is shown in an error: its TOML type and value."""
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    if isinstance(value, dict):
        return "a table"
    return f"{kind} {shown}"


def _fail(where: str, expected: str, found: object, source: str) -> ConfigError:
    return ConfigError(where, f"expected {expected}, found {_describe(found)}{source}")


def _in(path: str | None) -> str:
    return f" (in {path})" if path else ""


def check_str(where: str, value: object, source: str = "", *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _fail(where, "a string", value, source)
    if not empty and not value.strip():
        raise _fail(where, "a non-empty string", value, source)
    return value


def check_bool(where: str, value: object, source: str = "") -> bool:
    if not isinstance(value, bool):
        raise _fail(where, "true or false", value, source)
    return value


def check_int(where: str, value: object, source: str = "", *, minimum: int = 1) -> int:
    """An integer (a TOML boolean is not one) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"an integer of at least {minimum}", value, source)
    if value < minimum:
        raise ConfigError(where, f"must be at least {minimum}, got {value}{source}")
    return value


def check_float(
    where: str, value: object, source: str = "", *, positive: bool = True, unit: str = "seconds"
) -> float:
    """A finite number of ``unit``, > 0 (``positive``) or >= 0."""
    bound = "greater than 0" if positive else "at least 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"a number of {unit} {bound}", value, source)
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(where, f"must be a finite number of {unit}, got {value}{source}")
    if number < 0 or (positive and number == 0):
        raise ConfigError(where, f"must be {bound}, got {value:g}{source}")
    return number


def check_endpoint(where: str, value: object, source: str = "") -> str:
    """An ``http://`` or ``https://`` URL with a host."""
    text = check_str(where, value, source)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ConfigError(where, f"expected an http(s) URL, found {text!r}: {e}{source}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            where,
            f"expected an http(s) URL such as https://ec2.example.com/, found {text!r}{source}",
        )
    return text


def check_cidr(where: str, value: object, source: str = "") -> str:
    """A network in CIDR notation; a bare address means that address alone
    (``/32`` or ``/128``). Returns the normalized form."""
    text = check_str(where, value, source)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        hint = ""
        try:
            hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
        except ValueError:
            pass
        raise ConfigError(
            where, f"expected a CIDR such as 203.0.113.0/24, found {text!r}: {e}{hint}{source}"
        ) from None
    return str(net)


def check_signature_version(where: str, value: object, source: str = "") -> str:
    text = check_str(where, value, source)
    if text not in SIGNATURE_VERSIONS:
        raise ConfigError(where, f'expected "v4" or "v2", found {text!r}{source}')
    return text


def check_address_domain(where: str, value: object, source: str = "") -> str:
    """The Domain a floating IP is allocated in: "vpc", or "standard" for
    clouds with only EC2-Classic addresses (Eucalyptus, OpenStack's ec2-api)."""
    text = check_str(where, value, source)
    if text not in ADDRESS_DOMAINS:
        raise ConfigError(
            where, f'expected "vpc" or "standard" (EC2-Classic, Eucalyptus), found {text!r}{source}'
        )
    return text


SSH_ENDPOINT_FIELDS = ("public_ip", "private_ip", "instance_id", "index")


def check_template(where: str, value: object, source: str = "") -> str:
    """An endpoint string template such as ``tcp:host={public_ip}:port=22``,
    using only the placeholders in SSH_ENDPOINT_FIELDS."""
    text = check_str(where, value, source)
    example = "'tcp:host={public_ip}:port=22'"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ConfigError(
            where, f"expected an endpoint template such as {example}, found {text!r}: {e}{source}"
        ) from None
    for f in fields:
        root = f.split(".", 1)[0].split("[", 1)[0]
        if root not in SSH_ENDPOINT_FIELDS:
            known = ", ".join("{" + n + "}" for n in SSH_ENDPOINT_FIELDS)
            raise ConfigError(
                where, f"unknown placeholder {{{f}}} in {text!r}; expected {known}{source}"
            )
    return text


def check_commands(where: str, value: object, source: str = "") -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(where, "an array of strings", value, source)
    return tuple(check_str(f"{where}[{i}]", item, source) for i, item in enumerate(value))


def _check_table(where: str, value: object, source: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, "a table", value, source)
    return value


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key_path(*parts: str) -> str:
    """A dotted TOML key path; keys that are not bare are quoted as TOML would."""
    return ".".join(p if _BARE_KEY.fullmatch(p) else json.dumps(p) for p in parts)


def _reject_unknown(
    where: str, table: Mapping[str, Any], known: frozenset[str] | tuple[str, ...], source: str
) -> None:
    for key in table:
        if key not in known:
            path = f"{where}.{key_path(key)}" if where else key_path(key)
            raise ConfigError(
                path, f"unknown key; expected one of {', '.join(sorted(known))}{source}"
            )


# --- partial settings ------------------------------------------------------


def _pairs(value: Mapping[str, _T]) -> tuple[tuple[str, _T], ...]:
    return tuple(sorted(value.items()))


@frozen
class CloudSettings:
    """Cloud settings from one layer (config or flags); ``None`` = not given.

    ``secret_key_env`` names an environment variable that :func:`build_cloud`
    reads the secret key from, so a config file need not hold the secret.
    ``retry`` holds the RetryPolicy fields this layer sets, sorted by name.
    """

    endpoint: str | None = None
    region: str | None = None
    signature_version: str | None = None
    profile: str | None = None
    access_key: str | None = None
    secret_key: str | None = attrs.field(default=None, repr=False)
    secret_key_env: str | None = None
    session_token: str | None = attrs.field(default=None, repr=False)
    retry: tuple[tuple[str, float], ...] = ()


@frozen
class CheckSettings:
    """Check settings from one layer (config or flags); ``None`` = not given.

    ``timeouts`` holds the Timeouts fields this layer sets, sorted by name.
    """

    image: str | None = None
    image_name: str | None = None
    image_owner: str | None = None
    instance_type: str | None = None
    ssh_user: str | None = None
    ssh_key: str | None = None
    ssh_endpoint: str | None = None
    ssh_cidr: str | None = None
    commands: tuple[str, ...] | None = None
    floating_ip: bool | None = None
    address_domain: str | None = None
    parallel: int | None = None
    console: bool | None = None
    ssh: bool | None = None
    timeouts: tuple[tuple[str, float], ...] = ()


@frozen
class CloudConfig:
    """One ``[clouds.NAME]`` table: how to reach the cloud, and the check
    defaults for it."""

    name: str
    cloud: CloudSettings
    check: CheckSettings


@frozen
class ClientTLSSettings:
    """The ``[tls]`` table: PEM files a client uses to reach the daemon over
    TCP (paths already made relative to the config file's directory)."""

    ca: str
    cert: str
    key: str
    server_name: str | None = None


@frozen
class Config:
    """A parsed config file. ``connect`` and ``tls`` say how clients reach
    the daemon; the ``[daemon]`` table is the daemon's own
    (:mod:`txvmbot.daemon.settings`) and is not parsed here."""

    path: str
    clouds: tuple[CloudConfig, ...] = ()
    state_dir: str | None = None
    connect: str | None = None
    tls: ClientTLSSettings | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.clouds)

    def cloud(self, name: str | None, where: str = "--cloud") -> CloudConfig:
        """The cloud called ``name``; with no name, the only cloud there is."""
        if name is None:
            if len(self.clouds) == 1:
                return self.clouds[0]
            if not self.clouds:
                raise ConfigError(where, f"{self.path} defines no [clouds.NAME] table")
            raise ConfigError(
                where,
                f"{self.path} defines clouds {', '.join(self.names())}; choose one with --cloud",
            )
        for c in self.clouds:
            if c.name == name:
                return c
        known = ", ".join(self.names()) or "none"
        raise ConfigError(where, f"no cloud named {name!r} in {self.path} (it defines: {known})")


# --- parsing ---------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and parse the TOML config at ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("--config", f"{path} is not UTF-8: {e}") from None
    return parse_config_text(text, path)


def parse_config_text(text: str, path: str) -> Config:
    """Parse TOML ``text`` read from ``path`` (``path`` is used in errors and
    to resolve relative paths in the file)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # The message carries "(at line L, column C)".
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    return parse_config(data, path)


def parse_cloud_table(name: str, table: object, where: str, source: str = "") -> CloudConfig:
    """Validate one cloud table (as in ``[clouds.NAME]``) found at ``where``
    (a key path used in errors, e.g. ``job``); relative paths stay as they are."""
    return _parse_cloud(name, table, _in(source) if source else "", "", where)


def parse_config(data: Mapping[str, Any], path: str) -> Config:
    """Validate a decoded TOML document into a :class:`Config`.

    Relative ``state_dir`` and ``ssh_key`` paths are taken relative to the
    directory of ``path``, so cron and CI can run from anywhere.
    """
    src = _in(path)
    base = os.path.dirname(path)
    _reject_unknown("", data, ("clouds", "state_dir", "connect", "tls", "daemon", "pools"), src)
    state_dir = None
    if "state_dir" in data:
        state_dir = _relative_to(base, check_str("state_dir", data["state_dir"], src))
    connect = None
    if "connect" in data:
        connect = check_str("connect", data["connect"], src)
    tls = None
    if "tls" in data:
        tls = _parse_client_tls(_check_table("tls", data["tls"], src), src, base)
    clouds: list[CloudConfig] = []
    tables = _check_table("clouds", data.get("clouds", {}), src)
    for name, table in tables.items():
        clouds.append(_parse_cloud(name, table, src, base))
    return Config(path=path, clouds=tuple(clouds), state_dir=state_dir, connect=connect, tls=tls)


def _parse_client_tls(table: Mapping[str, Any], src: str, base: str) -> ClientTLSSettings:
    _reject_unknown("tls", table, ("ca", "cert", "key", "server_name"), src)
    paths = {}
    for key in ("ca", "cert", "key"):
        if key not in table:
            raise ConfigError(f"tls.{key}", f"required: a PEM file{src}")
        p = os.path.expanduser(check_str(f"tls.{key}", table[key], src))
        paths[key] = _relative_to(base, p)
    name = None
    if "server_name" in table:
        name = check_str("tls.server_name", table["server_name"], src)
    return ClientTLSSettings(server_name=name, **paths)


def _relative_to(base: str, p: str) -> str:
    if os.path.isabs(p) or p.startswith("~") or not base:
        return p
    return os.path.join(base, p)


def _parse_cloud(
    name: str, value: object, src: str, base: str, where: str | None = None
) -> CloudConfig:
    where = key_path("clouds", name) if where is None else where
    if not name.strip():
        raise ConfigError(where, f"a cloud needs a non-empty name{src}")
    table = _check_table(where, value, src)
    _reject_unknown(where, table, _CLOUD_TABLE_KEYS, src)

    def get(key: str, check: Callable[[str, object, str], _T]) -> _T | None:
        if key not in table:
            return None
        return check(f"{where}.{key}", table[key], src)

    if "secret_key" in table and "secret_key_env" in table:
        raise ConfigError(f"{where}.secret_key", f"set secret_key or secret_key_env, not both{src}")
    has_secret = "secret_key" in table or "secret_key_env" in table
    if has_secret and "access_key" not in table:
        raise ConfigError(f"{where}.access_key", f"required with a secret key{src}")
    if "access_key" in table and not has_secret:
        raise ConfigError(
            f"{where}.secret_key", f"required with access_key (or set secret_key_env){src}"
        )
    if "image" in table and "image_name" in table:
        raise ConfigError(f"{where}.image", f"set image or image_name, not both{src}")

    retry: dict[str, float] = {}
    if "retry" in table:
        rtable = _check_table(f"{where}.retry", table["retry"], src)
        _reject_unknown(f"{where}.retry", rtable, RETRY_FIELDS, src)
        for key, v in rtable.items():
            retry[key] = _check_retry_value(f"{where}.retry.{key}", key, v, src)
        _check_retry_consistent(f"{where}.retry", retry, src)

    timeouts: dict[str, float] = {}
    if "timeouts" in table:
        ttable = _check_table(f"{where}.timeouts", table["timeouts"], src)
        _reject_unknown(f"{where}.timeouts", ttable, TIMEOUT_FIELDS, src)
        for key, v in ttable.items():
            timeouts[key] = check_float(f"{where}.timeouts.{key}", v, src)
        check_timeouts_consistent(timeouts, lambda k: f"{where}.timeouts.{k}", src)

    ssh_key = get("ssh_key", check_str)
    cloud = CloudSettings(
        endpoint=get("endpoint", check_endpoint),
        region=get("region", check_str),
        signature_version=get("signature_version", check_signature_version),
        profile=get("profile", check_str),
        access_key=get("access_key", check_str),
        secret_key=get("secret_key", check_str),
        secret_key_env=get("secret_key_env", check_str),
        session_token=get("session_token", check_str),
        retry=_pairs(retry),
    )
    check = CheckSettings(
        image=get("image", check_str),
        image_name=get("image_name", check_str),
        image_owner=get("image_owner", check_str),
        instance_type=get("instance_type", check_str),
        ssh_user=get("ssh_user", check_str),
        ssh_key=None if ssh_key is None else _relative_to(base, ssh_key),
        ssh_endpoint=get("ssh_endpoint", check_template),
        ssh_cidr=get("ssh_cidr", check_cidr),
        commands=get("commands", check_commands),
        floating_ip=get("floating_ip", check_bool),
        address_domain=get("address_domain", check_address_domain),
        parallel=get("parallel", check_int),
        console=get("console", check_bool),
        ssh=get("ssh", check_bool),
        timeouts=_pairs(timeouts),
    )
    return CloudConfig(name=name, cloud=cloud, check=check)


def _check_retry_value(where: str, key: str, value: object, src: str) -> float:
    if key == "max_attempts":
        return check_int(where, value, src, minimum=1)
    if key == "request_timeout" or key == "max_elapsed":
        return check_float(where, value, src, positive=True)
    return check_float(where, value, src, positive=False)


def _check_retry_consistent(where: str, retry: Mapping[str, float], src: str = "") -> None:
    d = RetryPolicy()
    base = retry.get("base_delay", d.base_delay)
    cap = retry.get("max_delay", d.max_delay)
    if cap < base:
        raise ConfigError(
            f"{where}.max_delay", f"must be at least base_delay ({base:g}), got {cap:g}{src}"
        )


def check_timeouts_consistent(
    timeouts: Mapping[str, float], name_of: Callable[[str], str], src: str = ""
) -> None:
    """``poll_max_interval`` may not be below ``poll_interval``. ``name_of``
    turns a Timeouts field name into the key or flag that set it."""
    d = Timeouts()
    low = timeouts.get("poll_interval", d.poll_interval)
    high = timeouts.get("poll_max_interval", d.poll_max_interval)
    if high < low:
        raise ConfigError(
            name_of("poll_max_interval"),
            f"must be at least {name_of('poll_interval')} ({low:g}), got {high:g}{src}",
        )


def timeout_flag(field_name: str) -> str:
    """The command-line flag for a Timeouts field: ``--timeout-ssh-connect``."""
    return "--timeout-" + field_name.replace("_", "-")


# --- layering --------------------------------------------------------------


def _over(top: _T | None, bottom: _T | None) -> _T | None:
    return bottom if top is None else top


def build_cloud(
    config: CloudSettings,
    flags: CloudSettings,
    environ: Mapping[str, str],
    *,
    name: str = "default",
    where: str = "",
) -> Cloud:
    """Lay ``flags`` over ``config`` over the defaults into a :class:`Cloud`.

    Credentials come from the layer that sets ``access_key``; without one,
    from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
    in ``environ`` unless a profile is named; else they are left ``None``
    for the EC2 client to resolve (its profile). ``where`` is the config key
    prefix (``clouds.prod``) used in errors about config-only keys.
    """
    endpoint = _over(flags.endpoint, config.endpoint)
    region = _over(flags.region, config.region)
    in_config = f" (or set endpoint in [{where}])" if where else ""
    if endpoint is None:
        raise ConfigError("--endpoint", f"required: the EC2 API URL{in_config}")
    if region is None:
        raise ConfigError(
            "--region", "required" + (f" (or set region in [{where}])" if where else "")
        )
    sig = _over(flags.signature_version, config.signature_version) or "v4"
    profile = _over(flags.profile, config.profile)

    credentials: Credentials | None = None
    layer = flags if flags.access_key is not None else config
    prefix = "--" if layer is flags else (f"{where}." if where else "")
    if layer.access_key is not None:
        secret = layer.secret_key
        if secret is None and layer.secret_key_env is not None:
            secret = environ.get(layer.secret_key_env)
            if not secret:
                raise ConfigError(
                    f"{prefix}secret_key_env",
                    f"environment variable {layer.secret_key_env} is not set or empty",
                )
        if secret is None:
            raise ConfigError(f"{prefix}secret_key", "required with access_key")
        credentials = Credentials(layer.access_key, secret, layer.session_token)
    elif (
        profile is None
        and environ.get("AWS_ACCESS_KEY_ID")
        and environ.get("AWS_SECRET_ACCESS_KEY")
    ):
        credentials = Credentials(
            environ["AWS_ACCESS_KEY_ID"],
            environ["AWS_SECRET_ACCESS_KEY"],
            environ.get("AWS_SESSION_TOKEN") or None,
        )

    retry_values: dict[str, Any] = dict(config.retry)
    retry_values.update(flags.retry)
    _check_retry_consistent(f"{where}.retry" if where else "retry", retry_values)
    retry = RetryPolicy(**retry_values)
    return Cloud(
        endpoint=endpoint,
        region=region,
        name=name,
        signature_version=sig,  # type: ignore[arg-type]  # checked by the parsers
        credentials=credentials,
        profile=profile,
        retry=retry,
    )


def build_check_spec(cloud: Cloud, config: CheckSettings, flags: CheckSettings) -> CheckSpec:
    """Lay ``flags`` over ``config`` over the model's defaults into a
    :class:`CheckSpec`.

    An image given on one layer (by id or by name) replaces any image the
    layer below gave, so ``--image`` wins over a config's ``image_name``.
    """
    if flags.image is not None or flags.image_name is not None:
        image, image_name = flags.image, flags.image_name
    else:
        image, image_name = config.image, config.image_name
    if not image and not image_name:
        raise ConfigError(
            "--image",
            "an image is required: give --image ID or --image-name PATTERN "
            "(or image/image_name in the config)",
        )
    values: dict[str, Any] = {}
    for a in attrs.fields(CheckSettings):
        if a.name in ("image", "image_name", "timeouts"):
            continue
        v = _over(getattr(flags, a.name), getattr(config, a.name))
        if v is not None:
            values[a.name] = v
    timeout_values = dict(config.timeouts)
    timeout_values.update(flags.timeouts)
    check_timeouts_consistent(timeout_values, timeout_flag)
    timeouts = Timeouts(**timeout_values)
    return CheckSpec(
        cloud=cloud,
        image=image,
        image_name=image_name,
        timeouts=timeouts,
        **values,
    )


def state_dir_for(flag: str | None, config: str | None, environ: Mapping[str, str]) -> str:
    """--state-dir, else the config's state_dir, else $XDG_STATE_HOME/txvmbot
    (if absolute, as the XDG spec asks), else ~/.local/state/txvmbot."""
    if flag is not None:
        return os.path.expanduser(check_str("--state-dir", flag))
    if config is not None:
        return os.path.expanduser(config)
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "txvmbot")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "txvmbot")
