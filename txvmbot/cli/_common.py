"""What the ``txvmbot`` commands share: output streams, exit codes, the
config file and state dir, logging, running the reactor.

Importing this module imports no part of Twisted.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from typing import IO, Any

import attrs

from txvmbot.config import (
    CloudConfig,
    CloudSettings,
    build_cloud,
    check_endpoint,
    check_str,
    key_path,
    load_config,
    state_dir_for,  # noqa: F401 (the cli modules take it from here)
)
from txvmbot.errors import ConfigError
from txvmbot.model import Cloud

CANCEL_REASON = "SIGINT/SIGTERM received"

_CONFIG_NOTE = """\
Settings come from the flags, then from the cloud's table in --config, then
from the defaults shown. Credentials: access_key with secret_key or
secret_key_env in the config; else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
from the environment; else the named --profile.
"""


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=78)


def add_cloud_flags(p: argparse.ArgumentParser) -> None:
    """Where the cloud is: --endpoint, --region, --signature-version, --profile."""
    cloud = p.add_argument_group("cloud")
    cloud.add_argument(
        "--endpoint", metavar="URL", help="EC2 API URL (required unless in --config)"
    )
    cloud.add_argument("--region", metavar="R", help="region name (required unless in --config)")
    cloud.add_argument(
        "--signature-version",
        choices=("v4", "v2"),
        help="request signing: v4, or v2 for old Eucalyptus/OpenStack (default: v4)",
    )
    cloud.add_argument(
        "--profile", metavar="P", help="credentials profile (~/.aws/credentials) (default: none)"
    )


def add_files_flags(p: argparse.ArgumentParser, *, json_optional: bool = False) -> None:
    """--config, --cloud, --state-dir, --json and --verbose. With
    ``json_optional``, a bare ``--json`` means ``--json -``."""
    files = p.add_argument_group("config and state")
    files.add_argument(
        "--config", metavar="FILE", help="TOML file with [clouds.NAME] tables (default: none)"
    )
    files.add_argument(
        "--cloud",
        metavar="NAME",
        help="which [clouds.NAME] of --config to use (default: the only one)",
    )
    files.add_argument(
        "--state-dir",
        metavar="DIR",
        help="holds journal.sqlite and evidence/ (default: state_dir from --config, "
        "else $XDG_STATE_HOME/txvmbot, else ~/.local/state/txvmbot)",
    )
    json_help = (
        "also write the results as JSON to FILE, or to stdout with '-' (then the "
        "human output goes to stderr) (default: none)"
    )
    if json_optional:
        files.add_argument("--json", metavar="FILE|-", nargs="?", const="-", help=json_help)
    else:
        files.add_argument("--json", metavar="FILE|-", help=json_help)
    files.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log info messages to stderr, not only warnings and errors",
    )


# --- from arguments to values ----------------------------------------------


def _load_cloud_config(args: argparse.Namespace) -> tuple[CloudConfig | None, str | None]:
    """The chosen [clouds.NAME] of --config, and the config's state_dir."""
    if args.config is None:
        if args.cloud is not None:
            raise ConfigError("--cloud", "needs --config FILE to look the cloud up in")
        return None, None
    config = load_config(args.config)
    return config.cloud(args.cloud), config.state_dir


def cloud_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], chosen: CloudConfig | None
) -> Cloud:
    """The :class:`Cloud` from flags over the chosen config table."""
    flags = CloudSettings(
        endpoint=None if args.endpoint is None else check_endpoint("--endpoint", args.endpoint),
        region=None if args.region is None else check_str("--region", args.region),
        signature_version=args.signature_version,
        profile=None if args.profile is None else check_str("--profile", args.profile),
    )
    if chosen is None:
        return build_cloud(CloudSettings(), flags, environ)
    return build_cloud(
        chosen.cloud, flags, environ, name=chosen.name, where=key_path("clouds", chosen.name)
    )


def _make_private_dir(path: str, where: str) -> None:
    """Create ``path`` (and parents) with mode 0700 if it does not exist."""
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(where, f"cannot create {path}: {e.strerror or e}") from None


# --- running ---------------------------------------------------------------


@attrs.define
class _Streams:
    stdout: IO[str]
    stderr: IO[str]
    json_path: str | None

    @property
    def human(self) -> IO[str]:
        """Where people's output goes: stderr when stdout carries JSON."""
        return self.stderr if self.json_path == "-" else self.stdout

    def write_json(self, doc: Any) -> None:
        if self.json_path is None:
            return
        text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
        if self.json_path == "-":
            self.stdout.write(text)
            self.stdout.flush()
            return
        tmp = f"{self.json_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.json_path)
        self.human.write(f"JSON results written to {self.json_path}\n")


@attrs.define
class _Exit:
    """The exit code the command decided on; ``None`` if it never finished
    (the reactor was stopped under it)."""

    code: int | None = None


def _log_observer(stream: IO[str], verbose: bool) -> Any:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    return FilteringLogObserver(
        textFileLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )


class _Log:
    """twisted.logger.Logger, created on first use (its import is not free)."""

    def __getattr__(self, name: str) -> Any:
        from twisted.logger import Logger

        return getattr(Logger(namespace="txvmbot.cli"), name)


_log = _Log()


def _open_journal(state_dir: str) -> Any:
    from txvmbot.journal import SQLiteJournal

    return SQLiteJournal(os.path.join(state_dir, "journal.sqlite"))


def _react(main_fn: Callable[[Any], Any], reactor: Any) -> None:
    """Run ``main_fn(reactor)`` under ``task.react``; swallow its SystemExit
    (the real exit code is in the command's :class:`_Exit`)."""
    from twisted.internet.task import react

    try:
        react(main_fn, (), _reactor=reactor)
    except SystemExit:
        pass


def _close(journal: Any) -> None:
    close = getattr(journal, "close", None)
    if close is not None:
        close()
