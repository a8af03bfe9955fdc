"""Helpers shared by the benchmark scripts: a reactor in a thread, counting
wrappers, CPU accounting of the moto process, medians and tables.

Every network address used here is 127.0.0.1 (the moto server the script
started); every wait is bounded.
"""

from __future__ import annotations

import argparse
import copy
import http.client
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.support import checkrun  # noqa: E402
from tests.support.servers import Moto  # noqa: E402

REGION = checkrun.REGION


def bench_env() -> dict[str, str]:
    """The environment of every subprocess: test credentials only, no AWS
    config files, and the venv's bin first on PATH (for ``aws``)."""
    env = checkrun.env()
    env["AWS_DEFAULT_REGION"] = REGION
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def set_test_credentials() -> None:
    """This process talks to moto only: give it moto's test credentials."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            del os.environ[k]
    os.environ.update(checkrun.ENV)


def pick_image(moto: Moto) -> str:
    """The first of moto's amazon images (as the e2e tests pick it). The
    first DescribeImages also warms moto up (it loads its AMI list)."""
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


# --- CPU accounting -----------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def self_cpu() -> float:
    """CPU seconds used by this process, all threads."""
    return time.process_time()


class CPUWindow:
    """Wall time, moto's CPU and our own CPU over a ``with`` block."""

    def __init__(self, moto_pid: int) -> None:
        self.moto_pid = moto_pid
        self.wall = self.moto_cpu = self.own_cpu = 0.0

    def __enter__(self) -> CPUWindow:
        self._w = time.perf_counter()
        self._m = proc_cpu(self.moto_pid)
        self._o = self_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.moto_cpu = proc_cpu(self.moto_pid) - self._m
        self.own_cpu = self_cpu() - self._o


# --- a reactor in a thread ----------------------------------------------------


class ReactorThread:
    """The global reactor, running in a daemon thread, so the main thread can
    time subprocesses and thread pools and still hand work to an already
    running reactor. ``call`` is blockingCallFromThread with a bound."""

    def __init__(self) -> None:
        from twisted.internet import reactor
        from twisted.logger import (
            FilteringLogObserver,
            LogLevel,
            LogLevelFilterPredicate,
            globalLogBeginner,
            textFileLogObserver,
        )

        # Warnings and errors of txvmbot (a failed step, say) go to stderr.
        globalLogBeginner.beginLoggingTo(
            [
                FilteringLogObserver(
                    textFileLogObserver(sys.stderr),
                    [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
                )
            ],
            redirectStandardIO=False,
        )
        self.reactor: Any = reactor
        self._thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self.call(lambda: None, timeout=10)

    def call(self, f: Callable[..., Any], *args: Any, timeout: float = 300.0) -> Any:
        """Run ``f(*args)`` in the reactor thread; wait (at most ``timeout``
        seconds) for its result, Deferred or not."""
        from twisted.internet.defer import maybeDeferred
        from twisted.python.failure import Failure

        q: queue.Queue[Any] = queue.Queue()

        def go() -> None:
            maybeDeferred(f, *args).addBoth(q.put)

        self.reactor.callFromThread(go)
        try:
            result = q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{f!r} did not finish within {timeout}s") from None
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def stop(self) -> None:
        if self._thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self._thread.join(10)


# --- counting -----------------------------------------------------------------


def counting_agent(agent: Any) -> Any:
    """An IAgent that counts the HTTP requests it sends (retries included)."""
    from twisted.web.iweb import IAgent
    from zope.interface import implementer

    @implementer(IAgent)
    class CountingAgent:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.count = 0

        def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
            self.count += 1
            return self.inner.request(method, uri, headers, bodyProducer)

    return CountingAgent(agent)


def counting_client(inner: Any, record: bool = False) -> Any:
    """An IEC2Client decorator that counts API calls per operation; with
    ``record``, it also keeps every call, in order, as (operation, params)
    in ``log`` (off by default: the timed shapes only count)."""
    from zope.interface import implementer

    from txvmbot.interfaces import IEC2Client

    @implementer(IEC2Client)
    class CountingClient:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.calls: dict[str, int] = {}
            self.log: list[tuple[str, dict[str, Any]]] = []

        endpoint = property(lambda self: self.inner.endpoint)
        region = property(lambda self: self.inner.region)
        signature_version = property(lambda self: self.inner.signature_version)
        api_version = property(lambda self: self.inner.api_version)

        @property
        def total(self) -> int:
            return sum(self.calls.values())

        def call(
            self, operation: str, params: dict[str, Any] | None = None, *, repeatable: bool = True
        ) -> Any:
            self.calls[operation] = self.calls.get(operation, 0) + 1
            if record:
                self.log.append((operation, copy.deepcopy(params or {})))
            return self.inner.call(operation, params, repeatable=repeatable)

        def close(self) -> Any:
            return self.inner.close()

    return CountingClient(inner)


def make_counting_client(reactor: Any, cloud: Any, record: bool = False) -> tuple[Any, Any]:
    """(counting IEC2Client, counting agent) over a real EC2Client built as
    make_client builds it (its pool and agent, counted). ``record``: see
    counting_client."""
    from txvmbot.ec2 import make_client
    from txvmbot.ec2.client import make_agent, make_pool

    pool = make_pool(reactor)
    agent = counting_agent(make_agent(reactor, cloud, pool))
    client = make_client(reactor, cloud, pool=pool, agent=agent)
    return counting_client(client, record), agent


# --- raw EC2 Query requests -----------------------------------------------------

#: Headers of an unsigned EC2 Query request that moto accepts: it checks no
#: signature but routes by the credential scope, so the header names ec2.
RAW_HEADERS = {
    "Content-Type": "application/x-www-form-urlencoded; charset=utf-8",
    "Authorization": f"AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/ec2/aws4_request, "
    "SignedHeaders=host, Signature=0",
    "X-Amz-Date": "20260101T000000Z",
}


def query_body(operation: str, params: dict[str, Any]) -> str:
    """The form body botocore would send for ``operation(**params)``
    (serialized by botocore's EC2 serializer, urlencoded as AWSRequest
    does). Built ahead of any timing."""
    from urllib.parse import urlencode

    import botocore.session
    from botocore.serialize import create_serializer

    global _service_model
    if _service_model is None:
        _service_model = botocore.session.Session().get_service_model("ec2")
    request = create_serializer("ec2", include_validation=True).serialize_to_request(
        params, _service_model.operation_model(operation)
    )
    return urlencode(request["body"], doseq=True)


_service_model: Any = None


def raw_post(port: int, body: bytes, timeout: float = 30.0) -> tuple[int, bytes]:
    """POST ``body`` to moto on 127.0.0.1:``port`` over http.client, one
    connection per request (moto answers ``Connection: close`` anyway)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/", body, RAW_HEADERS)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


# --- figures ------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        if c != c:
            return "-"
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}"
    return str(c)


def reproduce_line(argv: Sequence[str]) -> str:
    import shlex

    script = os.path.relpath(os.path.abspath(argv[0]), ROOT)
    return "reproduce: cd " + shlex.quote(ROOT) + " && . .venv/bin/activate && python " + " ".join(
        shlex.quote(a) for a in [script, *argv[1:]]
    )


def bench_parser(
    doc: str | None, *, unit: str = "side", timeout: float = 120.0, warmup: bool = True
) -> argparse.ArgumentParser:
    """The options every benchmark here shares: --runs, --warmup (when
    ``warmup``) and --timeout, the bound of one run of a ``unit``."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=5, help=f"timed runs of each {unit} (default: 5)")
    if warmup:
        p.add_argument(
            "--warmup", type=int, default=1, help=f"untimed runs of each {unit} first (default: 1)"
        )
    p.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"bound of one run of a {unit}, s (default: {timeout:g})",
    )
    return p
