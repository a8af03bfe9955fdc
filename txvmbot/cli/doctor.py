"""``txvmbot doctor``: checks of this installation, each with the fix."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from txvmbot.cli._common import _Streams, _wrap


def add_parser(sub: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check the installation (twistd plugin and its cache) and say how to fix it",
        description=_wrap(
            "Check what makes the daemon work: that twistd finds the txvmbot plugin, and "
            "that Twisted's plugin cache (dropin.cache) is present, up to date and "
            "writable. A stale or missing cache makes the first process that looks for "
            "plugins import all of them. Exits 1 when something needs fixing."
        ),
    )
    doctor.add_argument(
        "--fix", action="store_true", help="regenerate the plugin cache where it is stale"
    )
    doctor.set_defaults(func=_cmd_doctor)


def _cmd_doctor(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot import doctor

    findings = doctor.diagnose()
    if args.fix and not all(f.ok for f in findings):
        doctor.regenerate()
        print("regenerated the plugin cache; checking again", file=streams.human)
        findings = doctor.diagnose()
    for f in findings:
        mark = "ok  " if f.ok else "FAIL"
        print(f"{mark} {f.what}", file=streams.human)
        if f.fix:
            print(f"     fix: {f.fix}", file=streams.human)
    return 0 if all(f.ok for f in findings) else 1
