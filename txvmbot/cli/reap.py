"""``txvmbot reap``: remove what earlier checks left behind."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from txvmbot.cli._common import (
    _CONFIG_NOTE,
    _close,
    _Exit,
    _load_cloud_config,
    _make_private_dir,
    _open_journal,
    _react,
    _Streams,
    _wrap,
    add_cloud_flags,
    add_files_flags,
    cloud_from_args,
    state_dir_for,
)
from txvmbot.config import check_float

if TYPE_CHECKING:
    from txvmbot.model import ReapReport


def add_parser(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    reap = sub.add_parser(
        "reap",
        help="remove instances, groups, keypairs and addresses earlier checks left behind",
        description=_wrap(
            "Find what earlier checks created and did not remove (from the journal "
            "and by txvmbot's tags in the cloud) and remove it. Exits 1 if anything "
            "could not be removed."
        ),
        epilog=_CONFIG_NOTE,
        formatter_class=fmt,
    )
    add_cloud_flags(reap)
    add_files_flags(reap)
    what = reap.add_argument_group("reap")
    what.add_argument(
        "--older-than",
        metavar="SECONDS",
        type=float,
        help="only what was created more than SECONDS ago, so running checks are "
        "left alone (default: everything)",
    )
    what.add_argument(
        "--dry-run", action="store_true", help="only list what would be removed (default: off)"
    )
    reap.set_defaults(func=_cmd_reap)


def _cmd_reap(
    args: argparse.Namespace,
    streams: _Streams,
    environ: Mapping[str, str],
    reactor: Any,
) -> int:
    older_than = None
    if args.older_than is not None:
        older_than = check_float("--older-than", args.older_than, positive=False)
    chosen, config_state = _load_cloud_config(args)
    cloud = cloud_from_args(args, environ, chosen)
    state_dir = state_dir_for(args.state_dir, config_state, environ)
    _make_private_dir(state_dir, "--state-dir")

    exit = _Exit()
    journal = _open_journal(state_dir)
    try:

        async def go(r: Any) -> None:
            from txvmbot.ec2.reaper import reap
            from txvmbot.report import format_reap, reap_to_json, renderer_for

            human = streams.human
            renderer = renderer_for(human, r)
            renderer.start()
            try:
                report: ReapReport = await reap(
                    r,
                    cloud,
                    journal=journal,
                    older_than=older_than,
                    dry_run=args.dry_run,
                    observer=renderer,
                )
            finally:
                renderer.stop()
            human.write(format_reap(report))
            human.flush()
            streams.write_json(reap_to_json(report))
            exit.code = 1 if report.errors else 0

        _react(go, reactor)
    finally:
        _close(journal)
    if exit.code is None:
        streams.stderr.write(
            "txvmbot reap: stopped before it finished; run it again to remove the rest\n"
        )
        return 1
    return exit.code
