"""``txvmbot image build`` and ``txvmbot image show``: the local VM test
image, built offline from Debian packages."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from typing import Any

from txvmbot.cli import _images
from txvmbot.cli._common import _Streams, _wrap, state_dir_for
from txvmbot.errors import ConfigError


def add_parser(sub: Any) -> None:
    image = sub.add_parser(
        "image",
        help="build or inspect the local VM test image (QEMU)",
        description=_wrap(
            "The test image local jobs boot under QEMU: a Debian kernel, an initrd with "
            "busybox and dropbear, a small ext4 base disk and an ssh key pair, built "
            "offline from Debian packages."
        ),
    )
    isub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND", required=True)
    build = isub.add_parser(
        "build",
        help="build the test image (reused if up to date)",
        description=_wrap(
            "Build the test image into DIR: the kernel package linux-image-amd64 depends "
            "on (fetched with apt-get download into the cache dir and reused), busybox "
            "and dropbear from this host's busybox-static and dropbear-bin packages. "
            "The build is atomic; an image built from the same inputs is kept unless "
            "--force. Needs: apt-get install qemu-utils busybox-static dropbear-bin "
            "e2fsprogs openssh-client. With --distro debian: a real Debian guest (systemd, "
            "OpenSSH, python3 and each --package) installed from Debian's archive with "
            "mmdebstrap, as root, into STATE_DIR/images/debian-RELEASE (or --name); the "
            "archive's packages are cached, so a rebuild downloads nothing."
        ),
    )
    _state_flags(build)
    build.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where kernel .debs (and, with --distro debian, the archive's .debs and "
        "package lists, in debian-RELEASE/) are kept between builds "
        "(default: STATE_DIR/cache/debs)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if up to date")
    build.add_argument(
        "--distro",
        choices=("busybox", "debian"),
        default="busybox",
        help="busybox: the small test image (busybox, dropbear, no package manager); "
        "debian: a real Debian guest (systemd, OpenSSH, python3 and --package) built from "
        "Debian's archive with mmdebstrap, as root (apt-get install mmdebstrap) "
        "(default: busybox)",
    )
    build.add_argument(
        "--release",
        metavar="R",
        help="with --distro debian: the Debian release (default: bookworm)",
    )
    build.add_argument(
        "--package",
        metavar="PKG",
        action="append",
        dest="packages",
        help="with --distro debian: a Debian package to install too; repeat for several "
        "(default: only systemd-sysv udev dbus kmod openssh-server iproute2 python3)",
    )
    build.add_argument(
        "--mirror",
        metavar="URL",
        help="with --distro debian: the Debian mirror, e.g. http://deb.debian.org/debian "
        "(default: mmdebstrap's: deb.debian.org with RELEASE, RELEASE-updates and "
        "RELEASE-security)",
    )
    build.add_argument(
        "--name",
        metavar="NAME",
        help="the image's name, under STATE_DIR/images/NAME (default: 'default' at "
        "STATE_DIR/image for busybox, debian-RELEASE for debian)",
    )
    build.set_defaults(func=_cmd_build)

    show = isub.add_parser(
        "show",
        help="check an image against its manifest and print what it holds",
        description=_wrap(
            "Load the image in DIR, check every file against manifest.json (size and "
            "mtime, or sha256 with --verify) and print its files and provenance. Exits 1 "
            "if a file is missing or changed."
        ),
    )
    _state_flags(show)
    show.add_argument("--verify", action="store_true", help="check every file's sha256")
    _images.add_show_arguments(show)
    show.set_defaults(func=_cmd_show)
    _images.add_parsers(isub, _state_flags)


def _state_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--output",
        "--dir",
        dest="output",
        metavar="DIR",
        help="the image directory (default: STATE_DIR/image)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="default: $XDG_STATE_HOME/txvmbot, else ~/.local/state/txvmbot",
    )


def _dirs(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str]:
    from txvmbot.qemu.image import default_cache_dir, default_image_dir

    state = state_dir_for(args.state_dir, None, environ)
    output = args.output or default_image_dir(environ, state)
    cache = getattr(args, "cache_dir", None) or default_cache_dir(environ, state)
    return os.path.abspath(os.path.expanduser(output)), os.path.expanduser(cache)


def _build_dirs(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[str, str]:
    """The output and cache dirs of ``image build``: --output, else --name
    (or the distribution's default name) under the state dir."""
    from txvmbot.qemu.image import ImageError, default_cache_dir
    from txvmbot.qemu.images import DEFAULT, image_dir_for

    if args.distro != "debian":
        for flag in ("release", "packages", "mirror"):
            if getattr(args, flag, None):
                name = "--package" if flag == "packages" else f"--{flag}"
                raise ConfigError(name, "only with --distro debian")
    if args.output and args.name:
        raise ConfigError("--name", "give --name or --output DIR, not both")
    state = state_dir_for(args.state_dir, None, environ)
    cache = os.path.expanduser(args.cache_dir or default_cache_dir(environ, state))
    if args.output:
        return os.path.abspath(os.path.expanduser(args.output)), cache
    name = args.name
    if name is None:
        name = f"debian-{args.release or 'bookworm'}" if args.distro == "debian" else DEFAULT
    try:
        return image_dir_for(name, state), cache
    except ImageError as e:
        raise ConfigError("--name", str(e)) from None


def _cmd_build(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu.image import ImageError, build_debian_image, build_image, load_image

    output, cache = _build_dirs(args, environ)
    out = streams.human
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {line}", file=out, flush=True)

    try:
        if args.distro == "debian":
            result = build_debian_image(
                output,
                cache_dir=cache,
                release=args.release or "bookworm",
                packages=tuple(args.packages or ()),
                mirror=args.mirror,
                force=args.force,
                progress=progress,
                environ=environ,
            )
        else:
            result = build_image(output, cache_dir=cache, force=args.force, progress=progress)
        info = load_image(output)
    except ImageError as e:
        print(f"txvmbot image build: error: {e}", file=streams.stderr)
        return 1
    progress(f"{result}: kernel {info.kernel_version} ({os.path.basename(info.kernel or '')})")
    _images.print_info(info, out)
    return 0


def _cmd_show(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu.image import ImageError, load_image

    output = _images.image_dir_from_args(args, environ) or _dirs(args, environ)[0]
    try:
        info = load_image(output, verify=args.verify)
    except ImageError as e:
        print(f"txvmbot image show: error: {e}", file=streams.stderr)
        return 1
    streams.write_json(_images.info_json(info, "sha256" if args.verify else "size"))
    _images.print_info(info, streams.human)
    return 0
