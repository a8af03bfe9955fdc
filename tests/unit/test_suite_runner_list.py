"""txvmbot's own runner (``{runner_py}``), run here as a real process on
real unittest, trial and pytest suites: it lists the tests
(``txvmbot suite --runner`` with neither ``--list`` nor ``--tests``),
answering ``#list``, read back by :func:`listed`; and what it writes
reaches txvmbot when each test starts, so a test that kills it is named."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from subunit import StreamResultToBytes

from txvmbot.jobs.suite.results import read_subunit
from txvmbot.jobs.suite.serve import listed, runner_script

UNITTEST = """
import unittest

class Arithmetic(unittest.TestCase):
    def test_add(self):
        self.assertEqual(1 + 1, 2)

    def test_wrong(self):
        self.assertEqual(1, 2)
"""

TRIAL = """
from twisted.trial import unittest

class Plain(unittest.SynchronousTestCase):
    def test_one(self):
        pass

    def test_two(self):
        pass
"""

PYTEST = """
import pytest

@pytest.mark.parametrize("x", [1, 2])
def test_x(x):
    assert x

class TestC:
    def test_y(self):
        pass
"""


#: The runner's environment on a machine: its stdout buffered (as over
#: ssh), whatever this process was started with.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def answer(cwd: Path, args: list[str], stdin: str) -> bytes:
    """txvmbot's runner started with ``args`` in ``cwd``, fed ``stdin``: its
    stdout (the protocol)."""
    script = cwd / "runner.py"
    script.write_bytes(runner_script())
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
        check=True,
        env=ENV,
    )
    return done.stdout


def split(stream: bytes, token: str) -> tuple[bytes, bytes]:
    """The answer to the request with ``token``, and what came after it."""
    mark = f"txvmbot:end-of-batch:{token}".encode()
    end = stream.index(mark) + len(mark) + 4  # and the packet's CRC32
    return stream[:end], stream[end:]


def test_unittest_discovery_lists_every_test_and_a_module_that_does_not_import(
    tmp_path: Path,
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "test_math.py").write_text(textwrap.dedent(UNITTEST))
    (tmp_path / "pkg" / "test_broken.py").write_text("import no_such_module_here\n")
    broken = "unittest.loader._FailedTest.pkg.test_broken"

    out = answer(
        tmp_path,
        ["--discover", "pkg", "-t", "."],
        f"#list L1\npkg.test_math.Arithmetic.test_add\n{broken}\n#end B1\n",
    )

    listing, rest = split(out, "L1")
    ids, error = listed(listing)
    assert error is None
    assert sorted(ids) == sorted(
        [broken, "pkg.test_math.Arithmetic.test_add", "pkg.test_math.Arithmetic.test_wrong"]
    )
    # Running the broken module's id reports its import error, not "no such test".
    read = read_subunit(split(rest, "B1")[0], "w", ["pkg.test_math.Arithmetic.test_add", broken])
    outcomes = {r.test_id: r for r in read.results}
    assert outcomes["pkg.test_math.Arithmetic.test_add"].outcome == "passed"
    assert outcomes[broken].outcome == "failed"
    assert "no_such_module_here" in outcomes[broken].message + outcomes[broken].output.decode()


def test_unittest_names_are_listed_too(tmp_path: Path) -> None:
    (tmp_path / "test_math.py").write_text(textwrap.dedent(UNITTEST))

    ids, error = listed(split(answer(tmp_path, ["test_math.Arithmetic"], "#list L\n"), "L")[0])

    assert (ids, error) == (
        ("test_math.Arithmetic.test_add", "test_math.Arithmetic.test_wrong"),
        None,
    )


def test_a_runner_given_nothing_to_list_says_what_to_give(tmp_path: Path) -> None:
    ids, error = listed(split(answer(tmp_path, [], "#list L\n"), "L")[0])

    assert ids == ()
    assert (
        error
        == "nothing to list: give the runner --discover START (and -t TOP, -p PATTERN) or test names"
    )


def test_trial_lists_the_names_it_was_given(tmp_path: Path) -> None:
    (tmp_path / "test_trialsample.py").write_text(textwrap.dedent(TRIAL))

    ids, error = listed(
        split(answer(tmp_path, ["--trial", "test_trialsample"], "#list L\n"), "L")[0]
    )

    assert (ids, error) == (
        ("test_trialsample.Plain.test_one", "test_trialsample.Plain.test_two"),
        None,
    )


def test_pytest_lists_what_it_collected_and_a_module_it_could_not(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_p.py").write_text(textwrap.dedent(PYTEST))
    (tmp_path / "tests" / "test_bad.py").write_text("import no_such_module_here\n")

    out = answer(
        tmp_path,
        ["--pytest", "tests"],
        "#list L1\ntests/test_bad.py\ntests/test_p.py::TestC::test_y\n#end B1\n",
    )

    listing, rest = split(out, "L1")
    ids, error = listed(listing)
    assert error is None
    assert ids == (
        "tests/test_p.py::test_x[1]",
        "tests/test_p.py::test_x[2]",
        "tests/test_p.py::TestC::test_y",
        "tests/test_bad.py",
    )
    read = read_subunit(
        split(rest, "B1")[0], "w", ["tests/test_bad.py", "tests/test_p.py::TestC::test_y"]
    )
    outcomes = {r.test_id: r for r in read.results}
    assert outcomes["tests/test_p.py::TestC::test_y"].outcome == "passed"
    bad = outcomes["tests/test_bad.py"]
    assert bad.outcome == "failed"
    assert "pytest could not collect it" in bad.message + bad.output.decode()
    assert "no_such_module_here" in bad.message + bad.output.decode()


def test_a_test_that_kills_the_runner_was_announced_before_it_died(tmp_path: Path) -> None:
    """The runner writes at each test's start, not after every packet: the
    results before the killer, and the killer's start, are out when the
    process dies without a flush (os._exit, as a segfault would)."""
    (tmp_path / "test_dies.py").write_text(
        textwrap.dedent(
            """
            import os, unittest

            class Dies(unittest.TestCase):
                def test_a(self):
                    pass

                def test_b(self):
                    self.assertEqual(1, 2)

                def test_c_kills(self):
                    os._exit(3)

                def test_d(self):
                    pass
            """
        )
    )
    ids = [f"test_dies.Dies.test_{n}" for n in ("a", "b", "c_kills", "d")]
    script = tmp_path / "runner.py"
    script.write_bytes(runner_script())
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        input=("\n".join(ids) + "\n#end B\n").encode(),
        capture_output=True,
        timeout=60,
        env=ENV,
    )

    assert done.returncode == 3
    read = read_subunit(done.stdout, "w", ids)
    assert {r.test_id: r.outcome for r in read.results} == {ids[0]: "passed", ids[1]: "failed"}
    assert read.running == ids[2]
    assert read.missing == (ids[3],)


LEAKY = {
    "unittest": (
        "test_leaky.py",
        """
        import unittest

        SHARED = {"clean": True}

        class Leaky(unittest.TestCase):
            def test_dirties(self):
                SHARED["clean"] = False

            def test_sees_clean(self):
                self.assertTrue(SHARED["clean"])
        """,
        [],
        "test_leaky.Leaky.test_",
    ),
    "trial": (
        "test_leaky.py",
        """
        from twisted.trial import unittest

        SHARED = {"clean": True}

        class Leaky(unittest.SynchronousTestCase):
            def test_dirties(self):
                SHARED["clean"] = False

            def test_sees_clean(self):
                self.assertTrue(SHARED["clean"])
        """,
        ["--trial"],
        "test_leaky.Leaky.test_",
    ),
    "pytest": (
        "tests/test_leaky.py",
        """
        SHARED = {"clean": True}

        def test_dirties():
            SHARED["clean"] = False

        def test_sees_clean():
            assert SHARED["clean"]
        """,
        ["--pytest", "tests"],
        "tests/test_leaky.py::test_",
    ),
}


@pytest.mark.parametrize("kind", sorted(LEAKY))
def test_a_batch_run_alone_leaves_nothing_behind_for_the_next(tmp_path: Path, kind: str) -> None:
    """``#alone``: the batch runs in a forked child; what its tests change
    in memory does not reach the runner's later batches (txvmbot's probes
    run ahead of listing order so); its results come out all the same."""
    name, source, args, prefix = LEAKY[kind]
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text(textwrap.dedent(source))
    dirties, clean = prefix + "dirties", prefix + "sees_clean"

    out = answer(tmp_path, args, f"#alone\n{dirties}\n#end A\n{clean}\n#end B\n{dirties}\n#end C\n{clean}\n#end D\n")

    outcomes = []
    for token, test in (("A", dirties), ("B", clean), ("C", dirties), ("D", clean)):
        answer_of, out = split(out, token)
        read = read_subunit(answer_of, "w", [test])
        outcomes.append([r.outcome for r in read.results])
    # Alone, the change stayed in the child; in the runner itself, it stays.
    assert outcomes == [["passed"], ["passed"], ["passed"], ["failed"]]


def test_a_bad_runner_argument_stops_it_with_its_usage(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as e:
        answer(tmp_path, ["--no-such-flag"], "")
    assert e.value.returncode == 2
    assert b"--no-such-flag" in e.value.stderr


def packets(*statuses: tuple[str, str | None, bytes]) -> bytes:
    out = io.BytesIO()
    stream = StreamResultToBytes(out)
    for test_id, status, attachment in statuses:
        if attachment:
            stream.status(test_id=test_id, file_name="error", file_bytes=attachment, eof=True)
        else:
            stream.status(test_id=test_id, test_status=status)
    return out.getvalue()


def test_listed_reads_exists_packets_once_each_in_order_and_nothing_else() -> None:
    data = (
        b"a line that is not subunit\n"
        + packets(("b.t", "exists", b""), ("a.t", "exists", b""), ("b.t", "exists", b""))
        + b"\xb3 torn"
        + packets(
            ("c.t", "inprogress", b""),
            ("c.t", "success", b""),
            ("txvmbot:end-of-batch:XY", "exists", b""),
        )
    )

    assert listed(data) == (("b.t", "a.t"), None)


def test_listed_gives_the_runners_reason() -> None:
    data = packets(
        ("txvmbot:list-error:XY", None, b"cannot import tests: boom"),
        ("txvmbot:end-of-batch:XY", "exists", b""),
    )

    assert listed(data) == ((), "cannot import tests: boom")
