"""Tests for txvmbot.daemon.groupcommit: the group commit policy, on
Deferreds the tests fire by hand."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from txvmbot.daemon.groupcommit import GroupCommit


class Writes:
    """A write function whose writes the test answers."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.pending: list[Deferred[Sequence[str]]] = []

    def __call__(self, group: list[str]) -> Deferred[Sequence[str]]:
        self.groups.append(group)
        d: Deferred[Sequence[str]] = Deferred()
        self.pending.append(d)
        return d



class GroupCommitTests(SynchronousTestCase):
    def test_one_write_at_a_time_and_the_next_takes_all_that_waited(self) -> None:
        w = Writes()
        g: GroupCommit[str, str] = GroupCommit(w, in_flight=1)
        a = g.add("a")
        self.assertEqual(w.groups, [["a"]])
        b, c = g.add("b"), g.add("c")
        self.assertEqual((w.groups, g.waiting, g.writing), ([["a"]], 2, 1))
        self.assertNoResult(a)
        w.pending[0].callback(["a!"])
        self.assertEqual(self.successResultOf(a), "a!")
        self.assertEqual(w.groups, [["a"], ["b", "c"]])
        self.assertNoResult(b)
        w.pending[1].callback(["b!", "c!"])
        self.assertEqual((self.successResultOf(b), self.successResultOf(c)), ("b!", "c!"))
        self.assertEqual((g.waiting, g.writing), (0, 0))

    def test_in_flight_bounds_the_writes_under_way(self) -> None:
        w = Writes()
        g: GroupCommit[str, str] = GroupCommit(w, in_flight=2)
        g.add("a")
        g.add("b")
        c, d = g.add("c"), g.add("d")
        self.assertEqual(w.groups, [["a"], ["b"]])
        w.pending[1].callback(["b!"])  # the second ends first: room for the next
        self.assertEqual(w.groups, [["a"], ["b"], ["c", "d"]])
        w.pending[2].callback(["c!", "d!"])
        self.assertEqual((self.successResultOf(c), self.successResultOf(d)), ("c!", "d!"))
        self.assertEqual(g.writing, 1)  # the first is still under way

    def test_a_failed_write_fails_its_group_only(self) -> None:
        w = Writes()
        g: GroupCommit[str, str] = GroupCommit(w, in_flight=1)
        a = g.add("a")
        b, c = g.add("b"), g.add("c")
        w.pending[0].errback(OSError("disk full"))
        self.failureResultOf(a, OSError)
        self.assertEqual(w.groups, [["a"], ["b", "c"]])
        w.pending[1].callback(["b!", "c!"])
        self.assertEqual(self.successResultOf(c), "c!")
        self.successResultOf(b)

    def test_a_write_that_raises_fails_its_group(self) -> None:
        def boom(group: list[str]) -> Deferred[Sequence[str]]:
            raise RuntimeError("bug")

        g: GroupCommit[str, str] = GroupCommit(boom)
        self.failureResultOf(g.add("a"), RuntimeError)
        self.assertEqual(g.writing, 0)

    def test_a_wrong_number_of_results_fails_the_group(self) -> None:
        g: GroupCommit[str, str] = GroupCommit(lambda group: succeed(["x"]), in_flight=None)
        g.hold()
        a, b = g.add("a"), g.add("b")
        g.release()
        self.failureResultOf(a, ValueError)
        self.failureResultOf(b, ValueError)

    def test_held_items_gather_until_release_or_flush(self) -> None:
        groups: list[list[str]] = []

        def write(group: list[str]) -> Deferred[Sequence[str]]:
            groups.append(group)
            return succeed([f"{item}!" for item in group])

        g: GroupCommit[str, str] = GroupCommit(write, in_flight=None)
        g.hold()
        a, b = g.add("a"), g.add("b")
        self.assertEqual(groups, [])
        self.assertNoResult(a)
        g.release()
        self.assertEqual(groups, [["a", "b"]])
        self.assertEqual((self.successResultOf(a), self.successResultOf(b)), ("a!", "b!"))
        g.hold()
        g.hold()  # holds nest
        g.add("c")
        g.flush()  # goes now, held or not
        d = g.add("d")
        g.release()
        self.assertEqual(groups, [["a", "b"], ["c"]])
        g.release()
        self.assertEqual(groups, [["a", "b"], ["c"], ["d"]])
        self.assertEqual(self.successResultOf(d), "d!")
        self.assertEqual(self.successResultOf(g.add("e")), "e!")  # not held: at once

    def test_without_a_bound_every_group_is_written_at_once(self) -> None:
        w = Writes()
        g: GroupCommit[str, str] = GroupCommit(w, in_flight=None)
        g.add("a")
        g.add("b")
        self.assertEqual((w.groups, g.writing), ([["a"], ["b"]], 2))

    def test_in_flight_must_be_positive(self) -> None:
        self.assertRaises(ValueError, GroupCommit, lambda group: succeed([]), in_flight=0)
