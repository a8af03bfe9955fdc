"""Integration tests for ``open_session``, ``Session.run``, ``Session.upload``
and the small-file calls ``write_file``, ``read_file``, ``remove_file``
(SFTP) against a real OpenSSH sshd on 127.0.0.1 (tests/support/sshd.py,
one per test, stopped by its pid): the sshd side's filesystem is this
machine's, so what arrived is checked with ``os``. One test boots the local
test VM (busybox + dropbear + OpenSSH's sftp-server) under QEMU and uploads
to it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support.deferreds import failed
from tests.support.local_files import write
from tests.support.processes import child_pids, kill_pids, kill_qemu_pid
from tests.support.sshd import SSHD, sshd_server
from tests.support.stalling_proxy import StallingProxyFactory
from txvmbot.ssh import (
    Session,
    SSHCommandFailed,
    SSHCommandTimeout,
    SSHFileError,
    SSHFileMissing,
    SSHFileTimeout,
    SSHFileTooLarge,
    SSHUploadError,
    SSHUploadTimeout,
    UploadResult,
    _sftp,
    generate_key,
    load_private_key,
    open_session,
    public_openssh,
)

reactor: Any = _reactor


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def listing(root: str) -> dict[str, tuple[str, int, bytes]]:
    """Every path below ``root``: kind, permission bits, file content."""
    seen: dict[str, tuple[str, int, bytes]] = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(here, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISDIR(st.st_mode):
                seen[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            elif stat.S_ISLNK(st.st_mode):
                seen[rel] = ("link", 0, os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    seen[rel] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return seen


# -- against a real sshd ----------------------------------------------------------


class SFTPTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.key = generate_key()
        self.stack = ExitStack()
        self.addCleanup(self.stack.close)
        self.sshd: SSHD = self.stack.enter_context(sshd_server([public_openssh(self.key)]))
        self.local = tempfile.mkdtemp(prefix="txvmbot-sftp-local-")
        self.remote = tempfile.mkdtemp(prefix="txvmbot-sftp-remote-")
        self.addCleanup(shutil.rmtree, self.local, True)
        self.addCleanup(shutil.rmtree, self.remote, True)

    async def session(self, endpoint: str | None = None) -> Session:
        session = await open_session(
            reactor,
            endpoint or self.sshd.endpoint,
            self.sshd.user,
            self.key,
            connect_timeout=10,
        )
        self.addCleanup(session.abort)
        return session

    def when_bytes_pass(self, limit: int, action: Any) -> None:
        """Call ``action()`` once, when the server has acknowledged more than
        ``limit`` bytes of an upload: mid-upload, whatever the speed."""
        acked = _sftp._Upload._acked
        done: list[bool] = []

        def watching(upload: Any, ignored: object, progress: list[int], size: int) -> None:
            acked(upload, ignored, progress, size)
            if upload._bytes > limit and not done:
                done.append(True)
                action()

        self.patch(_sftp._Upload, "_acked", watching)

    def tree(self) -> str:
        """A source tree: nested directories, modes, an in-tree symlink."""
        src = os.path.join(self.local, "tree")
        write(os.path.join(src, "top.txt"), b"top\n", 0o664)
        write(os.path.join(src, "bin", "run"), b"#!/bin/sh\necho hi\n", 0o755)
        write(os.path.join(src, "a", "b", "c", "deep"), b"deep\n" * 1000, 0o600)
        write(os.path.join(src, "ro", "inside"), b"in a read-only dir\n", 0o444)
        os.makedirs(os.path.join(src, "empty"))
        os.chmod(os.path.join(src, "empty"), 0o750)
        os.chmod(os.path.join(src, "a", "b"), 0o700)
        os.symlink("../top.txt", os.path.join(src, "bin", "top-link"))
        os.chmod(os.path.join(src, "ro"), 0o555)
        self.addCleanup(os.chmod, os.path.join(src, "ro"), 0o755)
        return src


class UploadTests(SFTPTestCase):
    async def test_single_file(self) -> None:
        src = os.path.join(self.local, "one")
        write(src, b"hello\n", 0o664)  # the server's umask (022) would drop g+w
        dest = os.path.join(self.remote, "renamed")
        session = await self.session()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        result = await session.upload(src, dest, bound=20)
        # conch logs every SFTP packet at info level: not passed on
        self.assertEqual([e for e in events if "dispatching" in e.get("log_format", "")], [])
        self.assertTrue([e for e in events if "uploaded" in e.get("log_format", "")])
        self.assertEqual(listing(self.remote), {"renamed": ("file", 0o664, b"hello\n")})
        self.assertEqual((result.files, result.directories, result.bytes), (1, 0, 6))
        self.assertIsInstance(result, UploadResult)
        self.assertTrue(0 <= result.seconds < 20)
        self.assertIn("Starting session: subsystem 'sftp'", self.sshd.log())

    async def test_overwrites_a_file(self) -> None:
        src = os.path.join(self.local, "one")
        write(src, b"new", 0o600)
        dest = os.path.join(self.remote, "old")
        write(dest, b"old content, longer", 0o644)
        session = await self.session()
        await session.upload(src, dest, bound=20)
        self.assertEqual(listing(self.remote), {"old": ("file", 0o600, b"new")})

    async def test_tree(self) -> None:
        src = self.tree()
        dest = os.path.join(self.remote, "copy")
        session = await self.session()
        result = await session.upload(src, dest, bound=20)
        expected = listing(src)
        # the symlink arrives as the file it points to
        expected["bin/top-link"] = expected["top.txt"]
        self.assertEqual(listing(dest), expected)
        self.assertEqual(expected["ro"], ("dir", 0o555, b""))
        self.assertEqual(expected["a/b"], ("dir", 0o700, b""))
        self.assertEqual((result.files, result.directories), (5, 7))
        self.assertEqual(result.bytes, sum(len(v[2]) for v in expected.values()))
        os.chmod(os.path.join(dest, "ro"), 0o755)

    async def test_into_existing_directory(self) -> None:
        src = self.tree()
        single = os.path.join(self.local, "single.txt")
        write(single, b"s", 0o640)
        os.chmod(self.remote, 0o711)
        session = await self.session()
        await session.upload(src, self.remote, bound=20)
        await session.upload(single, self.remote, bound=20)
        self.assertEqual(sorted(os.listdir(self.remote)), ["single.txt", "tree"])
        self.assertEqual(
            listing(os.path.join(self.remote, "tree"))["a/b/c/deep"][2], b"deep\n" * 1000
        )
        self.assertEqual(listing(self.remote)["single.txt"], ("file", 0o640, b"s"))
        # an existing directory keeps its own mode
        self.assertEqual(stat.S_IMODE(os.stat(self.remote).st_mode), 0o711)
        # again: the existing tree is reused and its files overwritten
        write(os.path.join(src, "top.txt"), b"changed\n", 0o664)
        result = await session.upload(src, self.remote, bound=20)
        self.assertEqual(result.files, 5)
        with open(os.path.join(self.remote, "tree", "top.txt"), "rb") as f:
            self.assertEqual(f.read(), b"changed\n")
        os.chmod(os.path.join(self.remote, "tree", "ro"), 0o755)

    async def test_large_file_is_pipelined(self) -> None:
        src = os.path.join(self.local, "big")
        write(src, os.urandom(8 * 1024 * 1024 + 123), 0o644)
        in_flight: list[int] = []
        send = _sftp._Client._sendRequest

        def counting(client: Any, msg: int, data: bytes) -> Deferred[Any]:
            d = send(client, msg, data)
            in_flight.append(len(client.openRequests))
            return d

        self.patch(_sftp._Client, "_sendRequest", counting)
        session = await self.session()
        t0 = time.monotonic()
        result = await session.upload(src, os.path.join(self.remote, "big"), bound=60)
        took = time.monotonic() - t0
        self.assertEqual(sha256(os.path.join(self.remote, "big")), sha256(src))
        self.assertEqual(result.bytes, 8 * 1024 * 1024 + 123)
        self.assertGreaterEqual(max(in_flight), _sftp.WRITES_IN_FLIGHT)
        print(f"\n8 MiB over sftp in {took:.2f}s")

    async def test_missing_local_path(self) -> None:
        session = await self.session()
        src = os.path.join(self.local, "nope")
        e = await failed(session.upload(src, self.remote, bound=10), SSHUploadError)
        self.assertEqual(e.local_path, src)
        self.assertEqual(e.remote_path, self.remote)
        self.assertIn(f"upload {src!r} to {self.remote!r}", str(e))
        self.assertIn("No such file or directory", str(e))
        self.assertIn(self.sshd.endpoint, str(e))
        self.assertFalse(e.lost)
        self.assertNotIn("Starting session: subsystem", self.sshd.log())

    async def test_symlink_outside_refused(self) -> None:
        src = self.tree()
        os.symlink("/etc/hostname", os.path.join(src, "escape"))
        session = await self.session()
        e = await failed(session.upload(src, self.remote, bound=10), SSHUploadError)
        self.assertIn("escape", str(e))
        self.assertIn("outside", str(e))
        self.assertEqual(os.listdir(self.remote), [])

    async def test_remote_directory_cannot_be_made(self) -> None:
        src = self.tree()
        dest = os.path.join(self.remote, "no-such-parent", "copy")
        session = await self.session()
        e = await failed(session.upload(src, dest, bound=10), SSHUploadError)
        self.assertIn(f"mkdir {dest}: the server said 'No such file' (SFTP status 2)", str(e))
        self.assertFalse(e.lost)
        # the session is still good
        self.assertEqual((await session.run("echo ok", 10)).stdout, b"ok\n")

    async def test_remote_permission_denied(self) -> None:
        src = self.tree()
        # /sys refuses new entries even to root
        e = await failed(
            (await self.session()).upload(src, "/sys/txvmbot-x", bound=10), SSHUploadError
        )
        self.assertIn("mkdir /sys/txvmbot-x: the server said", str(e))
        self.assertIn("Permission denied", str(e))

    async def test_remote_file_cannot_be_written(self) -> None:
        src = os.path.join(self.local, "one")
        write(src, b"x")
        dest = os.path.join(self.remote, "missing-dir", "one")
        session = await self.session()
        e = await failed(session.upload(src, dest, bound=10), SSHUploadError)
        self.assertIn(f"open {dest} for writing: the server said 'No such file'", str(e))

    async def test_directory_onto_a_file(self) -> None:
        src = self.tree()
        dest = os.path.join(self.remote, "a-file")
        write(dest, b"x")
        session = await self.session()
        e = await failed(session.upload(src, dest, bound=10), SSHUploadError)
        self.assertIn(f"mkdir {dest}: it exists and is not a directory", str(e))

    async def test_bound_too_short(self) -> None:
        # A proxy that forwards the first 1 MiB the client sends, then holds
        # everything: the upload cannot finish, deterministically.
        factory = StallingProxyFactory("127.0.0.1", self.sshd.port, stall_after=1 << 20)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        session = await self.session(f"tcp:host=127.0.0.1:port={port.getHost().port}")
        src = os.path.join(self.local, "big")
        write(src, os.urandom(4 * 1024 * 1024))
        t0 = time.monotonic()
        e = await failed(
            session.upload(src, os.path.join(self.remote, "big"), bound=1.5), SSHUploadTimeout
        )
        self.assertTrue(1.4 < time.monotonic() - t0 < 5)
        self.assertEqual(e.bound, 1.5)
        self.assertTrue(0 < e.bytes_done < 1 << 20, e.bytes_done)
        [(name, done, size)] = e.in_progress
        self.assertEqual((name, size), ("big", 4 * 1024 * 1024))
        self.assertEqual(done, e.bytes_done)
        self.assertIn("did not finish within 1.5s after", str(e))
        self.assertIn(f"was writing big: {done} of {size} bytes", str(e))
        self.assertIn(repr(src), str(e))

    async def test_cancel(self) -> None:
        src = os.path.join(self.local, "big")
        write(src, os.urandom(16 * 1024 * 1024))
        session = await self.session()
        d = session.upload(src, os.path.join(self.remote, "big"), bound=60)
        self.when_bytes_pass(1 << 20, d.cancel)
        await failed(d, CancelledError)
        self.assertLess(os.path.getsize(os.path.join(self.remote, "big")), 16 * 1024 * 1024)
        # the session outlives the cancelled upload
        self.assertFalse(session.lost)
        self.assertEqual((await session.run("echo still here", 10)).stdout, b"still here\n")

    async def test_no_sftp_subsystem(self) -> None:
        with sshd_server([public_openssh(self.key)], sftp=False) as sshd:
            session = await self.session(sshd.endpoint)
            src = os.path.join(self.local, "one")
            write(src, b"x")
            e = await failed(session.upload(src, self.remote, bound=10), SSHUploadError)
            self.assertIn("the server refused the sftp subsystem", str(e))
            self.assertFalse(e.lost)
            f = await failed(session.write_file(src, b"x", 10), SSHFileError)
            self.assertIn(f"write {src!r}: the server refused the sftp subsystem", str(f))
            await session.close()


class FileTests(SFTPTestCase):
    """``write_file``, ``read_file`` and ``remove_file``."""

    async def test_write_then_read_back(self) -> None:
        path = os.path.join(self.remote, "ids.bin")
        data = os.urandom(200 * 1024 + 5)  # several 32 KiB writes and reads
        session = await self.session()
        self.assertIsNone(await session.write_file(path, data, 20))
        self.assertEqual(listing(self.remote), {"ids.bin": ("file", 0o600, data)})
        self.assertEqual(await session.read_file(path, 20, limit=len(data)), data)
        self.assertTrue(os.path.exists(path))  # read without remove: kept
        # truncates a longer file, and sets the mode whatever the umask (022)
        await session.write_file(path, b"short\x00\xff", 20, mode=0o664)
        self.assertEqual(listing(self.remote), {"ids.bin": ("file", 0o664, b"short\x00\xff")})
        self.assertEqual(await session.read_file(path, 20, limit=8), b"short\x00\xff")
        await session.write_file(path, b"", 20)
        self.assertEqual(await session.read_file(path, 20, limit=0), b"")
        self.assertEqual(listing(self.remote), {"ids.bin": ("file", 0o600, b"")})
        # all over one connection, one sftp channel each
        self.assertEqual(self.sshd.log().count("Accepted publickey"), 1)
        self.assertEqual(self.sshd.log().count("subsystem 'sftp'"), 6)

    async def test_read_and_remove(self) -> None:
        path = os.path.join(self.remote, "report.xml")
        data = os.urandom(70 * 1024)
        write(path, data)
        session = await self.session()
        self.assertEqual(await session.read_file(path, 20, limit=1 << 20, remove=True), data)
        self.assertFalse(os.path.exists(path))

    async def test_read_missing(self) -> None:
        path = os.path.join(self.remote, "nope")
        session = await self.session()
        e = await failed(session.read_file(path, 10, limit=100), SSHFileMissing)
        self.assertIsInstance(e, SSHFileError)
        self.assertEqual((e.path, e.operation, e.lost), (path, "read", False))
        self.assertEqual(
            str(e),
            f"ssh to {self.sshd.endpoint} as {self.sshd.user}: read {path!r}: "
            "open for reading: the server said 'No such file' (SFTP status 2)",
        )
        e = await failed(session.read_file(path, 10, limit=100, remove=True), SSHFileMissing)
        self.assertEqual(e.path, path)

    async def test_read_too_large(self) -> None:
        path = os.path.join(self.remote, "big")
        write(path, b"x" * 1000)
        session = await self.session()
        e = await failed(session.read_file(path, 10, limit=999), SSHFileTooLarge)
        self.assertIsInstance(e, SSHFileError)
        self.assertEqual((e.path, e.size, e.limit, e.removed), (path, 1000, 999, False))
        self.assertIn(f"read {path!r}: the file is 1000 bytes, over the limit of 999 bytes", str(e))
        self.assertTrue(os.path.exists(path))
        e = await failed(session.read_file(path, 10, limit=999, remove=True), SSHFileTooLarge)
        self.assertEqual((e.size, e.limit, e.removed), (1000, 999, True))
        self.assertIn("over the limit of 999 bytes (removed)", str(e))
        self.assertFalse(os.path.exists(path))
        # the session is still good
        self.assertEqual((await session.run("echo ok", 10)).stdout, b"ok\n")

    async def test_read_past_the_stated_size_and_removal_refused(self) -> None:
        # /proc files say they are 0 bytes long, and cannot be removed
        with open("/proc/version", "rb") as f:
            expected = f.read()
        session = await self.session()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        data = await session.read_file("/proc/version", 10, limit=1 << 16, remove=True)
        self.assertEqual(data, expected)
        [warning] = [e for e in events if "could not remove" in e.get("log_format", "")]
        self.assertEqual(warning["path"], "/proc/version")
        self.assertIn("remove: the server said", warning["why"])
        e = await failed(session.read_file("/proc/version", 10, limit=10), SSHFileTooLarge)
        self.assertGreater(e.size, 10)

    async def test_read_a_directory(self) -> None:
        session = await self.session()
        e = await failed(session.read_file(self.remote, 10, limit=100), SSHFileError)
        self.assertNotIsInstance(e, SSHFileMissing)
        self.assertIn(f"read {self.remote!r}: not a regular file", str(e))

    async def test_write_into_missing_directory(self) -> None:
        parent = os.path.join(self.remote, "missing-dir")
        path = os.path.join(parent, "ids")
        session = await self.session()
        e = await failed(session.write_file(path, b"data", 10), SSHFileError)
        self.assertNotIsInstance(e, SSHFileMissing)
        self.assertEqual((e.path, e.operation, e.lost), (path, "write", False))
        self.assertIn(
            f"write {path!r}: open for writing: the server said 'No such file' (SFTP status 2); "
            f"is there a directory {parent!r}?",
            str(e),
        )
        self.assertEqual(os.listdir(self.remote), [])
        self.assertEqual((await session.run("echo ok", 10)).stdout, b"ok\n")

    async def test_write_permission_denied(self) -> None:
        session = await self.session()
        e = await failed(session.write_file("/sys/txvmbot-x", b"x", 10), SSHFileError)
        self.assertIn("write '/sys/txvmbot-x': open for writing: the server said", str(e))
        self.assertIn("Permission denied", str(e))

    async def test_remove(self) -> None:
        path = os.path.join(self.remote, "gone")
        write(path, b"x")
        session = await self.session()
        self.assertIsNone(await session.remove_file(path, 10))
        self.assertFalse(os.path.exists(path))
        # already missing: not an error
        self.assertIsNone(await session.remove_file(path, 10))
        e = await failed(session.remove_file(self.remote, 10), SSHFileError)
        self.assertIn(f"remove {self.remote!r}: remove: the server said", str(e))

    async def test_write_bound_too_short(self) -> None:
        # The proxy forwards the first 1 MiB the client sends, then holds.
        factory = StallingProxyFactory("127.0.0.1", self.sshd.port, stall_after=1 << 20)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        session = await self.session(f"tcp:host=127.0.0.1:port={port.getHost().port}")
        path = os.path.join(self.remote, "big")
        t0 = time.monotonic()
        e = await failed(session.write_file(path, os.urandom(4 << 20), 1.5), SSHFileTimeout)
        self.assertTrue(1.4 < time.monotonic() - t0 < 5)
        self.assertEqual((e.path, e.operation, e.bound, e.size), (path, "write", 1.5, 4 << 20))
        self.assertTrue(0 < e.bytes_done < 1 << 20, e.bytes_done)
        self.assertIn(
            f"write {path!r}: did not finish within 1.5s after {e.bytes_done} of {4 << 20} bytes",
            str(e),
        )
        self.assertFalse(session.lost)


class SessionTests(SFTPTestCase):
    async def test_many_commands_and_uploads_on_one_connection(self) -> None:
        session = await self.session()
        self.assertEqual(session.host_key_fingerprint, self.sshd.host_key_fingerprint)
        for i in range(20):
            result = await session.run(f"echo {i}", 10)
            self.assertEqual((result.stdout, result.exit_status), (f"{i}\n".encode(), 0))
        src = os.path.join(self.local, "f")
        write(src, b"data")
        await session.upload(src, os.path.join(self.remote, "f"), bound=10)
        r = await session.run(f"cat {self.remote}/f; exit 4", 10)
        self.assertEqual((r.stdout, r.exit_status), (b"data", 4))
        self.assertEqual(self.sshd.log().count("Accepted publickey"), 1)
        self.assertFalse(session.lost)
        await session.close()
        self.assertTrue(session.lost)

    async def test_run_timeout_is_public_and_keeps_the_session(self) -> None:
        session = await self.session()
        e = await failed(session.run("echo started; sleep 5", 0.5), SSHCommandTimeout)
        self.assertEqual(e.partial.stdout, b"started\n")
        self.assertIn(self.sshd.endpoint, str(e))
        self.assertEqual(e.host_key_fingerprint, self.sshd.host_key_fingerprint)
        self.assertFalse(session.lost)
        self.assertEqual((await session.run("echo next", 10)).stdout, b"next\n")

    async def test_lost_after_server_killed(self) -> None:
        session = await self.session()
        lost = session.when_lost()
        self.assertFalse(session.lost)
        self.assertFalse(lost.called)
        # the listener and the process serving our connection (its child)
        kill_pids([self.sshd.pid, *child_pids(self.sshd.pid)])
        await lost
        self.assertTrue(session.lost)
        e = await failed(session.run("true", 5), SSHCommandFailed)
        self.assertIn("could not start", str(e))
        src = os.path.join(self.local, "f")
        write(src, b"x")
        u = await failed(session.upload(src, self.remote, bound=5), SSHUploadError)
        self.assertTrue(u.lost)
        self.assertIn("could not start: the connection was lost", str(u))
        f = await failed(session.read_file(src, 5, limit=10), SSHFileError)
        self.assertTrue(f.lost)
        self.assertIn(f"read {src!r}: could not start: the connection was lost", str(f))

    async def test_lost_mid_upload(self) -> None:
        session = await self.session()
        src = os.path.join(self.local, "big")
        write(src, os.urandom(16 * 1024 * 1024))

        self.when_bytes_pass(1 << 20, lambda: kill_pids(child_pids(self.sshd.pid)))
        e = await failed(
            session.upload(src, os.path.join(self.remote, "big"), bound=60), SSHUploadError
        )
        self.assertTrue(e.lost, str(e))
        self.assertIn("connection lost", str(e))
        self.assertTrue(session.lost)


# -- the local test VM: dropbear runs OpenSSH's sftp-server ------------------------


@pytest.fixture(scope="class")
def _image_for_class(request: pytest.FixtureRequest, qemu_image: Any) -> Iterator[None]:
    request.cls.image = qemu_image
    yield


@pytest.mark.usefixtures("_image_for_class")
class VMUploadTests(TestCase):
    """Real QEMU under TCG on the test image."""

    timeout = 120
    image: Any

    async def test_upload_to_the_vm(self) -> None:
        from txvmbot.qemu.boot import BootSpec, boot

        directory = tempfile.mkdtemp(prefix="txvm-")  # short: QMP socket path
        self.addCleanup(shutil.rmtree, directory, True)
        vm = await boot(
            reactor,
            BootSpec(
                self.image, os.path.join(directory, "a"), accel="auto", memory_mb=256, cpus=1
            ),
        )
        self.addCleanup(kill_qemu_pid, vm.pid)
        self.addCleanup(vm.kill)
        await vm.wait_ready(60)
        session = await open_session(
            reactor,
            vm.ssh_endpoint,
            "root",
            load_private_key(self.image.ssh_key),
            connect_timeout=10,
        )
        self.addCleanup(session.abort)
        src = os.path.join(directory, "src")
        write(os.path.join(src, "bin", "tool"), b"#!/bin/sh\necho tool ran\n", 0o755)
        write(os.path.join(src, "blob"), os.urandom(1024 * 1024 + 7), 0o600)
        result = await session.upload(src, "/tmp", bound=60)
        self.assertEqual((result.files, result.directories), (2, 2))
        r = await session.run(
            "cd /tmp/src && sha256sum blob && ls -l blob bin/tool && bin/tool", 30
        )
        self.assertEqual(r.exit_status, 0, r)
        out = r.stdout.decode()
        self.assertIn(sha256(os.path.join(src, "blob")), out)
        self.assertIn("-rw-------", out)
        self.assertIn("-rwxr-xr-x", out)
        self.assertTrue(out.endswith("tool ran\n"), out)
        # dropbear garbles a new channel's command (no output, no exit
        # status) if an old one is closed on while its process still runs:
        # after a cancelled upload and a timed-out command, the next
        # commands still run whole.
        big = os.path.join(directory, "big")
        write(big, os.urandom(8 * 1024 * 1024))
        for delay in (0.05, 0.3):
            d = session.upload(big, "/tmp/big", bound=60)
            reactor.callLater(delay, d.cancel)
            await failed(d, CancelledError)
            r = await session.run("echo after cancel", 10)
            self.assertEqual((r.stdout, r.exit_status), (b"after cancel\n", 0))
        for _ in range(2):
            e = await failed(session.run("echo started; sleep 5", 0.5), SSHCommandTimeout)
            self.assertEqual(e.partial.stdout, b"started\n")
            r = await session.run("echo after timeout", 10)
            self.assertEqual((r.stdout, r.exit_status), (b"after timeout\n", 0))
        await session.close()
        self.assertEqual(await vm.stop(10), "powerdown")
