#!/usr/bin/env python
"""Benchmark: one API-only lifecycle (check with --no-ssh) by txvmbot against
the same lifecycle by a euca-style shell script (bench/euca_style_check.sh,
one `aws ec2 ...` process per step), both against the same moto server this
script starts on 127.0.0.1.

Sides, each timed --runs times in alternating order (medians reported):

  script          bench/euca_style_check.sh: 11+ `aws` processes
  txvmbot cli     `python -m txvmbot check ... --no-ssh` as a subprocess:
                  wall time includes Python start-up, imports, botocore model
                  load, SQLite journal open
  txvmbot inproc  Check(spec with ssh=False).run() on an already running
                  reactor in this process (botocore model already loaded):
                  only the lifecycle itself; SQLite journal (as the CLI)
  inproc memjrnl  the same with a MemoryJournal (no fsync per journal write)

Both sides poll with the same interval (--poll-interval); moto answers
"running" and "terminated" on the first poll, so neither side sleeps.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    REGION,
    ReactorThread,
    bench_env,
    bench_parser,  # noqa: E402
    make_counting_client,
    median,
    pick_image,
    reproduce_line,
    set_test_credentials,
    table,
)
from tests.support import checkrun  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "euca_style_check.sh")
TARGET = 3.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, timeout=120.0)
    p.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="seconds between state polls, both sides (default: 1.0, txvmbot's default)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 100 or not 0 <= args.warmup <= 10:
        p.error("--runs must be 1..100 and --warmup 0..10")
    if not 0 < args.poll_interval <= 10:
        p.error("--poll-interval must be in (0, 10]")
    return args


class Sides:
    def __init__(self, url: str, image: str, args: argparse.Namespace, rt: ReactorThread) -> None:
        self.url = url
        self.image = image
        self.args = args
        self.rt = rt
        self.env = bench_env()
        self.tmp = tempfile.mkdtemp(prefix="txvmbot-bench-")
        self.script_calls: list[int] = []
        self.inproc_calls: list[int] = []
        self.inproc_steps: dict[str, list[float]] = {}

    def script(self) -> float:
        cmd = ["bash", SCRIPT, self.url, REGION, self.image, str(self.args.poll_interval)]
        t0 = time.perf_counter()
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=self.args.timeout
        )
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"euca_style_check.sh failed ({p.returncode}):\n{p.stderr}")
        m = re.search(r"(\d+) aws calls", p.stderr)
        if m:
            self.script_calls.append(int(m.group(1)))
        return wall

    def cli(self) -> float:
        state = os.path.join(self.tmp, "cli-state")
        cmd = checkrun.txvmbot_cmd(
            "check",
            "--endpoint",
            self.url,
            "--region",
            REGION,
            "--image",
            self.image,
            "--no-ssh",
            "--state-dir",
            state,
            "--timeout-poll-interval",
            str(self.args.poll_interval),
            "--timeout-poll-max-interval",
            str(max(10.0, self.args.poll_interval)),
        )
        t0 = time.perf_counter()
        p = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=self.args.timeout
        )
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"txvmbot check failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return wall

    def _spec(self) -> Any:
        from txvmbot.model import CheckSpec, Cloud, Credentials, Timeouts

        cloud = Cloud(
            endpoint=self.url,
            region=REGION,
            credentials=Credentials("testing", "testing"),
        )
        return CheckSpec(
            cloud=cloud,
            image=self.image,
            ssh=False,
            timeouts=Timeouts(
                poll_interval=self.args.poll_interval,
                poll_max_interval=max(10.0, self.args.poll_interval),
            ),
        )

    def _inproc(self, journal: Any, record: bool) -> float:
        from txvmbot.jobs.smoke import Check

        spec = self._spec()
        reactor = self.rt.reactor

        async def go() -> tuple[float, Any, int]:
            client, _agent = make_counting_client(reactor, spec.cloud)
            check = Check(reactor, spec, journal=journal, client=client)
            t0 = time.perf_counter()
            result = await check.run()
            wall = time.perf_counter() - t0
            await client.close()
            return wall, result, client.total

        from twisted.internet.defer import ensureDeferred

        wall, result, calls = self.rt.call(
            lambda: ensureDeferred(go()), timeout=self.args.timeout
        )
        if not result.passed:
            raise SystemExit(f"in-process check failed: {result.error}")
        if record:
            self.inproc_calls.append(calls)
            for s in result.steps:
                self.inproc_steps.setdefault(" ".join(s.name.split(" ")[:2]), []).append(s.duration)
        return float(wall)

    def inproc(self) -> float:
        from txvmbot.journal import SQLiteJournal

        if not hasattr(self, "_sqlite"):
            # sqlite3 objects belong to the thread that made them: the reactor's.
            path = os.path.join(self.tmp, "inproc-journal.sqlite")
            self._sqlite = self.rt.call(SQLiteJournal, path)
        return self._inproc(self._sqlite, record=True)

    def inproc_mem(self) -> float:
        from txvmbot.journal import MemoryJournal

        return self._inproc(self.rt.call(MemoryJournal), record=False)


def startup_costs(env: dict[str, str], runs: int) -> dict[str, float]:
    """Median wall time of bare process start-ups, to show where time goes."""
    cmds = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -m txvmbot --help": checkrun.txvmbot_cmd("--help"),
        "python: import txvmbot.ec2 + load ec2 model": [
            sys.executable,
            "-c",
            "from txvmbot.ec2 import _botocore as b; b.api_version()",
        ],
        "aws --version": ["aws", "--version"],
    }
    out = {}
    for name, cmd in cmds.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=True)
            times.append(time.perf_counter() - t0)
        out[name] = median(times)
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    with moto_server() as moto:
        image = pick_image(moto)
        rt = ReactorThread()
        rt.start()
        try:
            sides = Sides(moto.url, image, args, rt)
            plan = [
                ("script (aws CLI per step)", sides.script),
                ("txvmbot cli (subprocess)", sides.cli),
                ("txvmbot inproc (sqlite journal)", sides.inproc),
                ("txvmbot inproc-mem (memory journal)", sides.inproc_mem),
            ]
            print(
                f"moto {moto.url} (pid {moto.pid}), image {image}, poll interval "
                f"{args.poll_interval:g}s both sides, {args.runs} runs + {args.warmup} warm-up",
                flush=True,
            )
            # Warm-up: the first in-process run also loads the botocore model.
            cold_inproc = None
            for _ in range(args.warmup):
                for name, fn in plan:
                    w = fn()
                    if cold_inproc is None and "sqlite" in name:
                        cold_inproc = w
            sides.inproc_calls.clear()
            sides.inproc_steps.clear()
            sides.script_calls.clear()
            times: dict[str, list[float]] = {name: [] for name, _ in plan}
            for i in range(args.runs):
                order = plan if i % 2 == 0 else plan[::-1]
                for name, fn in order:
                    times[name].append(fn())
                print(
                    f"  run {i + 1}/{args.runs}: "
                    + ", ".join(f"{n.split(' (')[0]} {times[n][-1]:.3f}s" for n, _ in plan),
                    flush=True,
                )
            startup = startup_costs(bench_env(), max(3, min(args.runs, 5)))
        finally:
            rt.stop()

    script = median(times[plan[0][0]])
    cli = median(times[plan[1][0]])
    inproc = median(times[plan[2][0]])
    rows = []
    for name, _ in plan:
        ts = times[name]
        rows.append([name, median(ts), min(ts), max(ts), script / median(ts)])
    print()
    print("wall time per lifecycle, seconds")
    print(table(["side", "median", "min", "max", "script/side"], rows))
    print()
    calls = median([float(c) for c in sides.script_calls])
    print(
        f"API calls per lifecycle: script {calls:.0f} (one aws process each), "
        f"txvmbot {median([float(c) for c in sides.inproc_calls]):.0f}"
    )
    print(
        "txvmbot inproc steps, median ms: "
        + ", ".join(f"{k} {median(v) * 1000:.1f}" for k, v in sides.inproc_steps.items())
    )
    if cold_inproc is not None:
        print(f"first in-process run (loads botocore model): {cold_inproc:.3f}s")
    print("process start-up alone, median s: " + ", ".join(f"{k} {v:.3f}" for k, v in startup.items()))
    print(
        f"where the script's time goes: ~{script / max(calls, 1):.3f}s per aws call "
        f"(aws start-up alone {startup['aws --version']:.3f}s)"
    )
    print(
        f"where txvmbot cli's time goes: {cli:.3f}s = lifecycle {inproc:.3f}s "
        f"+ start-up/imports/model/journal/exit {cli - inproc:.3f}s"
    )
    ratio = script / cli
    verdict = "MET" if ratio >= TARGET else "MISSED"
    print()
    print(
        f"RESULT: script/txvmbot-cli = {ratio:.1f}x (target >= {TARGET:g}x: {verdict}); "
        f"script/txvmbot-inproc = {script / inproc:.1f}x; "
        f"medians script {script:.3f}s, cli {cli:.3f}s, inproc {inproc:.3f}s"
    )
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
