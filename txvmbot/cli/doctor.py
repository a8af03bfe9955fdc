"""``txvmbot doctor``: checks of this installation, each with the fix."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from txvmbot.cli._common import _Streams, _wrap


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check the installation (twistd plugin and its cache) and the daemon's data "
        "files, and say how to fix them",
        description=_wrap(
            "Check what makes the daemon work: that twistd finds the txvmbot plugin, that "
            "Twisted's plugin cache (dropin.cache) is present, up to date and writable, "
            "and that the daemon's job store and journal in its data dir are not damaged "
            "(SQLite's quick_check, as every daemon start runs it; safe while the daemon "
            "runs). A stale or missing cache makes the first process that looks for "
            "plugins import all of them. Exits 1 when something needs fixing."
        ),
    )
    doctor.add_argument(
        "--fix", action="store_true", help="regenerate the plugin cache where it is stale"
    )
    doctor.add_argument(
        "--config",
        metavar="FILE",
        help="the daemon's config, as given to twistd txvmbot (its [daemon] data_dir)",
    )
    doctor.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the daemon's data dir, as given to twistd txvmbot (default: from --config, "
        "else the daemon's default, $XDG_STATE_HOME/txvmbot)",
    )
    doctor.set_defaults(func=_cmd_doctor)


def _cmd_doctor(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot import doctor
    from txvmbot.tap import build_settings

    options = {"config": args.config, "data-dir": args.data_dir, "workers": None,
               "listen": [], "log-json": None}
    settings = build_settings(options, environ)
    findings = doctor.diagnose()
    if args.fix and not all(f.ok for f in findings):
        doctor.regenerate()
        print("regenerated the plugin cache; checking again", file=streams.human)
        findings = doctor.diagnose()
    # --fix leaves the data files alone: moving one aside loses what it holds.
    findings.extend(doctor.check_data_files(settings.data_dir, settings.shared))
    for f in findings:
        mark = "ok  " if f.ok else "FAIL"
        print(f"{mark} {f.what}", file=streams.human)
        if f.fix:
            print(f"     fix: {f.fix}", file=streams.human)
    return 0 if all(f.ok for f in findings) else 1
