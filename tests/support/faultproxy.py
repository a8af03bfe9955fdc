"""A fault-injecting HTTP proxy for an EC2 Query API server (moto), run as a
subprocess on 127.0.0.1:

    python -m tests.support.faultproxy --upstream http://127.0.0.1:PORT --port N \\
        --faults throttle:3,503:5,drop:7,lost:4 --log FILE

Faults follow a deterministic schedule on ``n``, the number of the request
(1, 2, 3, ... counting every HTTP request the proxy receives, faulted or
not). ``KIND:K`` means "every K-th request":

``throttle``  answered HTTP 400 with an EC2 ``RequestLimitExceeded`` error,
              not forwarded;
``503``       answered HTTP 503 with an HTML page (as a load balancer would),
              not forwarded;
``drop``      the connection is closed without an answer, not forwarded;
``lost``      forwarded; the cloud's answer is read, then discarded and the
              connection closed ("the answer was lost after the cloud acted").

Precedence: when several periods divide ``n``, the fault written FIRST in
the spec wins. Requests no fault picks are forwarded unchanged
(``forward``).

The proxy appends one line per request to the log file, written before the
action is carried out: ``n action Action`` (e.g. ``4 lost RunInstances``).
Only loopback upstreams are accepted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

from tests.support import paths
from tests.support.servers import free_port, stop, wait_for_port

KINDS = ("throttle", "503", "drop", "lost")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ROOT = paths.ROOT


def parse_faults(spec: str) -> list[tuple[str, int]]:
    """``"throttle:3,lost:4"`` -> ``[("throttle", 3), ("lost", 4)]``, in order."""
    faults: list[tuple[str, int]] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, period = item.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
        try:
            k = int(period)
        except ValueError:
            raise ValueError(f"fault {item!r} needs a period, like {kind}:3") from None
        if k < 1:
            raise ValueError(f"fault {item!r}: the period must be at least 1")
        faults.append((kind, k))
    return faults


def choose(n: int, faults: list[tuple[str, int]]) -> str:
    """The action for request ``n``: the first fault whose period divides
    ``n``, else ``forward``."""
    for kind, period in faults:
        if n % period == 0:
            return kind
    return "forward"


def read_log(path: str) -> list[tuple[int, str, str]]:
    """The proxy's log as (n, action, Action) tuples."""
    entries = []
    with open(path) as f:
        for line in f:
            n, action, op = (line.rstrip("\n").split(" ", 2) + [""])[:3]
            entries.append((int(n), action, op))
    return entries


THROTTLE_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
    b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
    b"</Error></Errors><RequestID>faultproxy-throttle</RequestID></Response>"
)
UNAVAILABLE_HTML = (
    b"<html><head><title>503 Service Temporarily Unavailable</title></head>"
    b"<body><center><h1>503 Service Temporarily Unavailable</h1></center></body></html>"
)
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"content-length",
    b"te",
    b"trailer",
    b"upgrade",
}


def _make_resource(reactor: Any, upstream: str, faults: list[tuple[str, int]], log: IO[str]) -> Any:
    from twisted.internet.defer import ensureDeferred
    from twisted.web import resource, server
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer
    from zope.interface import implementer

    pool = HTTPConnectionPool(reactor, persistent=True)
    agent = Agent(reactor, pool=pool)

    @implementer(IBodyProducer)
    class Body:
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.length = len(data)

        def startProducing(self, consumer: Any) -> Any:
            from twisted.internet.defer import succeed

            consumer.write(self.data)
            return succeed(None)

        def pauseProducing(self) -> None: ...

        def resumeProducing(self) -> None: ...

        def stopProducing(self) -> None: ...

    class Proxy(resource.Resource):
        isLeaf = True

        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def render(self, request: Any) -> Any:
            self.n += 1
            n = self.n
            body = request.content.read()
            params = dict(parse_qsl(body.decode("utf-8", "replace")))
            params.update(parse_qsl(urlsplit(request.uri.decode("latin-1")).query))
            action = choose(n, faults)
            log.write(f"{n} {action} {params.get('Action', '-')}\n")
            log.flush()
            if action == "throttle":
                request.setResponseCode(400)
                request.setHeader(b"content-type", b"text/xml;charset=UTF-8")
                return THROTTLE_XML
            if action == "503":
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"text/html")
                return UNAVAILABLE_HTML
            if action == "drop":
                request.channel.transport.loseConnection()
                return server.NOT_DONE_YET
            ensureDeferred(self.forward(request, body, lost=(action == "lost")))
            return server.NOT_DONE_YET

        async def forward(self, request: Any, body: bytes, lost: bool) -> None:
            headers = Headers()
            for name, values in request.requestHeaders.getAllRawHeaders():
                if name.lower() not in _HOP_BY_HOP and name.lower() != b"host":
                    headers.setRawHeaders(name, values)
            url = upstream.rstrip("/").encode() + request.uri
            try:
                response = await agent.request(
                    request.method, url, headers, Body(body) if body else None
                )
                answer = await readBody(response)
            except Exception as e:
                if lost:
                    request.channel.transport.loseConnection()
                    return
                request.setResponseCode(502)
                request.setHeader(b"content-type", b"text/plain")
                request.write(f"faultproxy: upstream failed: {e}\n".encode())
                request.finish()
                return
            if lost or request.channel is None:
                if request.channel is not None:
                    request.channel.transport.loseConnection()
                return
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            request.setHeader(b"content-length", str(len(answer)).encode())
            request.write(answer)
            request.finish()

    return Proxy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fault-injecting EC2 proxy (tests only)")
    parser.add_argument("--upstream", required=True, help="loopback URL of the real server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--faults", default="", help="e.g. throttle:3,503:5,drop:7,lost:4")
    parser.add_argument("--log", required=True, help="file to append one line per request to")
    args = parser.parse_args(argv)
    host = urlsplit(args.upstream).hostname
    if host not in LOOPBACK:
        parser.error(f"upstream {args.upstream!r} is not on loopback")
    faults = parse_faults(args.faults)

    from twisted.internet import reactor as _reactor
    from twisted.web import server

    reactor: Any = _reactor
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    site = server.Site(_make_resource(reactor, args.upstream, faults, log))
    site.noisy = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    reactor.run()


@contextmanager
def fault_proxy(upstream_url: str, faults: str, log_path: str | None = None) -> Iterator[str]:
    """Run the proxy in a subprocess in front of ``upstream_url``; yield its
    URL; stop it by pid. ``log_path`` (default: a temp file, removed after)
    receives the per-request log; read it with ``read_log``."""
    parse_faults(faults)  # fail here, not in the child
    port = free_port()
    owned = log_path is None
    if log_path is None:
        fd, log_path = tempfile.mkstemp(prefix="faultproxy-", suffix=".log")
        os.close(fd)
    stderr = tempfile.TemporaryFile()
    cmd = [
        sys.executable,
        "-m",
        "tests.support.faultproxy",
        "--upstream",
        upstream_url,
        "--port",
        str(port),
        "--faults",
        faults,
        "--log",
        log_path,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stderr, stderr=stderr)
    try:
        try:
            wait_for_port(port, proc)
        except RuntimeError as e:
            stderr.seek(0)
            raise RuntimeError(f"{e}: {stderr.read().decode(errors='replace')[-2000:]}") from e
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop(proc)
        stderr.close()
        if owned:
            os.unlink(log_path)


if __name__ == "__main__":
    main()
