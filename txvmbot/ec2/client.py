"""An asynchronous EC2 Query API client: botocore's models, Twisted's HTTP.

``make_client(reactor, cloud)`` gives an IEC2Client whose ``call`` serializes
and signs with botocore, sends with Twisted's Agent over a persistent
connection pool, parses with botocore, checks that the answer is really the
operation's, and retries transient errors (see ``txvmbot.ec2.retry``).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import _WrapperException
from twisted.web.client import HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from txvmbot import __version__
from txvmbot.ec2 import _botocore
from txvmbot.ec2.credentials import resolve
from txvmbot.ec2.retry import (
    ApiCallObserver,
    call_with_retries,
    describe,
    is_refused,
    is_transient,
)
from txvmbot.errors import ConfigError, TransportError
from txvmbot.interfaces import IEC2Client
from txvmbot.model import Cloud, Credentials

__all__ = ["DirectEndpoints", "EC2Client", "make_agent", "make_client", "make_pool"]


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body that is already in memory, written at once (no
    cooperator, so it works the same on a real reactor and in memory)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyReader(Protocol):
    """Collects a response body. Unlike ``readBody``, cancelling really closes
    the connection (the Agent's body transport has no ``abortConnection``),
    and a body ended by the server closing the connection is accepted."""

    def __init__(self, finished: Deferred[bytes]) -> None:
        self._finished: Deferred[bytes] | None = finished
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        finished, self._finished = self._finished, None
        if finished is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self._chunks))
        else:
            finished.errback(reason)

    def cancel(self, _: Deferred[bytes]) -> None:
        self._finished = None
        producer = getattr(self.transport, "stopProducing", None)
        if producer is not None:
            producer()


def _read_body(response: IResponse) -> Deferred[bytes]:
    reader = _BodyReader(Deferred(lambda d: reader.cancel(d)))
    finished = reader._finished
    assert finished is not None
    response.deliverBody(reader)
    return finished


def _is_cancellation(exc: BaseException) -> bool:
    """True when ``exc`` is how the Agent reports that we cancelled it:
    CancelledError itself, ConnectingCancelledError, or a ResponseFailed-like
    wrapper around a CancelledError."""
    if isinstance(exc, (CancelledError, ierror.ConnectingCancelledError)):
        return True
    if isinstance(exc, _WrapperException):
        return any(isinstance(r, Failure) and r.check(CancelledError) for r in exc.reasons)
    return False


def _normalize_endpoint(endpoint: str, where: str) -> str:
    """Check the endpoint URL; drop a default port, so that the Host header
    Twisted writes and the host botocore signs agree."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            where, f"{endpoint!r} is not an http(s) URL like https://ec2.us-east-1.amazonaws.com"
        )
    if parts.query or parts.fragment:
        raise ConfigError(where, f"{endpoint!r} must not have a query or fragment")
    try:
        port = parts.port
    except ValueError as e:
        raise ConfigError(where, f"{endpoint!r}: {e}") from e
    netloc = parts.netloc
    if port is not None and port == {"http": 80, "https": 443}[parts.scheme]:
        netloc = netloc.rsplit(":", 1)[0]
    return urlunsplit((parts.scheme, netloc, parts.path or "/", "", ""))


@implementer(IEC2Client)
class EC2Client:
    """Calls one EC2-API endpoint.

    ``agent`` is an IAgent (Twisted's Agent in production; an in-memory one
    such as ``treq.testing.RequestTraversalAgent`` in tests), or a treq-like
    object with ``request(method, url, headers=, data=)`` (``StubTreq``).
    ``clock`` bounds each attempt and times the backoff; ``random`` draws
    the jitter. ``api_observer``, if given, is told of every HTTP attempt
    with the action, its outcome code and whether it is retried (see
    :data:`txvmbot.ec2.retry.ApiCallObserver`).
    """

    log = Logger()

    def __init__(
        self,
        cloud: Cloud,
        credentials: Credentials,
        *,
        agent: Any,
        clock: IReactorTime,
        pool: HTTPConnectionPool | None = None,
        random: Callable[[], float] = _random.random,
        api_observer: ApiCallObserver | None = None,
    ) -> None:
        self.cloud = cloud
        self.endpoint = _normalize_endpoint(cloud.endpoint, f"clouds.{cloud.name}.endpoint")
        self.region = cloud.region
        self.signature_version = cloud.signature_version
        self.retry_policy = cloud.retry
        self._credentials = credentials
        self._agent = agent
        self._clock = clock
        self._pool = pool
        self._random = random
        self._api_observer = api_observer
        self._user_agent = f"txvmbot/{__version__} botocore/{_botocore.botocore_version()}"

    def __repr__(self) -> str:
        return (
            f"<EC2Client {self.endpoint} region={self.region} "
            f"sig={self.signature_version} key={self._credentials.access_key}>"
        )

    @property
    def api_version(self) -> str:
        """The EC2 API version of the botocore model (loads it on first use)."""
        return _botocore.api_version()

    def call(
        self, operation: str, params: dict[str, Any] | None = None, *, repeatable: bool = True
    ) -> Deferred[dict[str, Any]]:
        """Call ``operation`` with botocore-shaped ``params``.

        Fires with botocore's parsed answer without ``ResponseMetadata``; fails
        with ParamError (before sending), CloudError or TransportError (after
        transient errors were retried). The ClientToken of a RunInstances is
        chosen once here, so every retry of this call carries the same one.
        With ``repeatable=False`` only errors that say the cloud did not act
        (throttling) are retried: for a create whose duplicate nothing could
        find (no ClientToken, no tag).
        """
        try:
            prepared = _botocore.prepare_params(operation, params or {})
        except Exception:
            return fail()
        return call_with_retries(
            self._clock,
            self.retry_policy,
            operation,
            lambda: Deferred.fromCoroutine(self._attempt(operation, prepared)),
            random=self._random,
            retryable=is_transient if repeatable else is_refused,
            observer=self._api_observer,
        )

    async def _attempt(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        request = _botocore.sign_request(
            operation,
            params,
            endpoint=self.endpoint,
            region=self.region,
            credentials=self._credentials,
            signature_version=self.signature_version,
            user_agent=self._user_agent,
        )
        headers = Headers(dict(request.headers))
        try:
            if IAgent.providedBy(self._agent):
                response = await self._agent.request(
                    request.method, request.url, headers, _BytesProducer(request.body)
                )
                body = await _read_body(response)
            else:
                response = await self._agent.request(
                    request.method.decode("ascii"),
                    request.url.decode("ascii"),
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                )
                body = await response.content()
        except Exception as e:
            if _is_cancellation(e):
                # Cancelled by the caller or by the attempt's timeout (which
                # turns a CancelledError into a TimeoutError).
                raise CancelledError() from e
            if isinstance(e, ierror.ConnectionRefusedError):
                raise TransportError(
                    operation, f"connection refused by {self.endpoint}: is the endpoint right?"
                ) from e
            raise TransportError(operation, f"{describe(e)} ({self.endpoint})") from e
        response_headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        result = _botocore.handle_response(operation, response.code, response_headers, body)
        self.log.debug(
            "{operation} answered HTTP {status} ({size} bytes)",
            operation=operation,
            status=response.code,
            size=len(body),
        )
        return result

    def close(self) -> Deferred[None]:
        """Close the pool's cached connections (requests in flight finish)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()


@implementer(IAgentEndpointFactory)
class DirectEndpoints:
    """Endpoints for the Agent that connect straight to an IP address.

    Twisted's default resolves every host name, an IP literal too, through
    getaddrinfo in the thread pool, once per connection; with a cloud that
    closes every connection (moto does) that cost ~0.45 ms of the reactor
    thread per request (bench/parallel_vs_boto3.py's profile). Names are
    still resolved, with HostnameEndpoint; https is wrapped in TLS that
    checks the name, as the Agent's default does.
    """

    def __init__(self, reactor: Any, timeout: float) -> None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        self._reactor = reactor
        self._timeout = timeout
        self._tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> Any:
        from twisted.internet.abstract import isIPAddress, isIPv6Address
        from twisted.internet.endpoints import (
            HostnameEndpoint,
            TCP4ClientEndpoint,
            TCP6ClientEndpoint,
            wrapClientTLS,
        )

        host = uri.host.decode("ascii")
        endpoint: Any
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


def make_pool(reactor: Any) -> HTTPConnectionPool:
    """The persistent connection pool an EC2Client uses by default."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    # Servers close idle connections; reusing one that was just closed
    # costs a (safe, logged) retry, so do not keep them long.
    pool.cachedConnectionTimeout = 50
    return pool


def make_agent(reactor: Any, cloud: Cloud, pool: HTTPConnectionPool) -> Any:
    """The IAgent an EC2Client for ``cloud`` uses by default: Twisted's
    Agent over ``pool`` with :class:`DirectEndpoints`."""
    from twisted.web.client import Agent

    return Agent.usingEndpointFactory(
        reactor, DirectEndpoints(reactor, cloud.retry.request_timeout), pool=pool
    )


def make_client(
    reactor: Any,
    cloud: Cloud,
    *,
    pool: HTTPConnectionPool | None = None,
    clock: IReactorTime | None = None,
    agent: Any = None,
    api_observer: ApiCallObserver | None = None,
) -> EC2Client:
    """An EC2Client for ``cloud``.

    Resolves credentials now (raising ConfigError if there are none) but
    loads the botocore model only on the first call. ``pool`` defaults to a
    new persistent HTTPConnectionPool; ``clock`` to ``reactor``; ``agent`` to
    Twisted's Agent over ``pool`` (tests inject an in-memory one).
    ``api_observer`` is told of every HTTP attempt (see EC2Client).
    """
    credentials = resolve(cloud)
    if pool is None:
        pool = make_pool(reactor)
    if agent is None:
        agent = make_agent(reactor, cloud, pool)
    return EC2Client(
        cloud,
        credentials,
        agent=agent,
        clock=clock if clock is not None else reactor,
        pool=pool,
        api_observer=api_observer,
    )
