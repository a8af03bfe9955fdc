"""Unit tests for the fault schedule of tests/support/faultproxy.py: which
fault a request gets, and a bad spec, with no proxy running.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.faultproxy import choose, parse_faults

SPEC = "throttle:3,503:5,drop:7,lost:4"


class ScheduleTests(SynchronousTestCase):
    def test_precedence_first_in_spec_wins(self) -> None:
        faults = parse_faults(SPEC)
        actions = [choose(n, faults) for n in range(1, 21)]
        self.assertEqual(
            actions,
            [
                "forward",
                "forward",
                "throttle",
                "lost",
                "503",
                "throttle",
                "drop",
                "lost",
                "throttle",
                "503",
                "forward",
                "throttle",
                "forward",
                "drop",
                "throttle",
                "lost",
                "forward",
                "throttle",
                "forward",
                "503",
            ],
        )

    def test_bad_spec(self) -> None:
        for spec in ["bogus:3", "throttle", "throttle:0", "lost:x"]:
            with self.assertRaises(ValueError):
                parse_faults(spec)
        self.assertEqual(parse_faults(""), [])
