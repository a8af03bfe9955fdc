"""The conch pieces of one ssh client session, driven over any endpoint.

``connect`` (public as ``open_session``) turns a client endpoint string
into an authenticated ``Session``; ``Session.execute`` runs one command in
its own exec channel (``_channel``; ``Session.run`` does, failing with public errors),
``Session.start`` keeps one running to talk to over stdin and stdout (in
``_process``), and ``Session.upload`` copies files over SFTP, and
``write_file``, ``read_file`` and ``remove_file`` handle single small files
(in ``_sftp``).
Host keys are accepted whatever they are (every VM is new) and recorded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.conch.error import ConchError
from twisted.conch.ssh.common import NS, getNS
from twisted.conch.ssh.connection import SSHConnection
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    MSG_DISCONNECT,
    SSHClientTransport,
)
from twisted.conch.ssh.userauth import MSG_USERAUTH_REQUEST, SSHUserAuthClient
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.model import CommandResult
from txvmbot.ssh._channel import (
    CLOSE_GRACE,
    KILL_GRACE,
    _bounded,
    _ChannelError,
    _CommandTimedOut,
    _ExecChannel,
    _text,
)
from txvmbot.ssh._keys import fingerprint_sha256, key_type
from txvmbot.ssh._values import (
    SSHAuthenticationError,
    SSHCommandFailed,
    SSHCommandTimeout,
    SSHConnectError,
    SSHHostKeyError,
    UploadResult,
)

if TYPE_CHECKING:
    from txvmbot.ssh._process import RemoteProcess, _ProcessChannel

log = Logger(namespace="txvmbot.ssh")

#: Output kept per stream of one command; the rest is dropped (and logged).
DEFAULT_MAX_OUTPUT = 16 * 1024 * 1024

#: The stderr a started command (``Session.start``) keeps: its last MiB.
DEFAULT_MAX_STDERR = 1 << 20


class _NotReady(Exception):
    """The transport went away before the ssh connection service started."""


class _ClientTransport(SSHClientTransport):
    """An ssh client transport that accepts any host key (recording it),
    authenticates with one key, and remembers why it ended, in words."""

    # Ed25519 first, as OpenSSH prefers it. Conch lists it last, after RSA,
    # and dropbear (the local test image's sshd, with only an Ed25519 host
    # key) advertises RSA anyway and then drops the key exchange.
    supportedPublicKeys = [b"ssh-ed25519"] + [
        k for k in SSHClientTransport.supportedPublicKeys if k != b"ssh-ed25519"
    ]

    def __init__(self, user: bytes, key: Key, ready: Deferred[_Connection]) -> None:
        self._user = user
        self._key = key
        self._ready = ready
        #: what the session was doing: connecting, exchanging keys,
        #: authenticating, ready
        self.phase = "connecting"
        self.host_key: Key | None = None
        #: why the session ended, as the first side to say so put it
        self.ended_because: str | None = None
        self.host_key_problem = False
        self.auth_rejected = False
        #: the methods the server said it accepts, from its last auth failure
        self.auth_methods = ""
        self.lost = False
        self._closing = False
        self._lost_waiters: list[Deferred[None]] = []

    # -- events from the network

    def connectionMade(self) -> None:
        self.phase = "exchanging keys"
        # Commands are a few small request/reply packets each; like OpenSSH,
        # do not let Nagle's algorithm hold them back.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not a TCP socket (unix endpoints have the method too)
        SSHClientTransport.connectionMade(self)

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        try:
            key = Key.fromString(hostKey)
        except (BadKeyError, ValueError) as e:
            return self._host_key_problem(f"cannot parse the server's host key: {e}")
        if self.host_key is not None and key.blob() != self.host_key.blob():
            return self._host_key_problem(
                f"host key changed during re-key from {fingerprint_sha256(self.host_key)} "
                f"to {fingerprint_sha256(key)}"
            )
        self.host_key = key
        log.debug(
            "ssh host key {fingerprint} ({type})",
            fingerprint=fingerprint_sha256(key),
            type=key_type(key),
        )
        return succeed(True)

    def _host_key_problem(self, why: str) -> Deferred[bool]:
        self.host_key_problem = True
        self._record(f"host key problem: {why}")
        return fail(ConchError(why))

    def connectionSecure(self) -> None:
        self.phase = "authenticating"
        self.requestService(_UserAuth(self._user, self._key, _Connection(self._ready)))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        self._record(f"server disconnected: {_text(description)} (code {reasonCode})")
        log.info("ssh server disconnected: {description}", description=_text(description))

    def sendDisconnect(self, reason: int, desc: bytes | str) -> None:
        if reason == DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            self.auth_rejected = True
        if not self._closing:
            self._record(f"client gave up: {_text(desc)}")
        SSHClientTransport.sendDisconnect(self, reason, desc)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        try:
            SSHClientTransport.connectionLost(self, reason)
        finally:
            if not self._ready.called:
                self._ready.errback(Failure(_NotReady(reason)))
            waiters, self._lost_waiters = self._lost_waiters, []
            for d in waiters:
                d.callback(None)

    def _record(self, why: str) -> None:
        if self.ended_because is None:
            self.ended_because = why

    # -- what the session does with it

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the underlying connection is gone."""
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def close(self) -> None:
        """Say goodbye and close the connection after pending writes."""
        if self.lost or self.transport is None:
            return
        if self._closing:
            return
        self._closing = True
        self.sendPacket(
            MSG_DISCONNECT, struct.pack(">L", DISCONNECT_BY_APPLICATION) + NS(b"done") + NS(b"")
        )
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection now, without waiting for anything."""
        self._closing = True
        if self.lost or self.transport is None:
            return
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()


class _UserAuth(SSHUserAuthClient):
    """Offer exactly one key, and no other method (no passwords, no
    keyboard-interactive: nobody is there to type).

    The signed request is sent at once (no "would you accept this key?"
    round trip), and RSA keys sign with rsa-sha2-256/512 (RFC 8332): conch's
    own client would use ssh-rsa (SHA-1), which OpenSSH >= 8.8 refuses.
    """

    preferredOrder = [b"publickey"]

    def __init__(self, user: bytes, key: Key, instance: SSHConnection) -> None:
        SSHUserAuthClient.__init__(self, user, instance)
        self._key = key
        self._offered = False

    def tryAuth(self, kind: bytes) -> None | Deferred[bool]:
        if kind != b"publickey":
            return None
        return SSHUserAuthClient.tryAuth(self, kind)

    def _algorithm(self) -> bytes:
        """The signature algorithm to use with our key."""
        if self._key.type() != "RSA":
            return self._key.sshType()
        transport = cast(_ClientTransport, self.transport)
        advertised = transport.peerExtensions.get(b"server-sig-algs")
        if advertised is None:
            return b"rsa-sha2-256"
        offered = advertised.split(b",")
        for algorithm in (b"rsa-sha2-512", b"rsa-sha2-256"):
            if algorithm in offered:
                return algorithm
        return b"ssh-rsa"

    def auth_publickey(self) -> Deferred[bool]:
        if self._offered:
            return succeed(False)
        self._offered = True
        transport = cast(_ClientTransport, self.transport)
        public = self._key.public()
        self.lastPublicKey = public
        self.triedPublicKeys.append(public)
        algorithm = self._algorithm()
        blob = public.blob()
        session_id = transport.sessionID
        assert session_id is not None, "authenticating before key exchange"
        signed = (
            NS(session_id)
            + bytes((MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.instance.name)
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(blob)
        )
        signature = self._key.sign(signed, signatureType=algorithm)
        self.askForAuth(b"publickey", b"\x01" + NS(algorithm) + NS(blob) + NS(signature))
        return succeed(True)

    def ssh_USERAUTH_FAILURE(self, packet: bytes) -> Any:
        methods, _ = getNS(packet)
        cast(_ClientTransport, self.transport).auth_methods = methods.decode("ascii", "replace")
        return SSHUserAuthClient.ssh_USERAUTH_FAILURE(self, packet)

    def ssh_USERAUTH_BANNER(self, packet: bytes) -> None:
        message, _ = getNS(packet)
        log.debug("ssh banner: {banner}", banner=_text(message))


class _Connection(SSHConnection):
    """The ssh-connection service; fires ``ready`` once it runs."""

    def __init__(self, ready: Deferred[_Connection]) -> None:
        SSHConnection.__init__(self)
        self._ready = ready

    def serviceStarted(self) -> None:
        SSHConnection.serviceStarted(self)
        transport = cast(_ClientTransport, self.transport)
        transport.phase = "ready"
        self._ready.callback(self)


class Session:
    """An authenticated ssh connection, held open to run many commands and
    SFTP transfers (uploads, small files), each in its own channel.

    ``run``, ``upload`` and the file methods fail with public errors
    (SSHCommandFailed, SSHCommandTimeout, SSHUploadError, SSHFileError);
    ``lost`` tells a dead connection from a failed command. Close it with
    ``close`` (or ``abort``).
    """

    def __init__(
        self,
        transport: _ClientTransport,
        conn: SSHConnection,
        clock: IReactorTime,
        *,
        endpoint: str = "",
        user: str = "",
    ) -> None:
        self.transport = transport
        self.conn = conn
        self.clock = clock
        #: where and as whom: named in every error
        self.endpoint = endpoint
        self.user = user
        assert transport.host_key is not None
        self.host_key_fingerprint = fingerprint_sha256(transport.host_key)
        self.host_key_type = key_type(transport.host_key)
        #: channels still closing (an abandoned upload's): fire when closed
        self._closing: list[Deferred[None]] = []
        #: the channels of commands started with ``start`` and still open
        self.processes: list[_ProcessChannel] = []

    @property
    def lost(self) -> bool:
        """True once the connection is gone (closed, dropped, or the server
        went away): nothing more can run on this session."""
        return bool(self.transport.lost)

    def lost_reason(self) -> str:
        """Why the connection ended, in words (as its first side said)."""
        return self.transport.ended_because or "the connection was lost"

    def when_lost(self) -> Deferred[None]:
        """A Deferred that fires once the connection is gone."""
        return self.transport.when_lost()

    def run(
        self, command: str, timeout: float, max_output: int = DEFAULT_MAX_OUTPUT
    ) -> Deferred[CommandResult]:
        """Run ``command`` in a new exec channel; fire with its result (a
        non-zero exit or a signal is a result).

        Fails with SSHCommandTimeout after ``timeout`` seconds (the command is
        sent SIGKILL; its channel closes once the server ended it, or after
        ``KILL_GRACE``; the session stays open and the next ``run`` or
        ``upload`` waits for that close), or with
        SSHCommandFailed if it could not be run to its end; then ``lost``
        says whether the connection went with it. Cancelling abandons the
        command.
        """
        if self._settling():
            return Deferred.fromCoroutine(self._run_later(command, timeout, max_output))
        d = self.execute(command, timeout, max_output, kill_grace=KILL_GRACE)

        def public(f: Failure) -> Failure:
            e = f.value
            if isinstance(e, _ChannelError):
                return Failure(self.command_error(command, e))
            return f

        return d.addErrback(public)

    def command_error(self, command: str, e: _ChannelError) -> SSHCommandFailed:
        """The public error for ``command`` that did not run to its end:
        SSHCommandTimeout if it timed out, else SSHCommandFailed."""
        if isinstance(e, _CommandTimedOut):
            return SSHCommandTimeout(
                self.endpoint,
                self.user,
                command,
                e.bound,
                e.partial,
                host_key_fingerprint=self.host_key_fingerprint,
                host_key_type=self.host_key_type,
            )
        return self.command_failed(command, e.reason, e.partial)

    def command_failed(self, command: str, reason: str, partial: CommandResult) -> SSHCommandFailed:
        """SSHCommandFailed for ``command`` on this session: ``reason`` in
        words, and what it produced so far."""
        return SSHCommandFailed(
            self.endpoint,
            self.user,
            command,
            reason,
            partial,
            host_key_fingerprint=self.host_key_fingerprint,
            host_key_type=self.host_key_type,
        )

    def start(
        self,
        command: str,
        on_stdout: Callable[[bytes], None],
        *,
        max_stderr: int = DEFAULT_MAX_STDERR,
    ) -> Deferred[RemoteProcess]:
        """Start ``command`` in a new exec channel and keep it running, to
        write to its stdin and read its stdout as it comes (a test runner
        fed batch after batch); fire with a ``RemoteProcess`` once the
        server accepted the exec request.

        Each chunk of stdout is passed to ``on_stdout`` as it arrives, and
        not kept (an exception from it is logged; the channel carries on);
        the last ``max_stderr`` bytes of stderr are kept for
        ``RemoteProcess.ended``. There is no bound: the command runs until it
        exits, ``RemoteProcess.stop`` or ``close`` (which kills it).

        Fails with SSHCommandFailed, naming the command and the reason, if
        the server refused the channel or the exec request, or the
        connection was lost. Cancelling before it fired closes the channel.
        Waits first, like ``run``, for an abandoned channel to close.
        """
        from txvmbot.ssh._process import start

        return start(self, command, on_stdout, max_stderr=max_stderr)

    async def _run_later(self, command: str, timeout: float, max_output: int) -> CommandResult:
        await self._settled()
        return await self.run(command, timeout, max_output)

    def closing(self, gone: Deferred[None]) -> None:
        """Note a channel that is closing; ``run`` and SFTP transfers wait
        (up to ``CLOSE_GRACE``) until ``gone`` fires before opening another.
        dropbear, asked for a new channel while an old one's process still
        ends, loses the new command's output and exit status."""
        if gone.called:
            return
        self._closing.append(gone)

        def forget(ignored: object) -> object:
            if gone in self._closing:
                self._closing.remove(gone)
            return ignored

        gone.addBoth(forget)

    def _settling(self) -> bool:
        return bool(self._closing) and not self.transport.lost

    def _settled(self) -> Deferred[None]:
        """Fires when the closing channels have closed, or ``CLOSE_GRACE``
        later at the latest."""
        waited = list(self._closing)

        def give_up(ignored: object) -> None:
            # closed, or not within the grace: do not wait for these again
            for gone in waited:
                if gone in self._closing:
                    self._closing.remove(gone)

        all_gone = DeferredList(waited).addCallback(lambda ignored: None)
        return _bounded(all_gone, self.clock, CLOSE_GRACE).addCallback(give_up)

    def upload(self, local_path: str, remote_path: str, *, bound: float) -> Deferred[UploadResult]:
        """Copy the local file or directory tree ``local_path`` to
        ``remote_path`` over SFTP (an "sftp" subsystem channel on this
        connection), within ``bound`` seconds.

        Like ``scp -r``: into ``remote_path`` under the source's name if that
        is an existing directory, else to ``remote_path`` itself (existing
        directories on the way are reused, files overwritten). Permission
        bits are kept; symlinks inside a tree are copied as the file they
        point to only if that file is inside the tree, else refused. Writes
        go in 32 KiB chunks, several in flight.

        Fires with an UploadResult. Fails with SSHUploadError naming the
        local path, the remote path and the server's message (``lost`` set if
        the connection went); with SSHUploadTimeout at the bound, naming the
        files being written and the bytes done. A timeout or a cancel closes
        the sftp channel, not the session; what was written stays. The
        bound includes waiting (``settled``) for an abandoned channel to
        close.
        """
        from txvmbot.ssh._sftp import upload

        return upload(self, local_path, remote_path, bound=bound)

    def write_file(self, path: str, data: bytes, bound: float, mode: int = 0o600) -> Deferred[None]:
        """Create or truncate the remote file ``path`` and write ``data`` to
        it, over one sftp channel, within ``bound`` seconds; its permission
        bits become ``mode`` (whatever the server's umask). Fires None once
        the file is written and closed.

        Fails with SSHFileError naming the path, the step and the server's
        message (a missing directory: "No such file"; ``lost`` set if the
        connection went), with SSHFileTimeout at the bound. A timeout or a
        cancel closes the sftp channel, not the session; the file may be
        left partly written.
        """
        from txvmbot.ssh._sftp import write_file

        return write_file(self, path, data, bound=bound, mode=mode)

    def read_file(
        self, path: str, bound: float, *, limit: int, remove: bool = False
    ) -> Deferred[bytes]:
        """Read the whole remote file ``path``, over one sftp channel, within
        ``bound`` seconds; with ``remove``, remove it after reading (a failed
        removal is logged, and the read stands).

        Fails with SSHFileMissing if there is no such file; with
        SSHFileTooLarge, saying its size, if it holds more than ``limit``
        bytes (it is removed all the same with ``remove``); with
        SSHFileTimeout at the bound (then it is not removed); with
        SSHFileError naming the path, the step and the server's message
        otherwise (not a regular file, permission denied, the connection
        lost).
        """
        from txvmbot.ssh._sftp import read_file

        return read_file(self, path, bound=bound, limit=limit, remove=remove)

    def remove_file(self, path: str, bound: float) -> Deferred[None]:
        """Remove the remote file ``path`` over one sftp channel, within
        ``bound`` seconds. A file already missing is not an error. Fails with
        SSHFileError naming the path and the server's message, or with
        SSHFileTimeout at the bound."""
        from txvmbot.ssh._sftp import remove_file

        return remove_file(self, path, bound=bound)

    def settled(self) -> Deferred[None]:
        """Fires once no abandoned channel is closing any more (each is
        waited for up to ``CLOSE_GRACE``): at once if none is. SFTP
        transfers wait for it, within their bound, before they open their
        channel."""
        if not self._settling():
            return succeed(None)
        return Deferred.fromCoroutine(self._settle())

    async def _settle(self) -> None:
        while self._settling():
            await self._settled()

    def execute(
        self,
        command: str,
        timeout: float,
        max_output: int = DEFAULT_MAX_OUTPUT,
        *,
        kill_grace: float = 0.0,
    ) -> Deferred[CommandResult]:
        """Run ``command`` in a new exec channel. Fires with its result, or
        fails with _ChannelError (_CommandTimedOut after ``timeout``
        seconds). Cancelling abandons the command. With ``kill_grace``, an
        abandoned command's channel is left to the server to close (once the
        command died of the KILL sent to it) for that long, and ``run`` and
        ``upload`` wait for it to close."""
        if self.transport.lost:
            why = self.transport.ended_because or "the connection was lost"
            return fail(_ChannelError(f"could not start: {why}", CommandResult(command, None)))
        channel = _ExecChannel(command, self.conn, max_output)
        timer: IDelayedCall | None = None

        def abandon() -> None:
            if kill_grace > 0:
                self.closing(channel.gone)
                channel.abandon(kill_grace, self.clock)
            else:
                channel.abandon()

        def cancel(d: Deferred[CommandResult]) -> None:
            abandon()

        result: Deferred[CommandResult] = Deferred(cancel)

        def timed_out() -> None:
            nonlocal timer
            timer = None
            log.warn(
                "ssh command {command!r} did not finish within {bound}s",
                command=command,
                bound=timeout,
            )
            abandon()
            if not result.called:
                result.errback(_CommandTimedOut(timeout, channel.partial()))

        def relay(outcome: CommandResult | Failure) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if result.called:
                return  # timed out or cancelled: already reported
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        def stop_timer(passthrough: object) -> object:
            if timer is not None and timer.active():
                timer.cancel()
            return passthrough

        result.addBoth(stop_timer)
        timer = self.clock.callLater(timeout, timed_out)
        channel.done.addBoth(relay)
        log.debug("ssh running {command!r}", command=command)
        self.conn.openChannel(channel)
        return result

    def close(self, grace: float = CLOSE_GRACE) -> Deferred[None]:
        """Close gracefully; abort if that takes longer than ``grace``.
        Fires once the connection is gone. Cancelling aborts at once.

        Commands started with ``start`` and still running are killed first
        (sshd would leave a command that ignores its closed stdin running
        after the connection), for up to ``KILL_GRACE`` of the ``grace``;
        their ``ended`` fires with exit_status None."""
        lost = self.transport.when_lost()
        if lost.called:
            return lost
        timer = self.clock.callLater(grace, self.transport.abort)

        def cancel(d: Deferred[None]) -> None:
            if timer.active():
                timer.cancel()
            self.transport.abort()

        result: Deferred[None] = Deferred(cancel)

        def gone(ignored: None) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(None)

        def goodbye(ignored: object = None) -> None:
            for channel in list(self.processes):
                channel.abandon()
            self.transport.close()

        lost.addCallback(gone)
        running = [channel.kill() for channel in self.processes if not channel.exited]
        if running:
            killed = DeferredList(running).addCallback(lambda ignored: None)
            _bounded(killed, self.clock, KILL_GRACE).addCallback(goodbye)
        else:
            goodbye()
        return result

    def abort(self) -> Deferred[None]:
        """Drop the connection now; fires once it is gone (at most ``CLOSE_GRACE`` later)."""
        self.transport.abort()
        return _bounded(self.transport.when_lost(), self.clock, CLOSE_GRACE)


def connect(
    reactor: Any,
    endpoint: str,
    user: str,
    key: Key,
    *,
    connect_timeout: float,
    clock: IReactorTime,
) -> Deferred[Session]:
    """Connect to the client endpoint string ``endpoint``, exchange keys and
    authenticate as ``user`` with ``key``, within ``connect_timeout`` seconds.

    Fails with SSHConnectError (SSHAuthenticationError, SSHHostKeyError)
    saying what happened. Cancelling aborts the connection.
    """
    try:
        ep = clientFromString(reactor, endpoint)
    except Exception as e:
        return fail(
            SSHConnectError(endpoint, user, f"invalid client endpoint string: {e}", transient=False)
        )
    ready: Deferred[_Connection] = Deferred()
    proto = _ClientTransport(user.encode("utf-8"), key, ready)
    timed_out = False
    log.debug("ssh connecting to {endpoint} as {user}", endpoint=endpoint, user=user)
    connecting = connectProtocol(ep, proto)

    def stop() -> None:
        if not connecting.called:
            connecting.cancel()
        else:
            proto.abort()

    def cancel(d: Deferred[Session]) -> None:
        if timer.active():
            timer.cancel()
        stop()

    result: Deferred[Session] = Deferred(cancel)

    def on_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        stop()

    timer = clock.callLater(connect_timeout, on_timeout)

    def finish(outcome: Session | Exception) -> None:
        if timer.active():
            timer.cancel()
        if result.called:
            return
        if isinstance(outcome, Exception):
            result.errback(Failure(outcome))
        else:
            result.callback(outcome)

    def connect_failed(f: Failure) -> None:
        if timed_out:
            reason = f"timed out after {connect_timeout:g}s while connecting"
        elif f.check(ConnectionRefusedError):
            reason = "connection refused"
        else:
            reason = f"could not connect: {f.getErrorMessage()}"
        finish(SSHConnectError(endpoint, user, reason))

    def on_ready(conn: _Connection) -> None:
        if result.called:
            proto.abort()
            return
        session = Session(proto, conn, clock, endpoint=endpoint, user=user)
        log.info(
            "ssh session to {endpoint} as {user}, host key {fingerprint}",
            endpoint=endpoint,
            user=user,
            fingerprint=session.host_key_fingerprint,
        )
        finish(session)

    def not_ready(f: Failure) -> None:
        finish(_why_not_ready(proto, f, endpoint, user, connect_timeout if timed_out else None))

    connecting.addCallbacks(lambda ignored: None, connect_failed)
    ready.addCallbacks(on_ready, not_ready)
    return result


def open_session(
    reactor: Any,
    endpoint: str,
    user: str,
    key: Key,
    *,
    connect_timeout: float,
    clock: IReactorTime | None = None,
) -> Deferred[Session]:
    """Connect to the client endpoint string ``endpoint`` and authenticate
    as ``user`` with ``key`` within ``connect_timeout`` seconds; fire with a
    Session held open for many ``run`` and ``upload`` calls.

    Fails with SSHConnectError (SSHAuthenticationError, SSHHostKeyError).
    Cancelling aborts the connection. The caller closes the session
    (``close``, or ``abort``) when done with it.
    """
    the_clock: IReactorTime = reactor if clock is None else clock
    return connect(reactor, endpoint, user, key, connect_timeout=connect_timeout, clock=the_clock)


def _why_not_ready(
    proto: _ClientTransport, f: Failure, endpoint: str, user: str, timed_out_after: float | None
) -> SSHConnectError:
    """Say, in words, why a connection ended before it was ready."""
    phase = proto.phase
    if timed_out_after is not None:
        return SSHConnectError(
            endpoint, user, f"timed out after {timed_out_after:g}s while {phase}"
        )
    if proto.host_key_problem:
        return SSHHostKeyError(endpoint, user, proto.ended_because or "host key problem")
    lost = f.value.args[0] if isinstance(f.value, _NotReady) and f.value.args else None
    lost_text = lost.getErrorMessage() if isinstance(lost, Failure) else "connection lost"
    said = proto.ended_because
    if proto.auth_rejected or (phase == "authenticating" and said and said.startswith("server")):
        offered = fingerprint_sha256(proto._key)
        accepts = f"; server accepts: {proto.auth_methods}" if proto.auth_methods else ""
        extra = f"; {said}" if said and said.startswith("server") else ""
        return SSHAuthenticationError(
            endpoint,
            user,
            f"authentication failed: the server did not accept key {offered}{accepts}{extra}",
        )
    if phase == "exchanging keys" and proto.host_key is None and said is None:
        return SSHConnectError(
            endpoint, user, f"connection closed before key exchange finished ({lost_text})"
        )
    return SSHConnectError(endpoint, user, f"connection closed while {phase}: {said or lost_text}")
