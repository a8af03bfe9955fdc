"""A long-lived test runner that ``txvmbot suite --runner`` starts on each
machine and feeds batch after batch on its stdin (seed 002).

This file runs on the machine, not in txvmbot: ``{runner_py}`` in
``--runner`` is the path of a copy of it, uploaded over SFTP. It needs only
the standard library and python-subunit (and Twisted, with ``--trial``).

A fresh process per batch pays the interpreter's start and the imports of
every test module again; a runner that stays up pays them once per machine,
as ``trial -j`` and pytest-xdist workers do.

The protocol, on stdin: test ids, one a line; a line ``#end TOKEN`` ends a
batch. For each batch the runner loads the ids (unittest's loader, or
trial's with ``--trial``), runs them, and writes their results to stdout as
a subunit v2 stream, then a status packet ``exists`` for the test id
``txvmbot:end-of-batch:TOKEN``, which tells txvmbot the batch is over (an id
that cannot be loaded is reported as an error of that id, never skipped).
A line ``#list TOKEN`` asks for the runner's tests instead: one ``exists``
packet per test id, in order, then the same end packet; a runner that
cannot list says why in a packet for ``txvmbot:list-error:TOKEN`` (its
``error`` attachment). A line ``#alone`` among a batch's ids runs that
batch in a child process (a fork): what its tests change in memory stays
there (txvmbot runs its probes, tests ahead of their listing order, so). Listing loads every test module, so the batches
after it pay no imports, as ``stestr`` and ``trial -j`` workers load
everything before their first test. End of input: the runner exits 0.

What it lists: unittest, ``--discover START [-t TOP] [-p PATTERN]`` (as
``python -m unittest discover``) or test names; with ``--trial``, the test
names (packages, modules) trial would load; with ``--pytest ARGS``, what
pytest collects from ARGS.
"""

from __future__ import annotations

import io
import os
import sys
import unittest
from collections.abc import Iterator
from typing import IO, Any

END = "#end "
LIST = "#list "
ALONE = "#alone"
MARK = "txvmbot:end-of-batch:"
LIST_ERROR = "txvmbot:list-error:"


#: The status bits of a subunit v2 packet's flags that say "inprogress".
_INPROGRESS = 0x2


def _flushing(stream: IO[bytes]) -> Any:
    """A binary stream that reaches txvmbot when a test starts (its
    ``inprogress`` packet carries the previous test's results along) and at
    the end of each batch (:func:`_end`), not after every packet: fewer
    writes leave the machine's cores to the tests (each write wakes sshd
    and txvmbot). A test that kills its runner has always been announced,
    so its failure is still put on it."""

    class Flushing:
        def read(self, size: int = -1) -> bytes:
            raise io.UnsupportedOperation("write only")  # how subunit tells a binary stream

        def write(self, data: bytes) -> int:
            n = stream.write(data)
            # Packets come whole: signature 0xB3, then two bytes of flags
            # whose low three bits are the test status.
            if len(data) > 2 and data[0] == 0xB3 and data[2] & 0x07 == _INPROGRESS:
                stream.flush()
            return n

        def flush(self) -> None:
            pass  # subunit flushes after every packet; see push()

        def push(self) -> None:
            stream.flush()

    return Flushing()


def _end(marks: Any, token: str) -> None:
    """The end packet of a request, and everything before it, to txvmbot."""
    marks.status(test_id=MARK + token, test_status="exists")
    marks.output_stream.push()


def _flat(suite: Any) -> list[Any]:
    if isinstance(suite, unittest.TestSuite):
        return [t for s in suite for t in _flat(s)]
    return [suite]


#: How unittest names a module it could not import (then the module's name).
_FAILED_IMPORT = "unittest.loader._FailedTest."


def _unittest_batch(ids: list[str], result: Any) -> None:
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for tid in ids:
        # A module the listing could not import: import it again, for its error.
        name = tid[len(_FAILED_IMPORT) :] if tid.startswith(_FAILED_IMPORT) else tid
        try:
            loaded = _flat(loader.loadTestsFromName(name))
        except Exception as e:  # a bad id is that id's error
            loaded = [_Unloadable(tid, e)]
        for test in loaded:
            # unittest's stand-in for a module it could not import has an
            # id of its own: report the error under the id that was asked.
            failed = getattr(test, "_exception", None)
            if type(test).__name__ == "_FailedTest" and failed is not None:
                test = _Unloadable(tid, failed)
            suite.addTest(test)
    suite.run(result)


class _Unloadable(unittest.TestCase):
    def __init__(self, test_id: str, error: Exception) -> None:
        super().__init__("runTest")
        self._id = test_id
        self._error = error

    def id(self) -> str:
        return self._id

    def runTest(self) -> None:
        raise ImportError(f"cannot load {self._id}: {self._error!r}")


def _trial_runner(stream: Any) -> Any:
    from subunit import StreamResultToBytes
    from testtools import ExtendedToStreamDecorator
    from twisted.trial import reporter, runner

    class V2Reporter(reporter.SubunitReporter):
        """trial's subunit reporter, writing v2 (trial's own writes v1)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._subunit = ExtendedToStreamDecorator(StreamResultToBytes(stream))
            self._subunit.startTestRun()
            self._successful = True

    trial = runner.TrialRunner(V2Reporter, workingDirectory="_trial_temp")
    loader = runner.TestLoader()

    def run(ids: list[str]) -> None:
        trial.run(loader.loadByNames(ids))

    return run


def _unittest_list(args: Any) -> list[str]:
    """The ids of the tests ``args`` name; a module that does not import is
    listed under unittest's id for it, and running that id reports the
    import's own error."""
    loader = unittest.TestLoader()
    if args.discover:
        suite = loader.discover(args.discover, pattern=args.pattern, top_level_dir=args.top)
    elif args.names:
        suite = loader.loadTestsFromNames(args.names)
    else:
        raise _CannotList(
            "nothing to list: give the runner --discover START (and -t TOP, -p PATTERN) or test names"
        )
    return [test.id() for test in _flat(suite)]


def _trial_list(names: list[str]) -> list[str]:
    from twisted.trial import runner

    if not names:
        raise _CannotList(
            "nothing to list: give the runner, after --trial, the test names trial would load"
        )
    # As ``trial NAMES`` loads them: packages recursively.
    return [test.id() for test in _flat(runner.TestLoader().loadByNames(names, recurse=True))]


class _CannotList(Exception):
    pass


def _batches(stdin: IO[str]) -> Iterator[tuple[str, list[str], str]]:
    """(what, ids, token) for each request on ``stdin``, until end of input:
    ``run`` a batch of ids, ``alone`` a batch to run in a child process,
    or ``list`` the tests."""
    batch: list[str] = []
    alone = False
    for line in stdin:
        line = line.rstrip("\n")
        if line.startswith(END):
            yield "alone" if alone else "run", batch, line[len(END) :]
            batch = []
            alone = False
        elif line.startswith(LIST):
            yield "list", [], line[len(LIST) :]
        elif line.strip() == ALONE:
            alone = True
        elif line.strip():
            batch.append(line.strip())


def _in_child(out: Any, run: Any, *args: Any) -> None:
    """``run(*args)`` in a child process (a fork, which shares what this process
    has loaded): whatever its tests change in memory stays in the child,
    so tests run ahead of their listing order (txvmbot's probes) cannot
    change what later tests meet here. The child's results go out before
    it ends; a child that dies leaves the test it ran without an end."""
    sys.stdout.flush()
    out.push()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            run(*args)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                out.push()
            finally:
                os._exit(code)
    os.waitpid(pid, 0)


def _answer_list(marks: Any, token: str, list_ids: Any) -> None:
    """Write the ids ``list_ids()`` gives as ``exists`` packets, once each,
    or why it could not; then the end packet."""
    try:
        ids = list_ids()
    except Exception as e:  # an import error, a bad argument: say so
        import traceback

        text = e.args[0] if isinstance(e, _CannotList) else traceback.format_exc()
        marks.status(
            test_id=LIST_ERROR + token,
            file_name="error",
            file_bytes=str(text).encode("utf-8", "replace"),
            eof=True,
            mime_type="text/plain;charset=utf8",
        )
    else:
        for tid in dict.fromkeys(ids):
            marks.status(test_id=tid, test_status="exists")
    _end(marks, token)


_PYTEST_STATUS = {"passed": "success", "failed": "fail", "skipped": "skip"}


def _pytest_main(out: Any, marks: Any, args: list[str], feed_in: IO[str]) -> int:
    """pytest, collected once; then each batch's node ids run in that
    session, as an xdist worker runs what its controller sends."""
    import datetime

    import pytest
    from subunit import StreamResultToBytes

    utc = datetime.timezone.utc  # noqa: UP017 - the machine's Python may be older than 3.11

    class Feed:
        def __init__(self) -> None:
            self.stream = StreamResultToBytes(out)
            self.outcome: dict[str, str] = {}
            self.done = False
            #: The collectors that failed (a module that does not import):
            #: listed as tests of their own, each failing with its error.
            self.collect_errors: dict[str, str] = {}

        def pytest_collectreport(self, report: Any) -> None:
            if report.failed:
                self.collect_errors[report.nodeid] = str(report.longrepr)

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtestloop(self, session: Any) -> bool:
            items = {item.nodeid: item for item in session.items}
            for what, ids, token in _batches(feed_in):
                if what == "list":
                    _answer_list(marks, token, lambda: [*items, *self.collect_errors])
                    continue
                if what == "alone":
                    _in_child(out, self._run, items, ids)
                else:
                    self._run(items, ids)
                _end(marks, token)
            self.done = True
            return True

        def _run(self, items: dict[str, Any], ids: list[str]) -> None:
            """Run the batch's ids in this session, in order."""
            todo = []
            for tid in ids:
                if tid in items:
                    todo.append(items[tid])
                elif tid in self.collect_errors:
                    self._status(tid, "inprogress")
                    self._status(
                        tid,
                        "fail",
                        text=f"{tid}: pytest could not collect it:\n{self.collect_errors[tid]}",
                    )
                else:
                    self._status(tid, "inprogress")
                    self._status(tid, "fail", text=f"{tid}: pytest collected no such test")
            for i, item in enumerate(todo):
                after = todo[i + 1] if i + 1 < len(todo) else None
                item.config.hook.pytest_runtest_protocol(item=item, nextitem=after)

        def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
            # Before its fixtures: a test's time includes its set-up.
            self._status(nodeid, "inprogress")
            self.outcome[nodeid] = "success"

        def pytest_runtest_logreport(self, report: Any) -> None:
            tid = report.nodeid
            status = _PYTEST_STATUS.get(report.outcome, "fail")
            if hasattr(report, "wasxfail"):
                status = "xfail" if report.skipped else "uxsuccess"
            if status != "success" and self.outcome.get(tid) == "success":
                self.outcome[tid] = status
                text = str(report.longrepr or "") if status in ("fail", "uxsuccess") else ""
                reason = ""
                if report.skipped and isinstance(report.longrepr, tuple):
                    reason = str(report.longrepr[-1])
                elif hasattr(report, "wasxfail"):
                    reason = str(report.wasxfail)
                self._attach(tid, "traceback", text)
                self._attach(tid, "reason", reason)
            if report.when == "teardown":
                self._attach(tid, "stdout", report.capstdout)
                self._attach(tid, "stderr", report.capstderr)
                self._status(tid, self.outcome.pop(tid, "success"))

        def _attach(self, tid: str, name: str, text: str) -> None:
            if text:
                self.stream.status(
                    test_id=tid, file_name=name, file_bytes=text.encode("utf-8", "replace"),
                    eof=True, mime_type="text/plain;charset=utf8",
                    timestamp=datetime.datetime.now(utc),
                )

        def _status(self, tid: str, status: str, text: str = "") -> None:
            self._attach(tid, "traceback", text)
            self.stream.status(test_id=tid, test_status=status, timestamp=datetime.datetime.now(utc))

    feed = Feed()
    code = pytest.main(["-p", "no:cacheprovider", "-p", "no:terminal", *args], plugins=[feed])
    if not feed.done:  # collection failed: say so on every batch's ids
        why = f"pytest did not start (exit status {int(code)})"
        if feed.collect_errors:
            why += ": " + "\n".join(f"{k}: {v}" for k, v in feed.collect_errors.items())[-4000:]

        def cannot() -> list[str]:
            raise _CannotList(why)

        for what, ids, token in _batches(feed_in):
            if what == "list":
                _answer_list(marks, token, cannot)
                continue
            for tid in ids:
                feed._status(tid, "inprogress")
                feed._status(tid, "fail", text=why)
            _end(marks, token)
    return 0


def main(argv: list[str]) -> int:
    # As ``python -m subunit.run`` and ``python -m twisted.trial`` do: the
    # tests are found from the working directory, not from this file's.
    sys.path.insert(0, os.getcwd())
    from subunit import StreamResultToBytes
    from testtools import ExtendedToStreamDecorator

    if argv[1:2] == ["--pytest"]:
        # Seed 002: the protocol gets a descriptor of its own; everything
        # else written to stdout (pytest's own lines, a test's print outside
        # its capture) goes to stderr instead.
        # pytest's capture replaces stdin too: the batches keep their own.
        protocol = os.fdopen(os.dup(1), "wb")
        feed_in = os.fdopen(os.dup(0), "r")
        os.dup2(2, 1)
        out = _flushing(protocol)
        return _pytest_main(out, StreamResultToBytes(out), argv[2:], feed_in)
    args = _arguments(argv[1:])
    out = _flushing(sys.stdout.buffer)
    marks = StreamResultToBytes(out)
    if args.trial:
        run = _trial_runner(out)

        def list_ids() -> list[str]:
            return _trial_list(args.names)
    else:
        result = ExtendedToStreamDecorator(StreamResultToBytes(out))
        result.startTestRun()

        def run(ids: list[str]) -> None:
            _unittest_batch(ids, result)

        def list_ids() -> list[str]:
            return _unittest_list(args)

    for what, ids, token in _batches(sys.stdin):
        if what == "list":
            _answer_list(marks, token, list_ids)
            continue
        if ids and what == "alone":
            _in_child(out, run, ids)
        elif ids:
            run(ids)
        sys.stdout.flush()
        _end(marks, token)
    return 0


def _arguments(argv: list[str]) -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog="runner.py", description="txvmbot's test runner: ids on stdin (see its source)"
    )
    p.add_argument("--trial", action="store_true", help="run the tests with trial (Twisted)")
    p.add_argument(
        "--discover", metavar="START", help="(unittest) list the tests discovery finds under START"
    )
    p.add_argument(
        "-t", "--top-level-directory", dest="top", metavar="TOP", help="(unittest) discovery's top"
    )
    p.add_argument(
        "-p", "--pattern", default="test*.py", help="(unittest) discovery's file pattern"
    )
    p.add_argument("names", nargs="*", help="what to list: test names (packages, modules, classes)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
