"""Reading the JUnit XML report of a batch (``--format junit``): a real
pytest report, Surefire-style and nested reports, broken ones, and mapping
testcases back to the ids the batch was given."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import paths
from txvmbot.errors import TxvmbotError
from txvmbot.jobs.suite.junit import JUnitError, JUnitRead, read_junit
from txvmbot.jobs.suite.results import TestResult, junit_names, write_junit

T0 = 1_700_000_000.0
WHERE = "batch 3 on worker-1: report.xml"


def read(xml: str | bytes, ids: list[str] | tuple[str, ...] = ()) -> JUnitRead:
    data = xml.encode("utf-8") if isinstance(xml, str) else xml
    return read_junit(data, "worker-1", list(ids), T0, where=WHERE)


def by_id(report: JUnitRead) -> dict[str, TestResult]:
    return {r.test_id: r for r in report.results}


def broken(xml: str | bytes, ids: tuple[str, ...] = ()) -> JUnitError:
    with pytest.raises(JUnitError) as caught:
        read(xml, ids)
    error = caught.value
    assert isinstance(error, TxvmbotError)
    assert error.where == WHERE and str(error).startswith(WHERE + ": ")
    return error


# --- a real pytest report -----------------------------------------------------

PYTEST_TESTS = """
import pytest


@pytest.fixture
def broken():
    raise RuntimeError("setup broke")


def test_pass():
    print("hello out")


def test_fail():
    print("printed " + "out")  # the source line differs from the output
    assert 1 == 2, "one is not two"


def test_error(broken):
    pass


def test_skip():
    pytest.skip("no network")


@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False


@pytest.mark.parametrize(("a", "b"), [(1, 2)])
def test_y(a, b):
    pass


class TestX:
    def test_m(self):
        pass
"""

PYTEST_IDS = tuple(
    f"pkg/tests/test_x.py::{name}"
    for name in (
        "test_pass",
        "test_fail",
        "test_error",
        "test_skip",
        "test_xfail",
        "test_y[1-2]",
        "TestX::test_m",
    )
)


@pytest.fixture(scope="module")
def pytest_report(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The JUnit XML report pytest itself writes for :data:`PYTEST_TESTS`."""
    root = tmp_path_factory.mktemp("pytest-run")
    tests = root / "pkg" / "tests"
    tests.mkdir(parents=True)
    (tests / "test_x.py").write_text(PYTEST_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(root),
            "-o",
            "junit_logging=system-out",
            "--junitxml",
            str(root / "report.xml"),
            "pkg/tests/test_x.py",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr  # a test failed
    return (root / "report.xml").read_bytes()


def test_pytest_report_maps_every_testcase(pytest_report: bytes) -> None:
    never = "pkg/tests/test_x.py::test_never_ran"
    report = read(pytest_report, [*PYTEST_IDS, never])
    assert [r.test_id for r in report.results] == list(PYTEST_IDS)
    assert report.unmatched == ()
    assert report.missing == (never,)
    results = by_id(report)
    outcomes = {test_id.partition("::")[2]: r.outcome for test_id, r in results.items()}
    assert outcomes == {
        "test_pass": "passed",
        "test_fail": "failed",
        "test_error": "failed",
        "test_skip": "skipped",
        "test_xfail": "passed",
        "test_y[1-2]": "passed",
        "TestX::test_m": "passed",
    }
    assert all(r.worker == "worker-1" for r in report.results)


def test_pytest_report_messages_and_output(pytest_report: bytes) -> None:
    results = {
        test_id.partition("::")[2]: r
        for test_id, r in by_id(read(pytest_report, PYTEST_IDS)).items()
    }
    fail = results["test_fail"]
    assert fail.message.startswith("AssertionError: one is not two")
    output = fail.output.decode()
    # The traceback comes first, then what the test printed.
    assert output.index("assert 1 == 2") < output.index("printed out")
    assert results["test_error"].message == 'failed on setup with "RuntimeError: setup broke"'
    assert "setup broke" in results["test_error"].output.decode()
    assert results["test_skip"].message == "no network"
    assert results["test_xfail"].message == "expected failure: known bug"  # passed, as subunit's xfail
    assert "hello out" in results["test_pass"].output.decode()
    assert results["test_pass"].message == ""


def test_pytest_report_lays_tests_out_one_after_the_other(pytest_report: bytes) -> None:
    report = read(pytest_report, PYTEST_IDS)
    clock = T0
    for result in report.results:
        assert result.started == pytest.approx(clock)
        assert result.duration >= 0
        clock += result.duration


def test_pytest_report_with_another_rootdir(pytest_report: bytes) -> None:
    # The ids were handed out relative to a parent of pytest's rootdir.
    ids = [f"checkout/{test_id}" for test_id in PYTEST_IDS]
    report = read(pytest_report, ids)
    assert [r.test_id for r in report.results] == ids
    assert report.unmatched == () and report.missing == ()


# --- other writers ------------------------------------------------------------

SUREFIRE = """\
<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
    name="com.example.FooTest" time="0.05" tests="3" errors="1" skipped="1" failures="0">
  <properties>
    <property name="java.version" value="17.0.2"/>
  </properties>
  <testcase name="testOk" classname="com.example.FooTest" time="0.01"/>
  <testcase name="testBoom" classname="com.example.FooTest" time="0.02">
    <error message="boom" type="java.lang.IllegalStateException">java.lang.IllegalStateException: boom
\tat com.example.FooTest.testBoom(FooTest.java:12)</error>
    <system-out>out line</system-out>
    <system-err>err line</system-err>
  </testcase>
  <testcase name="testLater" classname="com.example.FooTest" time="0"><skipped/></testcase>
  <testcase name="testFails" classname="com.example.FooTest" time="1.5">
    <failure type="org.opentest4j.AssertionFailedError">expected: &lt;1&gt; but was: &lt;2&gt;
\tat com.example.FooTest.testFails(FooTest.java:20)</failure>
  </testcase>
</testsuite>
"""


def test_surefire_report_with_a_testsuite_root() -> None:
    ids = (
        "com.example.FooTest.testOk",
        "com.example.FooTest#testBoom",  # Surefire's -Dtest syntax
        "FooTest#testLater",  # a class without its package
        "com.example.FooTest.testFails",
    )
    report = read(SUREFIRE, ids)
    assert [r.test_id for r in report.results] == list(ids)
    assert report.unmatched == () and report.missing == ()
    ok, boom, later, fails = report.results
    assert (ok.outcome, ok.duration, ok.started, ok.output) == ("passed", 0.01, T0, b"")
    assert (boom.outcome, boom.message) == ("failed", "boom")
    assert boom.started == pytest.approx(T0 + 0.01)
    assert boom.output == (
        b"java.lang.IllegalStateException: boom\n"
        b"\tat com.example.FooTest.testBoom(FooTest.java:12)\n"
        b"out line\n"
        b"err line\n"
    )
    assert (later.outcome, later.message) == ("skipped", "skipped")
    # No message attribute: the first line of the text.
    assert (fails.outcome, fails.message) == ("failed", "expected: <1> but was: <2>")
    assert fails.started == pytest.approx(T0 + 0.03)


def test_nested_testsuites_in_document_order() -> None:
    xml = """
    <testsuites>
      <testsuite name="outer">
        <system-out>suite output is no test's</system-out>
        <testcase classname="a.A" name="test_1" time="1"/>
        <testsuite name="inner">
          <testcase classname="a.B" name="test_2" time="2"/>
          <testsuite name="innermost"><testcase classname="a.C" name="test_3" time="3"/></testsuite>
        </testsuite>
        <testcase classname="a.A" name="test_4" time="4"/>
      </testsuite>
      <testsuites>
        <testsuite><testcase classname="a.D" name="test_5" time="5"/></testsuite>
      </testsuites>
    </testsuites>
    """
    ids = ("a.A.test_1", "a.B.test_2", "a.C.test_3", "a.A.test_4", "a.D.test_5")
    report = read(xml, ids)
    assert [r.test_id for r in report.results] == list(ids)
    assert [r.started - T0 for r in report.results] == [0, 1, 3, 6, 10]
    assert all(r.output == b"" for r in report.results)


def test_failure_and_error_in_one_testcase() -> None:
    # pytest reports a test that failed and then broke in teardown this way.
    xml = """
    <testsuite>
      <testcase classname="t.T" name="test_x" time="1">
        <failure message="first">trace 1</failure>
        <error message="failed on teardown">trace 2</error>
        <system-out>out</system-out>
        <system-err>err</system-err>
      </testcase>
    </testsuite>
    """
    (result,) = read(xml, ["t.T.test_x"]).results
    assert (result.outcome, result.message) == ("failed", "first")
    assert result.output == b"trace 1\ntrace 2\nout\nerr\n"


def test_missing_time_is_zero() -> None:
    xml = """
    <testsuite>
      <testcase classname="t.T" name="test_a"/>
      <testcase classname="t.T" name="test_b" time=""/>
      <testcase classname="t.T" name="test_c" time=" 2.5 "/>
    </testsuite>
    """
    report = read(xml, ["t.T.test_a", "t.T.test_b", "t.T.test_c"])
    assert [(r.duration, r.started) for r in report.results] == [
        (0.0, T0),
        (0.0, T0),
        (2.5, T0),
    ]


@pytest.mark.parametrize("time", ["1,5", "-1", "nan", "inf", "soon"])
def test_bad_time_names_the_testcase(time: str) -> None:
    xml = f"""
    <testsuite>
      <testcase classname="t.T" name="test_a" time="1"/>
      <testcase classname="t.T" name="test_b" time="{time}"/>
    </testsuite>
    """
    error = broken(xml)
    assert "testcase 2 (t.T.test_b)" in str(error)
    assert f"time={time!r}" in str(error)


def test_testcase_without_a_name() -> None:
    assert "testcase 1 has no name" in str(
        broken('<testsuite><testcase classname="a"/></testsuite>')
    )


# --- broken reports -----------------------------------------------------------


def test_broken_xml_names_where_and_line() -> None:
    xml = '<testsuites>\n<testsuite>\n<testcase name="a" time="1"\n</testsuites>\n'
    error = broken(xml)
    assert "line 4, column 1" in str(error) and "not well-formed" in str(error)


def test_truncated_report() -> None:
    error = broken('<testsuites><testsuite><testcase name="a"/>')
    assert "line 1" in str(error) and "no element found" in str(error)


@pytest.mark.parametrize("data", [b"", b"  \n"])
def test_empty_report(data: bytes) -> None:
    assert "empty" in str(broken(data))


def test_wrong_root() -> None:
    error = broken("<html><body><testcase name='x'/></body></html>")
    assert "root element is <html>" in str(error)


def test_entities_are_refused() -> None:
    laughs = """<?xml version="1.0"?>
<!DOCTYPE testsuite [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<testsuite><testcase name="&lol2;"/></testsuite>
"""
    error = broken(laughs)
    assert "entity 'lol'" in str(error) and "line 3" in str(error)


def test_a_doctype_without_entities_is_fine() -> None:
    xml = '<!DOCTYPE testsuite><testsuite><testcase name="t"/></testsuite>'
    assert [r.test_id for r in read(xml, ["t"]).results] == ["t"]


def test_bytes_that_are_not_utf8() -> None:
    xml = (
        b'<?xml version="1.0" encoding="utf-8"?>\n'
        b'<testsuite><testcase classname="a.T" name="test_x" time="1">'
        b"<system-out>bad \xff\xfe byte \x1b[31mred&#27;\xc3\xa9</system-out>"
        b"</testcase></testsuite>"
    )
    (result,) = read(xml, ["a.T.test_x"]).results
    assert result.output == "bad \ufffd\ufffd byte [31mred\u00e9\n".encode()


def test_a_declared_encoding_is_honoured() -> None:
    xml = (
        b'<?xml version="1.0" encoding="ISO-8859-1"?>\n'
        b'<testsuite><testcase classname="a.T" name="test_x">'
        b"<system-out>caf\xe9</system-out></testcase></testsuite>"
    )
    (result,) = read(xml, ["a.T.test_x"]).results
    assert result.output == "caf\u00e9\n".encode()


# --- mapping testcases back to the batch's ids ------------------------------------


def test_a_testcase_that_matches_no_id() -> None:
    xml = """
    <testsuite>
      <testcase classname="a.T" name="test_x" time="1"/>
      <testcase classname="other.Mod" name="test_z" time="1"><failure message="no"/></testcase>
      <testcase name="lonely" time="1"/>
    </testsuite>
    """
    report = read(xml, ["a.T.test_x"])
    assert [r.test_id for r in report.results] == ["a.T.test_x", "other.Mod.test_z", "lonely"]
    assert report.unmatched == ("other.Mod.test_z", "lonely")
    assert by_id(report)["other.Mod.test_z"].outcome == "failed"
    assert report.missing == ()


def test_ids_without_a_testcase_are_missing_not_results() -> None:
    xml = '<testsuite><testcase classname="a.T" name="test_x"/></testsuite>'
    report = read(xml, ["a.T.test_gone", "a.T.test_x", "b.py::test_gone", "a.T.test_gone"])
    assert [r.test_id for r in report.results] == ["a.T.test_x"]
    assert report.missing == ("a.T.test_gone", "b.py::test_gone")


def test_pytest_ids_map_exactly() -> None:
    xml = """
    <testsuite>
      <testcase classname="pkg.tests.test_x.TestX" name="test_y[1-2]"/>
      <testcase classname="tests.test_x" name="test_f"/>
      <testcase classname="tests.test_x" name="test_p[a::b.c]"/>
      <testcase classname="pkg.mod.Class" name="test_x"/>
    </testsuite>
    """
    ids = (
        "pkg/tests/test_x.py::TestX::test_y[1-2]",
        "tests/test_x.py::test_f",
        "tests/test_x.py::test_p[a::b.c]",
        "pkg.mod.Class.test_x",
    )
    report = read(xml, ids)
    assert [r.test_id for r in report.results] == list(ids)


def test_rootdir_prefix_mismatch_either_way() -> None:
    xml = """
    <testsuite>
      <testcase classname="proj.tests.test_x" name="test_f"/>
      <testcase classname="test_y.TestA" name="test_b"/>
    </testsuite>
    """
    ids = ("tests/test_x.py::test_f", "proj/tests/test_y.py::TestA::test_b")
    report = read(xml, ids)
    assert [r.test_id for r in report.results] == list(ids)
    assert report.unmatched == () and report.missing == ()


def test_an_ambiguous_prefix_match_is_not_guessed() -> None:
    xml = '<testsuite><testcase classname="tests.test_x" name="test_f"/></testsuite>'
    ids = ("a/tests/test_x.py::test_f", "b/tests/test_x.py::test_f")
    report = read(xml, ids)
    assert report.unmatched == ("tests.test_x.test_f",)
    assert report.missing == ids


def test_two_testcases_for_one_id_by_prefix_are_not_guessed() -> None:
    xml = """
    <testsuite>
      <testcase classname="a.tests.test_x" name="test_f"/>
      <testcase classname="b.tests.test_x" name="test_f"/>
    </testsuite>
    """
    report = read(xml, ["tests/test_x.py::test_f"])
    assert report.unmatched == ("a.tests.test_x.test_f", "b.tests.test_x.test_f")
    assert report.missing == ("tests/test_x.py::test_f",)


def test_an_exact_match_wins_over_a_prefix_match() -> None:
    xml = """
    <testsuite>
      <testcase classname="proj.tests.test_x" name="test_f"/>
      <testcase classname="tests.test_x" name="test_f"/>
    </testsuite>
    """
    report = read(xml, ["tests/test_x.py::test_f"])
    assert [r.test_id for r in report.results] == [
        "proj.tests.test_x.test_f",
        "tests/test_x.py::test_f",
    ]
    assert report.unmatched == ("proj.tests.test_x.test_f",)


def test_files_and_plain_names() -> None:
    # go-junit-report: the package is the class; a shell runner names files.
    xml = """
    <testsuites>
      <testsuite name="example.com/m/net">
        <testcase classname="example.com/m/net" name="TestDial" time="0.1"/>
        <testcase classname="example.com/m/net" name="TestListen" time="0.1"/>
      </testsuite>
      <testsuite name="shell">
        <testcase classname="shell" name="tests/net/t11.sh" time="1"/>
        <testcase classname="t12" name="sh" time="1"/>
      </testsuite>
    </testsuites>
    """
    ids = ("TestDial", "example.com/m/net.TestListen", "tests/net/t11.sh", "t12.sh")
    report = read(xml, ids)
    assert [r.test_id for r in report.results] == list(ids)
    assert report.unmatched == ()


def test_a_rerun_keeps_the_last_report() -> None:
    xml = """
    <testsuite>
      <testcase classname="t.T" name="test_flaky" time="1"><failure message="first try"/></testcase>
      <testcase classname="t.T" name="test_other" time="2"/>
      <testcase classname="t.T" name="test_flaky" time="3"/>
    </testsuite>
    """
    report = read(xml, ["t.T.test_flaky", "t.T.test_other"])
    assert [(r.test_id, r.outcome, r.started - T0) for r in report.results] == [
        ("t.T.test_other", "passed", 1.0),
        ("t.T.test_flaky", "passed", 3.0),
    ]


# --- properties -----------------------------------------------------------------

FRAGMENTS = st.sampled_from(
    [
        "<testsuites>",
        "</testsuites>",
        "<testsuite>",
        "</testsuite>",
        '<testcase classname="a.T" name="test_x" time="1">',
        '<testcase name="x" time="-2"/>',
        '<testcase classname="" name="" />',
        "</testcase>",
        '<failure message="m">',
        "</failure>",
        "<error/>",
        "<skipped/>",
        "<system-out>",
        "</system-out>",
        "<![CDATA[ <x> ]]>",
        "&amp;",
        "&lol;",
        "&#27;",
        "<!DOCTYPE testsuites [<!ENTITY lol 'x'>]>",
        '<?xml version="1.0" encoding="utf-16"?>',
        '<?xml version="1.0" encoding="nonsense"?>',
        "\xff",
        "\x00",
        "text",
    ]
)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), st.lists(FRAGMENTS, max_size=20)))
def test_only_junit_errors_on_any_input(data: bytes | list[str]) -> None:
    raw = (
        data
        if isinstance(data, bytes)
        else "".join(data).encode("utf-8").replace("\xff".encode(), b"\xff")
    )
    try:
        report = read_junit(raw, "w", ["a.T.test_x", "x"], T0, where="fuzz")
    except JUnitError as error:
        assert str(error).startswith("fuzz: ")
        return
    ids = {r.test_id for r in report.results}
    assert len(ids) == len(report.results)
    assert set(report.unmatched) <= ids
    assert not set(report.missing) & ids


PARTS = st.text(alphabet="abcxyz_", min_size=1, max_size=4).filter(str.isidentifier)
IDS = st.one_of(
    st.lists(PARTS, min_size=2, max_size=4).map(".".join),
    st.builds(
        lambda folder, module, rest: f"{folder}/test_{module}.py::{'::'.join(rest)}",
        PARTS,
        PARTS,
        st.lists(PARTS, min_size=1, max_size=2),
    ),
    st.builds(lambda folder, name: f"{folder}/{name}.sh", PARTS, PARTS),
    PARTS,
)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(IDS, min_size=1, max_size=8, unique=True))
def test_what_write_junit_writes_reads_back(ids: list[str]) -> None:
    names = [junit_names(test_id, "nightly") for test_id in ids]
    if len(set(names)) < len(names):
        return  # two ids JUnit cannot tell apart
    written = [TestResult(test_id, "passed", 1.0, "w", T0 + i) for i, test_id in enumerate(ids)]
    out = io.BytesIO()
    write_junit(written, out, "nightly")
    report = read_junit(out.getvalue(), "w", ids, T0, where="round trip")
    assert [r.test_id for r in report.results] == ids
    assert report.unmatched == () and report.missing == ()


def test_importing_does_not_touch_the_reactor() -> None:
    code = (
        "import sys, txvmbot.jobs.suite.junit; assert 'twisted.internet.reactor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=paths.ROOT)


def test_write_then_read_keeps_outcomes() -> None:
    written = [
        TestResult("pkg.T.test_ok", "passed", 1.0, "w", T0, output=b"hi\n"),
        TestResult("pkg.T.test_bad", "failed", 1.0, "w", T0 + 1, message="exit status 3"),
        TestResult("pkg.T.test_skip", "skipped", 0.0, "w", T0 + 2, message="no network"),
        TestResult("tests/t11.sh", "timeout", 5.0, "w", T0 + 2, message="passed its bound"),
    ]
    out = io.BytesIO()
    write_junit(written, out, "nightly")
    report = read_junit(out.getvalue(), "w", [r.test_id for r in written], T0, where="x")
    assert [(r.test_id, r.outcome, r.message) for r in report.results] == [
        ("pkg.T.test_ok", "passed", ""),
        ("pkg.T.test_bad", "failed", "exit status 3"),
        ("pkg.T.test_skip", "skipped", "no network"),
        ("tests/t11.sh", "failed", "passed its bound"),
    ]
    assert report.results[0].output == b"hi\n"


def test_many_tests_of_one_name_behind_another_rootdir() -> None:
    # Every class has a test_basic: the prefix fallback must not compare
    # each testcase with each id (20000 tests took minutes that way).
    n = 5000
    ids = [f"proj/tests/test_m{i // 20}.py::TestC{i % 20}::test_basic" for i in range(n)]
    cases = "".join(
        f'<testcase classname="tests.test_m{i // 20}.TestC{i % 20}" name="test_basic"/>'
        for i in range(n)
    )
    report = read(f"<testsuite>{cases}</testsuite>", ids)
    assert [r.test_id for r in report.results] == ids
