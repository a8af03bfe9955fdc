"""Suite results: reading subunit v2 tolerantly, writing subunit, JUnit XML and
JSON, checked against python-subunit's own writer, reader and tools."""

from __future__ import annotations

import datetime
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from subunit.v2 import ByteStreamToStreamResult, StreamResultToBytes
from testtools import StreamToDict

from txvmbot.jobs.suite.results import (
    STRAY_HEADER,
    TestResult,
    count_outcomes,
    from_exit,
    junit_names,
    machine_lost,
    read_subunit,
    timed_out,
    to_json,
    write_junit,
    write_subunit,
)

T0 = 1_700_000_000.0
BIN = Path(sys.executable).parent


def at(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(T0 + seconds, tz=datetime.UTC)


def packet(**kw: object) -> bytes:
    """One subunit v2 packet, written by python-subunit itself."""
    out = io.BytesIO()
    StreamResultToBytes(out).status(**kw)
    return out.getvalue()


def start(test_id: str, when: float) -> bytes:
    return packet(test_id=test_id, test_status="inprogress", timestamp=at(when))


def attach(test_id: str, name: str, data: bytes, when: float, eof: bool = True) -> bytes:
    return packet(
        test_id=test_id,
        file_name=name,
        file_bytes=data,
        eof=eof,
        mime_type="text/plain;charset=utf8",
        timestamp=at(when),
    )


def end(test_id: str, status: str, when: float) -> bytes:
    return packet(test_id=test_id, test_status=status, timestamp=at(when))


def run(test_id: str, status: str, begin: float, finish: float, *middle: bytes) -> bytes:
    return start(test_id, begin) + b"".join(middle) + end(test_id, status, finish)


def by_id(results: tuple[TestResult, ...]) -> dict[str, TestResult]:
    return {r.test_id: r for r in results}


# --- values and --format exit -------------------------------------------------


def test_from_exit_outcomes() -> None:
    ok = from_exit("t.sh", "worker-1", T0, 1.5, 0, None, b"out\n", b"err\n")
    assert (ok.outcome, ok.message, ok.output, ok.duration) == ("passed", "", b"out\nerr\n", 1.5)
    assert (ok.worker, ok.started, ok.attempts) == ("worker-1", T0, 1)
    bad = from_exit("t.sh", "worker-2", T0, 1.0, 3, None, b"", b"")
    assert (bad.outcome, bad.message, bad.is_failure) == ("failed", "exit status 3", True)
    skipped = from_exit("t.sh", "worker-2", T0, 1.0, 77, None, b"", b"")
    assert (skipped.outcome, skipped.message) == ("skipped", "exit status 77 (skipped)")
    no_skip = from_exit("t.sh", "w", T0, 1.0, 77, None, b"", b"", skip_status=None)
    assert no_skip.outcome == "failed"
    killed = from_exit("t.sh", "w", T0, 1.0, None, 9, b"", b"")
    assert (killed.outcome, killed.message) == ("failed", "killed by signal 9 (SIGKILL)")
    ssh_killed = from_exit("t.sh", "w", T0, 1.0, None, "TERM", b"", b"")
    assert ssh_killed.message == "killed by signal SIGTERM"
    lost = from_exit("t.sh", "worker-3", T0, 1.0, None, None, b"", b"")
    assert lost.outcome == "infra" and not lost.is_failure
    assert "worker-3" in lost.message


def test_timeout_and_infra_messages() -> None:
    hung = timed_out("t", "worker-1", T0, 5.0, b"partial")
    assert (hung.outcome, hung.message, hung.duration, hung.output) == (
        "timeout",
        "passed its bound of 5s",
        5.0,
        b"partial",
    )
    assert hung.is_failure
    lost = machine_lost("t", "worker-3", T0, 2.0, attempts=2)
    assert (lost.outcome, lost.message, lost.attempts) == (
        "infra",
        "machine worker-3 stopped answering",
        2,
    )
    assert not lost.is_failure


def test_result_validates_and_keeps_message_on_one_line() -> None:
    with pytest.raises(ValueError):
        TestResult("t", "exploded", 1.0, "w", T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TestResult("t", "passed", 1.0, "w", T0, attempts=0)
    result = TestResult("t", "failed", 1.0, "w", T0, message="first\n  second\n")
    assert result.message == "first second"
    assert len(TestResult("t", "failed", 1, "w", T0, message="x" * 2000).message) == 500
    counts = count_outcomes([result, result, timed_out("u", "w", T0, 1)])
    assert counts == {"passed": 0, "failed": 2, "skipped": 0, "timeout": 1, "infra": 0}


# --- reading subunit ----------------------------------------------------------


def test_read_pass_fail_skip_with_durations_from_timestamps() -> None:
    data = (
        run(
            "pkg.mod.T.test_ok",
            "success",
            0.0,
            1.25,
            attach("pkg.mod.T.test_ok", "stdout", b"hi\n", 1.0),
        )
        + run(
            "pkg.mod.T.test_bad",
            "fail",
            2.0,
            2.5,
            attach("pkg.mod.T.test_bad", "traceback", b"Traceback:\n", 2.4, eof=False),
            attach("pkg.mod.T.test_bad", "traceback", b"AssertionError: 1 != 2\n", 2.4),
        )
        + run(
            "pkg.mod.T.test_skip",
            "skip",
            3.0,
            3.0,
            attach("pkg.mod.T.test_skip", "reason", b"not today", 3.0),
        )
        + run("pkg.mod.T.test_xfail", "xfail", 4.0, 4.1)
        + run("pkg.mod.T.test_ux", "uxsuccess", 5.0, 5.1)
    )
    read = read_subunit(data, "worker-2", ["pkg.mod.T.test_ok", "pkg.mod.T.test_bad"])
    assert read.stray == b"" and read.running is None and read.missing == ()
    assert [r.test_id for r in read.results] == [
        "pkg.mod.T.test_ok",
        "pkg.mod.T.test_bad",
        "pkg.mod.T.test_skip",
        "pkg.mod.T.test_xfail",
        "pkg.mod.T.test_ux",
    ]
    ok, bad, skip, xfail, ux = read.results
    assert (ok.outcome, ok.output, ok.worker, ok.message) == ("passed", b"hi\n", "worker-2", "")
    assert ok.started == pytest.approx(T0) and ok.duration == pytest.approx(1.25)
    assert (bad.outcome, bad.message) == ("failed", "AssertionError: 1 != 2")
    assert bad.output == b"Traceback:\nAssertionError: 1 != 2\n"
    assert bad.duration == pytest.approx(0.5) and bad.started == pytest.approx(T0 + 2)
    assert (skip.outcome, skip.message, skip.output) == ("skipped", "not today", b"")
    assert xfail.outcome == "passed"
    assert (ux.outcome, ux.message) == ("failed", "unexpected success")


def test_batch_names_missing_tests_and_keeps_unexpected_ones() -> None:
    listing = b"".join(packet(test_id=t, test_status="exists") for t in ("a.t1", "a.t2", "a.t3"))
    data = listing + run("a.t1", "success", 0, 1) + run("a.t9", "fail", 1, 2)
    read = read_subunit(data, "worker-1", ["a.t1", "a.t2", "a.t3"])
    assert [r.test_id for r in read.results] == ["a.t1", "a.t9"]
    assert read.missing == ("a.t2", "a.t3")


def test_stream_without_timestamps_uses_the_given_start() -> None:
    data = packet(test_id="a.t", test_status="inprogress") + packet(
        test_id="a.t", test_status="success"
    )
    (result,) = read_subunit(data, "w", ["a.t"], started=T0 + 7).results
    assert (result.started, result.duration) == (T0 + 7, 0.0)


def test_stray_bytes_go_to_running_then_next_then_last_test() -> None:
    data = (
        b"before anything\n"
        + start("a.t1", 0)
        + b"printed by t1\n"
        + attach("a.t1", "stdout", b"captured\n", 0.5)
        + end("a.t1", "success", 1)
        + b"between\n"
        + run("a.t2", "success", 2, 3)
        + b"after all"
    )
    read = read_subunit(data, "w", ["a.t1", "a.t2"])
    t1, t2 = read.results
    assert t1.output == (
        STRAY_HEADER
        + b"before anything\n"
        + STRAY_HEADER
        + b"printed by t1\n"
        + b"--- stdout ---\ncaptured\n"
    )
    # Before it started and after it ended: two runs, marked apart.
    assert t2.output == STRAY_HEADER + b"between\n" + STRAY_HEADER + b"after all\n"
    assert read.stray == b"before anything\nprinted by t1\nbetween\nafter all"
    assert [r.outcome for r in read.results] == ["passed", "passed"]


def test_only_garbage_is_all_stray() -> None:
    read = read_subunit(b"Segmentation fault\n\xff\xfe", "w", ["a.t"])
    assert (read.results, read.running, read.missing) == ((), None, ("a.t",))
    assert read.stray == b"Segmentation fault\n\xff\xfe"


def test_utf8_text_with_signature_bytes_keeps_every_byte_and_packet() -> None:
    # "ó" is c3 b3 and b3 is the packet signature: python-subunit alone
    # takes it for a packet and drops the rest of the stream.
    text = "ó señor, ³ and a\xb3 in latin-1\n".encode() + b"\xb3\xb3 raw\n"
    data = start("a.t1", 0) + text + end("a.t1", "success", 1) + run("a.t2", "fail", 1, 2)
    read = read_subunit(data, "w", ["a.t1", "a.t2"])
    assert [(r.test_id, r.outcome) for r in read.results] == [
        ("a.t1", "passed"),
        ("a.t2", "failed"),
    ]
    assert read.stray == text
    assert read.results[0].output == STRAY_HEADER + text

    seen: list[Any] = []
    upstream = StreamToDict(seen.append)
    upstream.startTestRun()
    ByteStreamToStreamResult(io.BytesIO(data), non_subunit_name="stdout").run(upstream)
    upstream.stopTestRun()
    assert "a.t2" not in {d["id"] for d in seen}  # what the resync is for


def test_garbage_claiming_a_huge_packet_does_not_swallow_the_stream() -> None:
    # A signature, version 2 flags and a 3-byte length of ~4 MiB.
    garbage = b"\xb3\x2b\x02\xbf\xff\xff then text"
    data = run("a.t1", "success", 0, 1) + garbage + run("a.t2", "success", 1, 2)
    read = read_subunit(data, "w", ["a.t1", "a.t2"])
    assert [r.test_id for r in read.results] == ["a.t1", "a.t2"]
    assert read.stray == garbage
    assert read.results[1].output == STRAY_HEADER + garbage + b"\n"


def test_dangling_utf8_lead_byte_before_a_packet_does_not_hide_it() -> None:
    data = start("a.t1", 0) + b"cut \xc3" + end("a.t1", "fail", 1) + run("a.t2", "success", 1, 2)
    read = read_subunit(data, "w", ["a.t1", "a.t2"])
    assert [(r.test_id, r.outcome) for r in read.results] == [
        ("a.t1", "failed"),
        ("a.t2", "passed"),
    ]
    assert read.stray == b"cut \xc3"


def test_corrupt_packet_becomes_stray_and_the_rest_is_read() -> None:
    broken = bytearray(end("a.t1", "success", 1))
    broken[-1] ^= 0xFF  # bad checksum
    data = start("a.t1", 0) + bytes(broken) + run("a.t2", "success", 1, 2)
    read = read_subunit(data, "w", ["a.t1", "a.t2"])
    assert [r.test_id for r in read.results] == ["a.t2"]
    assert read.stray == bytes(broken)
    # a.t1 never ended: its end was the corrupt packet.
    assert read.running == "a.t1"


def test_packet_with_good_checksum_and_bad_body_does_not_raise() -> None:
    # Flags say "timestamp follows" but the body is empty; the CRC is right.
    body = b"\xb3" + struct.pack(">H", 0x2000 | 0x0200) + bytes([8])
    bogus = body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    data = bogus + run("a.t1", "success", 0, 1)
    read = read_subunit(data, "w", ["a.t1"])
    assert [r.test_id for r in read.results] == ["a.t1"]
    assert read.stray == bogus


def test_stream_cut_off_mid_test() -> None:
    whole = (
        run("a.t1", "success", 0, 1) + start("a.t2", 5) + attach("a.t2", "stdout", b"so far\n", 6)
    )
    last = end("a.t2", "success", 9)
    data = whole + last[: len(last) // 2]
    read = read_subunit(data, "worker-4", ["a.t1", "a.t2", "a.t3"])
    assert [r.test_id for r in read.results] == ["a.t1"]
    assert read.running == "a.t2"
    assert read.running_started == pytest.approx(T0 + 5)
    assert (
        read.running_output
        == b"--- stdout ---\nso far\n" + STRAY_HEADER + last[: len(last) // 2] + b"\n"
    )
    assert read.stray == last[: len(last) // 2]
    assert read.missing == ("a.t3",)


def test_same_test_twice_is_two_results() -> None:
    data = run("a.t", "fail", 0, 1) + run("a.t", "success", 1, 2)
    read = read_subunit(data, "w", ["a.t"])
    assert [r.outcome for r in read.results] == ["failed", "passed"]


def test_real_subunit_runner_with_prints_on_stdout(tmp_path: Path) -> None:
    (tmp_path / "test_printing.py").write_text(
        textwrap.dedent(
            """
            import sys, unittest

            class T(unittest.TestCase):
                def test_a_prints(self):
                    print("señor ó", flush=True)
                    sys.stdout.buffer.write(b"\\xb3\\xb3\\x00binary\\n")
                    sys.stdout.buffer.flush()

                def test_b_fails(self):
                    self.assertEqual(1, 2)

                @unittest.skip("not today")
                def test_c_skips(self):
                    pass
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "subunit.run", "test_printing"],
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=True,
    )
    ids = [f"test_printing.T.test_{n}" for n in ("a_prints", "b_fails", "c_skips")]
    read = read_subunit(done.stdout, "worker-1", ids)
    results = by_id(read.results)
    assert sorted(results) == ids and read.missing == () and read.running is None
    assert results[ids[0]].outcome == "passed"
    assert results[ids[0]].output == STRAY_HEADER + "señor ó\n".encode() + b"\xb3\xb3\x00binary\n"
    assert (results[ids[1]].outcome, results[ids[1]].message) == (
        "failed",
        "AssertionError: 1 != 2",
    )
    assert b"Traceback" in results[ids[1]].output
    assert (results[ids[2]].outcome, results[ids[2]].message) == ("skipped", "not today")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_never_raise(data: bytes) -> None:
    read = read_subunit(data, "w", ["a.t"])
    assert isinstance(read.stray, bytes)
    assert read.missing in ((), ("a.t",))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.binary(max_size=40)
        | st.sampled_from([b"\xb3", b"\xc3", "ó".encode(), b"\xb3\x2b\x02\xbf"]),
        min_size=4,
        max_size=4,
    )
)
def test_garbage_between_packets_is_kept_and_breaks_nothing(garbage: list[bytes]) -> None:
    pieces = [
        start("a.t1", 0),
        end("a.t1", "success", 1),
        run("a.t2", "fail", 1, 2),
        run("a.t3", "skip", 2, 3),
    ]
    data = b"".join(g + p for g, p in zip(garbage, pieces, strict=True))
    read = read_subunit(data, "w", ["a.t1", "a.t2", "a.t3"])
    assert [(r.test_id, r.outcome) for r in read.results] == [
        ("a.t1", "passed"),
        ("a.t2", "failed"),
        ("a.t3", "skipped"),
    ]
    assert read.stray == b"".join(garbage)
    assert read.running is None and read.missing == ()


# --- writing subunit ------------------------------------------------------------


def sample_results() -> list[TestResult]:
    return [
        TestResult("pkg.mod.T.test_ok", "passed", 1.5, "worker-1", T0, output=b"hello\n"),
        TestResult(
            "pkg.mod.T.test_bad", "failed", 0.25, "worker-2", T0 + 1, b"\xff\x00x", "exit status 3"
        ),
        TestResult("pkg.mod.T.test_skip", "skipped", 0.0, "worker-1", T0 + 2, message="no network"),
        timed_out("pkg.mod.T.test_hang", "worker-2", T0 + 3, 5.0, b"x" * 200_000),
        machine_lost("pkg.mod.T.test_lost", "worker-3", T0 + 4, 2.0, attempts=2),
    ]


def write(results: list[TestResult]) -> bytes:
    out = io.BytesIO()
    write_subunit(results, out)
    return out.getvalue()


def test_write_subunit_reads_back_with_python_subunit() -> None:
    seen: list[Any] = []
    reader = StreamToDict(seen.append)
    reader.startTestRun()
    ByteStreamToStreamResult(io.BytesIO(write(sample_results()))).run(reader)
    reader.stopTestRun()
    tests = {d["id"]: d for d in seen}
    assert {k: v["status"] for k, v in tests.items()} == {
        "pkg.mod.T.test_ok": "success",
        "pkg.mod.T.test_bad": "fail",
        "pkg.mod.T.test_skip": "skip",
        "pkg.mod.T.test_hang": "fail",
        "pkg.mod.T.test_lost": "fail",
    }
    assert tests["pkg.mod.T.test_ok"]["tags"] == {"worker-1"}
    assert tests["pkg.mod.T.test_lost"]["tags"] == {"worker-3"}
    details = tests["pkg.mod.T.test_hang"]["details"]
    assert isinstance(details, dict)
    assert b"".join(details["output"].iter_bytes()) == b"x" * 200_000
    assert details["reason"].as_text() == "passed its bound of 5s"
    bad = tests["pkg.mod.T.test_bad"]["details"]
    assert isinstance(bad, dict)
    assert b"".join(bad["output"].iter_bytes()) == b"\xff\x00x"
    begin, finish = tests["pkg.mod.T.test_ok"]["timestamps"]
    assert begin == at(0) and finish == at(1.5)


def test_write_then_read_subunit_round_trips() -> None:
    results = sample_results()
    read = read_subunit(write(results), "ignored", [r.test_id for r in results])
    assert read.stray == b"" and read.missing == ()
    for written, back in zip(results, read.results, strict=True):
        expected_outcome = "failed" if written.outcome in ("timeout", "infra") else written.outcome
        assert back.outcome == expected_outcome
        assert (back.test_id, back.output, back.message) == (
            written.test_id,
            written.output,
            written.message,
        )
        assert back.started == pytest.approx(written.started, abs=1e-6)
        assert back.duration == pytest.approx(written.duration, abs=1e-6)


def tool(name: str, data: bytes, *args: str) -> subprocess.CompletedProcess[bytes]:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install python-subunit in the venv")
    return subprocess.run(
        [str(path), *args],
        input=data,
        capture_output=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )


def test_subunit_tools_read_the_merged_stream() -> None:
    data = write(sample_results())
    listed = tool("subunit-ls", data, "--no-passthrough", "--times")
    assert listed.returncode == 1, listed.stderr  # 1: some tests failed
    times = dict(line.split() for line in listed.stdout.decode().splitlines())
    assert set(times) == {r.test_id for r in sample_results()}
    assert float(times["pkg.mod.T.test_ok"]) == pytest.approx(1.5)

    stats = tool("subunit-stats", data, "--no-passthrough").stdout.decode()
    assert "Total tests:       5" in stats
    assert "Failed tests:      3" in stats and "Skipped tests:     1" in stats

    pyunit = tool("subunit2pyunit", data, "--no-passthrough")
    assert pyunit.returncode == 1  # failures
    report = pyunit.stderr.decode()
    assert "FAIL: pkg.mod.T.test_bad" in report and "exit status 3" in report
    assert "skipped 'no network'" in report
    assert "Ran 5 tests" in report


# --- JUnit XML ------------------------------------------------------------------


def junit(results: list[TestResult], name: str = "suite") -> ET.Element:
    out = io.BytesIO()
    write_junit(results, out, name)
    assert out.getvalue().startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    return ET.fromstring(out.getvalue())


def test_junit_counts_names_times_messages() -> None:
    root = junit(sample_results(), "nightly")
    assert root.tag == "testsuites"
    (suite,) = root
    assert suite.tag == "testsuite"
    assert {
        k: suite.get(k) for k in ("name", "tests", "failures", "errors", "skipped", "time")
    } == {
        "name": "nightly",
        "tests": "5",
        "failures": "2",
        "errors": "1",
        "skipped": "1",
        "time": "8.000",  # T0 .. T0 + 3 + 5
    }
    assert root.get("tests") == "5" and root.get("failures") == "2"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"test_ok", "test_bad", "test_skip", "test_hang", "test_lost"}
    assert all(c.get("classname") == "pkg.mod.T" for c in cases.values())
    assert cases["test_ok"].get("time") == "1.500"
    assert list(cases["test_ok"]) == [cases["test_ok"].find("system-out")]
    assert cases["test_ok"].findtext("system-out") == "hello\n"
    failure = cases["test_bad"].find("failure")
    assert failure is not None and failure.get("message") == "exit status 3"
    hang = cases["test_hang"].find("failure")
    assert hang is not None and hang.get("message") == "passed its bound of 5s"
    error = cases["test_lost"].find("error")
    assert error is not None and error.get("message") == "machine worker-3 stopped answering"
    assert cases["test_lost"].find("failure") is None
    skipped = cases["test_skip"].find("skipped")
    assert skipped is not None and skipped.get("message") == "no network"


def test_junit_strips_what_xml_forbids() -> None:
    nasty = TestResult(
        "a.t\x01x",
        "failed",
        1.0,
        "w",
        T0,
        output=b"ok\x00\x1b[31mred\x1b[0m \xff\xfe tab\there\r\n\xef\xbf\xbe",
        message="bad \x0b thing <&>",
    )
    case = junit([nasty]).find("testsuite/testcase")
    assert case is not None
    # "t\x01x" is no Python identifier: the whole id is the name.
    assert (case.get("classname"), case.get("name")) == ("suite", "a.tx")
    assert case.findtext("system-out") == "ok[31mred[0m \ufffd\ufffd tab\there\n"
    failure = case.find("failure")
    assert failure is not None and failure.get("message") == "bad thing <&>"


def test_junit_of_nothing() -> None:
    root = junit([])
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "0" and suite.get("time") == "0.000"


@pytest.mark.parametrize(
    ("test_id", "names"),
    [
        ("pkg.mod.Class.test_x", ("pkg.mod.Class", "test_x")),
        ("pkg.mod.Class.test_x[1.5-a.b]", ("pkg.mod.Class", "test_x[1.5-a.b]")),
        ("pkg.T.test_x(scenario.one)", ("pkg.T", "test_x(scenario.one)")),
        ("tests/test_x.py::TestA::test_b[0.1]", ("tests.test_x.TestA", "test_b[0.1]")),
        ("tests/test_x.py::test_c", ("tests.test_x", "test_c")),
        ("tests/test_x.py::test_d[a::b.c]", ("tests.test_x", "test_d[a::b.c]")),
        ("pkg.test_mod.test_f", ("pkg.test_mod", "test_f")),
        # Not dotted Python names: the whole id is the name.
        ("tests/smoke/boot.sh", ("nightly", "tests/smoke/boot.sh")),
        ("tests/net/t11.sh", ("nightly", "tests/net/t11.sh")),
        ("t11.sh", ("nightly", "t11.sh")),
        ("auth.test.js", ("nightly", "auth.test.js")),
        ("t11-net.case", ("nightly", "t11-net.case")),
        ("pkg.2fast.test_x", ("nightly", "pkg.2fast.test_x")),
        ("pkg.class.test_x", ("nightly", "pkg.class.test_x")),
        ("pkg.T.test_x[1", ("nightly", "pkg.T.test_x[1")),
        ("boot", ("nightly", "boot")),
        (".hidden", ("nightly", ".hidden")),
        ("trailing.", ("nightly", "trailing.")),
    ],
)
def test_junit_names(test_id: str, names: tuple[str, str]) -> None:
    assert junit_names(test_id, "nightly") == names


def test_junit_names_keep_a_file_whole() -> None:
    assert junit_names("t11.sh", "s") == ("s", "t11.sh")
    assert junit_names("tests/net/t11.sh", "s") == ("s", "tests/net/t11.sh")


# --- JSON -----------------------------------------------------------------------


def test_to_json_is_plain() -> None:
    results = sample_results()
    summary = {
        "workers": ("worker-1", "worker-2"),
        "tags": {"b", "a"},
        "note": b"\xffok",
        "wall": 8.0,
    }
    doc = to_json(results, summary)
    assert json.loads(json.dumps(doc)) == doc
    assert doc["summary"] == {
        "workers": ["worker-1", "worker-2"],
        "tags": ["a", "b"],
        "note": "\ufffdok",
        "wall": 8.0,
    }
    assert doc["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "timeout": 1, "infra": 1}
    bad = doc["tests"][1]
    assert bad == {
        "test_id": "pkg.mod.T.test_bad",
        "outcome": "failed",
        "duration": 0.25,
        "worker": "worker-2",
        "started": T0 + 1,
        "attempts": 1,
        "message": "exit status 3",
        "output": "\ufffd\x00x",
    }
    assert doc["tests"][4]["attempts"] == 2


def test_results_are_frozen() -> None:
    result = sample_results()[0]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.outcome = "failed"  # type: ignore[misc]
    assert attrs.evolve(result, attempts=2).attempts == 2


def test_importing_does_not_touch_the_reactor() -> None:
    code = (
        "import sys, txvmbot.jobs.suite.results; "
        "assert 'twisted.internet.reactor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
