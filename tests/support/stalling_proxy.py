"""A TCP proxy (twisted.protocols.portforward) that forwards what the
client sends until a byte budget is spent, then holds the rest: a
connection that stalls mid-transfer, for the SFTP upload tests."""

from __future__ import annotations

from twisted.protocols.portforward import ProxyFactory, ProxyServer


class StallingProxy(ProxyServer):
    """Forwards what the client sends until the factory's budget is spent,
    then holds the rest."""

    def dataReceived(self, data: bytes) -> None:
        factory: StallingProxyFactory = self.factory  # type: ignore[assignment]
        room = max(factory.stall_after - factory.forwarded, 0)
        factory.forwarded += min(len(data), room)
        if room:
            ProxyServer.dataReceived(self, data[:room])


class StallingProxyFactory(ProxyFactory):
    protocol = StallingProxy

    def __init__(self, host: str, port: int, stall_after: int) -> None:
        ProxyFactory.__init__(self, host, port)
        self.stall_after = stall_after
        self.forwarded = 0
