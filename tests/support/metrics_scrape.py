"""Reading the daemon's Prometheus page in tests: ``scrape`` GETs /metrics
through a real twisted.web Site over a StringTransport and parses it with
prometheus_client's parser into ``Samples``; ``value`` and ``with_name``
read them."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from txvmbot.daemon.web.metrics import DaemonMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a /metrics page: (name, labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def with_name(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def scrape(metrics: DaemonMetrics) -> Samples:
    """GET /metrics through a real twisted.web Site over a StringTransport."""
    root = Resource()
    root.putChild(b"metrics", metrics.resource())
    protocol = Site(root).buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"content-type: " + CONTENT_TYPE_LATEST.encode() in head.lower(), head
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    protocol.connectionLost(Failure(Exception("done")))
    return parse(body.decode("utf-8"))


def dechunk(data: bytes) -> bytes:
    out = b""
    for _ in range(10_000):
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]
    raise AssertionError("too many chunks")
