"""What a remote process (``Session.start``) writes to stdout, kept and
waited on: an ``on_stdout`` for the tests of ``RemoteProcess``."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed

reactor: Any = _reactor


class Stdout:
    """An ``on_stdout`` that keeps the chunks, and can be waited on."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append(data)
        for item in list(self._waiting):
            expected, d = item
            if expected in self.data:
                self._waiting.remove(item)
                d.callback(None)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def until(self, expected: bytes, seconds: float = 10.0) -> Deferred[None]:
        """Fires once ``expected`` was seen; fails after ``seconds``."""
        if expected in self.data:
            return succeed(None)
        d: Deferred[None] = Deferred()
        item = (expected, d)
        self._waiting.append(item)

        def too_late() -> None:
            if item in self._waiting:
                self._waiting.remove(item)
                d.errback(
                    AssertionError(f"{expected!r} not seen within {seconds}s; saw {self.data!r}")
                )

        timer = reactor.callLater(seconds, too_late)
        d.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return d
