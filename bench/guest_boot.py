#!/usr/bin/env python
"""Benchmark: the busybox test guest against the Debian guest, in one run.

For each guest:

  build       seconds of ``image build`` (busybox) or ``image build --distro
              debian`` (python3-twisted, python3-subunit) into a fresh
              directory with the packages cached (the caches are warmed
              first, untimed: the kernel .deb and, for Debian, the archive's
              .debs and package lists); --skip-build times nothing and boots
              the tests' images instead
  disk        the base disk: MiB it takes on the host (qcow2), its virtual
              size, and the whole image directory
  cold        a job's cold boot to ssh: LocalCheck in this process on a
              running reactor, from the start of its boot step to the end of
              wait-ssh (QEMU spawn, QMP, ready marker, ssh handshake)
  template    the same job with fast_start: the VM resumes from the pool's
              template (built in the warm-up; its build time is shown)

Goals under TCG here (issue 17): Debian cold boot to ssh <= 20 s, Debian
template start to ssh <= 1.5 s; busybox no worse than before (template
0.56 s, cold ~4 s: <= 4.5 s). The machine is shared: its load average is
printed with the figures. Only 127.0.0.1 is used; one VM runs at a time;
every QEMU is stopped by its job (by pid at worst); every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ReactorThread, bench_parser, median, reproduce_line, table  # noqa: E402
from bench.qemu_bench import _reap_children  # noqa: E402

GOAL_DEBIAN_COLD = 20.0
GOAL_DEBIAN_TEMPLATE = 1.5
GOAL_BUSYBOX_COLD = 4.5
GOAL_BUSYBOX_TEMPLATE = 0.56
GUESTS = ("busybox", "debian")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, unit="guest and start kind", timeout=120.0)
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default: 256)")
    p.add_argument(
        "--skip-build",
        action="store_true",
        help="time no build; boot the tests' cached images (default: build both, timed)",
    )
    p.add_argument(
        "--guests",
        default=",".join(GUESTS),
        help=f"which guests, comma-separated (default: {','.join(GUESTS)})",
    )
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 30 or not 0 <= args.warmup <= 5:
        p.error("--runs must be 1..30 and --warmup 0..5")
    args.guests = [g for g in args.guests.split(",") if g]
    if not args.guests or any(g not in GUESTS for g in args.guests):
        p.error(f"--guests: choose from {', '.join(GUESTS)}")
    return args


def load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def build(guest: str, out: str, timed: bool) -> tuple[Any, float]:
    """The guest's image (built into ``out`` when ``timed``, with warm
    caches) and the build's seconds (nan when not timed)."""
    from tests.support.debian_fixtures import CACHE, PACKAGES, RELEASE, build_debian_test_image
    from tests.support.qemu_fixtures import build_test_image
    from txvmbot.qemu.image import build_debian_image, build_image, load_image

    # Warm the caches (and the tests' images) first, untimed.
    cached = build_test_image() if guest == "busybox" else build_debian_test_image()
    if not timed:
        return cached, float("nan")
    t0 = time.perf_counter()
    if guest == "busybox":
        build_image(out, cache_dir=CACHE, force=True)
    else:
        build_debian_image(out, cache_dir=CACHE, release=RELEASE, packages=PACKAGES, force=True)
    return load_image(out), time.perf_counter() - t0


def disk_figures(image: Any) -> tuple[float, float, float]:
    """MiB of the base disk on the host, its virtual size, the image dir."""
    used = os.stat(image.disk).st_blocks * 512 / 2**20
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", image.disk],
        capture_output=True, text=True, check=True, timeout=30,
    )
    virtual = json.loads(info.stdout)["virtual-size"] / 2**20
    total = 0
    for name in os.listdir(image.dir):
        st = os.lstat(os.path.join(image.dir, name))
        total += st.st_blocks * 512
    return used, virtual, total / 2**20


class Guest:
    """Jobs on one guest's image, each in the guest's own run dir (its
    pool's template lives there)."""

    def __init__(self, name: str, image: Any, args: argparse.Namespace, rt: ReactorThread,
                 tmp: str) -> None:
        self.name = name
        self.image = image
        self.args = args
        self.rt = rt
        # Short: QMP socket paths must fit in 107 bytes.
        self.run_dir = tempfile.mkdtemp(prefix=f"{name[:3]}-", dir=tmp)
        self.times: dict[str, list[float]] = {"cold": [], "template": []}
        self.ready: list[float] = []

    def job(self, fast: bool, record: bool) -> float:
        from txvmbot.jobs.smoke import LocalCheck
        from txvmbot.journal import MemoryJournal
        from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts

        pool = LocalPool(
            name=f"bench-{self.name}",
            image_dir=self.image.dir,
            run_dir=self.run_dir,
            memory_mb=self.args.memory,
            fast_start=fast,
            keep_on_failure=False,
            min_free_mb=64,
        )
        spec = LocalSpec(
            pool=pool,
            commands=("true",),
            timeouts=LocalTimeouts(boot=self.args.timeout, shutdown=10),
        )
        reactor = self.rt.reactor
        result = self.rt.call(
            lambda: LocalCheck(reactor, spec, journal=MemoryJournal()).run(),
            timeout=2 * self.args.timeout + 120,
        )
        if not result.passed:
            raise SystemExit(f"{self.name} {'template' if fast else 'cold'} job failed: "
                             f"{result.error}")
        steps = {s.name: s for s in result.steps}
        boot, ssh = steps["boot"], steps["wait-ssh"]
        wall = float(ssh.started + ssh.duration - boot.started)
        if record:
            self.times["template" if fast else "cold"].append(wall)
            if not fast:
                self.ready.append(float(steps["ready"].started + steps["ready"].duration
                                        - boot.started))
        return wall

    def template_build_seconds(self) -> float:
        path = os.path.join(self.run_dir, "template", "template.json")
        try:
            with open(path) as f:
                return float(json.load(f)["build_seconds"])
        except (OSError, ValueError, KeyError):
            return float("nan")


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    from txvmbot.qemu.accel import detect_accel

    accel, why = detect_accel("auto")
    tmp = tempfile.mkdtemp(prefix="txgb-", dir="/var/tmp")
    load_before = load()
    print(f"accel {accel} ({why}); {args.memory} MiB, 1 cpu; {args.runs} runs + "
          f"{args.warmup} warm-up; load average {load_before}", flush=True)
    built: dict[str, float] = {}
    images: dict[str, Any] = {}
    disks: dict[str, tuple[float, float, float]] = {}
    tbuild: dict[str, float] = {}
    guests: list[Guest] = []
    rt = ReactorThread()
    try:
        for name in args.guests:
            image, seconds = build(name, os.path.join(tmp, f"image-{name}"), not args.skip_build)
            built[name] = seconds
            images[name] = image
            disks[name] = disk_figures(image)
            print(f"{name}: image {image.dir}" + (
                f", built in {seconds:.1f}s" if seconds == seconds else ""), flush=True)
        rt.start()
        rt.call(_reap_children, rt.reactor)
        guests = [Guest(name, images[name], args, rt, tmp) for name in args.guests]
        # Warm-up: page cache, and each pool's template (built by the first
        # template job, timed apart).
        for _ in range(args.warmup):
            for g in guests:
                g.job(False, False)
                g.job(True, False)
        for i in range(args.runs):
            order = guests if i % 2 == 0 else guests[::-1]
            for g in order:
                for fast in ((False, True) if i % 2 == 0 else (True, False)):
                    g.job(fast, True)
            print(f"  run {i + 1}/{args.runs}: " + ", ".join(
                f"{g.name} cold {g.times['cold'][-1]:.2f}s template {g.times['template'][-1]:.3f}s"
                for g in guests), flush=True)
        tbuild.update({g.name: g.template_build_seconds() for g in guests})
    finally:
        rt.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for g in guests:
        used, virtual, total = disks[g.name]
        cold, fast = g.times["cold"], g.times["template"]
        rows.append([
            g.name, built[g.name], used, virtual, total,
            median(g.ready), median(cold), min(cold), max(cold),
            median(fast), min(fast), max(fast), tbuild[g.name],
        ])
    print()
    print("seconds and MiB; cold and template: a job's boot step start to the end of wait-ssh")
    print(table(
        ["guest", "build s", "disk MiB", "virtual MiB", "image MiB", "cold ready",
         "cold", "min", "max", "template", "min", "max", "template build"],
        rows,
    ))
    print(f"load average before {load_before}, after {load()} (2 cores, shared)")
    by = {g.name: g for g in guests}
    verdicts = []

    def goal(what: str, value: float, bound: float) -> None:
        verdicts.append(f"{what} {value:.2f}s (goal <= {bound:g}s: "
                        f"{'MET' if value <= bound else 'MISSED'})")

    if "debian" in by:
        goal("debian cold", median(by["debian"].times["cold"]), GOAL_DEBIAN_COLD)
        goal("debian template", median(by["debian"].times["template"]), GOAL_DEBIAN_TEMPLATE)
    if "busybox" in by:
        goal("busybox cold", median(by["busybox"].times["cold"]), GOAL_BUSYBOX_COLD)
        goal("busybox template", median(by["busybox"].times["template"]), GOAL_BUSYBOX_TEMPLATE)
    print()
    print(f"RESULT ({accel}, medians of {args.runs}): " + "; ".join(verdicts))
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
