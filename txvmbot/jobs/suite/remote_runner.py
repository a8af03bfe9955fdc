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
End of input: the runner exits 0.
"""

from __future__ import annotations

import io
import os
import sys
import unittest
from typing import IO, Any

END = "#end "
MARK = "txvmbot:end-of-batch:"


def _flushing(stream: IO[bytes]) -> Any:
    """A binary stream that is flushed after every write: results reach
    txvmbot as each test ends, not when a buffer fills."""

    class Flushing:
        def read(self, size: int = -1) -> bytes:
            raise io.UnsupportedOperation("write only")  # how subunit tells a binary stream

        def write(self, data: bytes) -> int:
            n = stream.write(data)
            stream.flush()
            return n

        def flush(self) -> None:
            stream.flush()

    return Flushing()


def _flat(suite: Any) -> list[Any]:
    if isinstance(suite, unittest.TestSuite):
        return [t for s in suite for t in _flat(s)]
    return [suite]


def _unittest_batch(ids: list[str], result: Any) -> None:
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for tid in ids:
        try:
            loaded = _flat(loader.loadTestsFromName(tid))
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


def main(argv: list[str]) -> int:
    # As ``python -m subunit.run`` and ``python -m twisted.trial`` do: the
    # tests are found from the working directory, not from this file's.
    sys.path.insert(0, os.getcwd())
    from subunit import StreamResultToBytes
    from testtools import ExtendedToStreamDecorator

    out = _flushing(sys.stdout.buffer)
    marks = StreamResultToBytes(out)
    if "--trial" in argv[1:]:
        run = _trial_runner(out)
    else:
        result = ExtendedToStreamDecorator(StreamResultToBytes(out))
        result.startTestRun()

        def run(ids: list[str]) -> None:
            _unittest_batch(ids, result)

    batch: list[str] = []
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line.startswith(END):
            if batch:
                run(batch)
            sys.stdout.flush()
            marks.status(test_id=MARK + line[len(END) :], test_status="exists")
            batch = []
        elif line.strip():
            batch.append(line.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
