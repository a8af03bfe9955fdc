"""Reading the JUnit XML report a batch's command wrote (``--format junit``).

pytest (``--junitxml``), Maven Surefire, go-junit-report and many others
write this format; each ``<testcase>`` becomes a :class:`TestResult` whose id
is, where it can be found, the id of the batch it stands for.

Everything here is pure: bytes in, values out. The XML is read with the
standard library's ElementTree (expat); a DTD that declares entities is
refused outright, so entity expansion never happens.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from math import isfinite
from typing import TypeVar
from xml.parsers import expat

from attrs import frozen

from txvmbot.errors import TxvmbotError
from txvmbot.jobs.suite.results import TestOutcome, TestResult, junit_names

__all__ = ["JUnitError", "JUnitRead", "read_junit"]

_T = TypeVar("_T")


class JUnitError(TxvmbotError):
    """A JUnit XML report could not be read: not XML, not JUnit, or a
    ``<testcase>`` with a time that is not a number of seconds.

    ``where`` names the report (its path, or a label such as the batch and
    machine it came from); ``message`` says what is wrong in it.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@frozen
class JUnitRead:
    """What one JUnit XML report said about a batch.

    ``results``: one per ``<testcase>``, in the order of the file (a test
    reported twice, as pytest's reruns do, only at its last place). Each has
    the id of the batch it maps to, else a best-effort id (``classname.name``)
    that is then also listed in ``unmatched``. ``missing``: ids of the batch
    no testcase maps to: they did not run.
    """

    results: tuple[TestResult, ...]
    unmatched: tuple[str, ...]
    missing: tuple[str, ...]


@frozen
class _Case:
    """One ``<testcase>``, as read."""

    classname: str
    name: str
    outcome: TestOutcome
    message: str
    output: bytes
    duration: float


# --- bytes to XML -----------------------------------------------------------

_DECLARED = re.compile(rb"""\A(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?encoding\s*=\s*["']([^"']*)["']""")
# Control characters XML 1.0 forbids anywhere, raw or as character references.
_FORBIDDEN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_FORBIDDEN_REFERENCE = re.compile(rb"&#(?:[xX]0*([0-9a-fA-F]{1,6})|0*([0-9]{1,7}));")


def _forbidden_reference(match: re.Match[bytes]) -> bytes:
    hexadecimal, decimal = match.groups()
    code = int(hexadecimal, 16) if hexadecimal is not None else int(decimal)
    allowed = code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0x10FFFF
    return match.group(0) if allowed and code not in (0xFFFE, 0xFFFF) else b""


def _tolerable(data: bytes) -> bytes:
    """``data`` with what a test's output often slips into a report made
    readable: bytes that are not UTF-8 become U+FFFD, and the control
    characters XML forbids (raw, or as ``&#27;``) are dropped, as
    :func:`~txvmbot.jobs.suite.results.write_junit` drops them.

    Only for a report in UTF-8 (declared, or by default): any other declared
    encoding is left to expat.
    """
    declared = _DECLARED.match(data)
    if declared is not None and declared.group(1).lower() not in (b"utf-8", b"utf8"):
        return data
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data  # UTF-16, by its byte order mark
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("utf-8", "replace").encode("utf-8")
    data = _FORBIDDEN.sub(b"", data)
    return _FORBIDDEN_REFERENCE.sub(_forbidden_reference, data)


class _StopReading(Exception):
    """Enough of the prolog was read: an entity was declared, or the root began."""


def _refuse_entities(data: bytes, where: str) -> None:
    """Raise :class:`JUnitError` if the document type declares entities.

    Reads only the prolog (expat stops at the root element); a prolog that
    does not parse is left for the real parse to report.
    """
    if b"<!ENTITY" not in data:
        return
    parser = expat.ParserCreate()
    declared: list[str] = []

    def entity(name: str, *rest: object) -> None:
        declared.append(name)
        raise _StopReading()

    def start(name: str, attributes: object) -> None:
        raise _StopReading()

    parser.EntityDeclHandler = entity
    parser.StartElementHandler = start
    try:
        parser.Parse(data, True)
    except (_StopReading, expat.ExpatError, ValueError, LookupError):
        pass
    if declared:
        raise JUnitError(
            where,
            f"the document type declares the entity {declared[0]!r} "
            f"(line {parser.CurrentLineNumber}); a JUnit report has no need "
            "of entities, and they are refused so that none can expand",
        )


def _parse(data: bytes, where: str) -> ET.Element:
    if not data.strip():
        raise JUnitError(where, "the JUnit report is empty")
    data = _tolerable(data)
    _refuse_entities(data, where)
    parser = ET.XMLParser()
    try:
        parser.feed(data)
        root = parser.close()
    except ET.ParseError as error:
        line, column = error.position
        reason = expat.ErrorString(error.code) or str(error)
        raise JUnitError(
            where, f"line {line}, column {column + 1}: not well-formed XML: {reason}"
        ) from None
    except (ValueError, LookupError) as error:
        # An encoding declaration Python cannot use, for instance.
        raise JUnitError(where, f"not readable as XML: {error}") from None
    if root.tag not in ("testsuites", "testsuite"):
        raise JUnitError(
            where,
            f"the root element is <{root.tag}>, not <testsuites> or <testsuite>: "
            "is this a JUnit XML report?",
        )
    return root


# --- XML to cases -----------------------------------------------------------


def _testcases(root: ET.Element) -> Iterator[ET.Element]:
    """The ``<testcase>`` elements under ``root`` and the ``<testsuite>``
    and ``<testsuites>`` in it, however deeply nested, in document order."""
    stack = [iter(root)]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
        elif child.tag == "testcase":
            yield child
        elif child.tag in ("testsuite", "testsuites"):
            stack.append(iter(child))


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _text(element: ET.Element) -> str:
    return "".join(element.itertext())


def _join(parts: Sequence[str]) -> bytes:
    """The texts, one after the other, each ending with a newline."""
    return "".join(p if p.endswith("\n") else p + "\n" for p in parts if p).encode("utf-8")


def _duration(case: ET.Element, label: str, where: str) -> float:
    value = case.get("time")
    if value is None or not value.strip():
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not isfinite(seconds) or seconds < 0:
        raise JUnitError(where, f"{label}: time={value!r} is not a number of seconds (0 or more)")
    return seconds


def _case(element: ET.Element, index: int, where: str) -> _Case:
    classname = element.get("classname", "")
    name = element.get("name")
    label = f"testcase {index}" + (f" ({classname}.{name})" if classname else f" ({name})")
    if not name:
        raise JUnitError(where, f"testcase {index} has no name attribute")
    duration = _duration(element, label, where)
    outcome: TestOutcome = "passed"
    message = ""
    tracebacks: list[str] = []
    stdout: list[str] = []
    stderr: list[str] = []
    for child in element:
        if child.tag in ("failure", "error"):
            text = _text(child)
            tracebacks.append(text)
            if outcome != "failed":
                outcome = "failed"
                message = child.get("message") or _first_line(text) or child.tag
        elif child.tag == "skipped" and outcome == "passed" and child.get("type") == "pytest.xfail":
            # pytest writes an expected failure as a skip of this type; a
            # subunit stream says "xfail", which passes: the same here.
            message = "expected failure: " + (child.get("message") or _first_line(_text(child)))
        elif child.tag == "skipped" and outcome == "passed":
            outcome = "skipped"
            message = child.get("message") or _first_line(_text(child)) or "skipped"
        elif child.tag == "system-out":
            stdout.append(_text(child))
        elif child.tag == "system-err":
            stderr.append(_text(child))
    return _Case(
        classname=classname,
        name=name,
        outcome=outcome,
        message=message,
        output=_join([*tracebacks, *stdout, *stderr]),
        duration=duration,
    )


# --- cases to the batch's ids -----------------------------------------------


def _key(test_id: str) -> tuple[str, str]:
    """The ``(classname, name)`` a JUnit writer gives ``test_id``: as
    :func:`~txvmbot.jobs.suite.results.junit_names` does (pytest node ids,
    dotted Python names), with ``""`` for the class of any other id; and a
    Surefire ``Class#method`` split at its ``#``."""
    classname, name = junit_names(test_id, "")
    if not classname and "#" in test_id:
        classname, _, name = test_id.partition("#")
    return classname, name


def _suffixes(classname: str) -> Iterator[str]:
    """``classname`` and each of its dotted suffixes, down to ``""``:
    ``a.b``, ``b``, ``""``."""
    yield classname
    dot = classname.find(".")
    while dot >= 0:
        yield classname[dot + 1 :]
        dot = classname.find(".", dot + 1)
    if classname:
        yield ""


def _splits(test_id: str) -> Iterator[tuple[str, str]]:
    """Every ``(classname, name)`` that ``classname.name`` or
    ``classname#name`` spells ``test_id``."""
    for index, char in enumerate(test_id):
        if char in ".#":
            yield test_id[:index], test_id[index + 1 :]


def _two(found: Iterable[Iterable[_T]]) -> set[_T]:
    """The distinct items of ``found``, stopping at two: enough to tell one
    candidate from several without walking every list."""
    seen: set[_T] = set()
    for items in found:
        for item in items:
            seen.add(item)
            if len(seen) > 1:
                return seen
    return seen


def _match(keys: Sequence[tuple[str, str]], ids: Sequence[str]) -> dict[tuple[str, str], str]:
    """Which batch id each testcase ``(classname, name)`` stands for.

    First the exact key of each id. Then a testcase and an id both left
    over go together if they have the same name and one class name is a
    dotted suffix of the other (``proj.tests.test_x`` and ``tests.test_x``:
    pytest's rootdir was not where the ids are relative to; ``""`` is a
    suffix of any), or if the whole id is the testcase's name,
    ``classname.name`` or ``classname#name``; only when each is the other's
    one candidate, so that nothing is guessed.
    """
    by_key: dict[tuple[str, str], str] = {}
    for test_id in ids:
        by_key.setdefault(_key(test_id), test_id)
    matched = {key: by_key[key] for key in keys if key in by_key}
    taken = set(matched.values())
    left = {t: _key(t) for t in dict.fromkeys(ids) if t not in taken}
    cases = [key for key in dict.fromkeys(keys) if key not in matched]
    if not left or not cases:
        return matched

    # Indexes on both sides, so that a report of thousands of tests that all
    # share a name (test_basic) is not read in quadratic time.
    ids_by_class: dict[tuple[str, str], list[str]] = defaultdict(list)
    ids_by_suffix: dict[tuple[str, str], list[str]] = defaultdict(list)
    for test_id, (classname, name) in left.items():
        ids_by_class[name, classname].append(test_id)
        for suffix in _suffixes(classname):
            ids_by_suffix[name, suffix].append(test_id)
    case_set = set(cases)
    cases_by_name: dict[str, list[tuple[str, str]]] = defaultdict(list)
    cases_by_suffix: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for key in cases:
        classname, name = key
        cases_by_name[name].append(key)
        for suffix in _suffixes(classname):
            cases_by_suffix[name, suffix].append(key)

    def ids_for(case: tuple[str, str]) -> set[str]:
        classname, name = case
        return _two(
            [
                ids_by_suffix.get((name, classname), ()),
                *(ids_by_class.get((name, s), ()) for s in _suffixes(classname)),
                (
                    whole
                    for whole in (name, f"{classname}.{name}", f"{classname}#{name}")
                    if whole in left
                ),
            ]
        )

    def cases_for(test_id: str) -> set[tuple[str, str]]:
        classname, name = left[test_id]
        return _two(
            [
                cases_by_suffix.get((name, classname), ()),
                ((s, name) for s in _suffixes(classname) if (s, name) in case_set),
                cases_by_name.get(test_id, ()),
                (split for split in _splits(test_id) if split in case_set),
            ]
        )

    for case in cases:
        found = ids_for(case)
        if len(found) == 1:
            (test_id,) = found
            if len(cases_for(test_id)) == 1:
                matched[case] = test_id
    return matched


def read_junit(
    data: bytes,
    worker: str,
    ids: Sequence[str],
    started: float,
    *,
    where: str,
) -> JUnitRead:
    """Read the JUnit XML report a batch of ``ids`` wrote on ``worker``.

    The root is ``<testsuites>`` or ``<testsuite>``; testsuites may nest.
    A ``<failure>`` or ``<error>`` fails a testcase (its message attribute,
    else the first line of its text, is the message; its text, the
    traceback, comes first in the output); ``<skipped>`` skips it, but for
    pytest's expected failures (``type="pytest.xfail"``), which pass, as
    subunit's ``xfail`` does. The output is then system-out and system-err. The report
    has no start times: testcases are laid out one after the other from
    ``started``, each taking its ``time`` (0 when absent).

    Bytes that are not UTF-8 in a UTF-8 report are read as U+FFFD. Raises
    :class:`JUnitError`, naming ``where``, for anything else that keeps the
    report from being read: not XML (with its line and column), another
    root, a testcase without a name or with a time that is not a number of
    seconds, a DTD declaring entities.
    """
    root = _parse(data, where)
    cases = [_case(element, index, where) for index, element in enumerate(_testcases(root), 1)]
    matched: Mapping[tuple[str, str], str] = _match(
        [(case.classname, case.name) for case in cases], ids
    )
    by_id: dict[str, TestResult] = {}
    unmatched: set[str] = set()
    clock = started
    for case in cases:
        key = (case.classname, case.name)
        test_id = matched.get(key)
        if test_id is None:
            test_id = f"{case.classname}.{case.name}" if case.classname else case.name
            unmatched.add(test_id)
        by_id.pop(test_id, None)  # a rerun: the last report of a test counts
        by_id[test_id] = TestResult(
            test_id=test_id,
            outcome=case.outcome,
            duration=case.duration,
            worker=worker,
            started=clock,
            output=case.output,
            message=case.message,
        )
        clock += case.duration
    results = tuple(by_id.values())
    return JUnitRead(
        results=results,
        unmatched=tuple(r.test_id for r in results if r.test_id in unmatched),
        missing=tuple(t for t in dict.fromkeys(ids) if t not in by_id),
    )
