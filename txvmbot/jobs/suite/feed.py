"""One queue that feeds a suite's tests to free workers (seed 002).

A static split decided up front left workers ending 10+ minutes apart. The
feeder hands out work only when a worker is free: longest expected test
first, in batches that shrink as the queue empties, so near the end every
batch is a single test and the workers end about one test apart.

Pure and deterministic: no reactor, no I/O. The caller runs the batches and
reports back with :meth:`Feeder.finished` or :meth:`Feeder.timed_out`.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence, Set

from attrs import frozen

from txvmbot.errors import ConfigError, TxvmbotError

#: Expected seconds of a test when no test of the run has a recorded time.
DEFAULT_EXPECTED = 1.0


class FeedError(TxvmbotError):
    """The feeder was told something that cannot be: a batch it did not hand
    out (or already closed), or a test id that is not in the batch."""


@frozen
class Batch:
    """Tests handed to ``worker`` to run in one go; ``seq`` counts batches
    from 0 and identifies this one until it is closed."""

    worker: str
    test_ids: tuple[str, ...]
    expected: float
    seq: int


@frozen
class Closed:
    """What became of a batch's tests once the caller closed it.

    ``done``: ended on the machine (passed, failed, skipped: the caller has
    the result). ``timed_out``: passed its bound; final, a test failure.
    ``requeued``: did not end and went back to the front of the queue.
    ``gave_up``: did not end a second time; report as infrastructure
    trouble, never as a test failure.
    """

    done: tuple[str, ...] = ()
    timed_out: tuple[str, ...] = ()
    requeued: tuple[str, ...] = ()
    gave_up: tuple[str, ...] = ()


def expected_durations(test_ids: Sequence[str], durations: Mapping[str, float]) -> dict[str, float]:
    """Expected seconds of each test: its recorded time, else the median of
    the recorded times of this run's tests, else :data:`DEFAULT_EXPECTED`."""
    known: dict[str, float] = {}
    for tid in test_ids:
        if tid in durations:
            value = durations[tid]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError("durations", f"test {tid!r}: {value!r} is not a number")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(
                    "durations", f"test {tid!r}: {value!r} is not a finite duration >= 0"
                )
            known[tid] = float(value)
    fallback = statistics.median(known.values()) if known else DEFAULT_EXPECTED
    return {tid: known.get(tid, fallback) for tid in test_ids}


class Feeder:
    """Hands out a suite's tests to free workers from one queue.

    Every test id ends exactly once: in some :class:`Closed` as ``done``,
    ``timed_out`` or ``gave_up``. At any time
    ``total == remaining + handed_out + done``.
    """

    def __init__(
        self,
        test_ids: Sequence[str],
        durations: Mapping[str, float],
        workers: int,
        batch: bool = True,
        slices_per_worker: int = 4,
    ) -> None:
        """``test_ids``: the suite's tests, each once; their order breaks
        ties. ``durations``: recorded seconds per test id from earlier runs.
        ``workers``: how many machines pull from the queue. ``batch``: hand
        out several tests at a time (a runner that reports each test, e.g.
        subunit); ``False`` hands out one test at a time (the runner's exit
        status is the only result). A batch is at most about the remaining
        expected work divided by ``workers * slices_per_worker``."""
        if workers < 1:
            raise ConfigError("workers", f"need at least 1 worker, got {workers}")
        if slices_per_worker < 1:
            raise ConfigError("slices_per_worker", f"need at least 1, got {slices_per_worker}")
        seen: set[str] = set()
        for tid in test_ids:
            if tid in seen:
                raise ConfigError("test ids", f"test {tid!r} is listed more than once")
            seen.add(tid)
        self._expected = expected_durations(test_ids, durations)
        position = {tid: i for i, tid in enumerate(test_ids)}
        order = sorted(test_ids, key=lambda tid: (-self._expected[tid], position[tid]))
        self._queue: deque[str] = deque(order)
        self._queued_seconds = math.fsum(self._expected.values())
        self._workers = workers
        self._batch = batch
        self._slices = slices_per_worker
        self._out: dict[int, Batch] = {}
        self._given_back: dict[str, int] = {}
        self._seq = 0
        self._ended = 0

    # -- counts ---------------------------------------------------------

    @property
    def total(self) -> int:
        """How many distinct tests the suite has."""
        return len(self._expected)

    @property
    def remaining(self) -> int:
        """How many tests wait in the queue."""
        return len(self._queue)

    @property
    def handed_out(self) -> int:
        """How many tests are out in batches not yet closed."""
        return sum(len(b.test_ids) for b in self._out.values())

    @property
    def done(self) -> int:
        """How many tests are over for good: ended, timed out or given up."""
        return self._ended

    @property
    def remaining_seconds(self) -> float:
        """Expected seconds of the tests in the queue."""
        return self._queued_seconds if self._queue else 0.0

    @property
    def empty(self) -> bool:
        """Nothing is queued and nothing is out: the suite is over."""
        return not self._queue and not self._out

    def expected(self, test_id: str) -> float:
        """Expected seconds of one test of the suite."""
        return self._expected[test_id]

    # -- the queue ------------------------------------------------------

    def take(self, worker: str) -> Batch | None:
        """The next batch for the free ``worker``, or ``None`` when the queue
        is empty. ``None`` is not the end of the suite while batches are out
        (see ``empty``): a batch that fails may put tests back."""
        if not self._queue:
            return None
        first = self._queue.popleft()
        ids = [first]
        seconds = self._expected[first]
        if self._batch:
            budget = self.remaining_seconds / (self._workers * self._slices)
            while self._queue and seconds + self._expected[self._queue[0]] <= budget:
                tid = self._queue.popleft()
                ids.append(tid)
                seconds += self._expected[tid]
        self._queued_seconds = max(0.0, self._queued_seconds - seconds)
        batch = Batch(worker=worker, test_ids=tuple(ids), expected=seconds, seq=self._seq)
        self._seq += 1
        self._out[batch.seq] = batch
        return batch

    def finished(self, batch: Batch, done: Set[str]) -> Closed:
        """Close ``batch``: ``done`` are its tests that ended. The others
        (the machine died, the run was cut off) go back to the front of the
        queue the first time, and are given up the second time."""
        self._close(batch, done)
        requeued: list[str] = []
        gave_up: list[str] = []
        for tid in batch.test_ids:
            if tid in done:
                continue
            count = self._given_back.get(tid, 0) + 1
            self._given_back[tid] = count
            (requeued if count == 1 else gave_up).append(tid)
        self._requeue(requeued)
        ended = [tid for tid in batch.test_ids if tid in done]
        self._ended += len(ended) + len(gave_up)
        return Closed(done=tuple(ended), requeued=tuple(requeued), gave_up=tuple(gave_up))

    def timed_out(self, batch: Batch, test_id: str, done: Set[str] = frozenset()) -> Closed:
        """Close ``batch`` because ``test_id`` passed its bound: that test is
        final (a failure) and not re-queued. ``done`` are the batch's tests
        that ended before; the others go back to the front of the queue
        without counting as an infrastructure attempt."""
        if test_id not in batch.test_ids:
            raise FeedError(f"batch {batch.seq} of {batch.worker}: no test {test_id!r} in it")
        if test_id in done:
            raise FeedError(
                f"batch {batch.seq} of {batch.worker}: test {test_id!r} cannot both "
                "end and time out"
            )
        self._close(batch, done)
        ended = [tid for tid in batch.test_ids if tid in done]
        requeued = [tid for tid in batch.test_ids if tid not in done and tid != test_id]
        self._requeue(requeued)
        self._ended += len(ended) + 1
        return Closed(done=tuple(ended), timed_out=(test_id,), requeued=tuple(requeued))

    def _close(self, batch: Batch, done: Set[str]) -> None:
        if self._out.get(batch.seq) != batch:
            raise FeedError(
                f"batch {batch.seq} of {batch.worker}: not handed out, or already closed"
            )
        stray = sorted(set(done) - set(batch.test_ids))
        if stray:
            raise FeedError(f"batch {batch.seq} of {batch.worker}: tests not in it: {stray}")
        del self._out[batch.seq]

    def _requeue(self, ids: Sequence[str]) -> None:
        if not self._queue:
            self._queued_seconds = 0.0
        self._queue.extendleft(reversed(ids))
        self._queued_seconds += math.fsum(self._expected[tid] for tid in ids)
