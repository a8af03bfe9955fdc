"""Test results of ``txvmbot suite``: read from what workers print, written as
one merged subunit v2 stream, JUnit XML for CI servers, and JSON.

Everything here is pure: bytes in, values out, output streams passed in.

A worker's stdout is shared with whatever its tests print (seed 002), so the
subunit reader is tolerant: bytes that are not subunit never break the stream.
They are kept, clearly marked, in the output of the test that was running when
they came (else the next test to start, else the last one that ended), and all
of them in :attr:`SubunitRead.stray`.

This module imports python-subunit and testtools (about 60 ms); only the suite
path imports it.
"""

from __future__ import annotations

import datetime
import io
import keyword
import re
import signal as _signal
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, BinaryIO, Literal

import attrs
from attrs import field, frozen
from subunit.v2 import ByteStreamToStreamResult, StreamResultToBytes
from testtools import StreamResult

__all__ = [
    "JSON_SCHEMA",
    "OUTCOMES",
    "STRAY_HEADER",
    "SubunitRead",
    "TestOutcome",
    "TestResult",
    "count_outcomes",
    "from_exit",
    "junit_names",
    "machine_lost",
    "read_subunit",
    "timed_out",
    "to_json",
    "write_junit",
    "write_subunit",
]

TestOutcome = Literal["passed", "failed", "skipped", "timeout", "infra"]
OUTCOMES: tuple[TestOutcome, ...] = ("passed", "failed", "skipped", "timeout", "infra")
JSON_SCHEMA = "txvmbot.suite/1"

#: Marks, in a test's output, bytes its worker printed outside the subunit stream.
STRAY_HEADER = b"--- bytes on stdout outside the subunit stream ---\n"

_MESSAGE_LIMIT = 500


def _one_line(text: str) -> str:
    """``text`` on one line: whitespace runs (newlines too) become one space,
    and anything past :data:`_MESSAGE_LIMIT` characters is cut."""
    line = " ".join(str(text).split())
    if len(line) > _MESSAGE_LIMIT:
        line = line[: _MESSAGE_LIMIT - 3] + "..."
    return line


def _positive_attempts(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value}")


@frozen
class TestResult:
    """How one test went on one machine.

    ``output`` is what it printed (stdout then stderr); ``message`` says, on
    one line, why it did not pass. ``infra`` means the machine failed, not the
    test: it never counts as a test failure. ``attempts`` is 2 when the test
    was run again after infrastructure trouble.
    """

    __test__ = False  # not a pytest test class, despite its name

    test_id: str
    outcome: TestOutcome = field(validator=attrs.validators.in_(OUTCOMES))
    duration: float
    worker: str
    started: float
    output: bytes = b""
    message: str = field(default="", converter=_one_line)
    attempts: int = field(default=1, validator=_positive_attempts)

    @property
    def is_failure(self) -> bool:
        """The test itself failed (``failed`` or ``timeout``); ``infra`` is not."""
        return self.outcome in ("failed", "timeout")


def count_outcomes(results: Iterable[TestResult]) -> dict[TestOutcome, int]:
    """How many results have each outcome (every outcome present, maybe 0)."""
    counts: dict[TestOutcome, int] = dict.fromkeys(OUTCOMES, 0)
    for result in results:
        counts[result.outcome] += 1
    return counts


# --- --format exit ----------------------------------------------------------


def _signal_text(sig: int | str) -> str:
    if isinstance(sig, int):
        try:
            return f"{sig} ({_signal.Signals(sig).name})"
        except ValueError:
            return str(sig)
    name = sig.upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def from_exit(
    test_id: str,
    worker: str,
    started: float,
    duration: float,
    exit_status: int | None,
    signal: int | str | None,
    stdout: bytes,
    stderr: bytes,
    *,
    skip_status: int | None = 77,
    attempts: int = 1,
) -> TestResult:
    """The result of a test that ran as one command (``--format exit``).

    Status 0 passes; ``skip_status`` (77, the automake and meson convention;
    None to turn off) skips; any other status, or a signal (a number, or an
    ssh signal name such as ``"KILL"``), fails. A command that ended with
    neither status nor signal lost its channel: that is ``infra``.
    """
    outcome: TestOutcome
    if signal is not None:
        outcome, message = "failed", f"killed by signal {_signal_text(signal)}"
    elif exit_status is None:
        outcome = "infra"
        message = f"command ended on {worker} without an exit status or signal"
    elif exit_status == 0:
        outcome, message = "passed", ""
    elif skip_status is not None and exit_status == skip_status:
        outcome, message = "skipped", f"exit status {exit_status} (skipped)"
    else:
        outcome, message = "failed", f"exit status {exit_status}"
    return TestResult(
        test_id=test_id,
        outcome=outcome,
        duration=max(0.0, duration),
        worker=worker,
        started=started,
        output=stdout + stderr,
        message=message,
        attempts=attempts,
    )


def timed_out(
    test_id: str,
    worker: str,
    started: float,
    bound: float,
    output: bytes = b"",
    *,
    attempts: int = 1,
) -> TestResult:
    """A test that was stopped because it passed its bound of ``bound`` s."""
    return TestResult(
        test_id=test_id,
        outcome="timeout",
        duration=bound,
        worker=worker,
        started=started,
        output=output,
        message=f"passed its bound of {bound:g}s",
        attempts=attempts,
    )


def machine_lost(
    test_id: str,
    worker: str,
    started: float,
    duration: float,
    output: bytes = b"",
    *,
    reason: str = "",
    attempts: int = 1,
) -> TestResult:
    """A test whose machine died under it: ``infra``, not a test failure."""
    return TestResult(
        test_id=test_id,
        outcome="infra",
        duration=max(0.0, duration),
        worker=worker,
        started=started,
        output=output,
        message=reason or f"machine {worker} stopped answering",
        attempts=attempts,
    )


# --- reading subunit v2 -----------------------------------------------------


@frozen
class SubunitRead:
    """What one subunit v2 stream from a worker said.

    ``results``: the tests that ended, in the order they ended (tests the
    stream names but the batch did not expect are included). ``running``: the
    test that started but never ended (the most recently started one, if
    several), with what it printed so far and when it started. ``stray``: all
    bytes that were not subunit, in order. ``missing``: tests ``expected``
    named that neither ended nor are ``running``: run them again.
    """

    results: tuple[TestResult, ...]
    running: str | None
    running_started: float | None
    running_output: bytes
    stray: bytes
    missing: tuple[str, ...]


# The name python-subunit gives non-subunit bytes; no real attachment uses it.
_NON_SUBUNIT = "txvmbot:non-subunit"
_SIGNATURE = b"\xb3"
_FINAL = frozenset({"success", "fail", "skip", "xfail", "uxsuccess"})
# What ByteStreamToStreamResult raises, besides the ParseError it reports as
# a "subunit.parser" test, when a packet has a valid checksum but a body that
# does not parse.
_PARSER_BREAKS = (struct.error, ValueError, IndexError, KeyError, OverflowError)


class _Resync(Exception):
    """Restart parsing at ``position`` with a fresh parser."""

    def __init__(self, position: int) -> None:
        super().__init__(position)
        self.position = position


@attrs.define
class _Section:
    """A run of one attachment (or of stray bytes, ``name`` None)."""

    name: str | None
    content: bytearray


@attrs.define
class _Partial:
    """A test being assembled from the events about it."""

    test_id: str
    sections: list[_Section] = attrs.Factory(list)
    reason: bytearray = attrs.Factory(bytearray)
    first: float | None = None
    last: float | None = None
    status: str | None = None

    def saw(self, timestamp: datetime.datetime | None) -> None:
        if timestamp is None:
            return
        when = timestamp.timestamp()
        self.first = when if self.first is None else min(self.first, when)
        self.last = when if self.last is None else max(self.last, when)

    def add(self, section: _Section) -> None:
        last = self.sections[-1] if self.sections else None
        if last is not None and section.name is not None and last.name == section.name:
            # The next packet of a chunked attachment.
            last.content += section.content
        else:
            self.sections.append(_Section(section.name, bytearray(section.content)))

    def output(self) -> bytes:
        """The attachments, in the order they came. A lone attachment is
        given as it is; several get a ``--- name ---`` line each; stray bytes
        always get :data:`STRAY_HEADER`."""
        sections = [s for s in self.sections if s.content]
        if len(sections) == 1 and sections[0].name is not None:
            return bytes(sections[0].content)
        parts: list[bytes] = []
        for section in sections:
            if section.name is None:
                parts.append(STRAY_HEADER)
            else:
                parts.append(f"--- {section.name} ---\n".encode())
            parts.append(bytes(section.content))
            if not section.content.endswith(b"\n"):
                parts.append(b"\n")
        return b"".join(parts)

    def message(self) -> tuple[TestOutcome, str]:
        reason = self.reason.decode("utf-8", "replace").strip()
        if self.status == "success":
            return "passed", ""
        if self.status == "xfail":
            return "passed", "expected failure"
        if self.status == "skip":
            return "skipped", reason or "skipped"
        if self.status == "uxsuccess":
            return "failed", reason or "unexpected success"
        if reason:
            return "failed", reason
        for section in reversed(self.sections):
            if section.name is not None and section.name.startswith("traceback"):
                lines = section.content.decode("utf-8", "replace").strip().splitlines()
                if lines:
                    return "failed", lines[-1]
        return "failed", "failed"

    def result(self, worker: str, fallback_started: float) -> TestResult:
        outcome, message = self.message()
        started = self.first if self.first is not None else fallback_started
        duration = (
            self.last - self.first if self.last is not None and self.first is not None else 0.0
        )
        return TestResult(
            test_id=self.test_id,
            outcome=outcome,
            duration=max(0.0, duration),
            worker=worker,
            started=started,
            output=self.output(),
            message=message,
        )


class _Collector(StreamResult):
    """Gathers the events python-subunit parses into tests.

    It also tells :func:`read_subunit` where to restart the parser (by
    raising :class:`_Resync`). python-subunit takes a 0xB3 byte (the packet
    signature, also found in text: UTF-8 "ó" is C3 B3) for the start of a
    packet; when that packet does not parse, it drops every byte the attempt
    read, up to the whole rest of the stream. Here such a byte is stray and
    parsing goes on at the next signature.
    """

    def __init__(self, data: bytes, source: io.BytesIO) -> None:
        super().__init__()
        self._data = data
        self._source = source
        self._begin = 0  # where the current parser started
        self._mark = 0  # where the next packet or byte starts
        self._open: dict[tuple[str | None, str], _Partial] = {}
        self._ended: list[_Partial] = []
        self._pending: list[_Section] = []  # not yet given to a test
        self._waiting: list[_Section] = []  # for the next test to start
        self.stray = bytearray()

    def begin(self, position: int) -> None:
        """A fresh parser starts reading at ``position``."""
        self._begin = self._mark = position

    def _add_stray(self, data: bytes) -> None:
        if not data:
            return
        self.stray += data
        if self._pending and self._pending[-1].name is None:
            self._pending[-1].content += data
        else:
            self._pending.append(_Section(None, bytearray(data)))

    def _stray_until_signature(self, start: int, after: int) -> int:
        """Keep ``data[start:]`` up to the first signature at or past
        ``after`` as stray, and say where that signature is: no other byte
        can start a packet."""
        following = self._data.find(_SIGNATURE, after)
        if following < 0:
            following = len(self._data)
        self._add_stray(self._data[start:following])
        return following

    def skip_bad_byte(self) -> int:
        """The packet starting at the mark did not parse: keep its bytes as
        stray up to the next signature, and say where to go on."""
        return self._stray_until_signature(self._mark, self._mark + 1)

    def _flush(self) -> None:
        """Give what came outside any test to the running test, or hold it
        for the next test to start."""
        if not self._pending:
            return
        if self._open:
            running = next(reversed(self._open.values()))
            for section in self._pending:
                running.add(section)
        else:
            self._waiting.extend(self._pending)
        self._pending = []

    def status(
        self,
        test_id: str | None = None,
        test_status: str | None = None,
        test_tags: set[str] | None = None,
        runnable: bool = True,
        file_name: str | None = None,
        file_bytes: bytes | memoryview | None = None,
        eof: bool = False,
        mime_type: str | None = None,
        route_code: str | None = None,
        timestamp: datetime.datetime | None = None,
    ) -> None:
        here = self._source.tell()
        content = bytes(file_bytes) if file_bytes is not None else b""
        if test_id is None and file_name == _NON_SUBUNIT:
            start = here - len(content)
            bad = content.find(_SIGNATURE)
            if bad >= 0 and start + bad > self._begin:
                # A signature the parser took for text: look for a packet
                # there with a fresh parser.
                self._add_stray(content[:bad])
                raise _Resync(start + bad)
            # python-subunit hands these over one byte at a time (~2 us a
            # byte); jump to the next signature instead.
            raise _Resync(self._stray_until_signature(start, here))
        if (
            test_id == "subunit.parser"
            and file_name == "Packet data"
            and content == self._data[self._mark : self._mark + len(content)]
        ):
            # python-subunit's report of a packet it could not parse.
            raise _Resync(self.skip_bad_byte())
        self._mark = here
        self._event(test_id, test_status, file_name, content, route_code, timestamp)

    def _event(
        self,
        test_id: str | None,
        test_status: str | None,
        file_name: str | None,
        content: bytes,
        route_code: str | None,
        timestamp: datetime.datetime | None,
    ) -> None:
        if test_id is None:
            if file_name is not None and content:
                # An attachment of the run, not of a test (a tool upstream
                # kept non-subunit bytes this way): place it like stray bytes.
                self._pending.append(_Section(file_name, bytearray(content)))
            return
        self._flush()
        key = (route_code, test_id)
        partial = self._open.get(key)
        if partial is None:
            if file_name is None and test_status in (None, "exists"):
                return  # listed, or tagged: not started
            partial = self._open[key] = _Partial(test_id)
            for section in self._waiting:
                partial.add(section)
            self._waiting = []
        partial.saw(timestamp)
        if file_name == "reason":
            partial.reason += content
        elif file_name is not None and content:
            partial.add(_Section(file_name, bytearray(content)))
        if test_status in _FINAL:
            partial.status = test_status
            del self._open[key]
            self._ended.append(partial)

    def finish(self, worker: str, expected: Sequence[str], started: float) -> SubunitRead:
        """What the whole stream said."""
        self._flush()
        if self._waiting and self._ended:
            for section in self._waiting:
                self._ended[-1].add(section)
        results = tuple(p.result(worker, started) for p in self._ended)
        running = next(reversed(self._open.values()), None)
        done = {r.test_id for r in results}
        if running is not None:
            done.add(running.test_id)
        return SubunitRead(
            results=results,
            running=running.test_id if running is not None else None,
            running_started=(
                (running.first if running.first is not None else started)
                if running is not None
                else None
            ),
            running_output=running.output() if running is not None else b"",
            stray=bytes(self.stray),
            missing=tuple(dict.fromkeys(t for t in expected if t not in done)),
        )


def read_subunit(
    data: bytes,
    worker: str,
    expected: Sequence[str],
    *,
    started: float = 0.0,
) -> SubunitRead:
    """Read the subunit v2 stream a worker printed for a batch of tests.

    Never raises on bad input: bytes that are not subunit (garbage, text,
    torn or corrupt packets, a stream cut off mid-packet) end up in
    ``stray`` and in some test's output. Start times and durations come from
    the stream's timestamps; ``started`` stands in for a stream without them.
    """
    source = io.BytesIO(data)
    collector = _Collector(data, source)
    collector.startTestRun()
    parser = ByteStreamToStreamResult(source, non_subunit_name=_NON_SUBUNIT)
    position = 0
    # run() starts afresh each time (its UTF-8 state too). Every restart
    # moves past at least one byte, so this ends.
    for _ in range(len(data) + 1):
        if position >= len(data):
            break
        source.seek(position)
        collector.begin(position)
        try:
            parser.run(collector)
        except _Resync as resync:
            position = resync.position
        except _PARSER_BREAKS:
            position = collector.skip_bad_byte()
        else:
            break
    collector.stopTestRun()
    return collector.finish(worker, expected, started)


# --- writing subunit v2 -----------------------------------------------------

_CHUNK = 64 * 1024
_TEXT = "text/plain;charset=utf8"
_UTC = datetime.UTC


def _when(epoch: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(max(0.0, epoch), tz=_UTC)


_SUBUNIT_STATUS: Mapping[TestOutcome, str] = {
    "passed": "success",
    "failed": "fail",
    "skipped": "skip",
    "timeout": "fail",
    "infra": "fail",
}


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def write_subunit(results: Iterable[TestResult], out: BinaryIO) -> None:
    """Write ``results`` to ``out`` as one subunit v2 stream.

    Each test is tagged with its worker; its output is the ``output``
    attachment (in 64 KiB packets; text if it is UTF-8, else
    ``application/octet-stream`` so that readers do not choke); the message
    of a test that did not pass is the ``reason`` attachment. ``timeout`` and ``infra`` become ``fail``.
    Attachments carry no timestamp: subunit-ls times a test from its last
    packet before the end.
    """
    writer = StreamResultToBytes(out)
    for result in results:
        tags = {result.worker}
        start = _when(result.started)
        end = _when(result.started + result.duration)
        writer.status(
            test_id=result.test_id, test_status="inprogress", test_tags=tags, timestamp=start
        )
        output = result.output
        output_type = _TEXT if _is_utf8(output) else "application/octet-stream"
        for offset in range(0, len(output), _CHUNK):
            writer.status(
                test_id=result.test_id,
                test_tags=tags,
                file_name="output",
                file_bytes=output[offset : offset + _CHUNK],
                eof=offset + _CHUNK >= len(output),
                mime_type=output_type,
            )
        if result.message and result.outcome != "passed":
            writer.status(
                test_id=result.test_id,
                test_tags=tags,
                file_name="reason",
                file_bytes=result.message.encode("utf-8"),
                eof=True,
                mime_type=_TEXT,
            )
        writer.status(
            test_id=result.test_id,
            test_status=_SUBUNIT_STATUS[result.outcome],
            test_tags=tags,
            timestamp=end,
        )


# --- JUnit XML --------------------------------------------------------------

# Characters XML 1.0 does not allow, even escaped.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(data: bytes | str) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    return _NOT_XML.sub("", text)


def _last_dot(text: str) -> int:
    """Index of the last "." outside brackets and parentheses (so that
    ``test_x[1.5]`` and ``test_x(scenario.a)`` stay whole), or -1."""
    depth = 0
    cut = -1
    for index, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth = max(0, depth - 1)
        elif char == "." and depth == 0:
            cut = index
    return cut


# Last parts that make a dotted id a file name, not a Python name: ``t11.sh``.
_FILE_SUFFIXES = frozenset(
    """
    awk bash bat bats bin c cc cfg cjs cmd conf cpp cs csh cxx dart el erl ex exe exp
    expect exs fish go groovy h hs ini jar java jl js json jsx kt ksh log lua md mjs ml
    nim out php pl pm ps1 py pyc r rb robot rs rst scala sed sh sql swift t tcl toml ts
    tsx txt xml yaml yml zig zsh
    """.split()
)


def _python_part(part: str) -> bool:
    return part.isidentifier() and not keyword.iskeyword(part)


def _is_python_name(module: str, last: str) -> bool:
    """Whether ``module.last`` is a dotted Python name: every part an
    identifier, ``last`` maybe with a ``[...]`` or ``(...)`` parameter suffix,
    and not a file name (``t11.sh``: ``last`` is not a file suffix)."""
    bracket = min((i for i in (last.find("["), last.find("(")) if i >= 0), default=len(last))
    base, suffix = last[:bracket], last[bracket:]
    if suffix and (suffix[0], suffix[-1]) not in (("[", "]"), ("(", ")")):
        return False
    return (
        all(_python_part(part) for part in module.split("."))
        and _python_part(base)
        and base.lower() not in _FILE_SUFFIXES
    )


def junit_names(test_id: str, suite_name: str) -> tuple[str, str]:
    """The JUnit ``(classname, name)`` of a test id.

    pytest node ids (``tests/test_x.py::Class::test_y[1]``) split as
    pytest's own JUnit writer does: ``tests.test_x.Class``, ``test_y[1]``.
    Dotted Python names (``pkg.mod.Class.test_x``, parameters such as
    ``[1.5]`` or ``(scenario.a)`` kept whole) split on their last dot. Any
    other id (``t11.sh``, ``tests/net/t11.sh``, ``boot``) is a test of
    ``suite_name`` named by its whole id: a file's name is not a class and a
    method.
    """
    path, bracket, parameters = test_id.partition("[")
    if "::" in path:
        module, *rest = path.split("::")
        name = rest.pop() + bracket + parameters
        return ".".join([module.removesuffix(".py").replace("/", "."), *rest]), name
    cut = _last_dot(test_id)
    if cut > 0 and _is_python_name(test_id[:cut], test_id[cut + 1 :]):
        return test_id[:cut], test_id[cut + 1 :]
    return suite_name, test_id


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def write_junit(results: Iterable[TestResult], out: BinaryIO, suite_name: str) -> None:
    """Write ``results`` to ``out`` as JUnit XML, as Jenkins and GitLab read it.

    ``failed`` and ``timeout`` are failures, ``infra`` an error; the time of
    the suite is the wall time from the first start to the last end.
    """
    results = list(results)
    counts = count_outcomes(results)
    starts = [r.started for r in results]
    ends = [r.started + r.duration for r in results]
    wall = max(ends) - min(starts) if results else 0.0
    totals = {
        "tests": str(len(results)),
        "failures": str(counts["failed"] + counts["timeout"]),
        "errors": str(counts["infra"]),
        "skipped": str(counts["skipped"]),
        "time": _seconds(wall),
    }
    root = ET.Element("testsuites", {"name": _xml_text(suite_name), **totals})
    suite = ET.SubElement(root, "testsuite", {"name": _xml_text(suite_name), **totals})
    if results:
        suite.set("timestamp", _when(min(starts)).strftime("%Y-%m-%dT%H:%M:%S"))
    for result in results:
        classname, name = junit_names(result.test_id, suite_name)
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": _xml_text(classname),
                "name": _xml_text(name),
                "time": _seconds(result.duration),
            },
        )
        message = _xml_text(result.message)
        if result.outcome in ("failed", "timeout"):
            failure = ET.SubElement(case, "failure", {"message": message, "type": result.outcome})
            failure.text = message
        elif result.outcome == "infra":
            error = ET.SubElement(case, "error", {"message": message, "type": "infra"})
            error.text = message
        elif result.outcome == "skipped":
            ET.SubElement(case, "skipped", {"message": message} if message else {})
        if result.output:
            ET.SubElement(case, "system-out").text = _xml_text(result.output)
    ET.indent(root)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


# --- JSON -------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """``value`` as plain JSON types: bytes decoded, tuples and sets as lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(results: Iterable[TestResult], summary: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-ready dict: ``summary`` as given, the counts by outcome, and
    every result (times in epoch seconds and seconds, output decoded as UTF-8
    with replacement characters)."""
    results = list(results)
    return {
        "schema": JSON_SCHEMA,
        "summary": _plain(summary),
        "counts": dict(count_outcomes(results)),
        "tests": [
            {
                "test_id": r.test_id,
                "outcome": r.outcome,
                "duration": r.duration,
                "worker": r.worker,
                "started": r.started,
                "attempts": r.attempts,
                "message": r.message,
                "output": r.output.decode("utf-8", "replace"),
            }
            for r in results
        ],
    }
