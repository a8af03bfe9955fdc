"""Unit tests for the QMP client against the fake QMP server of
tests/support/qmp_doubles.py, over iosim and StringTransport: negotiation,
commands and their answers, events, connection loss and cancelling, and
``connect_qmp``'s retries on a MemoryReactorClock."""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.qmp_doubles import GREETING, session
from txvmbot.errors import TxvmbotError
from txvmbot.qemu.qmp import (
    QMPConnectionLost,
    QMPError,
    QMPEvent,
    QMPProtocol,
    QMPTimeout,
    connect_qmp,
)


class QMPProtocolTests(SynchronousTestCase):
    def test_greeting_and_negotiation(self) -> None:
        server, client, pump = session()
        greeting = self.successResultOf(client.when_greeted())
        self.assertEqual(greeting["version"]["qemu"]["major"], 7)
        d = client.negotiate()
        pump.flush()
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(server.received[0]["execute"], "qmp_capabilities")

    def test_execute_returns_the_return_value(self) -> None:
        server, client, pump = session()
        d = client.execute("query-status")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"status": "running", "running": True})

    def test_arguments_are_sent(self) -> None:
        server, client, pump = session()
        d = client.execute("migrate", {"uri": "exec:cat > /x"})
        pump.flush()
        self.failureResultOf(d, QMPError)
        self.assertEqual(server.received[-1]["arguments"], {"uri": "exec:cat > /x"})
        self.assertTrue(server.received[-1]["id"].startswith("txvmbot-"))

    def test_error_is_a_qmp_error(self) -> None:
        server, client, pump = session()
        d = client.execute("boom")
        pump.flush()
        e = self.failureResultOf(d, QMPError).value
        self.assertIsInstance(e, TxvmbotError)
        self.assertEqual(
            (e.command, e.error_class, e.desc), ("boom", "GenericError", "it went boom")
        )
        self.assertIn("boom: GenericError: it went boom", str(e))

    def test_answers_are_matched_by_id(self) -> None:
        server, client, pump = session()
        server.handlers["slow"] = lambda a: None
        server.handlers["fast"] = lambda a: None
        slow = client.execute("slow")
        fast = client.execute("fast")
        pump.flush()
        first, second = server.held
        # Answer in reverse order: each still reaches its own Deferred.
        server.send({"return": {"who": "fast"}, "id": second["id"]})
        server.send({"return": {"who": "slow"}, "id": first["id"]})
        pump.flush()
        self.assertEqual(self.successResultOf(slow), {"who": "slow"})
        self.assertEqual(self.successResultOf(fast), {"who": "fast"})

    def test_answer_without_id_goes_to_the_oldest(self) -> None:
        server, client, pump = session()
        server.handlers["x"] = lambda a: None
        d = client.execute("x")
        pump.flush()
        server.send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
        pump.flush()
        self.assertEqual(self.failureResultOf(d, QMPError).value.desc, "JSON parse error")

    def test_events_reach_listeners(self) -> None:
        server, client, pump = session()
        seen: list[QMPEvent] = []
        client.add_event_listener(seen.append)
        server.event("STOP")
        server.event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        pump.flush()
        self.assertEqual([e.name for e in seen], ["STOP", "SHUTDOWN"])
        self.assertEqual(seen[1].data["reason"], "guest-shutdown")
        self.assertEqual(seen[0].timestamp, 10.5)
        client.remove_event_listener(seen.append)
        server.event("RESUME")
        pump.flush()
        self.assertEqual(len(seen), 2)

    def test_a_failing_listener_does_not_stop_others(self) -> None:
        server, client, pump = session()
        seen: list[str] = []

        def bad(e: QMPEvent) -> None:
            raise RuntimeError("listener bug")

        client.add_event_listener(bad)
        client.add_event_listener(lambda e: seen.append(e.name))
        server.event("POWERDOWN")
        pump.flush()
        self.assertEqual(seen, ["POWERDOWN"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_wait_event_with_predicate(self) -> None:
        server, client, pump = session()
        d = client.wait_event("MIGRATION", lambda e: e.data.get("status") == "completed")
        server.event("MIGRATION", {"status": "active"})
        pump.flush()
        self.assertNoResult(d)
        server.event("MIGRATION", {"status": "completed"})
        pump.flush()
        self.assertEqual(self.successResultOf(d).data, {"status": "completed"})

    def test_wait_event_fails_on_connection_loss_and_cancels(self) -> None:
        server, client, pump = session()
        d1 = client.wait_event("SHUTDOWN")
        d2 = client.wait_event("RESUME")
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        assert server.transport is not None
        server.transport.loseConnection()
        pump.flush()
        self.assertIn("wait for SHUTDOWN", str(self.failureResultOf(d1, QMPConnectionLost).value))

    def test_connection_loss_fails_pending_commands(self) -> None:
        server, client, pump = session()
        server.handlers["hang"] = lambda a: None
        d = client.execute("hang")
        pump.flush()
        assert server.transport is not None
        server.transport.loseConnection()
        pump.flush()
        e = self.failureResultOf(d, QMPConnectionLost).value
        self.assertIn("QMP hang: connection lost before an answer", str(e))
        self.assertIsNotNone(client.lost)
        later = client.execute("query-status")
        self.failureResultOf(later, QMPConnectionLost)
        self.successResultOf(client.when_closed())

    def test_cancelled_command_drops_its_answer(self) -> None:
        server, client, pump = session()
        server.handlers["hang"] = lambda a: None
        d = client.execute("hang")
        pump.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        server.send({"return": {}, "id": server.held[0]["id"]})
        d2 = client.execute("query-status")
        pump.flush()
        self.assertEqual(self.successResultOf(d2)["status"], "running")
        self.assertIsNone(client.lost)

    def test_garbage_closes_the_connection(self) -> None:
        transport = StringTransport()
        client = QMPProtocol()
        client.makeConnection(transport)
        client.dataReceived(json.dumps(GREETING).encode() + b"\r\n")
        d = client.execute("query-status")
        client.dataReceived(b"this is not json\r\n")
        self.assertTrue(transport.disconnecting)
        client.connectionLost(Failure(ConnectionError("gone")))
        e = self.failureResultOf(d, QMPConnectionLost).value
        self.assertIn("protocol error: not JSON", str(e))
        self.flushLoggedErrors()

    def test_wire_format(self) -> None:
        transport = StringTransport()
        client = QMPProtocol()
        client.makeConnection(transport)
        client.execute("query-status")
        line = transport.value()
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(json.loads(line), {"execute": "query-status", "id": "txvmbot-1"})


class ConnectQMPTests(SynchronousTestCase):
    def test_retries_until_bound(self) -> None:
        clock = MemoryReactorClock()
        d = connect_qmp(clock, "/tmp/nowhere/qmp.sock", bound=1.0, clock=clock, retry_delay=0.25)
        for _ in range(10):
            if not clock.unixClients or d.called:
                break
            _, factory, _, _ = clock.unixClients.pop()
            factory.clientConnectionFailed(None, Failure(FileNotFoundError(2, "No such file")))
            clock.advance(0.25)
        e = self.failureResultOf(d, QMPTimeout).value
        self.assertIn("/tmp/nowhere/qmp.sock", str(e))
        self.assertIn("no socket yet", str(e))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stops_when_not_worth_trying(self) -> None:
        clock = MemoryReactorClock()
        why: list[str | None] = [None]
        d = connect_qmp(
            clock, "/tmp/x.sock", bound=10, clock=clock, still_worth_trying=lambda: why[0]
        )
        _, factory, _, _ = clock.unixClients.pop()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        why[0] = "QEMU ended: exit status 1"
        clock.advance(0.05)
        self.assertIn("exit status 1", str(self.failureResultOf(d, QMPConnectionLost).value))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connects_greets_and_negotiates(self) -> None:
        clock = MemoryReactorClock()
        d = connect_qmp(clock, "/tmp/x.sock", bound=10, clock=clock)
        _, factory, _, _ = clock.unixClients.pop()
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(json.dumps(GREETING).encode() + b"\r\n")
        self.assertEqual(json.loads(transport.value())["execute"], "qmp_capabilities")
        proto.dataReceived(b'{"return": {}, "id": "txvmbot-1"}\r\n')
        self.assertIsInstance(self.successResultOf(d), QMPProtocol)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        clock = MemoryReactorClock()
        d = connect_qmp(clock, "/tmp/x.sock", bound=10, clock=clock)
        _, factory, _, _ = clock.unixClients.pop()
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
