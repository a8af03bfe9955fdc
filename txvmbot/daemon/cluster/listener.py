"""LISTEN on the shared database's channels, in a thread of its own, and
hand each notification to the reactor.

The connection is outside the pool (LISTEN holds it for good). When it
breaks (the database restarted, the network went), the thread says so,
reconnects with backoff, and says so again: a notification sent while it
was away is lost, so the owner catches up on ``connected``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txvmbot.daemon.stores.postgres.db import Database

__all__ = ["Listener"]

#: Longest wait between two reconnects.
MAX_BACKOFF = 5.0


class Listener:
    """Calls ``on_notify(channel, payload)`` on the reactor thread for each
    notification on ``channels``, and ``on_state(connected: bool, why)`` when
    the LISTEN connection comes or goes."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        db: Database,
        channels: tuple[str, ...],
        on_notify: Callable[[str, str], object],
        on_state: Callable[[bool, str], object],
    ) -> None:
        self._reactor = reactor
        self._db = db
        self._channels = channels
        self._on_notify = on_notify
        self._on_state = on_state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done: Deferred[None] | None = None
        self._up = False

    def start(self) -> None:
        self._done = Deferred()
        self._thread = threading.Thread(target=self._run, name="txvmbot-listen", daemon=True)
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Stop listening; fires once the thread has ended (within a second)."""
        self._stop.set()
        if self._done is None:
            from twisted.internet.defer import succeed

            return succeed(None)
        return self._done

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        self._reactor.callFromThread(fn, *args)

    def _state(self, up: bool, why: str) -> None:
        """Tell the owner of a change between connected and not (once)."""
        if up != self._up:
            self._up = up
            self._call(self._on_state, up, why)

    def _run(self) -> None:
        backoff = 0.2
        try:
            while not self._stop.is_set():
                try:
                    conn = self._db.connect()
                except Exception as e:
                    self._state(False, _why(e))
                    self._stop.wait(backoff)
                    backoff = min(MAX_BACKOFF, backoff * 2)
                    continue
                backoff = 0.2
                try:
                    with conn:
                        for channel in self._channels:
                            conn.execute(f"LISTEN {channel}")
                        self._state(True, "")
                        while not self._stop.is_set():
                            for n in conn.notifies(timeout=0.5):
                                self._call(self._on_notify, n.channel, n.payload)
                                if self._stop.is_set():
                                    break
                except Exception as e:
                    if self._stop.is_set():
                        break
                    self._state(False, _why(e))
                    self._stop.wait(backoff)
        finally:
            done = self._done
            if done is not None:
                self._call(done.callback, None)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

