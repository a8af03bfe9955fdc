"""Which API errors are worth retrying, and how: exponential backoff with full
jitter, bounded in attempts and in total time, every retry logged.

Only transient errors are retried: throttling, server-side errors (5xx), a
connection lost or reset mid-request, and timeouts. Anything else (a 4xx, a
refused connection, bad parameters) fails at once, because retrying would
only hide it.

An optional :data:`ApiCallObserver` is told of every attempt (the daemon's
metrics count them by action and outcome).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from typing import TypeVar

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import _newclient
from twisted.web.http import PotentialDataLoss

from txvmbot.errors import CloudError, TransportError
from txvmbot.model import RetryPolicy

__all__ = [
    "ApiCallObserver",
    "SERVER_ERROR_CODES",
    "THROTTLING_CODES",
    "backoff_delay",
    "call_with_retries",
    "describe",
    "is_transient",
    "outcome_code",
]

T = TypeVar("T")

log = Logger()

#: Told of each attempt of a call: ``(action, code, retrying)``, where
#: ``code`` is :func:`outcome_code` of the attempt ("OK" for an answer) and
#: ``retrying`` whether another attempt follows. It must be cheap and must
#: not raise (an exception is logged and ignored).
ApiCallObserver = Callable[[str, str, bool], object]

#: The longest outcome code told to an observer (a label value in metrics).
MAX_CODE_LENGTH = 64

#: Error codes that mean "slow down".
THROTTLING_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "SlowDown",
    }
)

#: Error codes that mean "the service failed, try again".
SERVER_ERROR_CODES = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}
)

# Connection reset or lost, or no answer in time: the request may or may not
# have reached the cloud, and trying again is the right thing (RunInstances
# carries a ClientToken for this).
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ierror.ConnectionLost,  # includes ConnectionDone
    ierror.ConnectionDone,
    ierror.TCPTimedOutError,
    ierror.TimeoutError,
    _newclient.ResponseFailed,  # includes ResponseNeverReceived
    _newclient.RequestTransmissionFailed,
    PotentialDataLoss,
    DeferredTimeoutError,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
)


def is_transient(failure_or_exc: Failure | BaseException) -> bool:
    """True when the error is worth retrying.

    Accepts a Failure or an exception: a CloudError with a throttling or
    server error code or an HTTP 5xx (or 429) status; a TransportError caused
    by a lost or reset connection or a timeout; or such a low-level error
    itself. A refused connection is not transient: the endpoint is wrong.
    """
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    if isinstance(exc, CloudError):
        if exc.code in THROTTLING_CODES or exc.code in SERVER_ERROR_CODES:
            return True
        return exc.status is not None and (exc.status >= 500 or exc.status == 429)
    if isinstance(exc, TransportError):
        cause = exc.__cause__
        return cause is not None and is_transient(cause)
    if isinstance(exc, ierror.ConnectionRefusedError):
        return False
    return isinstance(exc, _TRANSIENT_EXCEPTIONS)


def is_refused(failure_or_exc: Failure | BaseException) -> bool:
    """True when the cloud refused the request before acting on it
    (throttling): the one transient error a call that must not be repeated
    once the cloud may have acted can still retry. A 5xx, a reset or a
    timeout may come after the cloud acted."""
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    return isinstance(exc, CloudError) and (exc.code in THROTTLING_CODES or exc.status == 429)


def backoff_delay(
    policy: RetryPolicy, failures: int, random: Callable[[], float] = _random.random
) -> float:
    """The delay after the ``failures``-th failed attempt (1-based):
    full jitter over an exponentially growing cap,
    ``random() * min(max_delay, base_delay * 2 ** (failures - 1))``."""
    cap = min(policy.max_delay, policy.base_delay * 2 ** max(failures - 1, 0))
    return random() * cap


def describe(exc: BaseException) -> str:
    """A one-line description of a (possibly wrapped) low-level error."""
    if isinstance(exc, _newclient._WrapperException):
        inner = "; ".join(
            describe(r.value) for r in exc.reasons if isinstance(r, Failure) and r.value is not None
        )
        return f"{type(exc).__name__}({inner})" if inner else type(exc).__name__
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def outcome_code(exc: BaseException | None) -> str:
    """A short, bounded name for how an attempt ended: ``"OK"`` (None), the
    cloud's error code (``RequestLimitExceeded``, ``HTTP503``), or the class
    name of the transport error under a TransportError
    (``ResponseNeverReceived``, ``TimeoutError``, ``ConnectionRefusedError``);
    the exception's class name otherwise."""
    if exc is None:
        return "OK"
    if isinstance(exc, CloudError):
        code = exc.code or "CloudError"
    elif isinstance(exc, TransportError):
        cause = exc.__cause__
        code = type(cause).__name__ if cause is not None else "TransportError"
    else:
        code = type(exc).__name__
    return code[:MAX_CODE_LENGTH]


def _tell(observer: ApiCallObserver | None, operation: str, code: str, retrying: bool) -> None:
    if observer is None:
        return
    try:
        observer(operation, code, retrying)
    except Exception:
        log.failure("The API call observer failed on {operation}", operation=operation)


def _gave_up(
    operation: str, err: BaseException, attempts: int, elapsed: float, why: str
) -> Exception:
    note = (
        f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f}s ({why})"
    )
    new: Exception
    if isinstance(err, CloudError):
        new = CloudError(
            err.operation, err.code, f"{err.message} [{note}]", err.status, err.request_id
        )
    elif isinstance(err, TransportError):
        new = TransportError(err.operation, f"{err.reason} [{note}]")
    else:
        new = TransportError(operation, f"{describe(err)} [{note}]")
    setattr(new, "attempts", attempts)  # noqa: B010 - CloudError has no such field
    new.__cause__ = err
    return new


def call_with_retries(
    clock: IReactorTime,
    policy: RetryPolicy,
    operation: str,
    attempt: Callable[[], Deferred[T]],
    random: Callable[[], float] = _random.random,
    retryable: Callable[[BaseException], bool] = is_transient,
    observer: ApiCallObserver | None = None,
) -> Deferred[T]:
    """Call ``attempt()`` until it succeeds, fails with an error
    ``retryable`` refuses (default: any that is not transient), or the
    policy's attempts or elapsed time run out.

    Each attempt is bounded by ``policy.request_timeout`` (and by what is left
    of ``policy.max_elapsed``) on ``clock``; a timed-out attempt is cancelled
    and becomes a transient TransportError. Between attempts the delay is
    ``backoff_delay``; a retry is never started if its delay would end past
    ``max_elapsed``. Each retry is logged at warn level. The error that
    finally comes out is the last one, with "gave up after N attempts" added
    and an ``attempts`` attribute, when attempts or time ran out.

    Cancelling the returned Deferred cancels the attempt or the wait.
    ``observer``, if given, is told of every attempt once it has ended
    (see :data:`ApiCallObserver`); an attempt cancelled by the caller is
    told as ``CancelledError``.
    """

    async def run() -> T:
        start = clock.seconds()
        attempts = 0
        while True:
            attempts += 1
            elapsed = clock.seconds() - start
            timeout = max(min(policy.request_timeout, policy.max_elapsed - elapsed), 0.0)
            err: BaseException
            try:
                answer = await attempt().addTimeout(timeout, clock)
            except CancelledError:
                _tell(observer, operation, "CancelledError", False)
                raise
            except DeferredTimeoutError as e:
                err = TransportError(operation, f"no answer within {timeout:g}s")
                err.__cause__ = e
            except Exception as e:
                err = e
            else:
                _tell(observer, operation, "OK", False)
                return answer
            if not retryable(err):
                _tell(observer, operation, outcome_code(err), False)
                raise err
            elapsed = clock.seconds() - start
            if attempts >= policy.max_attempts:
                _tell(observer, operation, outcome_code(err), False)
                raise _gave_up(operation, err, attempts, elapsed, "max_attempts reached")
            delay = backoff_delay(policy, attempts, random)
            if elapsed + delay >= policy.max_elapsed:
                _tell(observer, operation, outcome_code(err), False)
                raise _gave_up(
                    operation,
                    err,
                    attempts,
                    elapsed,
                    f"max_elapsed {policy.max_elapsed:g}s reached",
                )
            _tell(observer, operation, outcome_code(err), True)
            log.warn(
                "{operation}: attempt {attempt}/{max_attempts} failed: {error}; "
                "retrying in {delay:.3f}s",
                operation=operation,
                attempt=attempts,
                max_attempts=policy.max_attempts,
                delay=delay,
                error=str(err),
                error_type=type(err).__name__,
            )
            await deferLater(clock, delay)

    return Deferred.fromCoroutine(run())
