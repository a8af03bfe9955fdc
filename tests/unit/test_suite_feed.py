"""The suite's scheduling layer: the feeder, recorded durations and the
spread figures (seed 002: a static split left workers 10+ minutes apart)."""

from __future__ import annotations

import json
import os
import random
import stat
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from txvmbot.errors import ConfigError, TxvmbotError
from txvmbot.jobs.suite import durations
from txvmbot.jobs.suite.feed import Batch, Closed, Feeder, FeedError, expected_durations
from txvmbot.jobs.suite.groups import by_class, family_of, grouping
from txvmbot.jobs.suite.ledger import between_tests
from txvmbot.jobs.suite.results import TestResult
from txvmbot.jobs.suite.spread import (
    Spread,
    Timeline,
    partition_by_count,
    partition_by_timing,
    static_timelines,
    summarize,
)

# -- the feeder: order and batches ------------------------------------------


def drain(feeder: Feeder, worker: str = "w0") -> list[Batch]:
    """Take and finish batches one by one until the queue is empty."""
    batches = []
    for _ in range(feeder.total + 1):
        batch = feeder.take(worker)
        if batch is None:
            break
        feeder.finished(batch, set(batch.test_ids))
        batches.append(batch)
    return batches


def test_order_is_longest_first_ties_in_given_order() -> None:
    ids = ["a", "b", "c", "d", "e"]
    feeder = Feeder(ids, {"a": 1.0, "b": 5.0, "c": 1.0, "d": 9.0, "e": 5.0}, 2, batch=False)
    order = [b.test_ids[0] for b in drain(feeder)]
    assert order == ["d", "b", "e", "a", "c"]


def test_light_groups_keep_their_listing_order_on_every_machine() -> None:
    """Recorded times of a suite of small classes (openstackclient's, where
    ``TestProjectSet`` leaks a property into the fake project that
    ``TestProjectCreate``, listed before it, checks): however their times
    fall, every machine meets the light classes in listing order, as a
    stestr or xdist worker does; only the heavy one (more than 2% of a
    machine's part) goes first. And every batch is in listing order."""
    rng = random.Random(7)
    ids = [f"pkg.mod{m}.Test{c}.test_{t}" for m in range(40) for c in range(10) for t in range(6)]
    recorded = {t: rng.uniform(0.001, 0.01) for t in ids}
    heavy = "pkg.mod17.Test3.test_2"
    recorded[heavy] = 2.0
    position = {t: i for i, t in enumerate(ids)}
    for workers in (2, 3):
        feeder = Feeder(ids, recorded, workers, group=by_class)
        seen: dict[str, list[str]] = {f"w{i}": [] for i in range(workers)}
        first = feeder.take("w0")
        assert first is not None and heavy in first.test_ids  # the heavy class first
        seen["w0"].extend(first.test_ids)
        feeder.finished(first, set(first.test_ids))
        for i in range(1, len(ids)):
            worker = f"w{i % workers}"
            batch = feeder.take(worker)
            if batch is None:
                break
            assert list(batch.test_ids) == sorted(batch.test_ids, key=position.__getitem__)
            seen[worker].extend(batch.test_ids)
            feeder.finished(batch, set(batch.test_ids))
        for got in seen.values():
            light = [position[t] for t in got if not t.startswith("pkg.mod17.Test3.")]
            assert light == sorted(light)


def test_unknown_tests_get_the_median_of_known_ones() -> None:
    expected = expected_durations(["a", "b", "c", "new"], {"a": 1.0, "b": 3.0, "c": 10.0})
    assert expected == {"a": 1.0, "b": 3.0, "c": 10.0, "new": 3.0}
    # Times recorded for tests that are not in this run do not count.
    assert expected_durations(["x", "y"], {"gone": 50.0}) == {"x": 1.0, "y": 1.0}
    feeder = Feeder(["new", "a", "c"], {"a": 1.0, "c": 10.0}, 1, batch=False)
    assert feeder.expected("new") == 5.5
    assert [b.test_ids[0] for b in drain(feeder)] == ["c", "new", "a"]


def test_without_batching_every_batch_is_one_test() -> None:
    ids = [f"t{i}" for i in range(50)]
    feeder = Feeder(ids, {t: 0.01 for t in ids}, 2, batch=False)
    batches = drain(feeder)
    assert [len(b.test_ids) for b in batches] == [1] * 50
    assert [b.seq for b in batches] == list(range(50))


def test_batches_shrink_to_single_tests_near_the_end() -> None:
    ids = [f"t{i:03d}" for i in range(400)]
    feeder = Feeder(ids, {t: 1.0 for t in ids}, workers=4)
    sizes = []
    for _ in range(401):
        before = feeder.remaining_seconds
        batch = feeder.take("w0")
        if batch is None:
            break
        # Every time recorded, no fixed cost: the remaining work / (workers * 2).
        assert len(batch.test_ids) == 1 or batch.expected <= before / 8 + 1e-9
        assert batch.expected == len(batch.test_ids) * 1.0
        feeder.finished(batch, set(batch.test_ids))
        sizes.append(len(batch.test_ids))
    assert sum(sizes) == 400
    assert sizes[0] == 50  # 400 s of work / 8
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-7:] == [1] * 7


def test_guessed_durations_make_smaller_batches() -> None:
    ids = [f"t{i:03d}" for i in range(400)]
    feeder = Feeder(ids, {}, workers=4)
    batch = feeder.take("w0")
    # Nothing recorded: the work is cut in workers * slices_per_worker.
    assert batch is not None and len(batch.test_ids) == 25  # 400 s / (4 x 4)
    # A long-lived runner's batches cost little: cut finer.
    batch = Feeder(ids, {}, workers=4, runner=True).take("w0")
    assert batch is not None and len(batch.test_ids) == 6  # 400 s / (4 x 16)


def test_a_fixed_cost_per_command_keeps_batches_big() -> None:
    """A batch that took 72.5 s for 62.5 s of tests: 10 s a command. Batches
    are then at least 20 x 10 s while a machine's share of the rest allows,
    and never below 2 x 10 s at the end."""
    ids = [f"t{i:04d}" for i in range(2000)]
    eighth = 0.125
    feeder = Feeder(ids, dict.fromkeys(ids, eighth), workers=2)
    first = feeder.take("w0")
    assert first is not None and len(first.test_ids) == 500  # 250 s / (2 x 2)
    feeder.finished(first, set(first.test_ids), took=72.5, times=dict.fromkeys(first.test_ids, eighth))
    assert feeder.fixed_cost("w0") == pytest.approx(10.0)
    assert feeder.fixed_cost("w1") == pytest.approx(10.0)  # the others' until its own is known
    second = feeder.take("w1")
    # 187.5 s left: 20 x 10 s is more than a machine's share, so the share.
    assert second is not None and len(second.test_ids) == 750
    feeder.finished(second, set(second.test_ids), took=103.75, times=dict.fromkeys(second.test_ids, eighth))
    sizes = []
    for _ in range(100):
        batch = feeder.take("w0")
        if batch is None:
            break
        sizes.append(len(batch.test_ids))
        feeder.finished(batch, set(batch.test_ids))
    assert sum(sizes) == 750
    assert sizes[0] == 375  # a machine's share of 93.75 s
    assert min(sizes[:-1]) >= 160  # 2 x 10 s of 0.125 s tests; the last takes what is left
    assert len(sizes) <= 5
    assert feeder.empty


def test_time_between_tests_is_no_part_of_a_commands_fixed_cost() -> None:
    """A long-lived runner costs 0.05 s a batch, and 2 ms between tests
    (its loader, writing results): that grows with the batch, so it is not
    counted as the batch's fixed cost (which would make every batch 20
    times too big)."""
    ids = [f"t{i:03d}" for i in range(400)]
    feeder = Feeder(ids, dict.fromkeys(ids, 0.01), workers=2)
    batch = feeder.take("w0")
    assert batch is not None
    n = len(batch.test_ids)
    gaps = (n - 1) * 0.002
    feeder.finished(
        batch, set(batch.test_ids), took=0.05 + n * 0.01 + gaps, times=dict.fromkeys(batch.test_ids, 0.01), between=gaps
    )
    assert feeder.fixed_cost("w0") == pytest.approx(0.05)


def test_between_tests_sums_the_gaps_inside_a_batch() -> None:
    def result(test_id: str, started: float, duration: float) -> TestResult:
        return TestResult(test_id=test_id, outcome="passed", duration=duration, worker="w", started=started)

    # Out of order as they may be recorded; the second and third overlap.
    results = [result("c", 103.0, 1.0), result("a", 100.0, 1.0), result("b", 101.5, 2.0)]
    assert between_tests(results) == pytest.approx(0.5)
    assert between_tests([]) == 0.0


def test_the_cost_is_measured_only_from_batches_that_ended_whole() -> None:
    feeder = Feeder(["a", "b"], {"a": 1.0, "b": 1.0}, workers=1, slices_per_worker=1)
    batch = feeder.take("w0")
    assert batch is not None and batch.test_ids == ("a", "b")
    feeder.finished(batch, {"a"}, took=30.0, times={"a": 1.0})
    assert feeder.fixed_cost("w0") == 0.0
    again = feeder.take("w0")
    assert again is not None and again.test_ids == ("b",)
    feeder.finished(again, {"b"}, took=3.0, times={"b": 1.0})
    assert feeder.fixed_cost("w0") == pytest.approx(2.0)


def test_times_of_this_run_replace_the_guess() -> None:
    ids = [f"t{i}" for i in range(100)]
    feeder = Feeder(ids, {}, workers=1)
    assert feeder.expected("t99") == 1.0
    batch = feeder.take("w0")
    assert batch is not None
    feeder.finished(
        batch, set(batch.test_ids), took=1.0, times={t: 0.01 for t in batch.test_ids}
    )
    assert feeder.expected("t99") == pytest.approx(0.01)
    assert feeder.remaining_seconds == pytest.approx(0.01 * feeder.remaining)


def test_a_slow_module_listed_last_is_probed_first_and_then_goes_first() -> None:
    """Nothing recorded, a runner; the tests of ``pkg.slow``, listed last,
    take 3 s, the rest 0.01 s. The first test of every class goes before
    the bulk (a probe, in a batch marked to run alone), so the slow classes
    are known early; once probed, the rest of each is expected at 3 s a
    test and goes next, before the fast classes' rest, although listed
    last. Without a runner there are no probes."""

    def case(module: str) -> list[str]:
        return [f"pkg.{module}.test_{j}" for j in range(10)]

    ids = [t for i in range(8) for c in ("A", "B") for t in case(f"fast{i}.Case{c}")]
    ids += case("slow.Case0") + case("slow.Case1") + case("slow.Case2")
    seconds = {t: 3.0 if t.startswith("pkg.slow") else 0.01 for t in ids}
    feeder = Feeder(ids, {}, workers=2, slices_per_worker=2, group=by_class, runner=True)
    handed: list[str] = []
    while not all(f"pkg.slow.Case{c}.test_0" in handed for c in range(3)):
        batch = feeder.take("w0")
        assert batch is not None and batch.alone
        assert all(t.endswith(".test_0") for t in batch.test_ids)  # probes only
        handed.extend(batch.test_ids)
        times = {t: seconds[t] for t in batch.test_ids}
        feeder.finished(batch, set(batch.test_ids), took=sum(times.values()) + 0.01, times=times)
    assert feeder.expected("pkg.slow.Case2.test_5") == pytest.approx(3.0)
    assert feeder.expected("pkg.fast3.CaseB.test_5") == pytest.approx(0.01)
    following = feeder.take("w1")
    assert following is not None and not following.alone
    assert following.test_ids[0].startswith("pkg.slow.Case")
    plain = Feeder(ids, {}, workers=2, slices_per_worker=2, group=by_class).take("w0")
    assert plain is not None and not plain.alone and plain.test_ids[:2] == tuple(ids[:2])


def test_a_cheap_command_gets_unrecorded_tests_in_batches_cut_by_count() -> None:
    """Nothing recorded and the first tests fast: their mean would make the
    whole unknown rest one or two huge batches. While a runner's batches
    are cheap, a batch holds at most the unrecorded tests left / (machines
    x 4)."""
    ids = [f"pkg.mod{i // 100}.Case{i // 10}.test_{i}" for i in range(1000)]
    feeder = Feeder(ids, {}, workers=2, group=by_class, runner=True)
    first = feeder.take("w0")
    assert first is not None
    feeder.finished(first, set(first.test_ids), took=0.05, times=dict.fromkeys(first.test_ids, 0.0001))
    second = feeder.take("w0")
    assert second is not None
    left = 1000 - len(first.test_ids)
    assert len(second.test_ids) <= -(-left // 8)
    # A costly command (a fresh interpreter a batch) is held to the cost
    # floors instead: one big batch.
    costly = Feeder(ids, {}, workers=2, group=by_class, runner=True)
    first = costly.take("w0")
    assert first is not None
    costly.finished(first, set(first.test_ids), took=2.0, times=dict.fromkeys(first.test_ids, 0.0001))
    second = costly.take("w0")
    assert second is not None and len(second.test_ids) > 2 * -(-left // 8)


def test_families_are_modules() -> None:
    assert family_of("pkg.mod.Class.test_x") == "pkg.mod"
    assert family_of("tests/test_x.py::TestX::test_y[1]") == "tests/test_x.py"
    assert family_of("tests/test_x.py::test_f") == "tests/test_x.py"
    assert family_of("t11.sh") == ""


# -- groups -----------------------------------------------------------------


def test_groups_stay_together_in_order_longest_group_first() -> None:
    ids = ["m.A.t1", "m.B.t1", "m.A.t2", "m.B.t2", "m.B.t3", "m.C.t1"]
    recorded = {"m.A.t1": 1.0, "m.A.t2": 1.0, "m.B.t1": 1.0, "m.B.t2": 1.0, "m.B.t3": 1.0, "m.C.t1": 2.5}
    feeder = Feeder(ids, recorded, workers=2, group=by_class)
    first = feeder.take("w0")
    second = feeder.take("w1")
    third = feeder.take("w0")
    assert first is not None and first.test_ids == ("m.B.t1", "m.B.t2", "m.B.t3")
    assert second is not None and second.test_ids == ("m.C.t1",)
    # The last class alone is more than a machine's share of what is left
    # (2 s over 2 machines): split, in order.
    assert third is not None and third.test_ids == ("m.A.t1",)


def test_a_group_is_split_only_when_bigger_than_a_machines_share() -> None:
    big = [f"pkg.Big.t{i}" for i in range(10)]
    small = [f"pkg.S{i}.t" for i in range(4)]
    ids = big + small
    feeder = Feeder(ids, dict.fromkeys(ids, 1.0), workers=2, group=by_class)
    # 14 s in all, 7 s a machine: the 10 s class would end late on its own.
    first = feeder.take("w0")
    assert first is not None and first.test_ids == tuple(big[:3])  # 14 / (2 x 2) = 3.5 s
    second = feeder.take("w1")
    # 11 s left, 5.5 s a machine: the rest of the class (7 s) is split again.
    assert second is not None and second.test_ids == tuple(big[3:5])
    # Without grouping, nothing is split and order is by test.
    plain = Feeder(ids, dict.fromkeys(ids, 1.0), workers=2)
    got = plain.take("w0")
    assert got is not None and got.test_ids == tuple(big[:3])


def test_a_group_within_a_share_goes_whole_even_over_the_budget() -> None:
    ids = [f"pkg.A.t{i}" for i in range(6)] + [f"pkg.B{i}.t" for i in range(10)]
    feeder = Feeder(ids, dict.fromkeys(ids, 1.0), workers=2, group=by_class)
    batch = feeder.take("w0")
    # 16 s, 8 s a machine, budget 4 s: the 6 s class goes whole.
    assert batch is not None and batch.test_ids == tuple(ids[:6])


def test_requeued_tests_go_back_as_one_group() -> None:
    ids = ["m.A.t1", "m.A.t2", "m.A.t3", "m.B.t1"]
    feeder = Feeder(ids, dict.fromkeys(ids, 1.0), workers=1, group=by_class)
    batch = feeder.take("w0")
    assert batch is not None
    closed = feeder.finished(batch, {"m.A.t1"})
    assert closed.requeued[:2] == ("m.A.t2", "m.A.t3")
    again = feeder.take("w0")
    assert again is not None and again.test_ids[:2] == ("m.A.t2", "m.A.t3")


def test_without_batching_groups_do_not_apply() -> None:
    ids = ["m.A.t1", "m.A.t2"]
    feeder = Feeder(ids, {}, workers=1, batch=False, group=by_class)
    assert [b.test_ids for b in drain(feeder)] == [("m.A.t1",), ("m.A.t2",)]


@pytest.mark.parametrize(
    ("test_id", "key"),
    [
        ("pkg.mod.Class.test_x", "pkg.mod.Class"),
        ("pkg.mod.Class.test_x[1.5]", "pkg.mod.Class"),
        ("pkg.mod.Class.test_x(scenario.a)", "pkg.mod.Class"),
        ("pkg.mod.test_f", "pkg.mod"),
        ("test_mod.test_f", None),  # two parts: as likely a file name as a Python name
        ("tests/test_x.py::TestX::test_y[1-2]", "tests/test_x.py::TestX"),
        ("tests/test_x.py::test_f", None),
        ("tests/test_x.py::test_f[a::b]", None),
        ("tests/test_x.py::TestX::test_y[a::b]", "tests/test_x.py::TestX"),
        ("t11.sh", None),
        ("tests/net/t11.sh", None),
        ("single", None),
        ("a.b-c.d", None),
    ],
)
def test_the_default_group_is_the_class(test_id: str, key: str | None) -> None:
    assert by_class(test_id) == key


def test_group_regex_means_what_it_means_to_stestr() -> None:
    key = grouping(r"^[^.]+\.[^.]+")
    assert key("pkg.mod.A.t1") == key("pkg.mod.B.t2") == "pkg.mod"
    assert key("nodots") is None
    assert grouping(None, enabled=False)("pkg.mod.A.t1") is None
    assert grouping(None)("pkg.mod.A.t1") == "pkg.mod.A"
    with pytest.raises(ConfigError, match="--group-regex.*not a regular expression"):
        grouping("(")


def test_a_long_test_goes_alone_even_when_it_is_over_the_budget() -> None:
    feeder = Feeder(["long", "a", "b"], {"long": 100.0, "a": 1.0, "b": 1.0}, workers=2)
    first = feeder.take("w0")
    assert first is not None and first.test_ids == ("long",)
    second = feeder.take("w1")
    assert second is not None and second.test_ids == ("a",)


def test_counts_and_empty() -> None:
    feeder = Feeder(["a", "b", "c"], {}, 2, batch=False)
    assert (feeder.total, feeder.remaining, feeder.handed_out, feeder.done) == (3, 3, 0, 0)
    assert not feeder.empty
    one = feeder.take("w0")
    two = feeder.take("w1")
    assert one is not None and two is not None
    assert (feeder.remaining, feeder.handed_out, feeder.done) == (1, 2, 0)
    feeder.finished(one, {"a"})
    assert (feeder.remaining, feeder.handed_out, feeder.done) == (1, 1, 1)
    three = feeder.take("w0")
    assert three is not None
    assert feeder.take("w0") is None
    assert not feeder.empty  # batches are still out
    feeder.finished(two, {"b"})
    feeder.finished(three, {"c"})
    assert (feeder.remaining, feeder.handed_out, feeder.done) == (0, 0, 3)
    assert feeder.empty
    assert feeder.take("w0") is None


# -- the feeder: failures ---------------------------------------------------


def test_tests_that_did_not_end_go_to_the_front_once_then_are_infra() -> None:
    recorded = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    feeder = Feeder(list(recorded), recorded, workers=1, slices_per_worker=1)
    first = feeder.take("w0")
    assert first is not None and first.test_ids == ("a", "b", "c", "d")
    # The machine died after "a" ended: the others go back to the front.
    closed = feeder.finished(first, {"a"})
    assert closed == Closed(done=("a",), requeued=("b", "c", "d"))
    assert (feeder.remaining, feeder.remaining_seconds, feeder.done) == (3, 6.0, 1)
    again = feeder.take("w0")
    assert again is not None and again.test_ids == ("b", "c", "d")
    # The second time "b" does not end it is given up: infrastructure trouble.
    closed = feeder.finished(again, {"c", "d"})
    assert closed == Closed(done=("c", "d"), gave_up=("b",))
    assert feeder.empty and feeder.done == 4


def test_a_whole_batch_lost_keeps_its_order_at_the_front() -> None:
    ids = [f"t{i}" for i in range(8)]
    feeder = Feeder(ids, {t: 1.0 for t in ids}, workers=1, slices_per_worker=2)
    batch = feeder.take("w0")
    assert batch is not None and batch.test_ids == ("t0", "t1", "t2", "t3")
    closed = feeder.finished(batch, set())
    assert closed.requeued == ("t0", "t1", "t2", "t3")
    assert feeder.remaining == 8
    assert feeder.remaining_seconds == 8.0
    after = feeder.take("w0")
    assert after is not None and after.test_ids == ("t0", "t1", "t2", "t3")


def test_a_timed_out_test_is_final_and_the_rest_goes_back() -> None:
    ids = ["a", "b", "c", "d"]
    feeder = Feeder(ids, {t: 1.0 for t in ids}, workers=1, slices_per_worker=1)
    batch = feeder.take("w0")
    assert batch is not None and batch.test_ids == ("a", "b", "c", "d")
    closed = feeder.timed_out(batch, "b", done={"a"})
    assert closed == Closed(done=("a",), timed_out=("b",), requeued=("c", "d"))
    assert (feeder.remaining, feeder.handed_out, feeder.done) == (2, 0, 2)
    # The re-queue after a time-out was not an infrastructure attempt: "c"
    # may still be given back once more before it is given up.
    again = feeder.take("w0")
    assert again is not None and again.test_ids == ("c", "d")
    assert feeder.finished(again, {"d"}).requeued == ("c",)
    last = feeder.take("w0")
    assert last is not None
    assert feeder.finished(last, set()).gave_up == ("c",)
    assert feeder.empty and feeder.done == 4


def test_closing_a_batch_wrongly_is_an_error() -> None:
    feeder = Feeder(["a", "b"], {}, 2, batch=False)
    batch = feeder.take("w0")
    assert batch is not None
    with pytest.raises(FeedError, match="not in it"):
        feeder.finished(batch, {"b"})
    with pytest.raises(FeedError, match="no test 'b'"):
        feeder.timed_out(batch, "b")
    with pytest.raises(FeedError, match="both end and time out"):
        feeder.timed_out(batch, "a", done={"a"})
    feeder.finished(batch, {"a"})
    with pytest.raises(FeedError, match="batch 0 of w0: not handed out, or already closed"):
        feeder.finished(batch, {"a"})
    with pytest.raises(FeedError):
        feeder.finished(Batch(worker="w9", test_ids=("b",), expected=1.0, seq=7), set())
    assert issubclass(FeedError, TxvmbotError)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ConfigError, match="listed more than once"):
        Feeder(["a", "b", "a"], {}, 1)
    with pytest.raises(ConfigError, match="at least 1 worker"):
        Feeder(["a"], {}, 0)
    with pytest.raises(ConfigError, match="slices_per_worker"):
        Feeder(["a"], {}, 1, slices_per_worker=0)
    with pytest.raises(ConfigError, match="'a'"):
        Feeder(["a"], {"a": -1.0}, 1)
    with pytest.raises(ConfigError, match="'a'"):
        Feeder(["a"], {"a": float("nan")}, 1)


def test_an_empty_suite_is_empty() -> None:
    feeder = Feeder([], {}, 3)
    assert feeder.empty and feeder.total == 0
    assert feeder.take("w0") is None


# -- a simulated run on a Clock ---------------------------------------------


def heavy_tailed(seed: int, n: int = 200) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """Test ids, their recorded seconds (Pareto, alpha 1.5, capped at 25 s)
    and the seconds they take this time (the recorded ones drifted by up to
    a few tens of per cent, as timings do between runs)."""
    rng = random.Random(seed)
    ids = [f"tests.t{i:03d}" for i in range(n)]
    recorded = {t: min(rng.paretovariate(1.5), 25.0) for t in ids}
    actual = {t: recorded[t] * rng.lognormvariate(0.0, 0.3) for t in ids}
    return ids, recorded, actual


def simulate(
    ids: Sequence[str],
    recorded: Mapping[str, float],
    actual: Mapping[str, float],
    workers: int = 4,
    batch: bool = True,
) -> list[Timeline]:
    """Run the suite on a Clock: each worker takes a batch when free and
    finishes it after the batch's actual seconds. Asserts that a worker
    only stops when nothing is left to hand out."""
    clock = Clock()
    feeder = Feeder(ids, recorded, workers, batch=batch)
    busy = {f"w{i}": 0.0 for i in range(workers)}
    ends = dict.fromkeys(busy, 0.0)

    def pull(worker: str) -> None:
        batch = feeder.take(worker)
        if batch is None:
            assert feeder.remaining == 0, "a worker stopped while tests were queued"
            return
        seconds = sum(actual[t] for t in batch.test_ids)
        clock.callLater(seconds, finish, worker, batch, seconds)

    def finish(worker: str, batch: Batch, seconds: float) -> None:
        feeder.finished(batch, set(batch.test_ids))
        busy[worker] += seconds
        ends[worker] = clock.seconds()
        pull(worker)

    for worker in busy:
        pull(worker)
    for _ in range(len(ids) + 1):
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(min(c.getTime() for c in calls) - clock.seconds())
    assert not clock.getDelayedCalls()
    assert feeder.empty and feeder.done == len(ids)
    return [Timeline(worker=w, start=0.0, end=ends[w], busy=busy[w]) for w in busy]


def test_four_workers_pulling_200_heavy_tailed_tests() -> None:
    ids, recorded, actual = heavy_tailed(seed=2)
    timelines = simulate(ids, recorded, actual)
    spread = summarize(timelines, actual.values())
    # The longest test is much shorter than a worker's share.
    assert spread.longest_test * 3 < spread.total_test_time / 4
    # No worker sat idle while tests remained: busy from start to its end.
    for t in timelines:
        assert t.busy == pytest.approx(t.end - t.start)
    assert spread.end_spread <= spread.longest_test
    assert spread.makespan <= 1.05 * spread.lower_bound
    assert spread.ratio <= 1.05
    # stestr's static splits on the same data end later.
    by_timing = summarize(
        static_timelines(partition_by_timing(ids, recorded, 4), actual), actual.values()
    )
    by_count = summarize(static_timelines(partition_by_count(ids, 4), actual), actual.values())
    assert by_timing.makespan > spread.makespan
    assert by_count.makespan > by_timing.makespan
    assert by_timing.end_spread > spread.end_spread
    assert by_count.end_spread > spread.end_spread


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("seed", range(10))
def test_the_bounds_hold_on_other_data(seed: int, batch: bool) -> None:
    ids, recorded, actual = heavy_tailed(seed=1000 + seed)
    spread = summarize(simulate(ids, recorded, actual, batch=batch), actual.values())
    assert spread.end_spread <= spread.longest_test
    assert spread.ratio <= 1.05
    by_timing = summarize(
        static_timelines(partition_by_timing(ids, recorded, 4), actual), actual.values()
    )
    assert by_timing.makespan > spread.makespan


def run_with_cost(
    ids: Sequence[str],
    actual: Mapping[str, float],
    recorded: Mapping[str, float],
    workers: int,
    cost: float,
) -> tuple[float, int]:
    """Each batch takes ``cost`` seconds besides its tests, and reports its
    wall time and test times back: (makespan, batches)."""
    clock = Clock()
    feeder = Feeder(ids, recorded, workers, group=by_class)
    ends: dict[str, float] = {}
    batches = 0

    def pull(worker: str) -> None:
        nonlocal batches
        batch = feeder.take(worker)
        if batch is None:
            ends[worker] = clock.seconds()
            return
        batches += 1
        took = cost + sum(actual[t] for t in batch.test_ids)
        clock.callLater(took, finish, worker, batch, took)

    def finish(worker: str, batch: Batch, took: float) -> None:
        feeder.finished(
            batch, set(batch.test_ids), took=took, times={t: actual[t] for t in batch.test_ids}
        )
        pull(worker)

    for i in range(workers):
        pull(f"w{i}")
    for _ in range(len(ids) + 1):
        calls = clock.getDelayedCalls()
        if not calls:
            break
        clock.advance(min(c.getTime() for c in calls) - clock.seconds())
    assert feeder.empty
    return max(ends.values()), batches


@pytest.mark.parametrize("seed", range(3))
def test_a_suite_of_small_tests_with_a_costly_command(seed: int) -> None:
    """A suite shaped like Twisted's own (2,409 tests, 55 s in all, most of
    them a few ms, a heavy tail) on 2 machines whose command costs 0.8 s
    (interpreter, imports) besides the tests: batches stay few, and the
    makespan stays near its lower bound (every machine pays the cost once),
    first run (nothing recorded) and second (recorded times drifted)."""
    rng = random.Random(seed)
    raw = [min(rng.paretovariate(1.2), 400.0) for _ in range(2409)]
    ids = [f"pkg.mod{i // 40}.Case{i // 8}.test_{i}" for i in range(len(raw))]
    actual = {t: x * 55.0 / sum(raw) for t, x in zip(ids, raw, strict=True)}
    recorded = {t: d * rng.lognormvariate(0.0, 0.5) for t, d in actual.items()}
    lower = 55.0 / 2 + 0.8
    first, first_batches = run_with_cost(ids, actual, {}, 2, 0.8)
    second, second_batches = run_with_cost(ids, actual, recorded, 2, 0.8)
    assert first <= 1.15 * lower and second <= 1.12 * lower
    assert first_batches <= 14 and second_batches <= 10
    # A runner that costs nothing per command gets smaller batches.
    _, free_batches = run_with_cost(ids, actual, recorded, 2, 0.0)
    assert free_batches > 2 * second_batches


# -- every test ends exactly once, whatever happens -------------------------


@settings(max_examples=200, deadline=None)
@given(
    recorded=st.lists(
        st.floats(min_value=0.0, max_value=100.0, allow_nan=False) | st.none(),
        min_size=0,
        max_size=30,
    ),
    workers=st.integers(min_value=1, max_value=5),
    batch=st.booleans(),
    data=st.data(),
)
def test_every_test_is_handed_out_and_ends_exactly_once(
    recorded: list[float | None], workers: int, batch: bool, data: st.DataObject
) -> None:
    ids = [f"t{i}" for i in range(len(recorded))]
    known = {t: d for t, d in zip(ids, recorded, strict=True) if d is not None}
    feeder = Feeder(ids, known, workers, batch=batch)
    ended: dict[str, int] = dict.fromkeys(ids, 0)
    handed: set[str] = set()
    out: list[Batch] = []
    free = [f"w{i}" for i in range(workers)]
    for _ in range(10 * len(ids) + 10):
        if feeder.empty:
            break
        assert feeder.total == feeder.remaining + feeder.handed_out + feeder.done
        can_take = bool(free) and feeder.remaining > 0
        if can_take and (not out or data.draw(st.booleans(), label="take")):
            worker = free.pop(0)
            taken = feeder.take(worker)
            assert taken is not None and taken.worker == worker and taken.test_ids
            assert not set(taken.test_ids) & {t for b in out for t in b.test_ids}
            handed.update(taken.test_ids)
            out.append(taken)
            continue
        assert out, "nothing out and nothing to take, yet not empty"
        closing = out.pop(data.draw(st.integers(0, len(out) - 1), label="which"))
        free.append(closing.worker)
        done = set(
            data.draw(st.lists(st.sampled_from(closing.test_ids), unique=True), label="done")
        )
        pending = [t for t in closing.test_ids if t not in done]
        time_out = bool(pending) and data.draw(st.booleans(), label="time out")
        if time_out:
            closed = feeder.timed_out(closing, data.draw(st.sampled_from(pending)), done)
        else:
            closed = feeder.finished(closing, done)
        assert set(closed.done) == done
        assert sorted(closed.done + closed.timed_out + closed.requeued + closed.gave_up) == (
            sorted(closing.test_ids)
        )
        for t in closed.done + closed.timed_out + closed.gave_up:
            ended[t] += 1
    assert feeder.empty
    assert feeder.take("w0") is None
    assert handed == set(ids)
    assert ended == dict.fromkeys(ids, 1)
    assert feeder.done == len(ids)


# -- durations between runs -------------------------------------------------


def test_durations_round_trip_and_merge(tmp_path: os.PathLike[str]) -> None:
    state = str(tmp_path)
    assert durations.load(state, "unit") == {}
    written = durations.save(state, "unit", {"a": 2.0, "b": 4.0})
    assert written == {"a": 2.0, "b": 4.0}
    assert durations.load(state, "unit") == {"a": 2.0, "b": 4.0}
    # An exponential moving average with the previous value; others kept.
    durations.save(state, "unit", {"a": 4.0, "c": 1.0})
    assert durations.load(state, "unit") == {"a": 3.0, "b": 4.0, "c": 1.0}
    durations.save(state, "unit", {"a": 5.0}, weight=0.25)
    assert durations.load(state, "unit")["a"] == 3.5
    # Suites are kept apart.
    assert durations.load(state, "other") == {}


def test_merge_is_an_exponential_moving_average() -> None:
    assert durations.merge({"a": 10.0, "b": 1.0}, {"a": 20.0, "c": 3.0}) == {
        "a": 15.0,
        "b": 1.0,
        "c": 3.0,
    }
    assert durations.merge({"a": 10.0}, {"a": 20.0}, weight=0.1) == {"a": pytest.approx(11.0)}


def test_durations_file_place_and_modes(tmp_path: os.PathLike[str]) -> None:
    state = os.path.join(str(tmp_path), "state")
    durations.save(state, "unit.fast-1_x", {"a": 1.0})
    path = durations.durations_path(state, "unit.fast-1_x")
    assert path == os.path.join(state, "suites", "unit.fast-1_x.durations.json")
    assert stat.S_IMODE(os.stat(os.path.join(state, "suites")).st_mode) == 0o700
    with open(path) as f:
        body = json.load(f)
    assert body == {"format": 1, "suite": "unit.fast-1_x", "durations": {"a": 1.0}}
    assert os.listdir(os.path.join(state, "suites")) == ["unit.fast-1_x.durations.json"]


def test_durations_write_is_atomic(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = str(tmp_path)
    durations.save(state, "unit", {"a": 2.0})
    path = durations.durations_path(state, "unit")
    with open(path, "rb") as f:
        before = f.read()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(durations.DurationsError, match="No space left") as info:
        durations.save(state, "unit", {"a": 100.0})
    assert path in str(info.value)
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(os.path.dirname(path)) == ["unit.durations.json"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", '"durations" object'),
        ('{"format": 1, "durations": []}', '"durations" object'),
        ('{"format": 99, "durations": {}}', "unknown format 99"),
        ('{"format": 1, "durations": {"a": "slow"}}', "'slow' is not a number"),
        ('{"format": 1, "durations": {"a": -3}}', "-3 is not a finite duration"),
        ('{"format": 1, "durations": {"a": true}}', "True is not a number"),
        ('{"format": 1, "durations": {"a": NaN}}', "nan is not a finite duration"),
    ],
)
def test_a_corrupt_durations_file_is_named(
    tmp_path: os.PathLike[str], text: str, reason: str
) -> None:
    state = str(tmp_path)
    path = durations.durations_path(state, "unit")
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(text)
    with pytest.raises(durations.DurationsError) as info:
        durations.load(state, "unit")
    assert path in str(info.value)
    assert reason in str(info.value)
    assert "delete the file" in str(info.value)
    assert isinstance(info.value, TxvmbotError)
    # save does not overwrite what it cannot read.
    with pytest.raises(durations.DurationsError):
        durations.save(state, "unit", {"a": 1.0})
    with open(path) as f:
        assert f.read() == text


def test_bad_new_durations_are_refused(tmp_path: os.PathLike[str]) -> None:
    with pytest.raises(durations.DurationsError, match="'a': -1.0"):
        durations.save(str(tmp_path), "unit", {"a": -1.0})
    with pytest.raises(ConfigError, match="weight"):
        durations.save(str(tmp_path), "unit", {"a": 1.0}, weight=0.0)
    assert not os.path.exists(os.path.join(str(tmp_path), "suites", "unit.durations.json"))


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "...", "../x", "a/b", "/etc/passwd", "a\\b", "a\n", "x" * 101, "é", "a b"],
)
def test_bad_suite_names_are_refused(tmp_path: os.PathLike[str], name: str) -> None:
    state = str(tmp_path)
    with pytest.raises(ConfigError, match="suite name"):
        durations.load(state, name)
    with pytest.raises(ConfigError, match="suite name"):
        durations.save(state, name, {"a": 1.0})
    assert os.listdir(state) == []


def test_good_suite_names_are_kept() -> None:
    for name in ["unit", "a", "x" * 100, "Suite-2.fast_1", ".hidden", "a..b"]:
        assert durations.check_suite_name(name) == name


# -- spread figures and static partitions -----------------------------------


def test_summarize_figures() -> None:
    timelines = [
        Timeline(worker="a", start=0.0, end=10.0, busy=9.0),
        Timeline(worker="b", start=1.0, end=7.0, busy=6.0),
    ]
    spread = summarize(timelines, [3.0, 3.0, 4.0, 5.0])
    assert spread == Spread(
        workers=2,
        makespan=10.0,
        busy=(("a", 9.0), ("b", 6.0)),
        end_spread=3.0,
        end_spread_share=0.3,
        total_test_time=15.0,
        longest_test=5.0,
        lower_bound=7.5,
        ratio=10.0 / 7.5,
    )
    # One test longer than the per-worker share sets the bound.
    assert summarize(timelines, [9.0, 1.0]).lower_bound == 9.0
    # The time runners spend between tests is work the machines share; a
    # command's fixed cost every machine pays.
    costly = summarize(timelines, [3.0, 3.0, 4.0, 5.0], fixed_cost=0.5, between=1.0)
    assert (costly.lower_bound, costly.between) == (8.0 + 0.5, 1.0)
    with pytest.raises(ConfigError):
        summarize([], [1.0])


def test_partition_by_count_is_round_robin() -> None:
    assert partition_by_count(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert partition_by_count(["a"], 3) == [["a"], [], []]


def test_partition_by_timing_is_greedy_longest_first() -> None:
    recorded = {"a": 1.0, "b": 7.0, "c": 3.0, "d": 4.0, "e": 2.0}
    parts = partition_by_timing(["a", "b", "c", "d", "e", "new1", "new2", "new3"], recorded, 2)
    # b -> 0 (7); d -> 1 (4); c -> 1 (7); e -> 0 (9); a -> 1 (8); unknown round-robin.
    assert parts == [["b", "e", "new1", "new3"], ["d", "c", "a", "new2"]]
    timelines = static_timelines(parts, {**recorded, "new1": 1, "new2": 1, "new3": 1})
    assert [(t.worker, t.end) for t in timelines] == [("worker-0", 11.0), ("worker-1", 9.0)]
    with pytest.raises(ConfigError):
        partition_by_timing(["a"], {}, 0)
