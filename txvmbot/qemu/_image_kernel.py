"""The Debian kernel of the test image: fetch its package, unpack the
kernel and the modules the initramfs needs, and extract the uncompressed
``vmlinux`` from ``vmlinuz``.

Synchronous (subprocess): runs from the CLI and test setup, never on the
daemon's reactor.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

from attrs import frozen

from txvmbot.qemu._image_errors import ImageError
from txvmbot.qemu._image_errors import run_tool as _run

#: The meta package whose dependency names the kernel package to use.
KERNEL_META_PACKAGE = "linux-image-amd64"

#: What the test image's initramfs loads (names as in DESIGN.md; their
#: dependencies are added from each module's own ``depends=``).
#: ``virtio_pci*`` is ``virtio_pci`` with its ``_modern_dev``/``_legacy_dev``.
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "virtio-rng",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
)

_XZ_MAGIC = b"\xfd7zXZ\x00"

Progress = Callable[[str], None]


@frozen
class KernelFiles:
    """A kernel unpacked into the cache: one directory per package version."""

    package: str
    version: str
    release: str  # uname -r, e.g. 6.1.0-56-amd64
    vmlinuz: str
    vmlinux: str | None
    modules: tuple[str, ...]  # .ko paths, in load order


def kernel_package(meta: str = KERNEL_META_PACKAGE) -> tuple[str, str]:
    """The kernel package ``meta`` depends on and its version, from one
    ``apt-cache show`` (each apt-cache call takes ~1 s here)."""
    fix = f"run `apt-get update` so apt knows {meta}"
    out = _run(["apt-cache", "show", "--no-all-versions", meta], "find the kernel package", fix)
    for line in out.splitlines():
        if line.startswith(("Depends:", "Pre-Depends:")):
            m = re.search(r"(linux-image-[^\s,|(]+)(?:\s*\(\s*=\s*([^)\s]+)\s*\))?", line)
            if m:
                return m.group(1), m.group(2) or _candidate_version(m.group(1))
    raise ImageError(
        f"find the kernel package: `apt-cache show {meta}` names no linux-image dependency; {fix}"
    )


def fetch_deb(package: str, version: str, cache_dir: str, progress: Progress) -> str:
    """The ``.deb`` of ``package`` in ``cache_dir``, downloaded with
    ``apt-get download`` unless already there. Runs ``apt-get update`` once
    if the first download fails (missing package lists)."""
    os.makedirs(cache_dir, exist_ok=True)
    if version:
        cached = _cached_deb(cache_dir, package, version)
        if cached:
            progress(f"kernel package {package} {version}: cached {cached}")
            return cached
    progress(f"downloading {package} {version or ''} with apt-get download".replace("  ", " "))
    # Download into a private temporary dir first: a half-written .deb never
    # lands in the cache. It is world-readable so apt's _apt user can write.
    tmp = tempfile.mkdtemp(prefix=".download-", dir=cache_dir)
    try:
        os.chmod(tmp, 0o777)
        try:
            _run(["apt-get", "download", "-q", package], "download the kernel", cwd=tmp)
        except ImageError:
            progress("apt-get download failed; running apt-get update once")
            _run(
                ["apt-get", "update", "-q"],
                "apt-get update (before downloading the kernel)",
                "check network access to the Debian mirror",
            )
            _run(
                ["apt-get", "download", "-q", package],
                "download the kernel",
                f"try `apt-get update && apt-get download {package}` by hand",
                cwd=tmp,
            )
        debs = glob.glob(os.path.join(tmp, "*.deb"))
        if len(debs) != 1:
            raise ImageError(f"download the kernel: expected one .deb in {tmp}, found {debs}")
        dest = os.path.join(cache_dir, os.path.basename(debs[0]))
        os.replace(debs[0], dest)
        os.chmod(dest, 0o644)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _candidate_version(package: str) -> str:
    try:
        out = _run(["apt-cache", "policy", package], "find the kernel version")
    except ImageError:
        return ""
    m = re.search(r"Candidate:\s*(\S+)", out)
    return m.group(1) if m and m.group(1) != "(none)" else ""


def _cached_deb(cache_dir: str, package: str, version: str) -> str | None:
    # apt-get download quotes ':' (epochs) as %3a in the file name.
    quoted = version.replace(":", "%3a")
    for name in (f"{package}_{quoted}_amd64.deb", f"{package}_{quoted}_all.deb"):
        path = os.path.join(cache_dir, name)
        if os.path.isfile(path):
            return path
    return None


def deb_field(deb: str, field: str) -> str:
    return _run(["dpkg-deb", "-f", deb, field], f"read {field} of {deb}").strip()


def unpack_kernel(
    deb: str, cache_dir: str, progress: Progress, modules: Iterable[str] = GUEST_MODULES
) -> KernelFiles:
    """Unpack the kernel ``deb`` into ``cache_dir/kernel-<package>_<version>``
    (once: later builds reuse it): vmlinuz, vmlinux (if the xz payload is
    found) and the modules of ``modules`` plus their dependencies."""
    package = deb_field(deb, "Package")
    version = deb_field(deb, "Version")
    wanted = tuple(modules)
    key = f"kernel-{package}_{version}".replace(":", "%3a")
    dest = os.path.join(cache_dir, key)
    listing = os.path.join(dest, "modules.load")
    if os.path.isfile(listing):
        with open(listing) as f:
            lines = f.read().split()
        if lines and lines[0] == "#" + ",".join(wanted):
            progress(f"kernel {package} {version}: unpacked before in {dest}")
            return _kernel_files(package, version, dest, lines[1:])
    progress(f"unpacking {os.path.basename(deb)} with dpkg-deb -x")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=cache_dir)
    try:
        root = os.path.join(tmp, "root")
        _run(["dpkg-deb", "-x", deb, root], f"unpack {deb}")
        staged = os.path.join(tmp, "out")
        os.makedirs(os.path.join(staged, "modules"))
        vmlinuz = _one(glob.glob(os.path.join(root, "boot", "vmlinuz-*")), "vmlinuz", deb)
        release = os.path.basename(vmlinuz)[len("vmlinuz-") :]
        shutil.copy2(vmlinuz, os.path.join(staged, "vmlinuz"))
        progress("extracting vmlinux from the xz payload of vmlinuz")
        if extract_vmlinux(vmlinuz, os.path.join(staged, "vmlinux")):
            pass
        else:
            progress("no xz payload in vmlinuz: the image boots vmlinuz (slower)")
        moddir = _one(
            [
                d
                for d in (
                    os.path.join(root, "lib", "modules", release),
                    os.path.join(root, "usr", "lib", "modules", release),
                )
                if os.path.isdir(d)
            ],
            f"lib/modules/{release}",
            deb,
        )
        order = copy_modules(moddir, wanted, os.path.join(staged, "modules"))
        with open(os.path.join(staged, "release"), "w") as f:
            f.write(release + "\n")
        with open(os.path.join(staged, "modules.load"), "w") as f:
            f.write("#" + ",".join(wanted) + "\n" + "\n".join(order) + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staged, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(listing) as f:
        return _kernel_files(package, version, dest, f.read().split()[1:])


def _kernel_files(package: str, version: str, dest: str, order: list[str]) -> KernelFiles:
    with open(os.path.join(dest, "release")) as f:
        release = f.read().strip()
    vmlinux = os.path.join(dest, "vmlinux")
    return KernelFiles(
        package=package,
        version=version,
        release=release,
        vmlinuz=os.path.join(dest, "vmlinuz"),
        vmlinux=vmlinux if os.path.isfile(vmlinux) else None,
        modules=tuple(os.path.join(dest, "modules", m) for m in order),
    )


def _one(found: list[str], what: str, deb: str) -> str:
    if len(found) != 1:
        raise ImageError(f"unpack {deb}: expected one {what}, found {len(found)}: {found}")
    return found[0]


def extract_vmlinux(vmlinuz: str, dest: str) -> bool:
    """Write the uncompressed ELF kernel inside bzImage ``vmlinuz`` to
    ``dest``: the first xz stream that decompresses to an ELF file. False
    if there is none (another compression, or not a bzImage)."""
    with open(vmlinuz, "rb") as f:
        data = f.read()
    start = data.find(_XZ_MAGIC)
    while start >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            out = b""
        if out.startswith(b"\x7fELF"):
            tmp = dest + ".tmp"
            with open(tmp, "wb") as f:
                f.write(out)
            os.replace(tmp, dest)
            return True
        start = data.find(_XZ_MAGIC, start + 1)
    return False


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(filename: str) -> str:
    base = os.path.basename(filename)
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(ext):
            return _norm(base[: -len(ext)])
    return _norm(base)


def _read_module(path: str) -> bytes:
    if path.endswith(".xz"):
        with lzma.open(path) as f:
            return f.read()
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path) as f:
            return f.read()
    if path.endswith(".zst"):
        raise ImageError(
            f"read {path}: zstd-compressed modules are not supported; use a kernel "
            f"with .ko or .ko.xz modules"
        )
    with open(path, "rb") as f:
        return f.read()


def _depends(data: bytes) -> list[str]:
    """The ``depends=`` of a module's .modinfo (NUL-separated key=value)."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [_norm(d) for d in m.group(1).decode().split(",") if d]


def _builtin(moddir: str) -> set[str]:
    path = os.path.join(moddir, "modules.builtin")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {_module_name(line.strip()) for line in f if line.strip()}


def copy_modules(moddir: str, wanted: Sequence[str], dest: str) -> list[str]:
    """Copy ``wanted`` modules and their dependencies from ``moddir`` to
    ``dest`` as uncompressed ``NAME.ko``; return the file names in load
    order (dependencies first, then ``wanted``'s order). Modules built into
    the kernel are skipped; a module found neither way is an ImageError."""
    index: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(os.path.join(moddir, "kernel")):
        for name in files:
            if ".ko" in name:
                index.setdefault(_module_name(name), os.path.join(dirpath, name))
    builtin = _builtin(moddir)
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = _norm(name)
        if name in order or name in visiting:
            return
        if name not in index:
            if name in builtin:
                return
            raise ImageError(
                f"kernel modules: {name} (needed by {' <- '.join(chain) or 'the image'}) "
                f"is neither in {moddir} nor built in"
            )
        visiting.add(name)
        data = _read_module(index[name])
        for dep in _depends(data):
            visit(dep, (name, *chain))
        with open(os.path.join(dest, name + ".ko"), "wb") as f:
            f.write(data)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [n + ".ko" for n in order]
