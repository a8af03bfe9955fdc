"""One queue that feeds a suite's tests to free workers (seed 002).

A static split decided up front left workers ending 10+ minutes apart. The
feeder hands out work only when a worker is free, in batches that shrink
as the queue empties, so that machines end close together. Groups too long
to end a run well (more than :data:`HEAVY_SHARE` of a machine's part of
the suite) go first, longest first; the others keep the order they were
listed in. So each machine runs the bulk of the suite in listing order, as
each worker of stestr, ``trial -j`` and pytest-xdist does: a suite whose
tests leak state into later ones (a class attribute changed in place)
sees the order it was written for, also in a runner that stays up batch
after batch.

Real runners pay a fixed cost per command (the interpreter's start, the
imports of the test modules a batch touches): the feeder learns each
machine's cost as the run goes (a batch's wall time minus the times its
tests reported) and never makes a batch so small that this cost dominates
it, and it keeps groups of tests that share their set-up (a class, a
layer: :mod:`txvmbot.jobs.suite.groups`) in one batch, in order. A group is
split only when it is bigger than a machine's share of what is left, the
one case where keeping it whole would leave the other machines waiting.

Batch sizes follow guided self-scheduling (factoring): a batch is the
remaining expected work divided by ``workers * slices``, where ``slices``
is 2 (at most ``slices_per_worker``) when every queued test has a
recorded duration and grows to
``slices_per_worker`` (4; 16 for a long-lived runner, whose batches cost
little) as the share of guessed durations grows (a guess is wrong more
often, so smaller batches hedge: a test far slower than guessed holds up
only the rest of its own batch, while the other machines go on with the
queue). Two floors keep the fixed cost
small: while a machine's share of the remaining work allows, a batch is big
enough that the cost is at most :data:`COST_SHARE` of it; and near the end
it shrinks no further than :data:`FLOOR_COSTS` times that cost. (tests/unit/test_suite_feed.py
simulates a 2,409-test suite of small, heavy-tailed tests with a fixed cost
per command to show what this wins.)

For a long-lived runner (``runner``), whose batches cost little, two more
hedges for a first run. The first test of every class of a module with no
recorded time goes before the bulk (a probe), and an unrecorded test's
time is guessed from its class first, then its module: a class of slow
tests (Twisted's ``test_sslverify``, dateutil's ``test_tzpath_data``) would
otherwise be met with no idea of it and end the run late; once probed, the
rest of it is heavy and goes first. A batch that holds probes is marked
``alone``: txvmbot's own runner runs it in a forked child, so that a test
run ahead of its listing order changes nothing the rest of the suite meets
(openstackclient's ``TestProjectSet`` changes a fake that
``TestProjectCreate``, listed before it, checks). And while the measured
cost stays cheap, unrecorded tests are also cut by count, at most the
ones left / (machines x :data:`COUNT_SLICES`) a batch: the first tests of
a run may all be fast ones, and a guess from them would hand out the whole
unknown rest in a few big batches. A fresh process a batch keeps neither:
its first batches must be big enough to pay for its start, and probes
(often a class's simplest test) would make the run's first guess too low.

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
from txvmbot.jobs.suite.groups import GroupKey, family_of

#: Expected seconds of a test when no test of the run has a recorded time.
DEFAULT_EXPECTED = 1.0
#: Slices per worker when every queued test has a recorded duration.
KNOWN_SLICES = 2.0
#: While much work is left, a machine's fixed cost per command is at most
#: this share of a batch.
COST_SHARE = 0.05
#: Near the end a batch shrinks, but not below this many times its
#: machine's fixed cost per command: smaller batches would cost more in
#: starts than they win in a closer end.
FLOOR_COSTS = 2.0
#: The queue is sorted again on what was learned of unrecorded tests each
#: time that grew by this factor.
RESORT_GROWTH = 1.25
#: How much of a machine's last measured fixed cost is kept when a new
#: batch is measured (an exponential moving average).
COST_MEMORY = 0.5
#: Slices per worker while durations are guessed, for a long-lived runner.
RUNNER_SLICES = 16
#: A command that costs at most this many seconds (a long-lived runner's
#: batch) is cheap: batches of tests without a recorded time are then also
#: cut by count (see ``Feeder._guessed_cap``).
CHEAP_COST = 0.25
#: ... and then into at most this many batches a machine by count, of the
#: tests without a recorded time that are left.
COUNT_SLICES = 4
#: A group expected to take more than this share of a machine's part of
#: the suite is heavy: it goes before the others, longest first. Lighter
#: ones, handed out last, leave machines ending within about this share.
HEAVY_SHARE = 0.02


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
    #: Holds a probe, a test run ahead of its listing order: a runner that
    #: can should run it where it changes nothing for later tests.
    alone: bool = False


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


def _check_durations(test_ids: Sequence[str], durations: Mapping[str, float]) -> dict[str, float]:
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
    return known


def expected_durations(test_ids: Sequence[str], durations: Mapping[str, float]) -> dict[str, float]:
    """Expected seconds of each test: its recorded time, else the median of
    the recorded times of this run's tests, else :data:`DEFAULT_EXPECTED`."""
    known = _check_durations(test_ids, durations)
    fallback = statistics.median(known.values()) if known else DEFAULT_EXPECTED
    return {tid: known.get(tid, fallback) for tid in test_ids}


def _alone(test_id: str) -> str | None:
    return None


#: Joins a module and a group within it in a guessing key.
_SEP = "\x00"


def _kin(test_id: str, group: GroupKey) -> str:
    """The key an unrecorded test's time is guessed by: its module, and its
    group within the module if it has one."""
    module = family_of(test_id)
    key = group(test_id)
    return f"{module}{_SEP}{key}" if module and key else module


def _wider(key: str) -> tuple[str, ...]:
    """The keys to guess by, narrowest first: the group, its module, the run."""
    if _SEP in key:
        return (key, key.partition(_SEP)[0], "")
    return (key, "") if key else ("",)


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
        slices_per_worker: int | None = None,
        group: GroupKey = _alone,
        runner: bool = False,
    ) -> None:
        """``test_ids``: the suite's tests, each once; their order breaks
        ties and is the order within a group. ``durations``: recorded
        seconds per test id from earlier runs. ``workers``: how many
        machines pull from the queue. ``batch``: hand out several tests at a
        time (a runner that reports each test, e.g. subunit); ``False``
        hands out one test at a time (the runner's exit status is the only
        result; groups do not apply). ``slices_per_worker``: how finely the
        remaining work is cut while durations are guessed (see the module's
        docstring; 4, or 16 with ``runner``). ``group``: the key that keeps
        tests together. ``runner``: the batches go to a long-lived runner
        (cheap batches: probes and cuts by count, see the module's
        docstring)."""
        if slices_per_worker is None:
            slices_per_worker = RUNNER_SLICES if runner else 4
        if workers < 1:
            raise ConfigError("workers", f"need at least 1 worker, got {workers}")
        if slices_per_worker < 1:
            raise ConfigError("slices_per_worker", f"need at least 1, got {slices_per_worker}")
        seen: set[str] = set()
        for tid in test_ids:
            if tid in seen:
                raise ConfigError("test ids", f"test {tid!r} is listed more than once")
            seen.add(tid)
        self._recorded = _check_durations(test_ids, durations)
        self._ids = tuple(test_ids)
        self._base_guess = statistics.median(self._recorded.values()) if self._recorded else DEFAULT_EXPECTED
        #: seconds and count of this run's tests without a recorded time that
        #: ended, in all ("") and by family (module)
        self._learned: dict[str, tuple[float, int]] = {}
        #: how many had been learned when the queue was last sorted
        self._sorted_at = 0
        #: what an unrecorded test's time is guessed from: its module; for
        #: a runner, its group (class) within its module, then its module
        self._family = {
            tid: _kin(tid, group if runner and batch else _alone) for tid in self._ids if tid not in self._recorded
        }
        self._workers = workers
        self._batch = batch
        self._slices = slices_per_worker
        self._position = {tid: i for i, tid in enumerate(self._ids)}
        self._given_back: dict[str, int] = {}
        self._heavy = self._heavy_from_here()
        self._runner = runner
        self._probes = self._first_of_unknown_modules() if runner else set()
        self._queue: deque[list[str]] = deque(self._groups(group if batch else _alone))
        self._queued_known = math.fsum(self._recorded.values())
        #: queued tests without a recorded time, by family
        self._queued_guessed: dict[str, int] = {}
        for f in self._family.values():
            self._queued_guessed[f] = self._queued_guessed.get(f, 0) + 1
        self._out: dict[int, Batch] = {}
        self._costs: dict[str, float] = {}
        self._seq = 0
        self._ended = 0

    def _heavy_from_here(self) -> float:
        """Seconds above which a group is heavy, from what is known now of
        the whole suite's tests."""
        return HEAVY_SHARE * self._seconds(self._ids) / self._workers

    def _first_of_unknown_modules(self) -> set[str]:
        """The first listed test of each group (class) of a module none of
        whose tests has a recorded time: the probes, each a group of its own
        (the rest of its class follows it, in order)."""
        known = {family_of(tid) for tid in self._recorded}
        firsts: dict[str, str] = {}
        for tid in self._ids:
            family = self._family.get(tid, "")
            if family and family_of(tid) not in known:
                firsts.setdefault(family, tid)
        return set(firsts.values())

    def _groups(self, group: GroupKey) -> list[list[str]]:
        """The tests as groups in listing order within each, in
        :meth:`_order`."""
        groups: dict[object, list[str]] = {}
        for index, tid in enumerate(self._ids):
            # A probe is one test, alone: many of them make a small batch.
            key = None if tid in self._probes else group(tid)
            groups.setdefault(index if key is None else ("group", key), []).append(tid)
        ordered = list(groups.values())
        ordered.sort(key=self._order)
        return ordered

    def _order(self, group: list[str]) -> tuple[int, int, int, float, int]:
        """Tests given back first; then, while a class's speed is unknown,
        its probe (see the module's docstring); then heavy groups longest
        expected first; then the others as listed."""
        seconds = self._seconds(group)
        heavy = seconds > self._heavy
        head = group[0]
        probe = head in self._probes and self._family.get(head, "") not in self._learned
        return (
            0 if head in self._given_back else 1,
            0 if probe else 1,
            0 if heavy else 1,
            -seconds if heavy else 0.0,
            self._position[head],
        )

    # -- counts ---------------------------------------------------------

    @property
    def total(self) -> int:
        """How many distinct tests the suite has."""
        return len(self._ids)

    @property
    def remaining(self) -> int:
        """How many tests wait in the queue."""
        return sum(len(g) for g in self._queue)

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
        if not self._queue:
            return 0.0
        return max(0.0, self._queued_known) + self._guessed_seconds()

    def _guessed_seconds(self) -> float:
        return math.fsum(n * self._guess_for(f) for f, n in self._queued_guessed.items())

    def _guess_for(self, family: str) -> float:
        """Expected seconds of a test of ``family`` without a recorded time."""
        for key in _wider(family):
            if key in self._learned:
                seconds, count = self._learned[key]
                return seconds / count
        return self._base_guess

    @property
    def empty(self) -> bool:
        """Nothing is queued and nothing is out: the suite is over."""
        return not self._queue and not self._out

    def expected(self, test_id: str) -> float:
        """Expected seconds of one test of the suite: its recorded time, else
        the mean time of this run's tests without one that ended so far in
        its module (a suite's slow tests come in modules), else in the whole
        run, else the median recorded time of the suite's tests."""
        if test_id in self._recorded:
            return self._recorded[test_id]
        return self._guess_for(self._family[test_id])

    def fixed_cost(self, worker: str) -> float:
        """Seconds ``worker`` spends per command besides its tests, as
        measured so far (other workers' median before its first batch ends;
        0 before any)."""
        if worker in self._costs:
            return self._costs[worker]
        return statistics.median(self._costs.values()) if self._costs else 0.0

    def fixed_costs(self) -> dict[str, float]:
        """Each worker's measured fixed cost per command (workers with no
        batch measured yet are left out)."""
        return dict(self._costs)

    def _seconds(self, ids: Sequence[str]) -> float:
        return math.fsum(self.expected(tid) for tid in ids)

    # -- the queue ------------------------------------------------------

    def take(self, worker: str) -> Batch | None:
        """The next batch for the free ``worker``, or ``None`` when the queue
        is empty. ``None`` is not the end of the suite while batches are out
        (see ``empty``): a batch that fails may put tests back."""
        if not self._queue:
            return None
        if not self._batch:
            ids = [self._queue.popleft()[0]]
        else:
            ids = self._fill(self._budget(worker), self._guessed_cap(worker))
        for tid in ids:
            if tid in self._recorded:
                self._queued_known -= self._recorded[tid]
            else:
                self._queued_guessed[self._family[tid]] -= 1
        batch = Batch(
            worker=worker,
            test_ids=tuple(ids),
            expected=self._seconds(ids),
            seq=self._seq,
            alone=any(tid in self._probes for tid in ids),
        )
        self._seq += 1
        self._out[batch.seq] = batch
        return batch

    def _budget(self, worker: str) -> float:
        """Seconds of tests for the next batch of ``worker``."""
        left = self.remaining_seconds
        guessed = self._guessed_seconds()
        share = guessed / left if left > 0 else 1.0
        known = min(KNOWN_SLICES, self._slices)
        slices = known + (self._slices - known) * share
        cost = self.fixed_cost(worker)
        return max(
            left / (self._workers * slices),
            min(cost / COST_SHARE, left / self._workers),
            FLOOR_COSTS * cost,
        )

    def _guessed_cap(self, worker: str) -> float:
        """How many tests without a recorded time a batch of ``worker`` may
        hold: while commands are cheap, a share of those left by count
        (guided self-scheduling as first written, robust to a guess that
        is wrong for all of them alike: the first tests of a run may all be
        fast ones), so that a suite's unknown bulk is never handed out in a
        few big batches. A costly command (a fresh interpreter and its
        imports) is held to the cost floors instead."""
        if not self._runner or self.fixed_cost(worker) > CHEAP_COST:
            return math.inf
        guessed = sum(self._queued_guessed.values())
        return max(1.0, math.ceil(guessed / (self._workers * COUNT_SLICES)))

    def _fill(self, budget: float, cap: float = math.inf) -> list[str]:
        """Whole groups, longest first, while they fit ``budget`` and hold no
        more than ``cap`` tests without a recorded time (the first always
        goes). A first group bigger than a machine's share of what is left
        is split: its first tests up to ``budget`` go, the rest stays at the
        front."""
        first = self._queue[0]
        seconds = self._seconds(first)
        if len(first) > 1 and seconds > max(budget, self.remaining_seconds / self._workers):
            cut = 1
            taken = self.expected(first[0])
            while cut < len(first) - 1 and taken + self.expected(first[cut]) <= budget:
                taken += self.expected(first[cut])
                cut += 1
            self._queue[0] = first[cut:]
            return first[:cut]
        ids = self._queue.popleft()
        guessed = self._guessed_in(ids)
        while (
            self._queue
            and seconds + (more := self._seconds(self._queue[0])) <= budget
            and guessed + (extra := self._guessed_in(self._queue[0])) <= cap
        ):
            ids = ids + self._queue.popleft()
            seconds += more
            guessed += extra
        # In listing order, as the machine would meet them in one run.
        return sorted(ids, key=self._position.__getitem__)

    def _guessed_in(self, ids: Sequence[str]) -> int:
        return sum(1 for tid in ids if tid not in self._recorded)

    def finished(
        self,
        batch: Batch,
        done: Set[str],
        *,
        took: float | None = None,
        times: Mapping[str, float] | None = None,
        between: float = 0.0,
    ) -> Closed:
        """Close ``batch``: ``done`` are its tests that ended. The others
        (the machine died, the run was cut off) go back to the front of the
        queue the first time, and are given up the second time.

        ``took``: the command's wall time; ``times``: the seconds each test
        reported; ``between``: the seconds the runner spent between its
        tests (they grow with the batch: no part of the fixed cost). They
        teach the feeder the worker's fixed cost per command (when every
        test of the batch ended) and how long tests without a recorded time
        take."""
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
        if times is not None:
            self._learn(batch, done, took, times, between)
        return Closed(done=tuple(ended), requeued=tuple(requeued), gave_up=tuple(gave_up))

    def _learn(
        self, batch: Batch, done: Set[str], took: float | None, times: Mapping[str, float], between: float
    ) -> None:
        reported = {tid: max(0.0, float(t)) for tid, t in times.items() if tid in done and math.isfinite(t)}
        guessed = [(self._family[tid], t) for tid, t in reported.items() if tid not in self._recorded]
        for family, seconds in guessed:
            for key in _wider(family):
                total, count = self._learned.get(key, (0.0, 0))
                self._learned[key] = (total + seconds, count + 1)
        learned = self._learned.get("", (0.0, 0))[1]
        if guessed and self._queue and learned >= RESORT_GROWTH * self._sorted_at:
            # What was learned may make other tests of the same modules
            # heavy, or heavier than their places say: sort again (each
            # time a quarter more is known, so a few times a run).
            self._heavy = self._heavy_from_here()
            self._queue = deque(sorted(self._queue, key=self._order))
            self._sorted_at = learned
        if took is None or not math.isfinite(took) or len(reported) != len(batch.test_ids):
            return
        cost = max(0.0, took - math.fsum(reported.values()) - max(0.0, between))
        before = self._costs.get(batch.worker)
        self._costs[batch.worker] = cost if before is None else COST_MEMORY * before + (1 - COST_MEMORY) * cost

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
        """``ids`` back at the front of the queue, as one group in order (in
        batch mode; one by one otherwise)."""
        if not ids:
            return
        if not self._queue:
            self._queued_known = 0.0
            self._queued_guessed = dict.fromkeys(self._queued_guessed, 0)
        if self._batch:
            self._queue.appendleft(list(ids))
        else:
            self._queue.extendleft([tid] for tid in reversed(ids))
        for tid in ids:
            if tid in self._recorded:
                self._queued_known += self._recorded[tid]
            else:
                self._queued_guessed[self._family[tid]] += 1
