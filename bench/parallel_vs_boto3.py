#!/usr/bin/env python
"""Benchmark: 20 API-only lifecycles at once, txvmbot in-process against
boto3 in a ThreadPoolExecutor, and both against moto's own ceiling, all on
the same moto server this script starts on 127.0.0.1.

Shapes, each timed --runs times in alternating order (medians reported):

  (a) txvmbot 1x20     one Check with parallel=20, as `txvmbot check
                       --parallel 20 --no-ssh` does: one keypair, one group,
                       one RunInstances of 20, one poll for all 20
  (a) boto3 1x20       the same calls by boto3, one thread
  (b) txvmbot 20x1     20 concurrent Checks (parallel=1) on one reactor,
                       one shared EC2 client, one shared SQLite journal
  (b) boto3 20x1       20 lifecycles in ThreadPoolExecutor(20), one shared
                       boto3 client, the same calls per lifecycle as (b)
  ceiling workload     moto's ceiling FOR THE SAME WORKLOAD as (b): 20
                       threads, each one lifecycle of exactly the calls one
                       txvmbot check made (recorded, untimed, by the counting
                       client: same operations, order, count, parameters),
                       pre-serialized bodies over http.client, unsigned; the
                       only parsing is a regex for the group and instance id
                       the next calls need. The fair ceiling for "the same
                       calls", and the one the 90% target is judged against
  ceiling raw          moto's cheap-call ceiling: --ceiling-threads threads
                       sending a pre-built DescribeKeyPairs over http.client
                       (no signing, no parsing) for --ceiling-seconds. moto
                       answers it 2-3x faster than lifecycle calls (its
                       CreateKeyPair alone is ~48 ms of RSA keygen), so no
                       lifecycle client can reach 90% of it; shown as before
  cheap txvmbot/boto3  the same cheap call as fast as possible, 20 at once,
                       by txvmbot's EC2 client and by boto3

Requests are counted where they are sent: a counting IAgent under txvmbot's
EC2Client (and a counting IEC2Client decorator for API calls), boto3's
``before-send`` event. moto's CPU time is read from /proc/PID/stat: a moto
near 1.0 CPU-s per wall-s is saturated (it is a single Python process).
Both sides poll with the same interval (--poll-interval, doubling up to
10 s); moto answers "running" and "terminated" on the first poll.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (
    REGION,
    CPUWindow,
    ReactorThread,
    bench_parser,  # noqa: E402
    make_counting_client,
    median,
    pick_image,
    query_body,
    raw_post,
    reproduce_line,
    set_test_credentials,
    table,
)
from tests.support import checkrun  # noqa: E402
from tests.support.servers import moto_server  # noqa: E402

TARGET = 0.90


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = bench_parser(__doc__, unit="shape", timeout=120.0, warmup=False)
    p.add_argument("--parallel", type=int, default=20, help="lifecycles at once (default: 20)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="first wait between state polls, both sides (default: 1.0, txvmbot's default)",
    )
    p.add_argument(
        "--ceiling-seconds",
        type=float,
        default=3.0,
        help="duration of each cheap-call rate measurement (default: 3)",
    )
    p.add_argument(
        "--ceiling-threads",
        type=int,
        default=8,
        help="threads of the raw ceiling client (default: 8)",
    )
    p.add_argument(
        "--journal",
        choices=("sqlite", "memory"),
        default="sqlite",
        help="txvmbot's journal in-process (default: sqlite, as the CLI)",
    )
    p.add_argument(
        "--no-reset",
        dest="reset",
        action="store_false",
        help="do not reset moto before each measurement; moto keeps terminated instances "
        "forever and its filtered DescribeInstances slows down as they pile up "
        "(default: reset, so every shape starts from the same empty moto)",
    )
    args = p.parse_args(argv)
    if not 1 <= args.runs <= 50 or not 1 <= args.parallel <= 100:
        p.error("--runs must be 1..50 and --parallel 1..100")
    if not 0 < args.poll_interval <= 10 or not 0.5 <= args.ceiling_seconds <= 30:
        p.error("--poll-interval must be in (0, 10], --ceiling-seconds in [0.5, 30]")
    if not 1 <= args.ceiling_threads <= 64:
        p.error("--ceiling-threads must be 1..64")
    return args


class Measure:
    """One measurement: wall, requests sent, moto CPU, our CPU."""

    def __init__(self, wall: float, requests: int, moto_cpu: float, own_cpu: float) -> None:
        self.wall = wall
        self.requests = requests
        self.moto_cpu = moto_cpu
        self.own_cpu = own_cpu

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall > 0 else float("nan")


# --- txvmbot ------------------------------------------------------------------


class Txvmbot:
    def __init__(self, rt: ReactorThread, url: str, image: str, args: argparse.Namespace) -> None:
        from txvmbot.journal import MemoryJournal, SQLiteJournal
        from txvmbot.model import CheckSpec, Cloud, Credentials, Timeouts

        self.rt = rt
        self.args = args
        self.cloud = Cloud(endpoint=url, region=REGION, credentials=Credentials("testing", "testing"))
        timeouts = Timeouts(
            poll_interval=args.poll_interval, poll_max_interval=max(10.0, args.poll_interval)
        )
        self.spec1 = CheckSpec(cloud=self.cloud, image=image, ssh=False, timeouts=timeouts)
        self.specn = CheckSpec(
            cloud=self.cloud, image=image, ssh=False, timeouts=timeouts, parallel=args.parallel
        )
        self.tmp = tempfile.mkdtemp(prefix="txvmbot-bench-")
        if args.journal == "sqlite":
            path = os.path.join(self.tmp, "journal.sqlite")
            self.journal = rt.call(SQLiteJournal, path)  # sqlite3 is per thread
        else:
            self.journal = rt.call(MemoryJournal)
        #: API calls per operation, summed over the runs of each shape
        self.calls: dict[str, dict[str, int]] = {"a": {}, "b": {}}

    def _timed(
        self, body: Any, shape: str | None = None, record: bool = False
    ) -> tuple[float, int, Any]:
        """Run ``body(client)`` (a coroutine) on the reactor with a fresh
        counting client; (wall seconds, HTTP requests, body's result). The
        client's per-operation counts are added to ``self.calls[shape]``."""
        from twisted.internet.defer import ensureDeferred

        async def go() -> tuple[float, int, Any]:
            client, agent = make_counting_client(self.rt.reactor, self.cloud, record=record)
            t0 = time.perf_counter()
            try:
                out = await body(client)
            finally:
                wall = time.perf_counter() - t0
                await client.close()
            if shape is not None:
                calls = self.calls[shape]
                for op, n in client.calls.items():
                    calls[op] = calls.get(op, 0) + n
            return wall, agent.count, (client, out)

        wall, count, (_client, out) = self.rt.call(
            lambda: ensureDeferred(go()), timeout=self.args.timeout
        )
        return wall, count, out

    def _checks(self, specs: list[Any]) -> Any:
        from twisted.internet.defer import gatherResults

        from txvmbot.jobs.smoke import Check

        async def body(client: Any) -> Any:
            checks = [Check(self.rt.reactor, s, journal=self.journal, client=client) for s in specs]
            results = await gatherResults([c.run() for c in checks])
            failed = [r.error for r in results if not r.passed]
            if failed:
                raise SystemExit(f"txvmbot check failed: {failed[0]}")
            return checks, client.log

        return body

    def one_by_n(self, moto_pid: int) -> Measure:
        with CPUWindow(moto_pid) as w:
            wall, requests, _ = self._timed(self._checks([self.specn]), "a")
        return Measure(wall, requests, w.moto_cpu, w.own_cpu)

    def n_by_one(self, moto_pid: int) -> Measure:
        with CPUWindow(moto_pid) as w:
            wall, requests, _ = self._timed(self._checks([self.spec1] * self.args.parallel), "b")
        return Measure(wall, requests, w.moto_cpu, w.own_cpu)

    def record_lifecycle(self) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
        """One check as (b) runs each of its 20 (parallel=1), untimed, with a
        recording counting client: (its check id, its calls in order with
        their parameters)."""
        _wall, _requests, (checks, log) = self._timed(self._checks([self.spec1]), record=True)
        return checks[0].check_id, log

    def cheap(self, moto_pid: int, seconds: float, concurrency: int) -> Measure:
        from twisted.internet.defer import ensureDeferred, gatherResults

        async def body(client: Any) -> int:
            deadline = time.perf_counter() + seconds

            async def loop() -> int:
                n = 0
                while time.perf_counter() < deadline and n < 100_000:
                    await client.call("DescribeKeyPairs", {})
                    n += 1
                return n

            counts = await gatherResults(
                [ensureDeferred(loop()) for _ in range(concurrency)]
            )
            return sum(counts)

        with CPUWindow(moto_pid) as w:
            wall, requests, _ = self._timed(body)
        return Measure(wall, requests, w.moto_cpu, w.own_cpu)


# --- boto3 --------------------------------------------------------------------


class Boto3:
    def __init__(self, url: str, image: str, args: argparse.Namespace) -> None:
        import boto3
        from botocore.config import Config

        self.args = args
        self.image = image
        self.client = boto3.session.Session().client(
            "ec2",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(max_pool_connections=max(10, args.parallel), retries={"mode": "standard"}),
        )
        self._lock = threading.Lock()
        self.sent = 0
        self.client.meta.events.register("before-send.ec2", self._count)
        self._seq = 0
        self.client.describe_regions()  # load the model and warm the pool, untimed

    def _count(self, **kwargs: Any) -> None:
        with self._lock:
            self.sent += 1

    def _name(self) -> str:
        with self._lock:
            self._seq += 1
            return f"boto3-bench-{os.getpid()}-{self._seq}"

    def _wait(self, ids: list[str], want: str) -> None:
        """Poll until every instance is ``want``: bounded in polls and time,
        the interval doubling up to 10 s as txvmbot's poll does."""
        delay = self.args.poll_interval
        deadline = time.monotonic() + self.args.timeout
        for _ in range(60):
            answer = self.client.describe_instances(InstanceIds=ids)
            states = [i["State"]["Name"] for r in answer["Reservations"] for i in r["Instances"]]
            if len(states) == len(ids) and all(s == want for s in states):
                return
            if time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 2, max(10.0, self.args.poll_interval))
        raise SystemExit(f"boto3: {ids} not {want} in time")

    def lifecycle(self, count: int = 1) -> None:
        c = self.client
        name = self._name()

        def tags(kind: str) -> list[dict[str, Any]]:
            return [{"ResourceType": kind, "Tags": [{"Key": "bench", "Value": name}]}]

        c.create_key_pair(KeyName=name, TagSpecifications=tags("key-pair"))
        images = c.describe_images(ImageIds=[self.image])["Images"]
        assert images and images[0]["ImageId"] == self.image
        gid = c.create_security_group(
            GroupName=name, Description=f"bench {name}", TagSpecifications=tags("security-group")
        )["GroupId"]
        perm = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
        c.authorize_security_group_ingress(GroupId=gid, IpPermissions=perm)
        ids = [
            i["InstanceId"]
            for i in c.run_instances(
                ImageId=self.image,
                MinCount=count,
                MaxCount=count,
                InstanceType="t3.micro",
                KeyName=name,
                SecurityGroupIds=[gid],
                TagSpecifications=tags("instance"),
            )["Instances"]
        ]
        self._wait(ids, "running")
        c.terminate_instances(InstanceIds=ids)
        self._wait(ids, "terminated")
        c.revoke_security_group_ingress(GroupId=gid, IpPermissions=perm)
        c.delete_security_group(GroupId=gid)
        c.delete_key_pair(KeyName=name)

    def _measure(self, moto_pid: int, fn: Any) -> Measure:
        before = self.sent
        with CPUWindow(moto_pid) as w:
            fn()
        return Measure(w.wall, self.sent - before, w.moto_cpu, w.own_cpu)

    def one_by_n(self, moto_pid: int) -> Measure:
        return self._measure(moto_pid, lambda: self.lifecycle(self.args.parallel))

    def n_by_one(self, moto_pid: int) -> Measure:
        def go() -> None:
            with ThreadPoolExecutor(self.args.parallel) as pool:
                futures = [pool.submit(self.lifecycle) for _ in range(self.args.parallel)]
                for f in futures:
                    f.result(timeout=self.args.timeout)

        return self._measure(moto_pid, go)

    def cheap(self, moto_pid: int, seconds: float, concurrency: int) -> Measure:
        def go() -> None:
            deadline = time.perf_counter() + seconds

            def loop() -> None:
                for _ in range(100_000):
                    if time.perf_counter() >= deadline:
                        return
                    self.client.describe_key_pairs()

            with ThreadPoolExecutor(concurrency) as pool:
                for f in [pool.submit(loop) for _ in range(concurrency)]:
                    f.result(timeout=seconds + 60)

        return self._measure(moto_pid, go)


# --- moto's ceiling -------------------------------------------------------------


def raw_ceiling(port: int, moto_pid: int, seconds: float, threads: int) -> Measure:
    """Requests/s moto answers to a pre-built DescribeKeyPairs: no signing
    (moto checks none, but routes by the credential scope, so the header
    names ec2), no parsing, one connection per request (moto closes them)."""
    body = b"Action=DescribeKeyPairs&Version=2016-11-15"
    counts = [0] * threads
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def loop(k: int) -> None:
        for _ in range(100_000):
            if time.perf_counter() >= deadline:
                return
            status, _answer = raw_post(port, body)
            if status != 200:
                errors.append(f"HTTP {status}")
                return
            counts[k] += 1

    with CPUWindow(moto_pid) as w:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(loop, k) for k in range(threads)]:
                f.result(timeout=seconds + 60)
    if errors:
        raise SystemExit(f"raw ceiling client: moto answered {errors[0]}")
    return Measure(w.wall, sum(counts), w.moto_cpu, w.own_cpu)


_GROUP_ID = re.compile(r"^sg-[0-9a-f]+$")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]+$")
_GROUP_IN_ANSWER = re.compile(rb"<groupId>(sg-[0-9a-f]+)</groupId>")
_INSTANCE_IN_ANSWER = re.compile(rb"<instanceId>(i-[0-9a-f]+)</instanceId>")
_CID, _GID, _IID = "@CID@", "@GID@", "@IID@"


def _ids_in(value: Any, pattern: re.Pattern[str]) -> set[str]:
    """Every string in a params structure that is a whole id of ``pattern``."""
    if isinstance(value, str):
        return {value} if pattern.match(value) else set()
    if isinstance(value, dict):
        return set().union(*(_ids_in(v, pattern) for v in value.values()))
    if isinstance(value, list | tuple):
        return set().union(*(_ids_in(v, pattern) for v in value))
    return set()


class WorkloadCeiling:
    """moto's ceiling for shape (b)'s own workload: ``parallel`` threads,
    each replaying one recorded txvmbot lifecycle (the same operations in
    the same order and count, the same parameters) as pre-serialized Query
    bodies over http.client, unsigned. Per lifecycle, the check id (in
    names, tags, the ClientToken) is swapped for a fresh one before timing;
    the group id and the instance id moto hands out are cut from the
    CreateSecurityGroup and RunInstances answers by a regex and pasted into
    the later bodies. Nothing else is parsed: moto's time is the cost."""

    def __init__(
        self, port: int, check_id: str, log: list[tuple[str, dict[str, Any]]], parallel: int
    ) -> None:
        self.port = port
        self.parallel = parallel
        self.counts: dict[str, int] = {}
        for op, _params in log:
            self.counts[op] = self.counts.get(op, 0) + 1
        groups = _ids_in([p for _op, p in log], _GROUP_ID)
        instances = _ids_in([p for _op, p in log], _INSTANCE_ID)
        if len(groups) != 1 or len(instances) != 1:
            raise SystemExit(f"workload ceiling: expected one group and one instance, got {groups} {instances}")
        (gid,) = groups
        (iid,) = instances
        self.steps: list[tuple[str, str]] = []
        for op, params in log:
            body = query_body(op, params).replace(check_id, _CID).replace(gid, _GID).replace(iid, _IID)
            self.steps.append((op, body))
        first_gid = next(k for k, (_op, b) in enumerate(self.steps) if _GID in b)
        first_iid = next(k for k, (_op, b) in enumerate(self.steps) if _IID in b)
        ops = [op for op, _b in self.steps]
        if "CreateSecurityGroup" not in ops[:first_gid] or "RunInstances" not in ops[:first_iid]:
            raise SystemExit("workload ceiling: an id is used before the call that creates it")
        if _CID not in self.steps[0][1]:
            raise SystemExit("workload ceiling: the first call does not carry the check id")

    def _lifecycle(self, bodies: list[tuple[str, str]]) -> int:
        gid = iid = b""
        sent = 0
        for op, text in bodies:
            body = text.encode("ascii")
            if gid:
                body = body.replace(_GID.encode(), gid)
            if iid:
                body = body.replace(_IID.encode(), iid)
            status, answer = raw_post(self.port, body)
            if status != 200:
                raise SystemExit(f"workload ceiling: {op} answered HTTP {status}: {answer[:200]!r}")
            sent += 1
            if op == "CreateSecurityGroup":
                m = _GROUP_IN_ANSWER.search(answer)
                gid = m.group(1) if m else b""
            elif op == "RunInstances":
                m = _INSTANCE_IN_ANSWER.search(answer)
                iid = m.group(1) if m else b""
        return sent

    def measure(self, moto_pid: int, timeout: float) -> Measure:
        import uuid

        lifecycles = []
        for _ in range(self.parallel):  # fresh names, tokens and tags per lifecycle, untimed
            cid = uuid.uuid4().hex[:12]
            lifecycles.append([(op, b.replace(_CID, cid)) for op, b in self.steps])
        with CPUWindow(moto_pid) as w:
            with ThreadPoolExecutor(self.parallel) as pool:
                futures = [pool.submit(self._lifecycle, bodies) for bodies in lifecycles]
                sent = sum(f.result(timeout=timeout) for f in futures)
        return Measure(w.wall, sent, w.moto_cpu, w.own_cpu)


# --- main -----------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv[1:])
    set_test_credentials()
    n = args.parallel
    with moto_server() as moto:
        image = pick_image(moto)
        rt = ReactorThread()
        rt.start()
        try:
            tx = Txvmbot(rt, moto.url, image, args)
            b3 = Boto3(moto.url, image, args)
            pid = moto.pid
            secs = args.ceiling_seconds
            warm = checkrun.ec2(moto.url)

            def fresh() -> None:
                """An empty moto, its AMI list loaded again (untimed)."""
                if args.reset:
                    moto.reset()
                    warm.describe_images(ImageIds=[image])

            fresh()
            check_id, log = tx.record_lifecycle()  # untimed: the workload to replay
            workload = WorkloadCeiling(moto.port, check_id, log, n)
            plan: list[tuple[str, Any]] = [
                (f"(a) txvmbot 1x{n}", lambda: tx.one_by_n(pid)),
                (f"(a) boto3 1x{n}", lambda: b3.one_by_n(pid)),
                (f"(b) txvmbot {n}x1", lambda: tx.n_by_one(pid)),
                (f"(b) boto3 {n}x1", lambda: b3.n_by_one(pid)),
                (f"ceiling workload {n}x1", lambda: workload.measure(pid, args.timeout)),
                ("ceiling raw DescribeKeyPairs", lambda: raw_ceiling(moto.port, pid, secs, args.ceiling_threads)),
                (f"cheap txvmbot DescribeKeyPairs x{n}", lambda: tx.cheap(pid, secs, n)),
                (f"cheap boto3 DescribeKeyPairs x{n}", lambda: b3.cheap(pid, secs, n)),
            ]
            print(
                f"moto {moto.url} (pid {pid}), image {image}, {n} lifecycles, poll interval "
                f"{args.poll_interval:g}s (doubling to 10s) both sides, journal {args.journal}, "
                f"{args.runs} runs + 1 warm-up, moto {'reset before each measurement' if args.reset else 'never reset'}",
                flush=True,
            )
            for _name, fn in plan[:5]:  # warm-up (botocore models, moto, pools)
                fresh()
                fn()
            tx.calls = {"a": {}, "b": {}}
            got: dict[str, list[Measure]] = {name: [] for name, _ in plan}
            for i in range(args.runs):
                order = plan if i % 2 == 0 else plan[::-1]
                for name, fn in order:
                    fresh()
                    got[name].append(fn())
                print(
                    f"  run {i + 1}/{args.runs}: "
                    + ", ".join(
                        f"{name.split(' DescribeKeyPairs')[0]} {got[name][-1].wall:.2f}s/"
                        f"{got[name][-1].rate:.0f}rps"
                        for name, _ in plan
                    ),
                    flush=True,
                )
        finally:
            rt.stop()

    def med(name: str, attr: str) -> float:
        return median([float(getattr(m, attr)) for m in got[name]])

    rows = []
    for name, _ in plan:
        ms = got[name]
        wall = med(name, "wall")
        reqs = med(name, "requests")
        rows.append(
            [
                name,
                wall,
                min(m.wall for m in ms),
                reqs,
                med(name, "rate"),
                max(m.rate for m in ms),
                median([m.moto_cpu / m.wall for m in ms]),
                median([m.own_cpu / max(m.requests, 1) * 1000 for m in ms]),
                median([m.moto_cpu / max(m.requests, 1) * 1000 for m in ms]),
            ]
        )
    print()
    print(
        table(
            [
                "shape",
                "wall med s",
                "wall min s",
                "requests",
                "req/s med",
                "req/s max",
                "moto CPU/wall",
                "client CPU ms/req",
                "moto CPU ms/req",
            ],
            rows,
        )
    )
    per_b = {op: c / (args.runs * n) for op, c in sorted(tx.calls["b"].items())}
    replayed = dict(sorted(workload.counts.items()))
    same = {op: float(c) for op, c in replayed.items()} == per_b
    print()
    print(
        f"txvmbot API calls per check, (b) {n}x1: "
        + ", ".join(f"{op} {v:.2f}" for op, v in per_b.items())
        + f" (total {sum(per_b.values()):.2f})"
    )
    print(
        "workload ceiling replays per lifecycle (one recorded check): "
        + " -> ".join(op for op, _b in workload.steps)
        + f" ({len(workload.steps)} calls; per-operation counts "
        + ("equal to (b)'s)" if same else f"DIFFER from (b)'s: {replayed})")
    )
    names = [name for name, _ in plan]
    work = med(names[4], "rate")
    cheap_ceiling = med(names[5], "rate")
    tx_b = med(names[2], "rate")
    b3_b = med(names[3], "rate")
    tx_cheap = med(names[6], "rate")
    b3_cheap = med(names[7], "rate")
    wall_a = med(names[1], "wall") / med(names[0], "wall")
    wall_b = med(names[3], "wall") / med(names[2], "wall")
    work_moto = median([m.moto_cpu / m.wall for m in got[names[4]]])
    frac_b = tx_b / work
    print()
    print(
        f"moto's workload ceiling ({n} threads x one lifecycle of the same {len(workload.steps)} calls, "
        f"pre-serialized, unsigned): {work:.0f} req/s, moto CPU/wall {work_moto:.2f}; "
        f"txvmbot (b) {tx_b:.0f} req/s = {tx_b / work:.0%} of it; boto3 (b) {b3_b:.0f} req/s = {b3_b / work:.0%}"
    )
    print(
        f"moto's cheap-call ceiling (raw DescribeKeyPairs, {args.ceiling_threads} threads): "
        f"{cheap_ceiling:.0f} req/s; txvmbot (b) = {tx_b / cheap_ceiling:.0%} of it; "
        f"boto3 (b) = {b3_b / cheap_ceiling:.0%}; the workload ceiling is "
        f"{work / cheap_ceiling:.0%} of it"
    )
    print(
        f"same cheap call: txvmbot {tx_cheap:.0f} req/s = {tx_cheap / cheap_ceiling:.0%} of the "
        f"cheap-call ceiling; boto3 {b3_cheap:.0f} req/s = {b3_cheap / cheap_ceiling:.0%}"
    )
    verdict = "MET" if frac_b >= TARGET else "MISSED"
    print()
    print(
        f"RESULT: txvmbot (b) {n}x1 {tx_b:.0f} req/s = {frac_b:.0%} of moto's workload ceiling "
        f"{work:.0f} req/s (target >= {TARGET:.0%}, judged against the workload ceiling: {verdict}); "
        f"= {tx_b / cheap_ceiling:.0%} of the cheap-call ceiling {cheap_ceiling:.0f} req/s; "
        f"boto3 (b) {b3_b / work:.0%} / {b3_b / cheap_ceiling:.0%}; "
        f"wall boto3/txvmbot (b) = {wall_b:.2f}x, (a) = {wall_a:.2f}x; "
        f"req/s txvmbot/boto3 (b) = {tx_b / b3_b:.2f}x"
    )
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
