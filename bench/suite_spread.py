#!/usr/bin/env python
"""Benchmark: a suite fed from one queue (txvmbot's SuiteRun) against the
static partitions stestr makes, on the same machines, all run for real.

The suite is synthetic: --tests tests whose true durations are heavy-tailed
(seeded Pareto, scaled to --total seconds in all, the longest capped at
--longest seconds), each test ``sleep X`` (format exit: the test id
``t0001_1.234`` carries its duration, the command strips the prefix). What
the schedulers are told is a "previous run": the true durations times a
seeded lognormal drift (--drift sigma), because timings drift between runs;
that is why a split decided up front loses.

Methods, each run over 4 (--machines) machines of the cloud backend
(CloudMachines, made by machines_for from a CheckSpec) against moto on
127.0.0.1, every machine's ssh endpoint pointed at ONE loopback OpenSSH
sshd: the "machines" are ssh sessions to localhost. That is enough for a
scheduling benchmark (a test's cost is its sleep, not the machine), not a
measure of real machines.

  dynamic           SuiteRun: every free machine takes the next test from
                    one queue, longest recorded first
  static by count   stestr without timings: round-robin over the ids
  static by timing  stestr's partition_tests: greedy on the recorded
                    durations, longest first, to the least loaded worker

The static workers run their fixed lists in order, each over its own ssh
session (txvmbot.ssh.open_session + Session.run) to machines acquired the
same way; their figures are measured, and also computed from the true
durations (static_timelines) as a cross-check.

Figures per method: makespan (first start to last end), each machine's busy
time and end, the end spread (last end minus first end, s and % of the
makespan), the lower bound max(total test time / machines, longest test)
and makespan / lower bound (test times as measured, ssh overhead included).
Goals: end spread <= 5% of the makespan and makespan <= 1.05x the lower
bound. Only 127.0.0.1 is used; moto and sshd are stopped by their pid;
every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    REGION,
    ReactorThread,
    bench_parser,
    pick_image,
    reproduce_line,
    set_test_credentials,
    table,
)
from tests.support import checkrun  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402
from tests.support.sshd import sshd_server  # noqa: E402

SPREAD_GOAL = 0.05
RATIO_GOAL = 1.05
#: The test command: the id is ``tNNNN_SECONDS``; one fork (sleep).
RUN = 't={test}; exec sleep "${t#*_}"'


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, unit="method", timeout=600.0, warmup=False)
    for action in p._actions:  # one round by default: each round is ~2 minutes
        if action.dest == "runs":
            action.default = 1
            action.help = "rounds of all three methods, each printed; goals judged on the worst (default: 1)"
    p.add_argument("--tests", type=int, default=200, help="tests in the suite (default: 200)")
    p.add_argument("--total", type=float, default=120.0, help="true seconds of all tests (default: 120)")
    p.add_argument("--longest", type=float, default=4.0, help="cap of one test, s (default: 4)")
    p.add_argument("--alpha", type=float, default=1.3, help="Pareto shape (default: 1.3)")
    p.add_argument(
        "--drift", type=float, default=0.5, help="sigma of the lognormal drift of recorded times (default: 0.5)"
    )
    p.add_argument("--machines", type=int, default=4, help="machines (default: 4)")
    p.add_argument("--seed", type=int, default=2, help="seed of durations and drift (default: 2)")
    args = p.parse_args(argv)
    if args.tests < 1 or args.machines < 1 or args.runs < 1:
        p.error("--tests, --machines and --runs must be at least 1")
    if not 0 < args.longest <= args.total:
        p.error("--longest must be positive and at most --total")
    return args


# --- the suite ------------------------------------------------------------------


@attrs.frozen
class Suite:
    """Test ids (in listing order) with their true and recorded seconds."""

    ids: tuple[str, ...]
    true: Mapping[str, float]
    recorded: Mapping[str, float]


def make_suite(n: int, total: float, longest: float, alpha: float, drift: float, seed: int) -> Suite:
    """``n`` Pareto-distributed durations summing to about ``total`` with
    the longest at most ``longest``, and a drifted "previous run" of them."""
    rng = random.Random(seed)
    raw = [rng.paretovariate(alpha) for _ in range(n)]

    def longest_for(cap: float) -> float:
        return cap * total / sum(min(x, cap) for x in raw)

    # Clip the tail at ``cap`` (in raw units) so that, once scaled to the
    # total, the longest test is ``longest``; bisection, bounded.
    cap = max(raw)
    if longest_for(cap) > longest:
        lo, hi = min(raw), max(raw)
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if longest_for(mid) < longest else (lo, mid)
        cap = lo
    scale = total / sum(min(x, cap) for x in raw)
    seconds = [round(max(min(x, cap) * scale, 0.001), 3) for x in raw]
    ids = tuple(f"t{i + 1:04d}_{s:.3f}" for i, s in enumerate(seconds))
    true = dict(zip(ids, seconds, strict=True))
    drift_rng = random.Random(seed * 7919 + 1)
    recorded = {tid: true[tid] * drift_rng.lognormvariate(0.0, drift) for tid in ids}
    return Suite(ids, true, recorded)


# --- figures --------------------------------------------------------------------


@attrs.frozen
class Figures:
    """One method's run: its spread summary, each machine's end (seconds
    after the first start), and how many tests passed."""

    method: str
    spread: Any  # txvmbot.jobs.suite.spread.Spread
    ends: tuple[float, ...]
    passed: int
    total: int
    how: str  # "run" or "computed"

    @property
    def spread_ok(self) -> bool:
        return bool(self.spread.end_spread_share <= SPREAD_GOAL)

    @property
    def ratio_ok(self) -> bool:
        return bool(self.spread.ratio <= RATIO_GOAL)


def figures(method: str, timelines: Sequence[Any], durations: Sequence[float], passed: int, how: str) -> Figures:
    from txvmbot.jobs.suite.spread import summarize

    s = summarize(timelines, durations)
    first = min(t.start for t in timelines)
    ends = tuple(t.end - first for t in timelines)
    return Figures(method, s, ends, passed, len(durations), how)


# --- the runs -------------------------------------------------------------------


class Bench:
    """The methods, run in the reactor thread against one moto and one sshd."""

    def __init__(self, rt: ReactorThread, args: argparse.Namespace, suite: Suite, target: Any) -> None:
        self.rt = rt
        self.args = args
        self.suite = suite
        self.target = target
        self.test_timeout = 2 * max(suite.true.values()) + 30.0
        self.check_ids: list[str] = []

    def _machines(self) -> Any:
        from txvmbot.engine import new_check_id
        from txvmbot.jobs.backends import machines_for
        from txvmbot.journal import MemoryJournal

        check_id = new_check_id()
        self.check_ids.append(check_id)
        return machines_for(self.rt.reactor, self.target, journal=MemoryJournal(), check_id=check_id)

    def dynamic(self) -> Figures:
        from twisted.internet.defer import ensureDeferred

        from txvmbot.jobs.suite.run import SuiteRun
        from txvmbot.jobs.suite.spec import SuiteSpec
        from txvmbot.jobs.suite.spread import Timeline

        spec = SuiteSpec(
            target=self.target,
            name="spread-bench",
            run=RUN,
            machines=self.args.machines,
            format="exit",
            tests=self.suite.ids,
            test_timeout=self.test_timeout,
            bound=self.args.timeout,
        )

        async def go() -> Any:
            run = SuiteRun(self.rt.reactor, self._machines(), spec, durations=self.suite.recorded)
            return await run.run()

        result = self.rt.call(lambda: ensureDeferred(go()), timeout=self.args.timeout + 120)
        if result.error or result.spread is None:
            raise SystemExit(f"dynamic: the suite run failed: {result.error or 'no figures'}")
        passed = sum(1 for t in result.tests if t.outcome == "passed")
        # SuiteRun's makespan starts when feeding starts; its timelines' own
        # starts are each slot's first test: place them at that common start.
        s = result.spread
        last = max(t.end for t in result.times)
        start = last - s.makespan
        timelines = [Timeline(t.worker, start, t.end, t.busy) for t in result.times]
        return figures("dynamic (SuiteRun)", timelines, [t.duration for t in result.tests], passed, "run")

    def static(self, parts: Mapping[str, list[list[str]]]) -> list[Figures]:
        """Acquire machines once, open one session per machine, run each
        partition in turn over those sessions, clean up."""
        from twisted.internet.defer import ensureDeferred

        from txvmbot import ssh
        from txvmbot.engine import StepRunner, StepSequence, gather

        reactor = self.rt.reactor
        n = self.args.machines

        async def go() -> list[Figures]:
            machines = self._machines()
            steps = StepRunner(reactor)
            sequence = StepSequence(steps, f"static {machines.check_id}")
            sessions: list[Any] = []
            try:
                await machines.prepare(sequence)
                got = await machines.acquire(sequence, n)
                connect = self.target.timeouts.ssh_connect
                sessions.extend(
                    await gather(
                        [
                            ssh.open_session(reactor, m.ssh_endpoint, m.ssh_user, m.key, connect_timeout=connect)
                            for m in got
                        ]
                    )
                )
                found = []
                for method, split in parts.items():
                    found.append(await self._run_static(method, sessions, split))
                return found
            finally:
                for s in sessions:
                    await s.close()
                errors = await machines.cleanup(steps)
                await machines.close()
                if errors:
                    raise SystemExit(f"static: cleanup failed: {errors}")

        result: list[Figures] = self.rt.call(lambda: ensureDeferred(go()), timeout=2 * self.args.timeout + 120)
        return result

    async def _run_static(self, method: str, sessions: Sequence[Any], split: list[list[str]]) -> Figures:
        from twisted.internet.defer import ensureDeferred

        from txvmbot.engine import gather
        from txvmbot.jobs.suite.spec import command_for
        from txvmbot.jobs.suite.spread import Timeline

        took: dict[str, float] = {}
        failed: list[str] = []
        t0 = time.time()

        async def worker(k: int, session: Any, part: list[str]) -> Timeline:
            busy = 0.0
            end = t0
            for tid in part:
                started = time.time()
                r = await session.run(command_for(RUN, [tid]), self.test_timeout)
                end = time.time()
                took[tid] = end - started
                busy += took[tid]
                if not r.ok:
                    failed.append(f"{tid}: exit {r.exit_status} {r.stderr[-200:]!r}")
            return Timeline(f"worker-{k + 1}", t0, end, busy)

        timelines = await gather(
            [ensureDeferred(worker(k, s, p)) for k, (s, p) in enumerate(zip(sessions, split, strict=True))]
        )
        if failed:
            raise SystemExit(f"{method}: tests failed: {failed[:3]}")
        return figures(method, timelines, list(took.values()), len(took), "run")


def computed(method: str, split: list[list[str]], true: Mapping[str, float]) -> Figures:
    """A static split's figures from the true durations, no overhead."""
    from txvmbot.jobs.suite.spread import static_timelines

    return figures(method, static_timelines(split, true), list(true.values()), len(true), "computed")


# --- printing -------------------------------------------------------------------


def print_round(found: Sequence[Figures], machines: int) -> None:
    headers = [
        "method",
        "how",
        "makespan s",
        "lower bound s",
        "makespan/LB",
        "end spread s",
        "end spread %",
        "busy s per machine",
        "end s per machine",
        "passed",
    ]
    rows = []
    for f in found:
        s = f.spread
        rows.append(
            [
                f.method,
                f.how,
                s.makespan,
                s.lower_bound,
                f"{s.ratio:.3f}",
                s.end_spread,
                f"{s.end_spread_share:.1%}",
                " ".join(f"{b:.1f}" for _w, b in s.busy),
                " ".join(f"{e:.1f}" for e in f.ends),
                f"{f.passed}/{f.total}",
            ]
        )
    print(table(headers, rows), flush=True)
    for f in found:
        s = f.spread
        print(
            f"  {f.method} ({f.how}): total test time {s.total_test_time:.1f}s, longest {s.longest_test:.2f}s, "
            f"lower bound max({s.total_test_time:.1f}/{machines}, {s.longest_test:.2f}) = {s.lower_bound:.1f}s; "
            f"end spread {s.end_spread:.2f}s = {s.end_spread_share:.1%} of {s.makespan:.1f}s "
            f"(goal <= {SPREAD_GOAL:.0%}: {'MET' if f.spread_ok else 'MISSED'}); "
            f"makespan {s.ratio:.3f}x lower bound (goal <= {RATIO_GOAL:.2f}x: {'MET' if f.ratio_ok else 'MISSED'})",
            flush=True,
        )


# --- main -----------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    suite = make_suite(args.tests, args.total, args.longest, args.alpha, args.drift, args.seed)
    true = list(suite.true.values())
    errors = [suite.recorded[t] / suite.true[t] for t in suite.ids]
    print(
        f"suite: {len(suite.ids)} tests `sleep X` (format exit, run {RUN!r}), seeded Pareto alpha "
        f"{args.alpha:g} (seed {args.seed}): total {sum(true):.1f}s, longest {max(true):.2f}s, "
        f"median {sorted(true)[len(true) // 2]:.3f}s, shortest {min(true):.3f}s; recorded durations = "
        f"true x lognormal(0, {args.drift:g}) drift (recorded/true from {min(errors):.2f} to {max(errors):.2f})",
        flush=True,
    )
    from txvmbot.jobs.suite.spread import partition_by_count, partition_by_timing

    n = args.machines
    parts = {
        "static by count (stestr round-robin)": partition_by_count(suite.ids, n),
        "static by timing (stestr greedy, recorded)": partition_by_timing(suite.ids, suite.recorded, n),
    }
    all_rounds: list[list[Figures]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="txvmbot-bench-") as tmp:
        key_path, public = checkrun.ssh_keypair(tmp)
        with sshd_server([public]) as sshd, moto_server() as moto:
            from txvmbot.model import CheckSpec, Cloud, Credentials, Timeouts

            image = pick_image(moto)
            target = CheckSpec(
                cloud=Cloud(endpoint=moto.url, region=REGION, credentials=Credentials("testing", "testing")),
                image=image,
                ssh_user=sshd.user,
                ssh_key=key_path,
                ssh_endpoint=sshd.endpoint,
                timeouts=Timeouts(ssh=30.0, running=60.0, poll_interval=0.2, poll_max_interval=1.0),
            )
            print(
                f"machines: {n} from the cloud backend (CloudMachines via machines_for) on moto {moto.url} "
                f"(pid {moto.pid}), image {image}; every machine's ssh endpoint is the ONE loopback sshd "
                f"{sshd.endpoint} (pid {sshd.pid}): {n} 'machines' are {n} ssh sessions to localhost, "
                "fine for a scheduling benchmark, not a measure of real machines",
                flush=True,
            )
            rt = ReactorThread()
            rt.start()
            bench = Bench(rt, args, suite, target)
            try:
                for r in range(args.runs):
                    found: list[Figures] = []
                    if r % 2 == 0:
                        found.append(bench.dynamic())
                        found.extend(bench.static(parts))
                    else:
                        static = bench.static(parts)
                        found = [bench.dynamic(), *static]
                    found.extend(computed(m + " ", split, suite.true) for m, split in parts.items())
                    print(f"\nround {r + 1}/{args.runs} ({time.monotonic() - started:.0f}s elapsed):", flush=True)
                    print_round(found, n)
                    all_rounds.append(found)
            finally:
                rt.stop()
            left = checkrun.leftovers(moto.url)
            print(f"\nmoto leftovers of the {len(bench.check_ids)} checks: {', '.join(left) or 'none'}")
    print(
        "rows 'computed': static_timelines on the TRUE sleep durations (no ssh overhead), a cross-check "
        "of the measured static rows; every other row was run for real"
    )
    print()
    for k, f in enumerate(all_rounds[0]):
        if f.how != "run":
            continue
        rounds = [fs[k] for fs in all_rounds]
        spread_ok = all(x.spread_ok for x in rounds)
        ratio_ok = all(x.ratio_ok for x in rounds)
        worst_share = max(x.spread.end_spread_share for x in rounds)
        worst_ratio = max(x.spread.ratio for x in rounds)
        print(
            f"RESULT {f.method}: end spread {worst_share:.1%} of makespan (goal <= {SPREAD_GOAL:.0%}: "
            f"{'MET' if spread_ok else 'MISSED'}), makespan {worst_ratio:.3f}x lower bound "
            f"(goal <= {RATIO_GOAL:.2f}x: {'MET' if ratio_ok else 'MISSED'})"
            + (f" [worst of {len(rounds)} rounds]" if len(rounds) > 1 else "")
        )
    print(f"wall time of the whole benchmark: {time.monotonic() - started:.0f}s")
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
