"""The ``txvmbot`` command: ``check`` runs one euca-style smoke check (or
several in a row), ``reap`` removes what earlier checks left behind, and
``submit``, ``watch``, ``jobs``, ``show``, ``cancel``, ``drain``,
``resume`` and ``status`` talk to the daemon (``twistd txvmbot``).

Exit status: 0 passed, 1 failed (or interrupted), 2 bad usage or config,
3 the daemon cannot be reached.

Importing this package and building the parser import neither the reactor
nor the scenario, so ``txvmbot --help`` is fast; both are imported when a
command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from txvmbot import __version__
from txvmbot.cli import check as _check
from txvmbot.cli import client as _client
from txvmbot.cli import doctor as _doctor
from txvmbot.cli import image as _image
from txvmbot.cli import local as _local
from txvmbot.cli import reap as _reap
from txvmbot.cli import suite as _suite
from txvmbot.cli._common import (
    CANCEL_REASON,
    _Exit,
    _load_cloud_config,
    _log_observer,
    _Streams,
    cloud_from_args,
    state_dir_for,
)
from txvmbot.cli.check import _CheckRun, spec_from_args
from txvmbot.errors import ConfigError

__all__ = [
    "CANCEL_REASON",
    "build_parser",
    "cloud_from_args",
    "main",
    "run",
    "spec_from_args",
    "state_dir_for",
    "_CheckRun",
    "_Exit",
    "_Streams",
    "_load_cloud_config",
]

_EPILOG = """\
examples:
  # one check against AWS, finding the newest Debian 12 image by name
  txvmbot check --endpoint https://ec2.eu-west-1.amazonaws.com --region eu-west-1 \\
      --image-name 'debian-12-amd64-*' --image-owner 136693071363 \\
      --ssh-user admin --ssh-key ~/.ssh/id_ed25519 --command 'uname -a'

  # ten checks in a row of a cloud from the config file, results as JSON
  txvmbot check --config clouds.toml --cloud prod --repeat 10 --json results.json

  # see what earlier checks left behind in that cloud, without removing it
  txvmbot reap --config clouds.toml --cloud prod --older-than 3600 --dry-run

  # the same check as a job of the daemon, watched live until it ends
  txvmbot submit --config clouds.toml --cloud prod --wait

  # what the daemon is doing
  txvmbot status; txvmbot jobs --state running --state queued

exit status: 0 passed, 1 failed or interrupted, 2 bad usage or config,
3 the daemon cannot be reached (daemon commands).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Builds nothing but the parser."""
    parser = argparse.ArgumentParser(
        prog="txvmbot",
        description="Smoke-check EC2-API clouds: boot a fresh VM, ssh in, run commands, "
        "always clean up.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"txvmbot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _check.add_parser(sub)
    _reap.add_parser(sub)
    _suite.add_parser(sub)
    _client.add_parsers(sub)
    _doctor.add_parser(sub)
    _local.add_parsers(sub)
    _image.add_parser(sub)
    return parser


def run(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    _reactor: Any = None,
) -> int:
    """Run the command line ``argv``; return the exit status.

    ``_reactor`` is for tests (a ``MemoryReactorClock``); without it the
    global reactor runs, with Twisted's signal handlers installed.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = _parse(parser, argv, stdout, stderr)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    streams = _Streams(stdout=stdout, stderr=stderr, json_path=getattr(args, "json", None))

    from twisted.logger import globalLogBeginner, globalLogPublisher

    observer = _log_observer(stderr, getattr(args, "verbose", False))
    if _reactor is None:
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    else:
        globalLogPublisher.addObserver(observer)
    try:
        code: int = args.func(args, streams, environ, _reactor)
        return code
    except ConfigError as e:
        stderr.write(f"txvmbot {args.command}: error: {e}\n")
        return 2
    finally:
        if _reactor is not None:
            globalLogPublisher.removeObserver(observer)


def _parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    stdout: IO[str],
    stderr: IO[str],
) -> argparse.Namespace:
    """``parser.parse_args`` writing to the given streams, not sys's."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        return parser.parse_args(argv)
    finally:
        sys.stdout, sys.stderr = old


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    _reactor: Any = None,
) -> int:
    """The console script: run ``argv`` and exit with its status."""
    raise SystemExit(run(argv, stdout=stdout, stderr=stderr, environ=environ, _reactor=_reactor))
