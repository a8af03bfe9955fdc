"""Copy a file or a directory tree to a machine over SFTP, on an open
session; write, read and remove single small files there.

Each transfer runs in its own "sftp" subsystem channel of the session's
connection, spoken by conch's ``FileTransferClient``; nothing is shelled
out. Only the suite path imports this module (``Session.upload`` and the
file methods import it when called), so conch's filetransfer is not loaded
by the CLI's other commands.

Like ``scp -r``: if the remote path is an existing directory the source is
copied into it under its own name, else the remote path is created. Files
keep their permission bits; directories made here get theirs once their
files are in (so a read-only directory can still be filled). Symlinks in a
tree are copied as the file they point to when that file is inside the tree,
and refused otherwise; the source itself may be a symlink.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from attrs import frozen
from twisted.conch.error import ConchError
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.connection import EXTENDED_DATA_STDERR, SSHConnection
from twisted.conch.ssh.filetransfer import (
    FX_NO_SUCH_FILE,
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    ClientFile,
    FileTransferClient,
    SFTPError,
)
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.error import ConnectionClosed, ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.errors import SSHError
from txvmbot.ssh._values import (
    SSHFileError,
    SSHFileMissing,
    SSHFileTimeout,
    SSHFileTooLarge,
    SSHUploadError,
    SSHUploadTimeout,
    UploadResult,
)

log = Logger(namespace="txvmbot.ssh")


class _Session(Protocol):
    """What a transfer needs of the ``Session`` (``_protocol``) it runs on;
    typed here so that this module does not import that one, which imports
    this one for ``upload`` and the file methods."""

    conn: SSHConnection
    clock: IReactorTime
    #: where and as whom: named in every error
    endpoint: str
    user: str

    @property
    def lost(self) -> bool: ...

    def lost_reason(self) -> str: ...

    def settled(self) -> Deferred[None]: ...

    def closing(self, gone: Deferred[None]) -> None: ...


#: Bytes per SFTP write: OpenSSH's sftp uses 32 KiB, and its sftp-server
#: accepts packets up to 256 KiB.
CHUNK = 32 * 1024

#: Writes sent ahead of their replies, per file (OpenSSH's sftp keeps 64).
WRITES_IN_FLIGHT = 16

#: Reads of CHUNK bytes sent ahead of their replies, per file.
READS_IN_FLIGHT = 16

#: How long an ending sftp channel may take to close before we close it.
CLOSE_GRACE = 5.0

#: Files written at once, so that a tree of small files is not one round
#: trip (open, write, close) after another.
FILES_AT_ONCE = 4

T = TypeVar("T")
R = TypeVar("R")


@frozen
class _Dir:
    """A directory of the local tree; ``relative`` is "" for its root."""

    relative: str
    mode: int


@frozen
class _File:
    """A file to copy: ``source`` is what is read (an in-tree symlink's
    target), ``relative`` where it goes below the target ("" for a single
    file)."""

    relative: str
    source: str
    mode: int
    size: int


@frozen
class _Tree:
    """What a local path holds, walked before anything is sent."""

    is_dir: bool
    dirs: tuple[_Dir, ...]
    files: tuple[_File, ...]


class _Failed(Exception):
    """Why the upload stopped, in words; ``lost`` if the connection went."""

    def __init__(self, reason: str, *, lost: bool = False, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lost = lost
        #: the SFTP status code, if the server refused a request
        self.code = code


def local_tree(local_path: str) -> _Tree:
    """Walk ``local_path`` (a file, or a directory recursively, in sorted
    order, parents before children). Raises _Failed for a missing path, an
    unreadable directory, a special file, or a symlink that leads out of the
    tree, to a directory, or nowhere."""
    try:
        st = os.stat(local_path)
    except OSError as e:
        raise _Failed(f"cannot read local {local_path!r}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return _Tree(False, (), (_File("", local_path, stat.S_IMODE(st.st_mode), st.st_size),))
    if not stat.S_ISDIR(st.st_mode):
        raise _Failed(f"local {local_path!r} is neither a regular file nor a directory")
    root = os.path.realpath(local_path)
    dirs: list[_Dir] = [_Dir("", stat.S_IMODE(st.st_mode))]
    files: list[_File] = []
    pending = deque([""])
    while pending:
        relative = pending.popleft()
        here = os.path.join(local_path, relative) if relative else local_path
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise _Failed(f"cannot list local directory {here!r}: {e.strerror}") from None
        for entry in entries:
            rel = posixpath.join(relative, entry.name) if relative else entry.name
            try:
                if entry.is_symlink():
                    files.append(_symlinked_file(entry.path, rel, root))
                    continue
                est = entry.stat(follow_symlinks=False)
            except OSError as e:
                raise _Failed(f"cannot read local {entry.path!r}: {e.strerror}") from None
            if stat.S_ISDIR(est.st_mode):
                dirs.append(_Dir(rel, stat.S_IMODE(est.st_mode)))
                pending.append(rel)
            elif stat.S_ISREG(est.st_mode):
                files.append(_File(rel, entry.path, stat.S_IMODE(est.st_mode), est.st_size))
            else:
                raise _Failed(
                    f"local {entry.path!r} is neither a regular file nor a directory "
                    f"(a socket, fifo or device is not copied)"
                )
    return _Tree(True, tuple(dirs), tuple(files))


def _symlinked_file(path: str, relative: str, root: str) -> _File:
    """The file an in-tree symlink points to, or _Failed saying why not."""
    target = os.path.realpath(path)
    if os.path.commonpath([root, target]) != root:
        raise _Failed(
            f"local symlink {path!r} points to {target!r}, outside {root!r}: "
            f"only symlinks to files inside the tree are followed"
        )
    try:
        st = os.stat(target)
    except OSError as e:
        raise _Failed(f"local symlink {path!r} points to {target!r}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Failed(
            f"local symlink {path!r} points to {target!r}, which is not a regular file: "
            f"only symlinks to files inside the tree are followed"
        )
    return _File(relative, target, stat.S_IMODE(st.st_mode), st.st_size)


@implementer(ILogObserver)
def _warnings_only(event: dict[str, Any]) -> None:
    """Pass on conch's filetransfer warnings and failures, not the info line
    it logs for every packet (hundreds per megabyte uploaded)."""
    if event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical):
        globalLogPublisher(event)


class _Client(FileTransferClient):
    """conch's SFTP client; ``ready`` fires once the server said its version.
    Once we have said end of file, new requests fail at once."""

    _log = Logger(observer=_warnings_only)

    def __init__(self, ready: Deferred[_Client]) -> None:
        FileTransferClient.__init__(self)
        self._ready = ready
        self.ended = False

    def gotServerVersion(self, serverVersion: int, extData: dict[bytes, bytes]) -> None:
        log.debug("sftp server version {version}", version=serverVersion)
        if not self._ready.called:
            self._ready.callback(self)

    def _sendRequest(self, msg: int, data: bytes) -> Deferred[Any]:
        if self.ended:
            return fail(ConnectionDone("the sftp channel is closing"))
        d: Deferred[Any] = FileTransferClient._sendRequest(self, msg, data)
        return d


class _SFTPChannel(SSHChannel):
    """A session channel running the "sftp" subsystem, feeding what arrives
    to a ``FileTransferClient`` whose transport it is. ``ready`` fires with
    the client, or fails with _Failed; ``gone`` fires when it has closed.

    It ends with end of file, not a close: the sftp server then exits and
    the ssh server closes the channel after it. (dropbear, closed on while
    its child still runs, garbles the next channel's command: no output, no
    exit status.) A close follows if the server takes longer than ``grace``.
    """

    name = b"session"

    def __init__(self, conn: SSHConnection, clock: IReactorTime, grace: float) -> None:
        SSHChannel.__init__(self, conn=conn)
        self._conn = conn
        self._clock = clock
        self._grace = grace
        self.ready: Deferred[_Client] = Deferred()
        self.gone: Deferred[None] = Deferred()
        self.client = _Client(self.ready)
        self._abandoned = False
        self._is_open = False
        self._client_started = False
        self._eof_sent = False
        self._close_timer: IDelayedCall | None = None

    def channelOpen(self, specificData: bytes) -> None:
        self._is_open = True
        if self._abandoned:
            self._conn.sendClose(self)
            return
        d = self._conn.sendRequest(self, b"subsystem", NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._started, self._refused)

    def _started(self, ignored: object) -> None:
        if not self._abandoned:
            self._client_started = True
            self.client.makeConnection(self)  # sends FXP_INIT

    def _refused(self, reason: Failure) -> None:
        if not self.ready.called and not self.localClosed:
            self.ready.errback(
                _Failed(
                    "the server refused the sftp subsystem (no sftp server installed? "
                    "OpenSSH needs `Subsystem sftp ...` in sshd_config; dropbear runs "
                    "/usr/lib/sftp-server)"
                )
            )
        self._abandoned = True
        self._close_now()  # no sftp server runs: nothing to wait for

    def openFailed(self, reason: Any) -> None:
        why = getattr(reason, "value", reason)
        desc = getattr(why, "desc", None) or str(why)
        if isinstance(desc, bytes):
            desc = desc.decode("utf-8", "replace")
        if not self.ready.called:
            self.ready.errback(_Failed(f"could not get a session channel for sftp: {desc}"))
        if not self.gone.called:
            self.gone.callback(None)

    def dataReceived(self, data: bytes) -> None:
        if self._client_started:
            self.client.dataReceived(data)

    def extReceived(self, dataType: int, data: bytes) -> None:
        if dataType == EXTENDED_DATA_STDERR:
            log.info("sftp server said: {text}", text=data.decode("utf-8", "replace").rstrip())

    def eofReceived(self) -> None:
        pass

    def closed(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self._client_started:
            self._client_started = False
            self.client.connectionLost(Failure(ConnectionDone("the sftp channel closed")))
        if not self.ready.called:
            self.ready.errback(_Failed("the sftp channel closed before the server was ready"))
        if not self.gone.called:
            self.gone.callback(None)

    def finish(self) -> None:
        """Say we are done (end of file): the sftp server exits and the ssh
        server closes the channel; ``gone`` fires then. What was not sent
        yet (waiting for the server's window) is dropped."""
        self.client.ended = True
        if self._eof_sent or self.localClosed or self not in self._conn.channelsToRemoteChannel:
            return
        self._eof_sent = True
        # Data after end of file breaks the protocol: drop what waits (an
        # abandoned upload's writes; a finished one has none).
        self.buf = b""
        self.extBuf = []
        self._conn.sendEOF(self)
        self._close_timer = self._clock.callLater(self._grace, self._close_now)

    def abandon(self) -> None:
        """Stop: new requests fail, the channel ends (``finish``), and
        requests in flight fail when it has closed."""
        self._abandoned = True
        self.finish()

    def _close_now(self) -> None:
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self.client.ended = True
        if self.localClosed or self not in self._conn.channelsToRemoteChannel:
            return
        self._conn.sendClose(self)
        # Do not wait for the server to confirm: fail what is in flight now.
        if self._client_started:
            self._client_started = False
            self.client.connectionLost(Failure(ConnectionDone("the sftp channel was closed")))


def upload(
    session: _Session, local_path: str, remote_path: str, *, bound: float
) -> Deferred[UploadResult]:
    """Copy ``local_path`` to ``remote_path`` over ``session``; see
    ``Session.upload``."""
    return _Upload(session, local_path, remote_path, bound).start()


def write_file(
    session: _Session, path: str, data: bytes, *, bound: float, mode: int
) -> Deferred[None]:
    """Write ``data`` to the remote file ``path``; see ``Session.write_file``."""
    return _WriteFile(session, path, bound, data, mode).start()


def read_file(
    session: _Session, path: str, *, bound: float, limit: int, remove: bool
) -> Deferred[bytes]:
    """Read the remote file ``path``; see ``Session.read_file``."""
    return _ReadFile(session, path, bound, limit, remove).start()


def remove_file(session: _Session, path: str, *, bound: float) -> Deferred[None]:
    """Remove the remote file ``path``; see ``Session.remove_file``."""
    return _RemoveFile(session, path, bound).start()


class _Transfer(Generic[R]):
    """One piece of work on its own sftp channel of a session, within a bound.

    The work (``_work``, a coroutine, given by each kind of transfer) starts
    once the session's abandoned channels have closed; ``result`` is fired by
    whichever ends it first: the work (done or failed), the bound, or a
    cancel. Then the sftp channel is closed and anything still in flight is
    dropped. A ``_Failed`` from the work becomes the kind's public error
    (``_error``); the bound, its timeout error (``_timed_out``).
    """

    def __init__(self, session: _Session, bound: float) -> None:
        self._session = session
        self._bound = bound
        self._clock = session.clock
        self._channel: _SFTPChannel | None = None
        self._timer: IDelayedCall | None = None
        self._started = 0.0
        self._stopped = False
        #: bytes the server acknowledged (writes) or sent (reads), in all
        self._bytes = 0
        self._result: Deferred[R] = Deferred(self._cancel)

    def start(self) -> Deferred[R]:
        self._started = self._clock.seconds()
        self._timer = self._clock.callLater(self._bound, self._time_up)
        work = Deferred.fromCoroutine(self._settle_then_work())
        work.addBoth(self._finish)
        return self._result

    # -- what each kind says

    async def _work(self) -> R:
        raise NotImplementedError()

    def _error(self, failed: _Failed) -> SSHError:
        """The public error for a transfer stopped by ``failed``."""
        raise NotImplementedError()

    def _timed_out(self) -> SSHError:
        """The public error (logged) for a transfer that passed its bound."""
        raise NotImplementedError()

    def _succeeded(self, result: R) -> None:
        """Log what was done."""

    # -- how it ends

    def _finish(self, outcome: R | Failure) -> None:
        self._stop()
        if self._result.called:
            return  # timed out or cancelled: already reported
        if isinstance(outcome, Failure):
            failed = outcome.value
            if isinstance(failed, _Failed):
                outcome = Failure(self._error(failed))
            self._result.errback(outcome)
        else:
            self._succeeded(outcome)
            self._result.callback(outcome)

    def _time_up(self) -> None:
        self._timer = None
        error = self._timed_out()
        self._stop()
        if not self._result.called:
            self._result.errback(error)

    def _cancel(self, d: Deferred[R]) -> None:
        self._stop()

    def _stop(self) -> None:
        """Stop the timer and close the channel; in-flight requests fail
        (their failures are consumed by the work coroutine)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._channel is not None:
            self._channel.abandon()
            self._session.closing(self._channel.gone)

    def _seconds(self) -> float:
        return round(self._clock.seconds() - self._started, 3)

    # -- the steps every kind takes

    async def _settle_then_work(self) -> R:
        # Within the bound: a channel abandoned before (a cancelled upload,
        # a killed command) may take up to CLOSE_GRACE to close.
        await self._session.settled()
        return await self._work()

    async def _done(self) -> None:
        """End the sftp server cleanly (end of file on its input) and wait
        for its channel to close, so that the server is done with it before
        the result fires (dropbear mixes up a new channel's exit with one
        still closing)."""
        channel = self._channel
        assert channel is not None
        channel.finish()
        await channel.gone

    async def _open(self) -> _Client:
        if self._stopped:
            raise CancelledError()  # while waiting for the session to settle
        if self._session.lost:
            raise _Failed(f"could not start: {self._session.lost_reason()}", lost=True)
        channel = self._channel = _SFTPChannel(self._session.conn, self._clock, CLOSE_GRACE)
        self._session.conn.openChannel(channel)
        try:
            return await channel.ready
        except _Failed as e:
            raise self._lost_or(e.reason) from None

    def _lost_or(self, reason: str) -> _Failed:
        """``reason``, unless the connection itself is gone: then that."""
        if self._session.lost:
            return _Failed(f"connection lost: {self._session.lost_reason()}", lost=True)
        return _Failed(reason)

    async def _call(self, d: Deferred[T], what: str) -> T:
        """Wait for one SFTP request; _Failed naming ``what`` and the
        server's answer if it failed. (End of file, EOFError, passes.)"""
        try:
            return await d
        except SFTPError as e:
            raise _Failed(f"{what}: {_server_says(e)}", code=e.code) from None
        except NotImplementedError as e:
            raise _Failed(f"{what}: the server does not support this ({e})") from None
        except (ConchError, ConnectionClosed) as e:
            if self._stopped:
                raise CancelledError() from None
            raise self._lost_or(f"{what}: the sftp channel closed ({e})") from None

    async def _stat(self, client: _Client, path: bytes) -> dict[str, int] | None:
        """The remote attributes of ``path`` (following links), or None if
        there is no such file."""
        try:
            attrs: dict[str, int] = await self._call(
                client.getAttrs(path, 1), f"stat {_text(path)}"
            )
        except _Failed as e:
            if e.code == FX_NO_SUCH_FILE:
                return None
            raise
        return attrs

    async def _write_chunks(
        self,
        handle: ClientFile,
        chunks: Iterable[bytes],
        what: str,
        chmod: Deferred[object],
        chmod_what: str,
        progress: list[int],
    ) -> None:
        """Write ``chunks`` one after the other from offset 0 of the open
        file ``handle``, up to WRITES_IN_FLIGHT ahead of their replies.
        ``chmod``, sent just before, is waited for with them. ``progress[0]``
        counts the bytes acknowledged."""
        window: deque[tuple[Deferred[object], str]] = deque([(chmod, chmod_what)])
        try:
            offset = 0
            for chunk in chunks:
                d = handle.writeChunk(offset, chunk)
                d.addCallback(self._acked, progress, len(chunk))
                window.append((d, what))
                offset += len(chunk)
                if len(window) >= WRITES_IN_FLIGHT:
                    head, head_what = window.popleft()
                    await self._call(head, head_what)
            while window:
                head, head_what = window.popleft()
                await self._call(head, head_what)
        finally:
            for pending, _what in window:
                pending.addErrback(lambda ignored: None)

    def _acked(self, ignored: object, progress: list[int], size: int) -> None:
        progress[0] += size
        self._bytes += size


class _Upload(_Transfer[UploadResult]):
    """One upload of a local file or tree, with its progress."""

    def __init__(self, session: _Session, local_path: str, remote_path: str, bound: float) -> None:
        super().__init__(session, bound)
        self._local = local_path
        self._remote = remote_path
        #: files being written: relative name -> [bytes acknowledged, size]
        self._progress: dict[str, list[int]] = {}
        self._files = 0
        self._dirs = 0

    def _succeeded(self, result: UploadResult) -> None:
        log.info(
            "uploaded {local} to {remote}: {files} files, {dirs} directories, "
            "{bytes} bytes in {seconds:.2f}s",
            local=self._local,
            remote=self._remote,
            files=result.files,
            dirs=result.directories,
            bytes=result.bytes,
            seconds=result.seconds,
        )

    def _timed_out(self) -> SSHError:
        in_progress = tuple(
            (name or os.path.basename(self._local), done, size)
            for name, (done, size) in self._progress.items()
        )
        log.warn(
            "upload of {local} to {remote} did not finish within {bound}s",
            local=self._local,
            remote=self._remote,
            bound=self._bound,
        )
        return SSHUploadTimeout(
            self._session.endpoint,
            self._session.user,
            self._local,
            self._remote,
            self._bound,
            self._bytes,
            in_progress,
        )

    def _error(self, failed: _Failed) -> SSHError:
        return SSHUploadError(
            self._session.endpoint,
            self._session.user,
            self._local,
            self._remote,
            failed.reason,
            lost=failed.lost,
        )

    # -- the work

    async def _work(self) -> UploadResult:
        tree = local_tree(self._local)
        client = await self._open()
        target = await self._target(client)
        made: list[tuple[bytes, int]] = []
        if tree.is_dir:
            for d in tree.dirs:
                path = _join(target, d.relative)
                if await self._mkdir(client, path, d.mode):
                    made.append((path, d.mode))
                self._dirs += 1
        await self._put_all(client, target, tree.files)
        # Deepest first; OpenSSH's sftp-server handles requests in order.
        modes = [
            self._call(client.setAttrs(path, {"permissions": mode}), f"chmod {_text(path)}")
            for path, mode in reversed(made)
        ]
        await self._all(modes)
        await self._done()
        return UploadResult(
            files=self._files,
            directories=self._dirs,
            bytes=self._bytes,
            seconds=self._seconds(),
        )

    async def _all(self, ds: list[Any]) -> None:
        """Wait for coroutines run at once; the first failure is raised and
        the others' are consumed."""
        if not ds:
            return
        running = [Deferred.fromCoroutine(c) for c in ds]
        try:
            await gatherResults(running, consumeErrors=True)
        except Exception as e:
            first = getattr(e, "subFailure", None)
            if isinstance(first, Failure):
                first.raiseException()
            raise

    async def _target(self, client: _Client) -> bytes:
        """Where the source goes: into ``remote_path`` if that is an
        existing directory, else ``remote_path`` itself."""
        remote = self._remote.encode("utf-8")
        attrs = await self._stat(client, remote)
        if attrs is not None and stat.S_ISDIR(attrs.get("permissions", 0)):
            name = os.path.basename(os.path.abspath(self._local))
            return posixpath.join(remote, os.fsencode(name)) if name else remote
        return remote

    async def _mkdir(self, client: _Client, path: bytes, mode: int) -> bool:
        """Make directory ``path`` (writable by us until the end); True if
        made, False if a directory was there already."""
        try:
            await self._call(
                client.makeDirectory(path, {"permissions": mode | 0o700}),
                f"mkdir {_text(path)}",
            )
            return True
        except _Failed as failed:
            if failed.lost:
                raise
            attrs = await self._stat(client, path)
            if attrs is not None and stat.S_ISDIR(attrs.get("permissions", 0)):
                return False
            if attrs is not None:
                raise _Failed(f"mkdir {_text(path)}: it exists and is not a directory") from None
            raise

    async def _put_all(self, client: _Client, target: bytes, files: tuple[_File, ...]) -> None:
        queue = iter(files)

        async def worker() -> None:
            for f in queue:
                if self._stopped:
                    return
                await self._put(client, _join(target, f.relative), f)

        await self._all([worker() for _ in range(min(FILES_AT_ONCE, len(files)))])

    async def _put(self, client: _Client, remote: bytes, f: _File) -> None:
        """Copy one file: open, chmod, pipelined writes, close."""
        name = _text(remote)
        with _open_local(f.source) as src:
            handle: ClientFile = await self._call(
                client.openFile(remote, FXF_WRITE | FXF_CREAT | FXF_TRUNC, {"permissions": f.mode}),
                f"open {name} for writing",
            )
            # The mode given at open passes through the server's umask; set it.
            chmod = client.setAttrs(remote, {"permissions": f.mode})
            progress = self._progress[f.relative] = [0, f.size]
            closed = False
            try:
                await self._write_chunks(
                    handle,
                    _local_chunks(src, f.source),
                    f"write {name}",
                    chmod,
                    f"chmod {name}",
                    progress,
                )
                closed = True
                await self._call(handle.close(), f"close {name}")
            finally:
                if not closed:
                    handle.close().addErrback(lambda ignored: None)
                self._progress.pop(f.relative, None)
        self._files += 1


class _FileTransfer(_Transfer[R]):
    """Writing, reading or removing one remote file, ``path``; it fails
    with SSHFileError (SSHFileTimeout at the bound)."""

    #: what it does to the file, in the errors: "write", "read", "remove"
    operation = ""

    def __init__(self, session: _Session, path: str, bound: float) -> None:
        super().__init__(session, bound)
        self._path = path
        self._remote = path.encode("utf-8")
        #: the file's size, once known (for the timeout's message)
        self._size: int | None = None

    def _error(self, failed: _Failed) -> SSHError:
        return SSHFileError(
            self._session.endpoint,
            self._session.user,
            self.operation,
            self._path,
            failed.reason,
            lost=failed.lost,
        )

    def _timed_out(self) -> SSHError:
        log.warn(
            "sftp {operation} of {path} did not finish within {bound}s",
            operation=self.operation,
            path=self._path,
            bound=self._bound,
        )
        return SSHFileTimeout(
            self._session.endpoint,
            self._session.user,
            self.operation,
            self._path,
            self._bound,
            self._bytes,
            self._size,
        )


class _WriteFile(_FileTransfer[None]):
    operation = "write"

    def __init__(self, session: _Session, path: str, bound: float, data: bytes, mode: int) -> None:
        super().__init__(session, path, bound)
        self._data = data
        self._mode = mode
        self._size = len(data)

    async def _work(self) -> None:
        client = await self._open()
        try:
            handle: ClientFile = await self._call(
                client.openFile(
                    self._remote, FXF_WRITE | FXF_CREAT | FXF_TRUNC, {"permissions": self._mode}
                ),
                "open for writing",
            )
        except _Failed as e:
            if e.code == FX_NO_SUCH_FILE:
                parent = posixpath.dirname(self._path)
                raise _Failed(f"{e.reason}; is there a directory {parent!r}?") from None
            raise
        # The mode given at open passes through the server's umask; set it.
        chmod = client.setAttrs(self._remote, {"permissions": self._mode})
        closed = False
        try:
            await self._write_chunks(
                handle, _slices(self._data), "write", chmod, f"chmod {self._mode:o}", [0]
            )
            closed = True
            await self._call(handle.close(), "close")
        finally:
            if not closed:
                handle.close().addErrback(lambda ignored: None)
        await self._done()

    def _succeeded(self, result: None) -> None:
        log.debug(
            "wrote {bytes} bytes to {path} in {seconds:.2f}s",
            bytes=len(self._data),
            path=self._path,
            seconds=self._seconds(),
        )


class _ReadFile(_FileTransfer[bytes]):
    operation = "read"

    def __init__(
        self, session: _Session, path: str, bound: float, limit: int, remove: bool
    ) -> None:
        super().__init__(session, path, bound)
        self._limit = limit
        self._remove = remove

    async def _work(self) -> bytes:
        client = await self._open()
        try:
            handle: ClientFile = await self._call(
                client.openFile(self._remote, FXF_READ, {}), "open for reading"
            )
        except _Failed as e:
            if e.code == FX_NO_SUCH_FILE:
                raise SSHFileMissing(
                    self._session.endpoint, self._session.user, "read", self._path, e.reason
                ) from None
            raise
        data = b""
        closed = False
        try:
            attrs: dict[str, int] = await self._call(handle.getAttrs(), "fstat")
            kind = attrs.get("permissions")
            if kind is not None and not stat.S_ISREG(kind):
                raise _Failed(f"not a regular file (mode {kind:o})")
            self._size = attrs.get("size")
            if self._size is None or self._size <= self._limit:
                data = await self._read_all(handle, self._size or 0)
            closed = True
            await self._call(handle.close(), "close")
        finally:
            if not closed:
                handle.close().addErrback(lambda ignored: None)
        seen = max(self._size or 0, len(data))
        removed = self._remove and await self._remove_after(client)
        if seen > self._limit:
            raise SSHFileTooLarge(
                self._session.endpoint,
                self._session.user,
                self._path,
                seen,
                self._limit,
                removed=removed,
            )
        await self._done()
        return data

    async def _read_all(self, handle: ClientFile, size: int) -> bytes:
        """Read from offset 0 to end of file: the ``size`` the server stated
        in reads up to READS_IN_FLIGHT ahead of their replies, then on until
        end of file (the file may have grown; a server may answer a read with
        fewer bytes than asked). Stops once past the limit."""
        data = bytearray()
        window: deque[tuple[int, Deferred[bytes]]] = deque()
        ahead = 0  # the next offset to ask for
        try:
            while len(data) <= self._limit:
                while len(window) < READS_IN_FLIGHT and (ahead < size or not window):
                    window.append((ahead, handle.readChunk(ahead, CHUNK)))
                    ahead += CHUNK
                offset, d = window.popleft()
                try:
                    chunk: bytes = await self._call(d, f"read at offset {offset}")
                except EOFError:
                    break
                data += chunk
                self._bytes += len(chunk)
                if len(chunk) < CHUNK:
                    # Reads sent ahead ask for the wrong offsets now: drop
                    # them, and go on from where this one ended.
                    for _offset, pending in window:
                        pending.addErrback(lambda ignored: None)
                    window.clear()
                    ahead = len(data)
        finally:
            for _offset, pending in window:
                pending.addErrback(lambda ignored: None)
        return bytes(data)

    async def _remove_after(self, client: _Client) -> bool:
        """Remove the file that was read; True if it was. A failure is
        logged: what was read stands."""
        try:
            await self._call(client.removeFile(self._remote), "remove")
        except _Failed as e:
            log.warn(
                "could not remove {path} after reading it: {why}", path=self._path, why=e.reason
            )
            return False
        return True

    def _succeeded(self, result: bytes) -> None:
        log.debug(
            "read {bytes} bytes from {path}{removed} in {seconds:.2f}s",
            bytes=len(result),
            path=self._path,
            removed=" and removed it" if self._remove else "",
            seconds=self._seconds(),
        )


class _RemoveFile(_FileTransfer[None]):
    operation = "remove"

    async def _work(self) -> None:
        client = await self._open()
        try:
            await self._call(client.removeFile(self._remote), "remove")
        except _Failed as e:
            if e.code != FX_NO_SUCH_FILE:
                raise
        await self._done()


def _open_local(path: str) -> Any:
    try:
        return open(path, "rb")
    except OSError as e:
        raise _Failed(f"cannot read local {path!r}: {e.strerror}") from None


def _local_chunks(src: Any, path: str) -> Iterator[bytes]:
    """The open local file ``src`` in CHUNK pieces."""
    while True:
        try:
            chunk: bytes = src.read(CHUNK)
        except OSError as e:
            raise _Failed(f"cannot read local {path!r}: {e.strerror}") from None
        if not chunk:
            return
        yield chunk


def _slices(data: bytes) -> Iterator[bytes]:
    """``data`` in CHUNK pieces (none if it is empty)."""
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        yield bytes(view[start : start + CHUNK])


def _join(target: bytes, relative: str) -> bytes:
    return posixpath.join(target, os.fsencode(relative)) if relative else target


def _text(path: bytes) -> str:
    return path.decode("utf-8", "replace")


def _server_says(e: SFTPError) -> str:
    message = e.message or "no message"
    return f"the server said {message!r} (SFTP status {e.code})"
