"""Doubles of the SSH transport and connection an ``_ExecChannel`` (and a
``Session``) talks to, for driving channels without a network."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from txvmbot.ssh import generate_key


class FakeTransport:
    def __init__(self) -> None:
        self.lost = False
        self.ended_because: str | None = None
        self.host_key = generate_key().public()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class FakeConnection:
    """What an _ExecChannel uses of an SSHConnection."""

    def __init__(self) -> None:
        self.transport = FakeTransport()
        self.opened: list[object] = []
        self.requests: list[tuple[bytes, bytes, bool]] = []
        self.replies: list[Deferred[None]] = []
        self.eofs: list[object] = []
        self.closes: list[object] = []
        self.channelsToRemoteChannel: dict[object, int] = {}

    def openChannel(self, channel: object) -> None:
        self.opened.append(channel)

    def sendRequest(
        self, channel: object, kind: bytes, data: bytes, wantReply: bool = False
    ) -> Deferred[None] | None:
        self.requests.append((kind, data, wantReply))
        if wantReply:
            d: Deferred[None] = Deferred()
            self.replies.append(d)
            return d
        return None

    def sendEOF(self, channel: object) -> None:
        self.eofs.append(channel)

    def sendClose(self, channel: object) -> None:
        self.closes.append(channel)
        channel.localClosed = True  # type: ignore[attr-defined]
