"""``txvmbot kept``, ``release`` and ``revive``: the evidence failed local
jobs left, and a way for a person to log in to a failed VM as it was."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from typing import Any

from txvmbot.cli._common import _react, _Streams, _wrap, state_dir_for


def _run_dir(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.run_dir:
        return os.path.abspath(os.path.expanduser(args.run_dir))
    return os.path.join(state_dir_for(args.state_dir, None, environ), "vms")


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the state dir of check --local and the daemon (default: $XDG_STATE_HOME/txvmbot "
        "or ~/.local/state/txvmbot)",
    )
    p.add_argument(
        "--run-dir",
        metavar="DIR",
        help="a pool's run_dir, if not <state dir>/vms (default: <state dir>/vms)",
    )


def add_parsers(sub: Any) -> None:
    kept = sub.add_parser(
        "kept",
        help="list the failed local VMs whose evidence is kept",
        description=_wrap(
            "List failed local VMs kept with their overlay, console log and saved state, "
            "newest first. Free one with `txvmbot release ID`; log in to one with "
            "`txvmbot revive ID`."
        ),
    )
    _add_dirs(kept)
    kept.set_defaults(func=_cmd_kept)

    release = sub.add_parser(
        "release", help="free a kept VM's evidence", description="Delete a kept VM's directory."
    )
    release.add_argument("vm", metavar="ID", help="the kept VM's id (see `txvmbot kept`)")
    _add_dirs(release)
    release.set_defaults(func=_cmd_release)

    revive = sub.add_parser(
        "revive",
        help="start a kept VM again, as it was when its job failed, for a person to log in",
        description=_wrap(
            "Start a kept VM from its saved state and overlay (or boot it from its overlay "
            "when no state was saved), print how to ssh in, and keep it running until "
            "interrupted (Ctrl-C) or --seconds pass; then stop it. Its evidence stays kept."
        ),
    )
    revive.add_argument("vm", metavar="ID", help="the kept VM's id (see `txvmbot kept`)")
    revive.add_argument(
        "--seconds", type=float, help="stop it after this long (default: until interrupted)"
    )
    revive.add_argument(
        "--image-dir", metavar="DIR", help="the image it ran on (default: the one it recorded)"
    )
    _add_dirs(revive)
    revive.set_defaults(func=_cmd_revive)


def _cmd_kept(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu.kept import list_kept

    run_dir = _run_dir(args, environ)
    found = list_kept(run_dir)
    out = streams.human
    if not found:
        out.write(f"no kept VMs in {run_dir}\n")
        return 0
    for k in found:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(k.kept_at))
        state = "saved state" if k.has_state else "no saved state"
        out.write(
            f"{k.vm_id}  kept {when} UTC, {k.size_bytes / 1e6:.1f} MB, {state}\n"
            f"    check {k.check_id}: {k.reason}\n    {k.path}\n"
        )
    return 0


def _cmd_release(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu.kept import release

    k = release(_run_dir(args, environ), args.vm)
    streams.human.write(f"released {k.vm_id}: removed {k.path}\n")
    return 0


def _cmd_revive(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    import json

    from txvmbot.errors import ConfigError
    from txvmbot.qemu import kept as K

    k = K.get_kept(_run_dir(args, environ), args.vm)
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError("--seconds", f"must be more than 0, got {args.seconds:g}")
    try:
        with open(os.path.join(k.path, "vm.json"), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    image_dir = args.image_dir or record.get("image_dir")
    if not image_dir:
        raise ConfigError("--image-dir", f"{k.path} does not say which image it ran on")
    # The saved state only loads into the same machine: same memory and cpus.
    argv = list(record.get("argv", []))
    memory = int(argv[argv.index("-m") + 1]) if "-m" in argv else 256
    cpus = int(str(argv[argv.index("-smp") + 1]).split(",")[0]) if "-smp" in argv else 1
    code = {"value": 1}

    async def go(r: Any) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.task import deferLater

        from txvmbot.qemu.boot import BootSpec, boot
        from txvmbot.qemu.disk import create_overlay
        from txvmbot.qemu.image import load_image

        image = load_image(image_dir)
        state = os.path.join(k.path, K.STATE_FILE)
        revive_dir = os.path.join(k.path, K.REVIVED_DIR)
        if os.path.isdir(revive_dir):
            import shutil

            from txvmbot.qemu.recover import stop_from_record

            stop_from_record(revive_dir)
            shutil.rmtree(revive_dir)
        os.makedirs(revive_dir)
        # The kept overlay is evidence: the revived guest writes to an
        # overlay of its own on top of it, so every revive starts the same.
        disk = os.path.join(revive_dir, "disk.qcow2")
        await create_overlay(r, os.path.join(k.path, K.OVERLAY_FILE), disk)
        vm = await boot(
            r,
            BootSpec(
                image,
                revive_dir,
                accel="auto",
                memory_mb=memory,
                cpus=cpus,
                disk=disk,
                incoming=state if os.path.exists(state) else None,
            ),
        )
        try:
            await vm.wait_ready(120)
        except BaseException:
            await vm.stop(10)
            raise
        streams.human.write(
            f"{k.vm_id} is running (pid {vm.pid}); log in with:\n"
            f"  ssh -i {image.ssh_key} -p {vm.ssh_port} -o StrictHostKeyChecking=no "
            f"-o UserKnownHostsFile=/dev/null {image.ssh_user}@127.0.0.1\n"
            "Ctrl-C stops it; its evidence stays kept.\n"
        )
        streams.human.flush()
        stopped: Deferred[None] = Deferred()
        r.addSystemEventTrigger("before", "shutdown", lambda: vm.stop(10) if vm.running else None)
        if args.seconds is not None:
            await deferLater(r, args.seconds, lambda: None)
            await vm.stop(10)
            code["value"] = 0
            return
        await stopped

    _react(go, reactor)
    return code["value"]
