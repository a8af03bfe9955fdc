"""The daemon's public AMP API, version :data:`API_VERSION`.

A client connects, sends :class:`Hello` and checks the daemon speaks its
version; then it may :class:`Submit`, :class:`Get`, :class:`List`,
:class:`Watch`, :class:`Cancel`, :class:`Drain`, :class:`Resume` and ask for
:class:`Status` and :class:`Failures` (finished jobs grouped by their
environment facts). Jobs, events and statuses travel as JSON documents (the
shapes of :mod:`txvmbot.daemon.codec`); a watch makes the daemon call the client
back with :class:`JobEventCmd` for each event of the job, in order, and with
:class:`WatchEnded` once the job is final.

Every argument is checked on the way in: its size (no AMP value exceeds
65,535 bytes, :data:`MAX_VALUE`; a job id is at most 64 characters of
``[a-zA-Z0-9-]``; a backend name at most 200 characters; a limit from 1 to
1,000, for :class:`Failures` to 100,000) and its type. A request that fails a check gets a typed AMP error
(:class:`BadRequest`, whose message names the argument) and the connection
stays up for the next request. Errors are declared on each command, so the
client gets :class:`BadRequest`, :class:`UnknownJobError`,
:class:`NotAllowed` or :class:`InternalError` back, never a bare
``RemoteAmpError``.

Importing this module imports AMP but never the reactor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
from twisted.protocols import amp

from txvmbot.daemon.codec import MAX_SPEC_BYTES, dumps
from txvmbot.daemon.jobs import FINAL_STATES, BackendStatus, DaemonStatus, Job
from txvmbot.daemon.scheduling.failures import DEFAULT_LIMIT as DEFAULT_REPORT_LIMIT
from txvmbot.daemon.scheduling.failures import FACTS, FailureReport, check_by, report_to_dict
from txvmbot.daemon.scheduling.failures import MAX_LIMIT as MAX_REPORT_LIMIT
from txvmbot.errors import ConfigError, DaemonUnavailable, TxvmbotError, UnknownJob
from txvmbot.model import CheckSpec

__all__ = [
    "API_VERSION",
    "MIN_API_VERSION",
    "APIError",
    "BadRequest",
    "Cancel",
    "DEFAULT_FAILURES_LIMIT",
    "Drain",
    "EpochArgument",
    "FactNamesArgument",
    "Failures",
    "Get",
    "Hello",
    "IncompatibleVersion",
    "InternalError",
    "JobEventCmd",
    "List",
    "NotAllowed",
    "Resume",
    "Status",
    "Submit",
    "UnknownJobError",
    "Unwatch",
    "Watch",
    "WatchEnded",
    "backend_from_dict",
    "backend_to_dict",
    "Fitted",
    "fit_document",
    "fit_report",
    "job_summary",
    "status_from_dict",
    "status_to_dict",
]

#: The API version this code speaks (the newest).
API_VERSION = 1
#: The oldest API version this code still speaks.
MIN_API_VERSION = 1

#: AMP's own limit on one value.
MAX_VALUE = amp.MAX_VALUE_LENGTH
MAX_JOB_ID = 64
MAX_BACKEND = 200
MAX_LIMIT = 1000
#: How many of the newest finished jobs one :class:`Failures` reads at most,
#: and by default.
MAX_FAILURES_LIMIT = MAX_REPORT_LIMIT
DEFAULT_FAILURES_LIMIT = DEFAULT_REPORT_LIMIT
#: The latest epoch time :class:`EpochArgument` takes (the year 5138).
MAX_EPOCH = 1e11
MAX_SPEC = min(MAX_SPEC_BYTES, MAX_VALUE)
JOB_STATES = ("queued", "running", "cleaning", *sorted(FINAL_STATES))
_JOB_ID = re.compile(r"[a-zA-Z0-9-]{1,64}")


# --- errors ------------------------------------------------------------------


class APIError(TxvmbotError):
    """An error the daemon answered a request with."""


class BadRequest(APIError):
    """The request was malformed: an argument is missing, of the wrong type,
    too large, or (for a job spec) invalid. The message names the argument
    or key."""


class UnknownJobError(APIError, UnknownJob):
    """No job has the given id."""

    def __init__(self, message: str, job_id: str = "") -> None:
        Exception.__init__(self, message)
        self.job_id = job_id


class NotAllowed(APIError):
    """The daemon understood the request and refuses it (a backend that is
    not known, too many watches on one connection, ...)."""


class InternalError(APIError):
    """The daemon failed while handling the request; it logged why."""


class IncompatibleVersion(APIError, DaemonUnavailable):
    """Client and daemon share no API version (raised by the client)."""


_ERRORS: dict[type[Exception], bytes] = {
    BadRequest: b"BAD_REQUEST",
    UnknownJobError: b"UNKNOWN_JOB",
    NotAllowed: b"NOT_ALLOWED",
    InternalError: b"INTERNAL_ERROR",
}
_JOB_ERRORS = {**_ERRORS}
_PLAIN_ERRORS = {k: v for k, v in _ERRORS.items() if k is not UnknownJobError}


# --- argument types ------------------------------------------------------------


class _Checked(amp.Argument):
    """An argument whose decoding failures (missing, wrong type, too large,
    invalid) become a :class:`BadRequest` naming the argument, instead of
    an unhandled error that makes AMP drop the connection."""

    what = "a value"

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        arg = name.decode("ascii", "replace")
        if strings.get(name) is None and not self.optional:
            raise BadRequest(f"argument {arg!r}: missing (expected {self.what})")
        try:
            super().fromBox(name, strings, objects, proto)
        except BadRequest as e:
            raise BadRequest(f"argument {arg!r}: {e}") from None
        except Exception as e:
            raise BadRequest(f"argument {arg!r}: expected {self.what}: {e}") from None

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        arg = name.decode("ascii", "replace")
        try:
            super().toBox(name, strings, objects, proto)
        except BadRequest as e:
            raise BadRequest(f"argument {arg!r}: {e}") from None


class _Text(_Checked):
    """UTF-8 text of at most ``max_chars`` characters."""

    def __init__(self, max_chars: int, optional: bool = False) -> None:
        super().__init__(optional)
        self.max_chars = max_chars
        self.what = f"text of 1 to {max_chars} characters"

    def check(self, text: str) -> str:
        if not text or len(text) > self.max_chars:
            raise BadRequest(f"expected {self.what}, got {len(text)} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise BadRequest("control characters are not allowed")
        return text

    def fromString(self, inString: bytes) -> str:
        return self.check(inString.decode("utf-8"))

    def toString(self, inObject: str) -> bytes:
        return self.check(inObject).encode("utf-8")


class JobIdArgument(_Text):
    """A job id: 1 to 64 characters of ``[a-zA-Z0-9-]``."""

    def __init__(self, optional: bool = False) -> None:
        super().__init__(MAX_JOB_ID, optional)
        self.what = "a job id of 1 to 64 characters a-z, A-Z, 0-9 and '-'"

    def check(self, text: str) -> str:
        if not _JOB_ID.fullmatch(text):
            shown = text if len(text) <= 70 else text[:67] + "..."
            raise BadRequest(f"expected {self.what}, got {shown!r}")
        return text


class BackendArgument(_Text):
    """A backend name: 1 to 200 characters, no control characters."""

    def __init__(self, optional: bool = False) -> None:
        super().__init__(MAX_BACKEND, optional)


class BoundedInteger(_Checked):
    """An integer from ``low`` to ``high``."""

    def __init__(self, low: int, high: int, optional: bool = False) -> None:
        super().__init__(optional)
        self.low, self.high = low, high
        self.what = f"an integer from {low} to {high}"

    def check(self, value: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"expected {self.what}, got {type(value).__name__}")
        if not self.low <= value <= self.high:
            raise BadRequest(f"expected {self.what}, got {value}")
        return value

    def fromString(self, inString: bytes) -> int:
        text = inString.decode("ascii")
        if not re.fullmatch(r"-?[0-9]{1,20}", text):
            raise BadRequest(f"expected {self.what}, got {text[:40]!r}")
        return self.check(int(text))

    def toString(self, inObject: int) -> bytes:
        return str(self.check(inObject)).encode("ascii")


class JSONArgument(_Checked):
    """A JSON document (UTF-8, at most ``limit`` bytes, which AMP caps at
    65,535) decoded to Python values; ``kind`` (dict or list) is checked."""

    def __init__(self, limit: int = MAX_VALUE, kind: type = dict, optional: bool = False) -> None:
        super().__init__(optional)
        self.limit = min(limit, MAX_VALUE)
        self.kind = kind
        self.what = f"a JSON {'object' if kind is dict else 'array'} of at most {self.limit} bytes"

    def fromString(self, inString: bytes) -> Any:
        if len(inString) > self.limit:
            raise BadRequest(f"{len(inString)} bytes is over the limit of {self.limit}")
        try:
            value = json.loads(inString.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"not valid JSON: {e}") from None
        if not isinstance(value, self.kind):
            raise BadRequest(f"expected {self.what}, found {type(value).__name__}")
        return value

    def toString(self, inObject: Any) -> bytes:
        data = inObject.data if isinstance(inObject, Fitted) else dumps(inObject)
        if len(data) > self.limit:
            raise BadRequest(f"{len(data)} bytes is over the limit of {self.limit}")
        return data


class StatesArgument(_Checked):
    """A list of job states (no more than there are states)."""

    what = "a list of job states (" + ", ".join(JOB_STATES) + ")"

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)
        self._list = amp.ListOf(amp.Unicode())

    def check(self, states: list[str]) -> list[str]:
        if len(states) > len(JOB_STATES):
            raise BadRequest(f"at most {len(JOB_STATES)} states, got {len(states)}")
        for s in states:
            if s not in JOB_STATES:
                raise BadRequest(
                    f"unknown job state {s[:40]!r}; expected one of {', '.join(JOB_STATES)}"
                )
        return list(states)

    def fromString(self, inString: bytes) -> list[str]:
        states = self._list.fromString(inString)
        if self._list.toString(states) != inString:
            raise BadRequest("malformed list (lengths do not match the data)")
        return self.check(states)

    def toString(self, inObject: list[str]) -> bytes:
        result: bytes = self._list.toString(self.check(list(inObject)))
        return result


class EpochArgument(_Checked):
    """A time in epoch seconds: a finite number from 0 to :data:`MAX_EPOCH`."""

    what = f"epoch seconds, a number from 0 to {MAX_EPOCH:.0f}"

    def check(self, value: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"expected {self.what}, got {type(value).__name__}")
        if not (math.isfinite(value) and 0 <= value <= MAX_EPOCH):
            raise BadRequest(f"expected {self.what}, got {value!r}")
        return float(value)

    def fromString(self, inString: bytes) -> float:
        text = inString.decode("ascii")
        if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{0,20})?(e[+-]?[0-9]{1,3})?", text):
            raise BadRequest(f"expected {self.what}, got {text[:40]!r}")
        return self.check(float(text))

    def toString(self, inObject: float) -> bytes:
        return repr(self.check(inObject)).encode("ascii")


class FactNamesArgument(_Checked):
    """Fact names to group failures by: 1 to as many as there are facts,
    each a key of :data:`txvmbot.daemon.scheduling.failures.FACTS`, none twice."""

    what = "a list of fact names (" + ", ".join(FACTS) + ")"

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)
        self._list = amp.ListOf(amp.Unicode())

    def check(self, names: list[str]) -> list[str]:
        if len(names) > len(FACTS):
            raise BadRequest(f"at most {len(FACTS)} facts, got {len(names)}")
        try:
            return list(check_by(names))
        except ConfigError as e:
            raise BadRequest(e.message) from None

    def fromString(self, inString: bytes) -> list[str]:
        names = self._list.fromString(inString)
        if self._list.toString(names) != inString:
            raise BadRequest("malformed list (lengths do not match the data)")
        return self.check(names)

    def toString(self, inObject: list[str]) -> bytes:
        result: bytes = self._list.toString(self.check(list(inObject)))
        return result


class _Bool(_Checked):
    what = "True or False"

    def __init__(self, optional: bool = False) -> None:
        super().__init__(optional)
        self._b = amp.Boolean()

    def fromString(self, inString: bytes) -> bool:
        value: bool = self._b.fromString(inString)
        return value

    def toString(self, inObject: bool) -> bytes:
        data: bytes = self._b.toString(inObject)
        return data


class _Version(_Text):
    def __init__(self) -> None:
        super().__init__(100)


# --- commands ------------------------------------------------------------------


class Hello(amp.Command):
    """First call of a client: which API versions the daemon speaks
    (``min_api_version`` to ``api_version``) and its software version."""

    commandName = b"Hello"
    arguments = [(b"api_version", BoundedInteger(0, 1_000_000)), (b"client", _Version())]
    response = [
        (b"api_version", BoundedInteger(0, 1_000_000)),
        (b"min_api_version", BoundedInteger(0, 1_000_000)),
        (b"daemon_version", _Version()),
    ]
    errors = _PLAIN_ERRORS


class Submit(amp.Command):
    """Queue a job: ``spec`` is :func:`txvmbot.daemon.codec.spec_to_dict`'s shape."""

    commandName = b"Submit"
    arguments = [(b"spec", JSONArgument(MAX_SPEC))]
    response = [(b"job", JSONArgument())]
    errors = _PLAIN_ERRORS


class Get(amp.Command):
    """One job (:func:`txvmbot.daemon.codec.job_to_dict`; long outputs may be cut
    to fit one AMP value, then ``truncated`` is true)."""

    commandName = b"Get"
    arguments = [(b"job_id", JobIdArgument())]
    response = [(b"job", JSONArgument())]
    errors = _JOB_ERRORS


class List(amp.Command):
    """Job summaries, newest first; ``more`` is true when more jobs matched
    than ``limit`` or than fit in one answer. The next page: the same
    filters with ``before`` set to the id of the last job of this one."""

    commandName = b"List"
    arguments = [
        (b"states", StatesArgument(optional=True)),
        (b"backend", BackendArgument(optional=True)),
        (b"limit", BoundedInteger(1, MAX_LIMIT)),
        (b"before", JobIdArgument(optional=True)),
    ]
    response = [(b"jobs", JSONArgument(kind=list)), (b"more", _Bool())]
    errors = _JOB_ERRORS  # an unknown ``before``


class Watch(amp.Command):
    """Stream a job's events with ``seq > after_seq``. After the answer the
    daemon calls :class:`JobEventCmd` for each event, then
    :class:`WatchEnded` when the job is final."""

    commandName = b"Watch"
    arguments = [(b"job_id", JobIdArgument()), (b"after_seq", BoundedInteger(0, 2**53))]
    response = [(b"ok", _Bool())]
    errors = _JOB_ERRORS


class Unwatch(amp.Command):
    """Stop a watch before the job is final."""

    commandName = b"Unwatch"
    arguments = [(b"job_id", JobIdArgument())]
    response = [(b"ok", _Bool())]
    errors = _JOB_ERRORS


class JobEventCmd(amp.Command):
    """Daemon to client: one event of a watched job
    (:func:`txvmbot.daemon.codec.event_to_dict`)."""

    commandName = b"JobEvent"
    arguments = [(b"event", JSONArgument())]
    response: ClassVar[list[Any]] = []
    errors = _PLAIN_ERRORS


class WatchEnded(amp.Command):
    """Daemon to client: the watched job is final in ``state``."""

    commandName = b"WatchEnded"
    arguments = [(b"job_id", JobIdArgument()), (b"state", _Text(20))]
    response: ClassVar[list[Any]] = []
    errors = _PLAIN_ERRORS


class Cancel(amp.Command):
    """Cancel a job; answers once it is final (after its cleanup)."""

    commandName = b"Cancel"
    arguments = [(b"job_id", JobIdArgument())]
    response = [(b"job", JSONArgument())]
    errors = _JOB_ERRORS


class Drain(amp.Command):
    """New jobs for ``backend`` wait; running ones finish."""

    commandName = b"Drain"
    arguments = [(b"backend", BackendArgument())]
    response = [(b"backend", JSONArgument())]
    errors = _PLAIN_ERRORS


class Resume(amp.Command):
    """Undo :class:`Drain` (and a quarantine)."""

    commandName = b"Resume"
    arguments = [(b"backend", BackendArgument())]
    response = [(b"backend", JSONArgument())]
    errors = _PLAIN_ERRORS


class Status(amp.Command):
    """The daemon's status (:func:`status_to_dict`)."""

    commandName = b"Status"
    arguments: ClassVar[list[Any]] = []
    response = [(b"status", JSONArgument())]
    errors = _PLAIN_ERRORS


class Failures(amp.Command):
    """Finished jobs grouped by environment facts
    (:func:`txvmbot.daemon.scheduling.failures.report_to_dict`): those that finished at
    or after ``since`` among the newest ``limit`` finished jobs, grouped
    by the facts named in ``by``. Groups with the fewest failures are left
    out (``omitted``) when the report would not fit one AMP value."""

    commandName = b"Failures"
    arguments = [
        (b"by", FactNamesArgument()),
        (b"since", EpochArgument()),
        (b"limit", BoundedInteger(1, MAX_FAILURES_LIMIT)),
    ]
    response = [(b"report", JSONArgument())]
    errors = _PLAIN_ERRORS


# --- documents -------------------------------------------------------------------


def backend_to_dict(b: BackendStatus) -> dict[str, Any]:
    return attrs.asdict(b)


def backend_from_dict(d: Mapping[str, Any]) -> BackendStatus:
    try:
        return BackendStatus(**d)
    except TypeError as e:
        raise BadRequest(f"malformed backend status: {e}") from None


def status_to_dict(s: DaemonStatus) -> dict[str, Any]:
    d = attrs.asdict(s, recurse=False)
    d["backends"] = [backend_to_dict(b) for b in s.backends]
    return d


def status_from_dict(d: Mapping[str, Any]) -> DaemonStatus:
    try:
        values = dict(d)
        values["backends"] = tuple(backend_from_dict(b) for b in values.get("backends", ()))
        return DaemonStatus(**values)
    except TypeError as e:
        raise BadRequest(f"malformed daemon status: {e}") from None


def job_summary(job: Job) -> dict[str, Any]:
    """The short form of a job that :class:`List` answers with."""
    check = job.spec.machines
    return {
        "id": job.id,
        "state": job.state,
        "backend": job.spec.backend,
        "priority": job.spec.priority,
        "image": (check.image or check.image_name or "") if isinstance(check, CheckSpec) else "",
        "target": job.spec.target,
        "submitted": job.submitted,
        "started": job.started,
        "finished": job.finished,
        "attempts": job.attempts,
        "passed": None if job.result is None else job.result.passed,
        "reason": _cut(job.reason, 200),
    }


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "...[truncated]"


@attrs.frozen
class Fitted:
    """A document that fits in one AMP value, with the bytes a
    :class:`JSONArgument` sends for it: measuring it meant encoding it, so
    it is not encoded a second time on the way out."""

    doc: dict[str, Any]
    data: bytes


def _cut_strings(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        # Keep the end: the last lines of a log say the most.
        return value if len(value) <= limit else "[truncated]..." + value[-limit:]
    if isinstance(value, list):
        return [_cut_strings(v, limit) for v in value]
    if isinstance(value, dict):
        return {k: _cut_strings(v, limit) for k, v in value.items()}
    return value


def fit_document(
    doc: dict[str, Any], part: str, limit: int = MAX_VALUE, describe: Callable[[], str] = str
) -> Fitted:
    """``doc``, with the long strings of ``doc[part]`` (a check result's
    console logs and command outputs) cut to their ends until the whole
    fits in ``limit`` bytes; ``truncated`` is then true. Raises
    :class:`InternalError` if even that does not fit."""
    data = dumps(doc)
    if len(data) <= limit:
        return Fitted(doc, data)
    size = len(data)
    cut = 8192
    while cut >= 64:
        smaller = dict(doc, truncated=True)
        if smaller.get(part) is not None:
            smaller[part] = _cut_strings(doc[part], cut)
        data = dumps(smaller)
        if len(data) <= limit:
            return Fitted(smaller, data)
        cut //= 2
    raise InternalError(
        f"{describe() or 'the answer'} is {size} bytes, too large for one AMP value "
        f"({limit} bytes) even with its outputs cut"
    )


def fit_report(report: FailureReport, limit: int = MAX_VALUE) -> Fitted:
    """``report`` as a document of at most ``limit`` bytes: its groups in
    order (most failures first) as long as they fit, the number of the
    others added to ``omitted``. Raises :class:`InternalError` if not even
    the first group fits."""
    doc = report_to_dict(report)
    data = dumps(doc)
    if len(data) <= limit:
        return Fitted(doc, data)
    groups = doc["groups"]
    # Room for the digits ``omitted`` may gain.
    size = len(dumps(dict(doc, groups=[]))) + 20
    kept: list[dict[str, Any]] = []
    for g in groups:
        n = len(dumps(g)) + 1
        if size + n > limit:
            break
        kept.append(g)
        size += n
    doc = dict(doc, groups=kept, omitted=report.omitted + len(groups) - len(kept))
    data = dumps(doc)
    if not kept or len(data) > limit:
        raise InternalError(
            f"the failure report is {len(data)} bytes, too large for one AMP value "
            f"({limit} bytes) even with groups left out"
        )
    return Fitted(doc, data)
