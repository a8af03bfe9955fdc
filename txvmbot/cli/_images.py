"""``txvmbot image import``, ``image list`` and the NAME of ``image show``:
images by name under the state dir (:mod:`txvmbot.qemu.images`)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

from txvmbot.cli._common import _Streams, _wrap, state_dir_for
from txvmbot.errors import ConfigError

_JSON_HELP = (
    "also write it as JSON to FILE, or to stdout with '-' or no FILE (then the human "
    "output goes to stderr) (default: none)"
)


def add_parsers(isub: Any, state_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """``image import`` and ``image list`` under ``txvmbot image``."""
    imp = isub.add_parser(
        "import",
        help="record a distribution's cloud image (qcow2 with cloud-init) as a local image",
        description=_wrap(
            "Import FILE, a distribution's cloud image (Debian genericcloud, Ubuntu, "
            "Fedora Cloud: a qcow2 with cloud-init), as the image NAME under "
            "STATE_DIR/images/NAME: the qcow2 is reflinked or copied in, an ssh key pair "
            "is generated, and a cloud-init NoCloud seed creates --user with that key, "
            "lets sshd start and prints the ready marker on the serial console. Use it "
            "with --image NAME on check --local and suite --local, or image = \"NAME\" "
            "in a [pools.NAME] table. Needs: apt-get install qemu-utils openssh-client "
            "dosfstools mtools."
        ),
    )
    imp.add_argument("file", metavar="FILE.qcow2", help="the cloud image (a standalone qcow2)")
    imp.add_argument(
        "--user", required=True, metavar="NAME",
        help="the user cloud-init creates with the image's key (jobs log in as it, with "
        "passwordless sudo); root is allowed",
    )
    imp.add_argument(
        "--name", metavar="NAME",
        help="the image's name (default: FILE's name without .qcow2/.img)",
    )
    imp.add_argument("--distro", metavar="D", help="the guest's distribution, e.g. debian")
    imp.add_argument("--release", metavar="R", help="the guest's release, e.g. 12 or bookworm")
    imp.add_argument(
        "--kernel", metavar="FILE",
        help="boot this kernel instead of the disk's boot loader (for a disk without one)",
    )
    imp.add_argument("--initrd", metavar="FILE", help="the initrd of --kernel")
    imp.add_argument(
        "--append", metavar="CMDLINE",
        help="the kernel command line of --kernel (default: root=/dev/vda1 rw console=ttyS0)",
    )
    imp.add_argument("--force", action="store_true", help="replace an image of that name")
    imp.add_argument(
        "--state-dir", metavar="DIR",
        help="default: $XDG_STATE_HOME/txvmbot, else ~/.local/state/txvmbot",
    )
    imp.set_defaults(func=_cmd_import)

    lst = isub.add_parser(
        "list",
        help="list the images by name: kind, distribution, kernel, size, build date, verified",
        description=_wrap(
            "List the images of the state dir: 'default' (STATE_DIR/image, the busybox "
            "test image) and every STATE_DIR/images/NAME. Each is loaded as a job would "
            "load it (every file's size, and its sha256 where its mtime changed; every "
            "sha256 with --verify). Exits 1 if any image does not load."
        ),
    )
    lst.add_argument("--verify", action="store_true", help="check every file's sha256")
    lst.add_argument("--json", metavar="FILE|-", nargs="?", const="-", help=_JSON_HELP)
    lst.add_argument(
        "--state-dir", metavar="DIR",
        help="default: $XDG_STATE_HOME/txvmbot, else ~/.local/state/txvmbot",
    )
    lst.set_defaults(func=_cmd_list)


def add_show_arguments(show: argparse.ArgumentParser) -> None:
    """The NAME and --json of ``image show``."""
    show.add_argument(
        "name", nargs="?", metavar="NAME",
        help="the image's name (see image list; default: --output, else 'default')",
    )
    show.add_argument("--json", metavar="FILE|-", nargs="?", const="-", help=_JSON_HELP)


def image_dir_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The directory ``image show NAME`` means, or None without a NAME."""
    from txvmbot.qemu.image import ImageError
    from txvmbot.qemu.images import image_dir_for

    name = getattr(args, "name", None)
    if name is None:
        return None
    if getattr(args, "output", None):
        raise ConfigError("--output", "give the image's NAME or --output DIR, not both")
    state = state_dir_for(args.state_dir, None, environ)
    try:
        return image_dir_for(name, state)
    except ImageError as e:
        raise ConfigError("NAME", str(e)) from None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"


def _table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _cmd_list(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu._image_list import list_images

    state = state_dir_for(args.state_dir, None, environ)
    images = list_images(state, verify=args.verify)
    streams.write_json([i.as_dict() for i in images])
    out = streams.human
    if not images:
        out.write(
            f"no images in {state}: txvmbot image build makes the default one, "
            "txvmbot image import FILE.qcow2 --user NAME imports a cloud image\n"
        )
        return 0
    rows = [["NAME", "KIND", "DISTRIBUTION", "KERNEL", "SIZE", "BUILT (UTC)", "VERIFIED"]]
    for i in images:
        distro = " ".join(p for p in (i.distro, i.release) if p) or "-"
        verified = ("yes" if i.checked == "size" else "yes, sha256") if i.verified else "NO"
        rows.append([i.name, i.kind or "?", distro, i.kernel or "-", _size(i.size_bytes),
                     _when(i.built_at), verified])
    _table(rows, out)
    broken = [i for i in images if not i.verified]
    for i in broken:
        streams.stderr.write(f"txvmbot image list: {i.name}: {i.error}\n")
    return 1 if broken else 0


def _cmd_import(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    from txvmbot.qemu._image_import import import_cloud_image
    from txvmbot.qemu.image import ImageError
    from txvmbot.qemu.images import DEFAULT, check_name, image_dir_for

    name = args.name
    if name is None:
        base = os.path.basename(args.file)
        for ext in (".qcow2", ".img"):
            if base.endswith(ext):
                base = base[: -len(ext)]
        name = base
    try:
        check_name(name, "--name" if args.name else f"the name from {args.file} (give --name)")
    except ImageError as e:
        raise ConfigError("--name", str(e)) from None
    if name == DEFAULT:
        raise ConfigError("--name", "'default' is the busybox test image's; choose another name")
    state = state_dir_for(args.state_dir, None, environ)
    dest = image_dir_for(name, state)
    out = streams.human
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {line}", file=out, flush=True)

    try:
        info = import_cloud_image(
            args.file,
            dest,
            user=args.user,
            distro=args.distro,
            release=args.release,
            kernel=args.kernel,
            initrd=args.initrd,
            cmdline=args.append,
            force=args.force,
            progress=progress,
        )
    except ImageError as e:
        message = str(e).removeprefix("image import: ")
        print(f"txvmbot image import: error: {message}", file=streams.stderr)
        return 1
    progress(f"imported as {name}: txvmbot check --local --image {name}")
    print_info(info, out)
    return 0


def info_rows(info: Any) -> list[tuple[str, str]]:
    """What ``image show`` adds for every kind: kind, distribution, and a
    cloud image's NoCloud user."""
    from txvmbot.qemu._image_list import kind_of

    m = info.manifest
    rows = [("kind", kind_of(m))]
    distro = " ".join(str(m[k]) for k in ("distro", "release") if m.get(k))
    if distro:
        rows.append(("distribution", distro))
    if info.seed:
        rows.append(("nocloud seed", f"{info.seed} (user {m.get('nocloud', {}).get('user', '?')})"))
    src = m.get("imported_from")
    if isinstance(src, Mapping) and src.get("path"):
        rows.append(("imported", str(src["path"])))
    return rows


def print_info(info: Any, out: IO[str]) -> None:
    """``image show``: the image, its files and what it holds."""
    m = info.manifest
    rows = [
        ("image", info.dir),
        *info_rows(info),
        ("kernel", f"{info.kernel} ({info.kernel_version})" if info.kernel
         else "none: the disk's own boot loader"),
        ("initrd", info.initrd),
        ("disk", info.disk),
        ("ssh key", f"{info.ssh_key} (user {info.ssh_user})"),
        ("host key", info.host_key_fingerprint),
        ("cmdline", info.cmdline),
        ("ready marker", info.ready_marker),
    ]
    pkgs = m.get("packages") or {}
    if (m.get("kernel") or {}).get("package"):
        pkgs = {m["kernel"]["package"]: m["kernel"]["version"], **pkgs}
    if pkgs and m.get("requested_packages"):
        # A Debian guest: hundreds of packages, listed in manifest.json.
        rows.append(("packages", f"{len(pkgs)} installed, from "
                     + ", ".join(str(p) for p in m["requested_packages"])))
    elif pkgs:
        rows.append(("packages", ", ".join(f"{k} {v}" for k, v in pkgs.items())))
    if m.get("built_at"):
        built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m["built_at"]))
        rows.append(("built", f"{built} on {m.get('builder', {}).get('host_kernel', '?')}"))
    for k, v in rows:
        if v is not None and v != "":
            print(f"  {k + ':':<13} {v}", file=out)


def info_json(info: Any, verified: str) -> dict[str, Any]:
    """``image show --json``: the loaded image and its manifest."""
    from txvmbot.qemu._image_list import kind_of

    return {
        "dir": info.dir,
        "kind": kind_of(info.manifest),
        "verified": verified,
        "kernel": info.kernel,
        "initrd": info.initrd,
        "disk": info.disk,
        "seed": info.seed,
        "ssh_key": info.ssh_key,
        "ssh_user": info.ssh_user,
        "ready_marker": info.ready_marker,
        "manifest": dict(info.manifest),
    }
