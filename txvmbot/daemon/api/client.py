"""The client library of the daemon's AMP API.

::

    client = await connect(reactor, "unix:path=/home/me/.local/state/txvmbot/txvmbot.sock")
    job = await client.submit(spec_dict)
    final = await client.watch(job.id, print)
    await client.close()

Every method returns a Deferred. Errors: :class:`~txvmbot.errors.DaemonUnavailable`
when the daemon cannot be reached or the connection is lost (it says where
and why), :class:`~txvmbot.daemon.api.protocol.IncompatibleVersion` when client
and daemon share no API version, and the API's own errors
(:class:`~txvmbot.daemon.api.protocol.BadRequest`,
:class:`~txvmbot.daemon.api.protocol.UnknownJobError` — also an
:class:`~txvmbot.errors.UnknownJob` —, :class:`~txvmbot.daemon.api.protocol.NotAllowed`,
:class:`~txvmbot.daemon.api.protocol.InternalError`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.error import ConnectionClosed, ConnectionDone, ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from txvmbot import __version__
from txvmbot.daemon import codec
from txvmbot.daemon.api.protocol import (
    API_VERSION,
    DEFAULT_FAILURES_LIMIT,
    APIError,
    Cancel,
    Drain,
    Failures,
    Get,
    Hello,
    IncompatibleVersion,
    JobEventCmd,
    List,
    NotAllowed,
    Resume,
    Status,
    Submit,
    Unwatch,
    Watch,
    WatchEnded,
    backend_from_dict,
    status_from_dict,
)
from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent, JobSpec
from txvmbot.daemon.scheduling.failures import DEFAULT_BY, FailureReport, report_from_dict
from txvmbot.errors import ConfigError, DaemonUnavailable

__all__ = ["ClientTLS", "DaemonClient", "JobList", "JobSummary", "connect"]

_log = Logger(namespace="txvmbot.daemon.api.client")
_EVENT_FIELDS = frozenset(a.name for a in attrs.fields(JobEvent))


@frozen
class ClientTLS:
    """PEM files for a TLS connection: the CA that signed the daemon's
    certificate, and our certificate and key. ``server_name`` is the name
    the daemon's certificate must carry (default: the host dialled)."""

    ca: str
    cert: str
    key: str
    server_name: str | None = None


@frozen
class JobSummary:
    """A job as :meth:`DaemonClient.list` reports it."""

    id: str
    state: str
    backend: str
    priority: int = 0
    image: str = ""
    submitted: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    passed: bool | None = None
    reason: str = ""


@frozen
class JobList:
    """Jobs, newest first; ``more`` when more matched than were sent."""

    jobs: tuple[JobSummary, ...]
    more: bool = False


_SUMMARY_FIELDS = frozenset(a.name for a in attrs.fields(JobSummary))


class _Watcher:
    def __init__(self, on_event: Callable[[JobEvent], Any]) -> None:
        self.on_event = on_event
        self.ended: Deferred[str] = Deferred()


class _ClientAMP(amp.AMP):
    """Our side of the connection: answers the daemon's watch callbacks."""

    def __init__(self) -> None:
        super().__init__()
        self.watchers: dict[str, _Watcher] = {}
        self.lost: Deferred[None] = Deferred()
        self.where = "?"
        self.up = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.up = True

    @JobEventCmd.responder
    def job_event(self, event: dict[str, Any]) -> dict[str, Any]:
        ev = codec.event_from_dict({k: v for k, v in event.items() if k in _EVENT_FIELDS})
        w = self.watchers.get(ev.job_id)
        if w is not None:
            try:
                w.on_event(ev)
            except Exception:
                _log.failure(
                    "While handling event {seq} of job {job_id}", seq=ev.seq, job_id=ev.job_id
                )
        return {}

    @WatchEnded.responder
    def watch_ended(self, job_id: str, state: str) -> dict[str, Any]:
        w = self.watchers.pop(job_id, None)
        if w is not None and not w.ended.called:
            w.ended.callback(state)
        return {}

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.up = False
        super().connectionLost(reason)
        watchers, self.watchers = self.watchers, {}
        for job_id, w in watchers.items():
            if not w.ended.called:
                w.ended.errback(
                    DaemonUnavailable(
                        f"lost the connection to the daemon at {self.where} while watching "
                        f"job {job_id}: {reason.getErrorMessage()}"
                    )
                )
        if not self.lost.called:
            self.lost.callback(None)


def _unavailable(f: Failure, where: str, doing: str) -> Failure:
    if f.check(ConnectionDone, ConnectionLost, ConnectionClosed):
        return Failure(
            DaemonUnavailable(
                f"lost the connection to the daemon at {where} {doing}: {f.getErrorMessage()}"
            )
        )
    return f


def _job(doc: Mapping[str, Any]) -> Job:
    try:
        return codec.job_from_dict(doc)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise APIError(f"the daemon sent a malformed job: {e}") from None


class DaemonClient:
    """A connection to the daemon. Build it with :func:`connect`."""

    def __init__(
        self, proto: _ClientAMP, where: str, api_version: int, daemon_version: str
    ) -> None:
        self._proto = proto
        self.where = where
        self.api_version = api_version
        self.daemon_version = daemon_version

    def _call(self, command: type[amp.Command], **kw: Any) -> Deferred[dict[str, Any]]:
        name = command.commandName.decode()
        d: Deferred[dict[str, Any]] = self._proto.callRemote(command, **kw)
        d.addErrback(_unavailable, self.where, f"during {name}")
        # A new Deferred: AMP ends its own chain with an errback that drops
        # the connection, which must not see errors our caller handles later.
        out: Deferred[dict[str, Any]] = Deferred()
        d.addCallbacks(out.callback, out.errback)
        return out

    def submit(self, spec: Mapping[str, Any] | JobSpec) -> Deferred[Job]:
        """Queue a job; ``spec`` is a :class:`JobSpec` or the dict of
        :func:`txvmbot.daemon.codec.spec_to_dict` (no credentials)."""
        doc = codec.spec_to_dict(spec) if isinstance(spec, JobSpec) else dict(spec)
        return self._call(Submit, spec=doc).addCallback(lambda r: _job(r["job"]))

    def get(self, job_id: str) -> Deferred[Job]:
        return self._call(Get, job_id=job_id).addCallback(lambda r: _job(r["job"]))

    def list(
        self,
        states: Iterable[str] | None = None,
        backend: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> Deferred[JobList]:
        """One page of job summaries, newest first; ``before``: the id of
        the last job of the previous page."""

        def parse(r: dict[str, Any]) -> JobList:
            try:
                jobs = tuple(
                    JobSummary(**{k: v for k, v in d.items() if k in _SUMMARY_FIELDS})
                    for d in r["jobs"]
                )
            except (TypeError, AttributeError) as e:
                raise APIError(f"the daemon sent a malformed job list: {e}") from None
            return JobList(jobs, bool(r["more"]))

        return self._call(
            List,
            states=None if states is None else list(states),
            backend=backend,
            limit=limit,
            before=before,
        ).addCallback(parse)

    def watch(
        self, job_id: str, on_event: Callable[[JobEvent], Any], after_seq: int = 0
    ) -> Deferred[Job]:
        """Call ``on_event`` with each event of the job after ``after_seq``
        until it is final; fire with the final Job. Cancelling the Deferred
        ends the watch."""
        if job_id in self._proto.watchers:
            raise NotAllowed(f"job {job_id} is already watched on this connection")
        w = _Watcher(on_event)
        self._proto.watchers[job_id] = w

        async def run() -> Job:
            try:
                await self._call(Watch, job_id=job_id, after_seq=after_seq)
                await w.ended
            except CancelledError:
                if self._proto.watchers.pop(job_id, None) is not None and self._proto.up:
                    self._call(Unwatch, job_id=job_id).addErrback(lambda _: None)
                raise
            except BaseException:
                self._proto.watchers.pop(job_id, None)
                raise
            return await self.get(job_id)

        return ensureDeferred(run())

    def cancel(self, job_id: str) -> Deferred[Job]:
        """Cancel a job; fires with it once final (after its cleanup)."""
        return self._call(Cancel, job_id=job_id).addCallback(lambda r: _job(r["job"]))

    def drain(self, backend: str) -> Deferred[BackendStatus]:
        return self._call(Drain, backend=backend).addCallback(
            lambda r: backend_from_dict(r["backend"])
        )

    def resume(self, backend: str) -> Deferred[BackendStatus]:
        return self._call(Resume, backend=backend).addCallback(
            lambda r: backend_from_dict(r["backend"])
        )

    def status(self) -> Deferred[DaemonStatus]:
        return self._call(Status).addCallback(lambda r: status_from_dict(r["status"]))

    def failures(
        self,
        by: Sequence[str] = DEFAULT_BY,
        since: float = 0.0,
        limit: int = DEFAULT_FAILURES_LIMIT,
    ) -> Deferred[FailureReport]:
        """The finished jobs that ended at or after ``since`` (epoch
        seconds), among the newest ``limit``, grouped by the facts named in
        ``by`` (keys of :data:`txvmbot.daemon.scheduling.failures.FACTS`)."""

        def parse(r: dict[str, Any]) -> FailureReport:
            try:
                return report_from_dict(r["report"])
            except ValueError as e:
                raise APIError(f"the daemon sent a malformed failure report: {e}") from None

        def older(f: Failure) -> Failure:
            if f.check(amp.UnhandledCommand):
                return Failure(
                    IncompatibleVersion(
                        f"the daemon at {self.where} (txvmbot {self.daemon_version}) does not "
                        f"answer Failures; this client is txvmbot {__version__}: upgrade the daemon"
                    )
                )
            return f

        return (
            self._call(Failures, by=list(by), since=float(since), limit=limit)
            .addErrback(older)
            .addCallback(parse)
        )

    def close(self) -> Deferred[None]:
        """Close the connection; fires once it is closed."""
        if self._proto.transport is not None and self._proto.up:
            self._proto.transport.loseConnection()
        return _chain(self._proto.lost)


def _chain(d: Deferred[None]) -> Deferred[None]:
    out: Deferred[None] = Deferred()
    if d.called:
        out.callback(None)
    else:
        d.addBoth(lambda _: out.callback(None))
    return out


def _tls_host(endpoint: str) -> str:
    from txvmbot.daemon.api.tls import _fields

    kind, args, kwargs = _fields(endpoint)
    host = kwargs.get("host", args[0] if args else "")
    if not host:
        raise ConfigError("--connect", f"{endpoint!r}: no host= to check the certificate against")
    return host


def _why(f: Failure) -> str:
    """A short reason for a failed connection or handshake."""
    from OpenSSL.SSL import Error as SSLError

    value = f.value
    if isinstance(value, ConnectionLost | ConnectionDone) and value.args:
        inner = value.args[0]
        if isinstance(inner, Failure):
            value = inner.value
    if isinstance(value, SSLError):
        return f"TLS handshake failed: {value}"
    from service_identity import VerificationError

    if isinstance(value, VerificationError):
        return (
            "TLS: the daemon's certificate does not name the host we dialled "
            f"(set server_name in [tls] if it uses another name): {value}"
        )
    return f.getErrorMessage().rstrip(".")


def connect(
    reactor: Any,
    endpoint: str,
    *,
    tls: ClientTLS | None = None,
    timeout: float = 30.0,
) -> Deferred[DaemonClient]:
    """Connect to the daemon at ``endpoint`` (a Twisted client endpoint
    string: ``unix:path=...``, or ``tcp:host=H:port=P`` with ``tls``) and
    check it speaks our API version."""
    from twisted.internet.endpoints import clientFromString, connectProtocol, wrapClientTLS

    kind = endpoint.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and tls is None:
        raise ConfigError(
            "--connect",
            f"{endpoint!r}: the daemon serves TCP clients only over TLS with a client "
            "certificate; add a [tls] table (ca, cert, key) to the config",
        )
    try:
        ep = clientFromString(reactor, endpoint)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(
            "--connect",
            f"{endpoint!r} is not a client endpoint string such as "
            f"unix:path=/path/txvmbot.sock: {e}",
        ) from None
    if tls is not None:
        from txvmbot.daemon.api.tls import client_tls_options

        host = tls.server_name or _tls_host(endpoint)
        ep = wrapClientTLS(client_tls_options(host, tls.ca, tls.cert, tls.key), ep)

    hint = "is the daemon running? (start it with `twistd txvmbot`)"

    async def go() -> DaemonClient:
        proto = _ClientAMP()
        proto.where = endpoint
        d = connectProtocol(ep, proto)
        d.addTimeout(timeout, reactor)
        try:
            await d
        except Exception:
            f = Failure()
            raise DaemonUnavailable(
                f"cannot reach the txvmbot daemon at {endpoint}: {_why(f)}; {hint}"
            ) from None
        hello = proto.callRemote(Hello, api_version=API_VERSION, client=f"txvmbot {__version__}")
        hello.addTimeout(timeout, reactor)
        try:
            answer = await hello
        except APIError:
            proto.transport.loseConnection()  # type: ignore[union-attr]
            raise
        except Exception:
            f = Failure()
            if proto.transport is not None:
                proto.transport.loseConnection()
            if f.check(amp.UnhandledCommand):
                raise IncompatibleVersion(
                    f"the daemon at {endpoint} does not speak the txvmbot API (no Hello)"
                ) from None
            why = _why(f)
            if tls is not None and "TLS" not in why:
                why += " (a TLS handshake failure looks like this: check the [tls] files)"
            raise DaemonUnavailable(
                f"the txvmbot daemon at {endpoint} did not answer: {why}"
            ) from None
        newest, oldest = answer["api_version"], answer["min_api_version"]
        if not oldest <= API_VERSION <= newest:
            proto.transport.loseConnection()  # type: ignore[union-attr]
            raise IncompatibleVersion(
                f"the daemon at {endpoint} (txvmbot {answer['daemon_version']}) speaks API "
                f"versions {oldest} to {newest}; this client (txvmbot {__version__}) speaks "
                f"{API_VERSION}: upgrade the older of the two"
            )
        return DaemonClient(proto, endpoint, API_VERSION, answer["daemon_version"])

    return ensureDeferred(go())
