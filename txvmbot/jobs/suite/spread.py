"""How evenly a suite run kept its workers busy, and the static splits that
stestr makes, to compare against (seed 002: workers ended 10+ minutes apart).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

from attrs import frozen

from txvmbot.errors import ConfigError


@frozen
class Timeline:
    """One worker's run: first start, last end and the seconds it spent
    running tests in between."""

    worker: str
    start: float
    end: float
    busy: float


@frozen
class Spread:
    """Summary figures of a run over ``workers`` machines.

    ``end_spread``: the last worker's end minus the first worker's end, the
    time machines sat done while another still ran. ``fixed_cost``: the
    measured seconds a command costs besides its tests (the runner's start,
    its imports), which every machine pays at least once. ``between``: the
    seconds the runners spent between tests (loading them, writing their
    results), in all. ``lower_bound``: no schedule can beat
    ``max((total_test_time + between) / workers, longest_test) +
    fixed_cost``; ``ratio`` is ``makespan / lower_bound`` (1.0 is perfect).
    """

    workers: int
    makespan: float
    busy: tuple[tuple[str, float], ...]
    end_spread: float
    end_spread_share: float
    total_test_time: float
    longest_test: float
    lower_bound: float
    ratio: float
    fixed_cost: float = 0.0
    between: float = 0.0


def summarize(
    timelines: Sequence[Timeline],
    test_durations: Iterable[float],
    fixed_cost: float = 0.0,
    between: float = 0.0,
) -> Spread:
    """The figures of a run from its workers' timelines, the seconds each of
    its tests took, the fixed cost of one command and the seconds spent
    between tests."""
    if not timelines:
        raise ConfigError("timelines", "need at least one worker's timeline")
    durations = list(test_durations)
    makespan = max(t.end for t in timelines) - min(t.start for t in timelines)
    ends = [t.end for t in timelines]
    end_spread = max(ends) - min(ends)
    total = sum(durations)
    longest = max(durations, default=0.0)
    lower = max((total + between) / len(timelines), longest) + fixed_cost
    return Spread(
        workers=len(timelines),
        makespan=makespan,
        busy=tuple((t.worker, t.busy) for t in timelines),
        end_spread=end_spread,
        end_spread_share=end_spread / makespan if makespan > 0 else 0.0,
        total_test_time=total,
        longest_test=longest,
        lower_bound=lower,
        ratio=makespan / lower if lower > 0 else 1.0,
        fixed_cost=fixed_cost,
        between=between,
    )


def static_timelines(
    partitions: Sequence[Sequence[str]], actual: Mapping[str, float], start: float = 0.0
) -> list[Timeline]:
    """The timelines of a static split when every worker starts at ``start``
    and runs its share back to back, each test taking ``actual`` seconds."""
    timelines = []
    for i, part in enumerate(partitions):
        busy = sum(actual[tid] for tid in part)
        timelines.append(Timeline(worker=f"worker-{i}", start=start, end=start + busy, busy=busy))
    return timelines


def _check_n(n: int) -> None:
    if n < 1:
        raise ConfigError("workers", f"need at least 1 partition, got {n}")


def partition_by_count(ids: Sequence[str], n: int) -> list[list[str]]:
    """Round-robin ``ids`` into ``n`` lists, as stestr does without timings."""
    _check_n(n)
    parts: list[list[str]] = [[] for _ in range(n)]
    for part, tid in zip(itertools.cycle(parts), ids):
        part.append(tid)
    return parts


def partition_by_timing(
    ids: Sequence[str], durations: Mapping[str, float], n: int
) -> list[list[str]]:
    """Split ``ids`` into ``n`` lists as stestr's ``partition_tests`` does:
    tests with a recorded time, longest first, each to the list with the
    least total so far (ties: fewer tests, then the first list); then tests
    without a recorded time round-robin."""
    _check_n(n)
    parts: list[list[str]] = [[] for _ in range(n)]
    totals = [0.0] * n
    known = [tid for tid in ids if tid in durations]
    unknown = [tid for tid in ids if tid not in durations]
    for tid in sorted(known, key=lambda t: durations[t], reverse=True):
        i = min(range(n), key=lambda k: (totals[k], len(parts[k])))
        parts[i].append(tid)
        totals[i] += durations[tid]
    for part, tid in zip(itertools.cycle(parts), unknown):
        part.append(tid)
    return parts
