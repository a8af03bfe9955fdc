#!/usr/bin/env python
"""Benchmark: boot-to-ssh of a local VM through txvmbot against the same
image started by a plain QEMU command line, and the template start
(fast_start) against the cold boot.

Sides, each timed --runs times in alternating order (medians reported):

  plain qemu        qemu-system-x86_64 as a subprocess with the image's
                    -kernel/-initrd/-append, the same -m/-smp/-machine/accel,
                    -netdev user with the ssh hostfwd on 127.0.0.1 and a fresh
                    qcow2 overlay; timed from spawn to the first successful
                    `ssh ... true` (OpenSSH client, retried every --poll s)
  txvmbot cold      LocalCheck in this process on an already running reactor:
                    from the start of its boot step to the end of wait-ssh
                    (QEMU spawn, QMP up, ready marker, ssh handshake)
  txvmbot fast      the same with the pool's fast_start: the VM resumes from
                    the pool's template (built once, in the warm-up)
  txvmbot cli       the whole `txvmbot check --local` command as a
                    subprocess, wall time (Python start-up, imports, journal,
                    overlay, boot, ssh, command, shutdown): for context

Targets: txvmbot cold within 10% of plain QEMU; the template start to ssh
under 1.5 s. Only 127.0.0.1 is used; at most two VMs run at once (one, in
practice: the sides run one after another); every QEMU is stopped by its
pid; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ReactorThread, bench_parser, median, reproduce_line, table  # noqa: E402
from tests.support import checkrun  # noqa: E402

TARGET_RATIO = 1.10
TARGET_FAST = 1.5


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, timeout=90.0)
    p.add_argument(
        "--image-dir",
        help="the image to boot (default: the test image, built if needed, as tests do)",
    )
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default: 256)")
    p.add_argument(
        "--poll",
        type=float,
        default=0.05,
        help="seconds between the plain side's ssh attempts (default: 0.05)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 50 or not 0 <= args.warmup <= 5:
        p.error("--runs must be 1..50 and --warmup 0..5")
    if not 0.01 <= args.poll <= 1.0:
        p.error("--poll must be in [0.01, 1]")
    return args


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Stop one QEMU by its pid, for sure."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


class Sides:
    def __init__(self, image: Any, args: argparse.Namespace, rt: ReactorThread) -> None:
        from txvmbot.qemu.accel import detect_accel

        self.image = image
        self.args = args
        self.rt = rt
        self.accel, _ = detect_accel("auto")
        # Short: QMP socket paths must fit in 107 bytes.
        self.tmp = tempfile.mkdtemp(prefix="txvb-")
        self.steps: dict[str, dict[str, list[float]]] = {}
        self.plain_marker: list[float] = []
        self.plain_attempts: list[int] = []
        self.plain_last_attempt: list[float] = []
        self.fast_job: list[float] = []

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- plain QEMU ------------------------------------------------------

    def plain_argv(self, vm_dir: str, port: int) -> list[str]:
        img = self.image
        return [
            "qemu-system-x86_64",
            "-machine",
            f"q35,accel={self.accel}",
            "-m",
            str(self.args.memory),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-kernel",
            img.kernel,
            "-initrd",
            img.initrd,
            "-append",
            img.cmdline,
            "-drive",
            f"file={os.path.join(vm_dir, 'disk.qcow2')},format=qcow2,if=virtio",
            "-netdev",
            f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{os.path.join(vm_dir, 'console.log')}",
        ]

    def ssh_argv(self, port: int) -> list[str]:
        return [
            "ssh",
            "-i",
            self.image.ssh_key,
            "-p",
            str(port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=2",
            "root@127.0.0.1",
            "true",
        ]

    def plain(self, record: bool) -> float:
        from txvmbot.qemu.argv import free_port
        from txvmbot.qemu.model import READY_MARKER

        vm_dir = tempfile.mkdtemp(prefix="plain-", dir=self.tmp)
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                self.image.disk,
                "-F",
                "qcow2",
                os.path.join(vm_dir, "disk.qcow2"),
            ],
            check=True,
            timeout=30,
        )
        port = free_port()
        console = os.path.join(vm_dir, "console.log")
        ssh = self.ssh_argv(port)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            self.plain_argv(vm_dir, port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        marker_at: list[float] = []
        done = threading.Event()

        def watch_console() -> None:
            # Only to show where the time goes: when the guest said ready.
            while not done.wait(0.01):
                try:
                    with open(console, "rb") as f:
                        if READY_MARKER.encode() in f.read():
                            marker_at.append(time.perf_counter() - t0)
                            return
                except FileNotFoundError:
                    pass

        watcher = threading.Thread(target=watch_console, daemon=True)
        watcher.start()
        try:
            deadline = t0 + self.args.timeout
            for attempt in range(1, 100_000):
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise SystemExit(f"plain QEMU exited ({proc.returncode}): {err}")
                a0 = time.perf_counter()
                r = subprocess.run(ssh, capture_output=True, timeout=10, check=False)
                now = time.perf_counter()
                if r.returncode == 0:
                    wall = now - t0
                    if record:
                        self.plain_attempts.append(attempt)
                        self.plain_last_attempt.append(now - a0)
                        if marker_at:
                            self.plain_marker.append(marker_at[0])
                    return wall
                if now > deadline:
                    raise SystemExit(
                        f"plain QEMU: no ssh within {self.args.timeout}s; last: "
                        f"{r.stderr.decode().strip()}"
                    )
                time.sleep(self.args.poll)
            raise SystemExit("plain QEMU: too many ssh attempts")
        finally:
            done.set()
            watcher.join(5)
            _kill(proc)
            shutil.rmtree(vm_dir, ignore_errors=True)

    # -- txvmbot in process ---------------------------------------------

    def _job(self, name: str, fast: bool, record: bool) -> float:
        from txvmbot.jobs.smoke import LocalCheck
        from txvmbot.journal import MemoryJournal
        from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts

        pool = LocalPool(
            name="bench",
            image_dir=self.image.dir,
            run_dir=os.path.join(self.tmp, "vms"),
            memory_mb=self.args.memory,
            fast_start=fast,
            keep_on_failure=False,
            min_free_mb=64,
        )
        spec = LocalSpec(pool=pool, commands=("true",), timeouts=LocalTimeouts(shutdown=5))
        reactor = self.rt.reactor

        def go() -> Any:
            return LocalCheck(reactor, spec, journal=MemoryJournal()).run()

        result = self.rt.call(go, timeout=self.args.timeout + 60)
        if not result.passed:
            raise SystemExit(f"txvmbot {name} job failed: {result.error}")
        steps = {s.name: s for s in result.steps}
        boot, ssh = steps["boot"], steps["wait-ssh"]
        wall = ssh.started + ssh.duration - boot.started
        if record:
            rec = self.steps.setdefault(name, {})
            for s in result.steps:
                key = "cleanup" if s.name.startswith("cleanup ") else s.name
                rec.setdefault(key, []).append(s.duration)
            if fast:
                first = steps["template"]
                self.fast_job.append(ssh.started + ssh.duration - first.started)
        return float(wall)

    def cold(self, record: bool) -> float:
        return self._job("cold", False, record)

    def fast(self, record: bool) -> float:
        return self._job("fast", True, record)

    def cli(self, record: bool) -> float:
        state = os.path.join(self.tmp, "cli")
        cmd = checkrun.txvmbot_cmd(
            "check",
            "--local",
            "--image-dir",
            self.image.dir,
            "--state-dir",
            state,
            "--memory",
            str(self.args.memory),
            "--no-keep-on-failure",
            "--command",
            "true",
        )
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout + 60)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"txvmbot check --local failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return wall


def _reap_children(reactor: Any) -> None:
    """The reactor runs in a thread here, without its SIGCHLD handler (only
    the main thread may set one): reap ended children every 10 ms instead,
    or a child that exits after closing its pipes (qemu-img) is never
    noticed. ``twistd`` runs the reactor in the main thread and needs none
    of this."""
    from twisted.internet import process
    from twisted.internet.task import LoopingCall

    loop = LoopingCall(process.reapAllProcesses)
    loop.clock = reactor
    loop.start(0.01, now=False)


def load_bench_image(image_dir: str | None) -> Any:
    from txvmbot.qemu.image import load_image

    if image_dir:
        return load_image(image_dir)
    from tests.support.qemu_fixtures import build_test_image

    return build_test_image()


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    for tool in ("qemu-system-x86_64", "qemu-img", "ssh"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    image = load_bench_image(args.image_dir)
    rt = ReactorThread()
    rt.start()
    rt.call(_reap_children, rt.reactor)
    sides = Sides(image, args, rt)
    try:
        plan = [
            ("plain qemu (subprocess + OpenSSH)", sides.plain),
            ("txvmbot cold (LocalCheck, boot->ssh)", sides.cold),
            ("txvmbot fast (template, boot->ssh)", sides.fast),
            ("txvmbot cli (check --local, whole cmd)", sides.cli),
        ]
        print(
            f"image {image.dir} (kernel {image.kernel_version}), accel {sides.accel}, "
            f"{args.memory} MiB, 1 cpu; {args.runs} runs + {args.warmup} warm-up",
            flush=True,
        )
        # Warm-up: page cache, and the pool's template (built on the first
        # fast run, timed here as the build).
        for _ in range(args.warmup):
            for _name, fn in plan:
                fn(False)
        tmpl = os.path.join(sides.tmp, "vms", "template", "template.json")
        build_seconds = float("nan")
        if os.path.exists(tmpl):
            import json

            with open(tmpl) as f:
                build_seconds = float(json.load(f)["build_seconds"])
        times: dict[str, list[float]] = {name: [] for name, _ in plan}
        for i in range(args.runs):
            order = plan if i % 2 == 0 else plan[::-1]
            for name, fn in order:
                times[name].append(fn(True))
            print(
                f"  run {i + 1}/{args.runs}: "
                + ", ".join(f"{n.split(' (')[0]} {times[n][-1]:.3f}s" for n, _ in plan),
                flush=True,
            )
    finally:
        rt.stop()
        sides.close()

    plain = median(times[plan[0][0]])
    cold = median(times[plan[1][0]])
    fast = median(times[plan[2][0]])
    cli = median(times[plan[3][0]])
    rows = []
    for name, _ in plan:
        ts = times[name]
        rows.append([name, median(ts), min(ts), max(ts), median(ts) / plain])
    print()
    print("spawn/boot to ssh, seconds")
    print(table(["side", "median", "min", "max", "side/plain"], rows))
    print()
    for side in ("cold", "fast"):
        rec = sides.steps.get(side, {})
        print(
            f"txvmbot {side} steps, median ms: "
            + ", ".join(f"{k} {median(v) * 1000:.0f}" for k, v in rec.items())
        )
    if sides.plain_marker:
        print(
            f"plain qemu: ready marker on the console at {median(sides.plain_marker):.3f}s, "
            f"{median([float(a) for a in sides.plain_attempts]):.0f} ssh attempts to the first "
            f"success, which took {median(sides.plain_last_attempt) * 1000:.0f} ms (OpenSSH "
            "client start, key exchange, `true`)"
        )
    if sides.plain_marker and "cold" in sides.steps:
        st = sides.steps["cold"]
        print(
            f"to the ready marker: plain {median(sides.plain_marker):.3f}s, txvmbot "
            f"{median(st['boot']) + median(st['ready']):.3f}s (boot + ready); marker to ssh: "
            f"plain {plain - median(sides.plain_marker):.3f}s (polling), txvmbot "
            f"{median(st['wait-ssh']):.3f}s (waits for the marker, then one conch connection)"
        )
    print(
        f"txvmbot fast, whole job from its template step to ssh: {median(sides.fast_job):.3f}s; "
        f"template build (cold boot + save, once per pool): {build_seconds:.2f}s"
    )
    ratio = cold / plain
    ok_ratio = ratio <= TARGET_RATIO
    ok_fast = fast < TARGET_FAST
    print()
    print(
        f"RESULT: txvmbot cold boot-to-ssh / plain qemu = {ratio:.2f} (target <= "
        f"{TARGET_RATIO:.2f}: {'MET' if ok_ratio else 'MISSED'}); template start to ssh "
        f"{fast:.3f}s (target < {TARGET_FAST:g}s: {'MET' if ok_fast else 'MISSED'}); "
        f"cold/fast = {cold / fast:.1f}x; medians plain {plain:.3f}s, cold {cold:.3f}s, "
        f"fast {fast:.3f}s, cli {cli:.3f}s"
    )
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
