"""TLS with client certificates, on a real reactor and 127.0.0.1: only
clients with a certificate from the daemon's CA are served, and clients
check the daemon's name. Certificates are made here with ``cryptography``."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fakes import FakeScheduler
from tests.support.pki import make_pki
from txvmbot.daemon.api.client import ClientTLS, _ClientAMP, connect
from txvmbot.daemon.api.protocol import API_VERSION, Hello
from txvmbot.daemon.api.server import AMPServerFactory
from txvmbot.daemon.api.tls import check_listen, listen_endpoint, tls_server_endpoint
from txvmbot.daemon.settings import TLSFiles
from txvmbot.errors import ConfigError, DaemonUnavailable

reactor: Any = _reactor


class CountingScheduler(FakeScheduler):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def status(self) -> Any:
        self.calls += 1
        return super().status()


class TLSListenerTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pki = make_pki(self.dir)
        self.sched = CountingScheduler()
        tls = TLSFiles(ca=self.pki["ca"], cert=self.pki["server"], key=self.pki["server.key"])
        ep = tls_server_endpoint(reactor, "ssl:0:interface=127.0.0.1", tls)
        d = ep.listen(AMPServerFactory(self.sched))

        def listening(port: Any) -> None:
            self.port = port
            self.addCleanup(port.stopListening)
            self.where = f"tcp:host=127.0.0.1:port={port.getHost().port}"

        return d.addCallback(listening)

    def tls(self, who: str = "client", **kw: Any) -> ClientTLS:
        return ClientTLS(ca=self.pki["ca"], cert=self.pki[who], key=self.pki[f"{who}.key"], **kw)

    async def test_client_with_the_right_certificate_is_served(self) -> None:
        for name in (None, "localhost"):
            client = await connect(reactor, self.where, tls=self.tls(server_name=name))
            status = await client.status()
            self.assertEqual(status.workers, 2)
            self.assertEqual(client.api_version, API_VERSION)
            await client.close()
        self.assertEqual(self.sched.calls, 2)

    async def test_certificate_from_another_ca_is_refused(self) -> None:
        with self.assertRaises(DaemonUnavailable) as cm:
            await connect(reactor, self.where, tls=self.tls("intruder"))
        self.assertIn(self.where, str(cm.exception))
        self.assertEqual(self.sched.calls, 0)

    async def test_client_checks_the_server_name(self) -> None:
        with self.assertRaises(DaemonUnavailable) as cm:
            await connect(reactor, self.where, tls=self.tls(server_name="daemon.example.com"))
        self.assertIn("TLS", str(cm.exception))

    async def test_tls_client_without_a_certificate_is_refused(self) -> None:
        ca = Certificate.loadPEM(open(self.pki["ca"], "rb").read())
        options = optionsForClientTLS("127.0.0.1", trustRoot=ca)
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        proto = _ClientAMP()
        await connectProtocol(wrapClientTLS(options, tcp), proto)
        answered: list[Any] = []
        hello = proto.callRemote(Hello, api_version=1, client="anonymous")
        hello.addBoth(answered.append)
        await proto.lost
        self.assertEqual(len(answered), 1)
        self.assertNotIsInstance(answered[0], dict)  # no answer: the handshake failed
        self.assertEqual(self.sched.calls, 0)

    async def test_plain_tcp_client_is_refused(self) -> None:
        got: list[bytes] = []
        closed: Deferred[None] = Deferred()

        class Raw(Protocol):
            def connectionMade(self) -> None:
                # An AMP Status box in the clear.
                self.transport.write(  # type: ignore[union-attr]
                    b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x06Status\x00\x00"
                )

            def dataReceived(self, data: bytes) -> None:
                got.append(data)

            def connectionLost(self, reason: Any = None) -> None:
                closed.callback(None)

        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await connectProtocol(tcp, Raw())
        await closed
        self.assertNotIn(b"_answer", b"".join(got))
        self.assertEqual(self.sched.calls, 0)

    async def test_client_refuses_plain_tcp_without_tls(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            await connect(reactor, self.where)
        self.assertIn("[tls]", str(cm.exception))


class ListenRulesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-tls-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pki = make_pki(self.dir)
        self.files = TLSFiles(self.pki["ca"], self.pki["server"], self.pki["server.key"])

    def test_plain_tcp_is_refused(self) -> None:
        for s in ("tcp:8443", "tcp6:8443:interface=\\:\\:1", "tcp:port=1:interface=0.0.0.0"):
            e = self.assertRaises(ConfigError, check_listen, s, True)
            self.assertIn("unauthenticated", str(e))
            self.assertRaises(ConfigError, tls_server_endpoint, reactor, s, self.files)
            self.assertRaises(ConfigError, listen_endpoint, reactor, s, self.files)

    def test_ssl_needs_tls_files(self) -> None:
        e = self.assertRaises(ConfigError, listen_endpoint, reactor, "ssl:8443", None)
        self.assertIn("[daemon.tls]", str(e))

    def test_ssl_string_cannot_bring_its_own_certificates(self) -> None:
        e = self.assertRaises(
            ConfigError, tls_server_endpoint, reactor, "ssl:8443:privateKey=k.pem", self.files
        )
        self.assertIn("privateKey", str(e))

    def test_other_kinds_are_refused(self) -> None:
        self.assertRaises(ConfigError, check_listen, "systemd:domain=INET:index=0", True)

    def test_unix_is_fine(self) -> None:
        self.assertEqual(
            check_listen("unix:/tmp/x.sock:mode=600", False), "unix:/tmp/x.sock:mode=600"
        )

    def test_mismatched_key_is_a_config_error(self) -> None:
        bad = TLSFiles(self.pki["ca"], self.pki["server"], self.pki["client.key"])
        e = self.assertRaises(ConfigError, tls_server_endpoint, reactor, "ssl:0", bad)
        self.assertEqual(e.where, "daemon.tls.key")

    def test_missing_file_is_a_config_error(self) -> None:
        bad = TLSFiles(
            os.path.join(self.dir, "nope.pem"), self.pki["server"], self.pki["server.key"]
        )
        e = self.assertRaises(ConfigError, tls_server_endpoint, reactor, "ssl:0", bad)
        self.assertEqual(e.where, "daemon.tls.ca")
        self.assertIn("nope.pem", str(e))
