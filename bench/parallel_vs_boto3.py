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
  ceiling raw          moto's ceiling: --ceiling-threads threads sending a
                       pre-built DescribeKeyPairs over http.client (no
                       signing, no parsing) for --ceiling-seconds
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
import http.client
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import (  # noqa: E402
    REGION,
    CPUWindow,
    ReactorThread,
    make_counting_client,
    median,
    pick_image,
    reproduce_line,
    set_test_credentials,
    table,
)
from tests import checkrun  # noqa: E402
from tests.servers import moto_server  # noqa: E402

TARGET = 0.90


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help="timed runs of each shape (default: 5)")
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
    p.add_argument(
        "--timeout", type=float, default=120.0, help="bound of one run of a shape, s (default: 120)"
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
        self.calls: dict[str, int] = {}

    def _timed(self, body: Any, record: bool = True) -> tuple[float, int, Any]:
        """Run ``body(client)`` (a coroutine) on the reactor with a fresh
        counting client; (wall seconds, HTTP requests, body's result)."""
        from twisted.internet.defer import ensureDeferred

        async def go() -> tuple[float, int, Any]:
            client, agent = make_counting_client(self.rt.reactor, self.cloud)
            t0 = time.perf_counter()
            try:
                out = await body(client)
            finally:
                wall = time.perf_counter() - t0
                await client.close()
            if record:
                for op, n in client.calls.items():
                    self.calls[op] = self.calls.get(op, 0) + n
            return wall, agent.count, out

        result: tuple[float, int, Any] = self.rt.call(
            lambda: ensureDeferred(go()), timeout=self.args.timeout
        )
        return result

    def _checks(self, specs: list[Any]) -> Any:
        from twisted.internet.defer import gatherResults

        from txvmbot.scenario import Check

        async def body(client: Any) -> Any:
            checks = [Check(self.rt.reactor, s, journal=self.journal, client=client) for s in specs]
            results = await gatherResults([c.run() for c in checks])
            failed = [r.error for r in results if not r.passed]
            if failed:
                raise SystemExit(f"txvmbot check failed: {failed[0]}")
            return results

        return body

    def one_by_n(self, moto_pid: int) -> Measure:
        with CPUWindow(moto_pid) as w:
            wall, requests, _ = self._timed(self._checks([self.specn]))
        return Measure(wall, requests, w.moto_cpu, w.own_cpu)

    def n_by_one(self, moto_pid: int) -> Measure:
        with CPUWindow(moto_pid) as w:
            wall, requests, _ = self._timed(self._checks([self.spec1] * self.args.parallel))
        return Measure(wall, requests, w.moto_cpu, w.own_cpu)

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
            wall, requests, _ = self._timed(body, record=False)
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
    headers = {
        "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request, "
        "SignedHeaders=host, Signature=0",
        "X-Amz-Date": "20260101T000000Z",
    }
    counts = [0] * threads
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    def loop(k: int) -> None:
        for _ in range(100_000):
            if time.perf_counter() >= deadline:
                return
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("POST", "/", body, headers)
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(f"HTTP {r.status}")
                    return
                counts[k] += 1
            finally:
                conn.close()

    with CPUWindow(moto_pid) as w:
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(loop, k) for k in range(threads)]:
                f.result(timeout=seconds + 60)
    if errors:
        raise SystemExit(f"raw ceiling client: moto answered {errors[0]}")
    return Measure(w.wall, sum(counts), w.moto_cpu, w.own_cpu)


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
            plan: list[tuple[str, Any]] = [
                (f"(a) txvmbot 1x{n}", lambda: tx.one_by_n(pid)),
                (f"(a) boto3 1x{n}", lambda: b3.one_by_n(pid)),
                (f"(b) txvmbot {n}x1", lambda: tx.n_by_one(pid)),
                (f"(b) boto3 {n}x1", lambda: b3.n_by_one(pid)),
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
            warm = checkrun.ec2(moto.url)

            def fresh() -> None:
                """An empty moto, its AMI list loaded again (untimed)."""
                if args.reset:
                    moto.reset()
                    warm.describe_images(ImageIds=[image])

            for _name, fn in plan[:4]:  # warm-up (botocore models, moto, pools)
                fresh()
                fn()
            tx.calls.clear()
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
    per = {op: c / (args.runs * (n + 1)) for op, c in sorted(tx.calls.items())}
    print()
    print(
        "txvmbot API calls per check, lifecycle runs (a)+(b): "
        + ", ".join(f"{op} {v:.2f}" for op, v in per.items())
    )
    ceiling = med(plan[4][0], "rate")
    tx_b = med(plan[2][0], "rate")
    b3_b = med(plan[3][0], "rate")
    tx_cheap = med(plan[5][0], "rate")
    b3_cheap = med(plan[6][0], "rate")
    wall_a = med(plan[1][0], "wall") / med(plan[0][0], "wall")
    wall_b = med(plan[3][0], "wall") / med(plan[2][0], "wall")
    frac_b = tx_b / ceiling
    frac_cheap = tx_cheap / ceiling
    print(
        f"moto ceiling (raw DescribeKeyPairs, {args.ceiling_threads} threads): {ceiling:.0f} req/s; "
        f"txvmbot (b) lifecycles {tx_b:.0f} req/s = {frac_b:.0%} of it; boto3 (b) {b3_b:.0f} req/s "
        f"= {b3_b / ceiling:.0%}"
    )
    print(
        f"same cheap call: txvmbot {tx_cheap:.0f} req/s = {frac_cheap:.0%} of the ceiling; "
        f"boto3 {b3_cheap:.0f} req/s = {b3_cheap / ceiling:.0%}"
    )
    verdict = "MET" if frac_b >= TARGET else "MISSED"
    print()
    print(
        f"RESULT: txvmbot (b) {n}x1 rate/ceiling = {frac_b:.0%} (target >= {TARGET:.0%}: {verdict}); "
        f"same-call rate/ceiling = {frac_cheap:.0%}; wall boto3/txvmbot (b) = {wall_b:.2f}x, "
        f"(a) = {wall_a:.2f}x; req/s txvmbot/boto3 (b) = {tx_b / b3_b:.2f}x"
    )
    print(reproduce_line(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
