"""Unit tests for the SSH session's SFTP side, with no server: the local tree
walk of an upload, and ``Session.run`` and the small-file calls' bounds,
timeouts, cancelling and lost connections on the SSH doubles of
tests/support/ssh_doubles.py and a Clock.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.conch.ssh.common import NS
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.local_files import write
from tests.support.ssh_doubles import FakeConnection
from txvmbot.ssh import (
    Session,
    SSHCommandFailed,
    SSHCommandTimeout,
    SSHFileError,
    SSHFileTimeout,
    _sftp,
)
from txvmbot.ssh._protocol import CLOSE_GRACE, KILL_GRACE

# -- the local tree, without a server -------------------------------------------


def test_local_tree_walks_sorted_parents_first(tmp_path: Path) -> None:
    write(str(tmp_path / "b" / "c" / "deep"), b"d", 0o600)
    write(str(tmp_path / "a"), b"aa", 0o755)
    (tmp_path / "empty").mkdir(mode=0o750)
    os.chmod(tmp_path / "empty", 0o750)
    tree = _sftp.local_tree(str(tmp_path))
    assert tree.is_dir
    assert [(d.relative, d.mode) for d in tree.dirs][1:] == [
        ("b", 0o755),
        ("empty", 0o750),
        ("b/c", 0o755),
    ]
    assert [(f.relative, f.mode, f.size) for f in tree.files] == [
        ("a", 0o755, 2),
        ("b/c/deep", 0o600, 1),
    ]


def test_local_tree_single_file(tmp_path: Path) -> None:
    write(str(tmp_path / "f"), b"12345", 0o640)
    tree = _sftp.local_tree(str(tmp_path / "f"))
    assert not tree.is_dir and tree.dirs == ()
    [f] = tree.files
    assert (f.relative, f.source, f.mode, f.size) == ("", str(tmp_path / "f"), 0o640, 5)


def test_local_tree_follows_symlink_inside(tmp_path: Path) -> None:
    write(str(tmp_path / "real"), b"x", 0o600)
    os.symlink("real", tmp_path / "alias")
    tree = _sftp.local_tree(str(tmp_path))
    alias = {f.relative: f for f in tree.files}["alias"]
    assert alias.source == os.path.realpath(tmp_path / "real")
    assert alias.mode == 0o600


def _dir_and_link(directory: Path, link: Path) -> None:
    directory.mkdir()
    os.symlink(directory.name, link)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: os.symlink("/etc/hostname", p / "out"), "outside"),
        (lambda p: os.symlink("../..", p / "up"), "outside"),
        (lambda p: os.symlink("missing", p / "dangling"), "No such file or directory"),
        (lambda p: _dir_and_link(p / "sub", p / "dirlink"), "not a regular file"),
        (lambda p: os.mkfifo(p / "fifo"), "neither a regular file nor a directory"),
    ],
)
def test_local_tree_refuses(tmp_path: Path, make: Any, words: str) -> None:
    make(tmp_path)
    with pytest.raises(_sftp._Failed, match=words) as info:
        _sftp.local_tree(str(tmp_path))
    assert str(tmp_path) in info.value.reason


def test_local_tree_missing(tmp_path: Path) -> None:
    with pytest.raises(_sftp._Failed, match="No such file or directory"):
        _sftp.local_tree(str(tmp_path / "nope"))


# -- Session.run on doubles: public errors, waiting for a killed command -----------


def fake_session(endpoint: str) -> tuple[Session, FakeConnection, Clock]:
    """A Session over a fake connection, on a Clock."""
    clock = Clock()
    conn = FakeConnection()
    session = Session(
        conn.transport,  # type: ignore[arg-type]
        conn,  # type: ignore[arg-type]
        clock,
        endpoint=endpoint,
        user="root",
    )
    return session, conn, clock


class SessionRunUnitTests(SynchronousTestCase):
    endpoint = "tcp:host=127.0.0.1:port=2222"

    def session(self) -> tuple[Session, FakeConnection, Clock]:
        return fake_session(self.endpoint)

    def started(self, conn: FakeConnection, index: int = -1) -> Any:
        channel: Any = conn.opened[index]
        conn.channelsToRemoteChannel[channel] = len(conn.opened)
        channel.channelOpen(b"")
        conn.replies[-1].callback(None)
        return channel

    def test_timeout_is_public_and_waits_for_the_kill(self) -> None:
        session, conn, clock = self.session()
        d = session.run("echo started; sleep 60", 2.0)
        channel = self.started(conn)
        channel.dataReceived(b"started\n")
        clock.advance(2.0)
        e = self.failureResultOf(d, SSHCommandTimeout).value
        self.assertEqual(e.partial.stdout, b"started\n")
        self.assertIn(f"ssh to {self.endpoint} as root: command", str(e))
        self.assertIn((b"signal", NS(b"KILL"), False), conn.requests)
        self.assertEqual(conn.closes, [])  # the server closes it once the command died
        d2 = session.run("echo next", 5.0)
        self.assertEqual(len(conn.opened), 1)  # waits for the old channel
        channel.request_exit_signal(NS(b"KILL") + b"\x00" + NS(b"") + NS(b""))
        channel.closed()
        self.assertEqual(len(conn.opened), 2)
        second = self.started(conn)
        second.request_exit_status(struct.pack(">L", 0))
        second.closed()
        self.assertEqual(self.successResultOf(d2).exit_status, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_killed_command_closed_after_grace(self) -> None:
        session, conn, clock = self.session()
        d = session.run("sleep 60", 1.0)
        channel = self.started(conn)
        clock.advance(1.0)
        self.failureResultOf(d, SSHCommandTimeout)
        clock.advance(KILL_GRACE)
        self.assertEqual(conn.closes, [channel])
        # the server never confirms: the next command waits CLOSE_GRACE at most
        d2 = session.run("true", 5.0)
        self.assertEqual(len(conn.opened), 1)
        clock.advance(CLOSE_GRACE)
        self.assertEqual(len(conn.opened), 2)
        d2.cancel()
        self.failureResultOf(d2, CancelledError)

    def test_failure_is_public(self) -> None:
        session, conn, clock = self.session()
        d = session.run("x", 10)
        [opened] = conn.opened
        channel: Any = opened
        conn.channelsToRemoteChannel[channel] = 1
        channel.channelOpen(b"")
        conn.replies[0].errback(Exception("channel request failed"))
        channel.closed()
        e = self.failureResultOf(d, SSHCommandFailed).value
        self.assertNotIsInstance(e, SSHCommandTimeout)
        self.assertIn("refused by the server", str(e))
        self.assertIn(self.endpoint, str(e))
        self.assertFalse(session.lost)

    def test_lost(self) -> None:
        session, conn, clock = self.session()
        conn.transport.lost = True
        conn.transport.ended_because = "server disconnected: bye (code 11)"
        self.assertTrue(session.lost)
        self.assertEqual(session.lost_reason(), "server disconnected: bye (code 11)")
        e = self.failureResultOf(session.run("true", 5), SSHCommandFailed).value
        self.assertIn("could not start: server disconnected: bye", str(e))
        self.assertEqual(conn.opened, [])


class FileBoundUnitTests(SynchronousTestCase):
    """The bound of the small-file calls, on doubles and a Clock."""

    endpoint = "tcp:host=127.0.0.1:port=2222"

    def session(self) -> tuple[Session, FakeConnection, Clock]:
        return fake_session(self.endpoint)

    def test_timeout_names_the_path_and_the_bound(self) -> None:
        session, conn, clock = self.session()
        d = session.read_file("/tmp/ids.txt", 3.0, limit=100)
        [channel] = conn.opened  # the server never answers
        clock.advance(2.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        e = self.failureResultOf(d, SSHFileTimeout).value
        self.assertIsInstance(e, SSHFileError)
        self.assertEqual(
            (e.path, e.operation, e.bound, e.bytes_done), ("/tmp/ids.txt", "read", 3.0, 0)
        )
        self.assertEqual(
            str(e), f"ssh to {self.endpoint} as root: read '/tmp/ids.txt': did not finish within 3s"
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_waiting_for_a_closing_channel_is_within_the_bound(self) -> None:
        session, conn, clock = self.session()
        session.closing(Deferred())  # an abandoned channel that never closes
        d = session.write_file("/tmp/x", b"data", 1.0)
        self.assertEqual(conn.opened, [])
        clock.advance(1.0)
        e = self.failureResultOf(d, SSHFileTimeout).value
        self.assertEqual((e.operation, e.path, e.bound), ("write", "/tmp/x", 1.0))
        self.assertIn("did not finish within 1s after 0 of 4 bytes", str(e))
        clock.advance(CLOSE_GRACE)  # done waiting: it does not open a channel now
        self.assertEqual(conn.opened, [])

    def test_cancel(self) -> None:
        session, conn, clock = self.session()
        d = session.remove_file("/tmp/x", 5.0)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])
