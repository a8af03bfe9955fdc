"""The AMP conversation between the daemon and one worker process.

Daemon -> worker: :class:`RunJob` (answered with the check's result when the
check, cleanup included, is over) and :class:`CancelJob`.

Worker -> daemon: :class:`StepEventCmd` streams the check's step events;
:class:`JournalIntend`, :class:`JournalCreated`, :class:`JournalDone` and
:class:`JournalPending` are the worker's journal, which lives in the daemon.
The daemon answers a journal command only after its own journal has written
it to disk, and the worker creates nothing before that answer: a crash of
either process at any point leaves the intent on disk.

RunJob's answer may carry ``api_calls``, the job's EC2 API attempts counted
by action and outcome (:class:`ApiCalls`) for the daemon's metrics; it is
optional both ways, so workers and daemons of different versions still talk.

Every argument has a size limit. An oversized or malformed argument is
answered with an AMP error (:class:`ArgumentTooLarge`,
:class:`MalformedArgument`) that leaves the connection up; AMP's own limit of
64 KiB per value is lifted for the JSON documents by splitting them over
several keys (:class:`Blob`).

Importing this module imports no reactor.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, ClassVar

from attrs import frozen
from twisted.protocols import amp
from twisted.python.failure import Failure

from txvmbot.daemon.codec import MAX_SPEC_BYTES
from txvmbot.errors import TxvmbotError

__all__ = [
    "MAX_API_CALLS_BYTES",
    "MAX_API_CALL_KINDS",
    "MAX_EVENT_BYTES",
    "MAX_PENDING_BYTES",
    "MAX_RESULT_BYTES",
    "ApiCalls",
    "ArgumentTooLarge",
    "Blob",
    "CancelJob",
    "WorkerUp",
    "JobCrashed",
    "JournalCreated",
    "JournalDone",
    "JournalIntend",
    "JournalPending",
    "JournalWriteFailed",
    "MalformedArgument",
    "RunJob",
    "StepEventCmd",
    "Text",
    "UnknownJobError",
    "WorkerBusy",
    "WorkerProtocolError",
    "decode_api_calls",
    "encode_api_calls",
]

#: The largest step event (JSON) a worker may send.
MAX_EVENT_BYTES = 64 * 1024
#: The largest check result (JSON) a worker may send. Command output is cut
#: by the worker to fit (see txvmbot.daemon.workers.worker).
MAX_RESULT_BYTES = 32 * 1024 * 1024
#: The largest answer to JournalPending (JSON list of entries).
MAX_PENDING_BYTES = 4 * 1024 * 1024
#: The most distinct (action, code) pairs one job's ``api_calls`` holds; the
#: worker counts any beyond under ("other", "other").
MAX_API_CALL_KINDS = 256
#: The longest action or code in ``api_calls``.
MAX_API_CALL_NAME = 64
#: The largest ``api_calls`` (JSON) a worker may send; the bounds above
#: keep it under this.
MAX_API_CALLS_BYTES = 128 * 1024

_ID = 200  # job ids, check ids
_NAME = 255  # resource names and ids, kinds
_URL = 2048
_REGION = 128
_REASON = 2000
_PATH = 4096


# --- errors -------------------------------------------------------------------


class WorkerProtocolError(TxvmbotError):
    """Root of the errors that cross the daemon<->worker AMP connection.

    Each is built from one message, so it survives the trip over the wire
    (AMP carries the text, the class comes from the error code).
    """

    def __init__(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        super().__init__(message)
        self.message = message


class ArgumentTooLarge(WorkerProtocolError):
    """An argument is over its size limit; the message names it."""


class MalformedArgument(WorkerProtocolError):
    """An argument is not what the command takes: invalid UTF-8 or JSON, a
    spec that does not validate, a journal entry that does not exist."""


class UnknownJobError(WorkerProtocolError):
    """The command names a job (or check) that is not the one running on
    this connection. A worker may only touch its own job's journal."""


class WorkerBusy(WorkerProtocolError):
    """RunJob reached a worker that is already running a job."""


class JournalWriteFailed(WorkerProtocolError):
    """The daemon's journal could not record the command; the worker must
    not create the resource."""


class JobCrashed(WorkerProtocolError):
    """The worker could not run the check at all (a bug of txvmbot's: the
    check itself reports every failure in its result)."""


_ERRORS: dict[type[Exception], bytes] = {
    ArgumentTooLarge: b"ARGUMENT_TOO_LARGE",
    MalformedArgument: b"MALFORMED_ARGUMENT",
    UnknownJobError: b"UNKNOWN_JOB",
    WorkerBusy: b"WORKER_BUSY",
    JournalWriteFailed: b"JOURNAL_WRITE_FAILED",
    JobCrashed: b"JOB_CRASHED",
}


# --- values -------------------------------------------------------------------


@frozen
class ApiCalls:
    """How many HTTP attempts of one EC2 API ``action`` ended with ``code``
    ("OK", the cloud's error code, or a transport error's class name), and
    how many of those were retried."""

    action: str
    code: str
    calls: int
    retries: int = 0


def encode_api_calls(counts: Iterable[ApiCalls]) -> bytes:
    """JSON of ``counts`` as ``[[action, code, calls, retries], ...]``."""
    return json.dumps(
        [[c.action, c.code, c.calls, c.retries] for c in counts], separators=(",", ":")
    ).encode("utf-8")


def decode_api_calls(data: bytes) -> tuple[ApiCalls, ...]:
    """The counts :func:`encode_api_calls` wrote. Raises MalformedArgument
    for anything else: not JSON, a wrong shape, names longer than
    MAX_API_CALL_NAME, negative counts, or more than MAX_API_CALL_KINDS + 1
    entries (so what the daemon counts stays bounded)."""
    if len(data) > MAX_API_CALLS_BYTES:
        raise MalformedArgument(
            f"api_calls is {len(data)} bytes, over the limit of {MAX_API_CALLS_BYTES}"
        )
    try:
        rows = json.loads(data)
    except ValueError as e:
        raise MalformedArgument(f"api_calls is not JSON: {e}") from None
    if not isinstance(rows, list) or len(rows) > MAX_API_CALL_KINDS + 1:
        raise MalformedArgument(
            f"api_calls must be a list of at most {MAX_API_CALL_KINDS + 1} entries"
        )
    counts = []
    for row in rows:
        if not (
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(v, str) and 0 < len(v) <= MAX_API_CALL_NAME for v in row[:2])
            and all(type(v) is int and v >= 0 for v in row[2:])
        ):
            raise MalformedArgument(
                f"api_calls entry {str(row)[:200]} is not [action, code, calls, retries]"
            )
        counts.append(ApiCalls(row[0], row[1], row[2], row[3]))
    return tuple(counts)


# --- argument types -------------------------------------------------------------


def _name(key: bytes) -> str:
    return key.decode("ascii", "replace")


class Text(amp.Unicode):
    """A UTF-8 string of at most ``limit`` bytes."""

    def __init__(self, limit: int, optional: bool = False) -> None:
        super().__init__(optional=optional)
        self.limit = limit

    def _check(self, name: bytes, size: int) -> None:
        if size > self.limit:
            raise ArgumentTooLarge(
                f"argument {_name(name)!r} is {size} bytes, over the limit of {self.limit}"
            )

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        raw = strings.get(name)
        if raw is not None:
            self._check(name, len(raw))
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MalformedArgument(f"argument {_name(name)!r} is not UTF-8: {e}") from None
        super().fromBox(name, strings, objects, proto)

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.get(_name(name))
        if value is not None:
            self._check(name, len(value.encode("utf-8")))
        super().toBox(name, strings, objects, proto)


class Blob(amp.Argument):
    """Bytes of at most ``limit``, split into AMP values of at most 64 KiB
    under the keys ``name``, ``name.1``, ``name.2``..."""

    def __init__(self, limit: int, optional: bool = False) -> None:
        super().__init__(optional=optional)
        self.limit = limit

    def _too_large(self, name: bytes, size: int) -> ArgumentTooLarge:
        return ArgumentTooLarge(
            f"argument {_name(name)!r} is {size} bytes, over the limit of {self.limit}"
        )

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = objects.get(_name(name))
        if value is None and self.optional:
            return
        if not isinstance(value, bytes):
            raise TypeError(f"argument {_name(name)!r} must be bytes, not {type(value).__name__}")
        if len(value) > self.limit:
            raise self._too_large(name, len(value))
        step = amp.MAX_VALUE_LENGTH
        strings[name] = value[:step]
        for i, start in enumerate(range(step, len(value), step), 1):
            strings[name + b".%d" % i] = value[start : start + step]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        first = strings.get(name)
        if first is None:
            if not self.optional:
                raise MalformedArgument(f"argument {_name(name)!r} is missing")
            objects[_name(name)] = None
            return
        parts = [first]
        size = len(first)
        i = 1
        while (more := strings.get(name + b".%d" % i)) is not None:
            size += len(more)
            if size > self.limit:
                raise self._too_large(name, size)
            parts.append(more)
            i += 1
        if size > self.limit:
            raise self._too_large(name, size)
        objects[_name(name)] = b"".join(parts)


class _Command(amp.Command):
    """A command whose argument errors are answered as AMP errors that
    leave the connection up (AMP's default for an exception while parsing
    arguments is to log it as unhandled and drop the connection)."""

    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS

    @classmethod
    def parseArguments(cls, strings: Any, protocol: Any) -> Any:
        try:
            return super().parseArguments(strings, protocol)
        except WorkerProtocolError as e:
            raise amp.RemoteAmpError(_ERRORS[type(e)], str(e), local=Failure(e)) from None
        except (amp.InvalidSignature, KeyError, ValueError, TypeError) as e:
            raise amp.RemoteAmpError(
                _ERRORS[MalformedArgument], f"{cls.__name__}: {e}", local=Failure(e)
            ) from None


# --- daemon -> worker -----------------------------------------------------------


class WorkerUp(_Command):
    """Is the worker up? Answered with its pid once its reactor runs. (The
    pool's readiness probe; ampoule's own Ping answers a str where AMP needs
    bytes and kills the worker on Python 3.)"""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response = [(b"pid", amp.Integer())]


class RunJob(_Command):
    """Run one check; answer with its result when it (and its cleanup) is
    over. ``spec`` is JSON of codec.spec_to_dict; ``result`` JSON of
    codec.result_to_dict. A failing check is a result, not an error.
    ``api_calls`` (optional: older workers leave it out) is
    :func:`encode_api_calls` of the job's EC2 API attempts."""

    arguments = [
        (b"job_id", Text(_ID)),
        (b"check_id", Text(_ID)),
        (b"spec", Blob(MAX_SPEC_BYTES)),
        (b"evidence_root", Text(_PATH)),
    ]
    response = [
        (b"result", Blob(MAX_RESULT_BYTES)),
        (b"api_calls", Blob(MAX_API_CALLS_BYTES, optional=True)),
    ]


class CancelJob(_Command):
    """Cancel the running job: the check stops at its current step and
    cleans up; RunJob then answers with the cancelled result.
    ``cancelling`` is False when that job is not (or no longer) running."""

    arguments = [(b"job_id", Text(_ID)), (b"reason", Text(_REASON))]
    response = [(b"cancelling", amp.Boolean())]


# --- worker -> daemon -----------------------------------------------------------


class StepEventCmd(_Command):
    """A step of the running job changed (JSON of codec.step_event_to_dict)."""

    commandName = b"StepEvent"
    arguments = [(b"job_id", Text(_ID)), (b"event", Blob(MAX_EVENT_BYTES))]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class JournalIntend(_Command):
    """Record, before the create, that a resource is about to be created.
    Answered once the daemon's journal has it on disk, with the new entry's
    ``seq`` and ``created`` time (the rest of the entry is the arguments)."""

    arguments = [
        (b"job_id", Text(_ID)),
        (b"check_id", Text(_ID)),
        (b"kind", Text(_NAME)),
        (b"name", Text(_NAME)),
        (b"endpoint", Text(_URL)),
        (b"region", Text(_REGION)),
        (b"parent_id", Text(_NAME, optional=True)),
    ]
    response = [(b"seq", amp.Integer()), (b"created", amp.Float())]


class JournalCreated(_Command):
    """Record the id the cloud gave entry ``seq`` of the job's check."""

    arguments = [(b"job_id", Text(_ID)), (b"seq", amp.Integer()), (b"resource_id", Text(_NAME))]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class JournalDone(_Command):
    """Record that entry ``seq``'s resource is gone."""

    arguments = [(b"job_id", Text(_ID)), (b"seq", amp.Integer())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []


class JournalPending(_Command):
    """The job's check's entries not yet done, newest first, as a JSON list
    of JournalEntry fields (what cleanup in the worker undoes)."""

    arguments = [(b"job_id", Text(_ID)), (b"check_id", Text(_ID))]
    response = [(b"entries", Blob(MAX_PENDING_BYTES))]
