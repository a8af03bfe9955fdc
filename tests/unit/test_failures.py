"""``txvmbot failures``: finished jobs grouped by their environment facts.

The pure grouping (fixed jobs, and hypothesis for the counts adding up), the
scheduler reading its store a page at a time, the AMP round trip over iosim
against the fake scheduler, and the command line against an in-process
server on a unix socket.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.support.fakes import FakeScheduler
from txvmbot import __version__
from txvmbot.cli import _Streams, build_parser, run
from txvmbot.cli.client import connection_for, execute
from txvmbot.daemon import codec
from txvmbot.daemon.api.client import DaemonClient, _ClientAMP
from txvmbot.daemon.api.protocol import (
    API_VERSION,
    BadRequest,
    EpochArgument,
    FactNamesArgument,
    IncompatibleVersion,
    fit_report,
)
from txvmbot.daemon.api.server import AMPServerFactory, DaemonAMP
from txvmbot.daemon.interfaces import IScheduler
from txvmbot.daemon.jobs import FINAL_STATES, Job
from txvmbot.daemon.scheduling.failures import (
    FACTS,
    MAX_EXAMPLES,
    PAGE,
    UNKNOWN,
    FailureTally,
    check_by,
    group_failures,
    parse_age,
    reason_of,
    report_from_dict,
    report_to_dict,
)
from txvmbot.daemon.scheduling.scheduler import Scheduler
from txvmbot.daemon.stores.sqlite.store import SQLiteJobStore
from txvmbot.errors import ConfigError
from txvmbot.journal import MemoryJournal
from txvmbot.model import CheckResult, Facts, StepResult
from txvmbot.testing import FakeWorkerPool, RecordingCleaner, make_job_spec

reactor: Any = _reactor

T0 = 1_700_000_000.0
DAY = 86400.0
OLD_KERNEL = "Linux 3.8.0-8 #1 SMP Tue Mar 5 2013 x86_64"
NEW_KERNEL = "Linux 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 x86_64"
GUEST = "Linux vm-1 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 x86_64 GNU/Linux"


def cloud_facts(kernel: str = NEW_KERNEL, image: str = "ami-1") -> Facts:
    return Facts(
        endpoint="http://127.0.0.1:1/",
        region="r",
        api_version="2016-11-15",
        image_id=image,
        image_name="debian-12",
        guest_uname=GUEST,
        guest_os="debian 12",
        host_kernel=kernel,
    )


def local_facts(qemu: str = "8.2.1", accel: str = "tcg", kernel: str = NEW_KERNEL) -> Facts:
    return Facts(
        endpoint="local:local",
        image_id="/var/lib/txvmbot/images/debian",
        image_name="6.1.0-18-amd64",
        host_kernel=kernel,
        extra=(
            ("guest_kernel_version", "6.1.0-17-amd64"),
            ("image_digest", "sha256:ab12"),
            ("qemu_accel", accel),
            ("qemu_version", qemu),
        ),
    )


def job(
    n: int,
    state: str,
    facts: Facts | None = None,
    *,
    finished: float | None = T0,
    backend: str = "prod",
    reason: str = "",
    error: str = "",
) -> Job:
    """Job ``job-N``; submitted N seconds after the epoch of the test, so
    newest first is highest N first."""
    result = None
    if facts is not None:
        result = CheckResult(
            check_id=f"job-{n}-0",
            passed=state == "passed",
            steps=(StepResult("keypair", 1.0, 0.5, "passed"),),
            facts=facts,
            error=error,
        )
    final = state in FINAL_STATES
    return Job(
        id=f"job-{n}",
        spec=make_job_spec(backend),
        state=state,  # type: ignore[arg-type]
        submitted=T0 - DAY * 30 + n,
        started=None,
        finished=finished if final else None,
        reason=reason,
        result=result,
    )


def newest_first(jobs: list[Job]) -> list[Job]:
    return sorted(jobs, key=lambda j: j.submitted, reverse=True)


# Seeds 000 and 003: every failure on host kernel 3.8.0-8.
SEED = newest_first(
    [
        job(1, "failed", cloud_facts(OLD_KERNEL), reason="step 'ssh' failed: no route"),
        job(2, "failed", cloud_facts(OLD_KERNEL), reason="step 'ssh' failed: reset"),
        job(3, "error", cloud_facts(OLD_KERNEL), reason="worker running job job-3 died: SIGSEGV"),
        job(4, "passed", cloud_facts(OLD_KERNEL)),
        job(5, "passed", cloud_facts(NEW_KERNEL)),
        job(6, "passed", cloud_facts(NEW_KERNEL)),
        job(7, "passed", local_facts()),
        job(8, "cancelled", cloud_facts(OLD_KERNEL), reason="cancelled by request"),
        # Not counted: before since, or not finished.
        job(9, "failed", cloud_facts(NEW_KERNEL), finished=T0 - 8 * DAY),
        job(10, "running", None),
        job(11, "queued", None),
    ]
)


class GroupTests(SynchronousTestCase):
    def test_the_host_kernel_all_failures_share(self) -> None:
        r = group_failures(SEED, ["host_kernel"], since=T0 - 7 * DAY)
        self.assertEqual(r.by, ("host_kernel",))
        self.assertEqual([g.key for g in r.groups], [("3.8.0-8",), ("6.1.0-18-amd64",)])
        old, new = r.groups
        self.assertEqual((old.failed, old.passed, old.total), (3, 1, 4))
        self.assertEqual(old.pass_rate, 0.25)
        self.assertEqual((new.failed, new.passed, new.total, new.pass_rate), (0, 3, 3, 1.0))
        # Newest failure first, with its reason.
        self.assertEqual(
            [(e.job_id, e.reason) for e in old.examples],
            [
                ("job-3", "worker running job job-3 died: SIGSEGV"),
                ("job-2", "step 'ssh' failed: reset"),
                ("job-1", "step 'ssh' failed: no route"),
            ],
        )
        # The cancelled job is in no group; the old and unfinished are skipped.
        self.assertEqual((r.cancelled, r.scanned, r.total, r.failed), (1, 11, 7, 3))
        self.assertTrue(r.complete)

    def test_since_is_inclusive(self) -> None:
        r = group_failures(SEED, ["backend"], since=T0)
        self.assertEqual(r.total, 7)
        r = group_failures(SEED, ["backend"], since=T0 + 0.001)
        self.assertEqual((r.groups, r.cancelled), ((), 0))

    def test_local_facts_and_unknown(self) -> None:
        r = group_failures(SEED, ["qemu", "accel"], since=T0 - 7 * DAY)
        self.assertEqual(
            [(g.key, g.failed, g.total) for g in r.groups],
            [((UNKNOWN, UNKNOWN), 3, 6), (("8.2.1", "tcg"), 0, 1)],
        )

    def test_every_fact_is_read(self) -> None:
        cloud, local = job(1, "failed", cloud_facts()), job(2, "passed", local_facts())
        bare = job(3, "error", None, backend="b2", reason="worker died")
        expected = {
            "host_kernel": ("6.1.0-18-amd64", "6.1.0-18-amd64", UNKNOWN),
            "qemu": (UNKNOWN, "8.2.1", UNKNOWN),
            "accel": (UNKNOWN, "tcg", UNKNOWN),
            "image": ("ami-1", "/var/lib/txvmbot/images/debian", UNKNOWN),
            "endpoint": ("http://127.0.0.1:1/", "local:local", UNKNOWN),
            "api_version": ("2016-11-15", UNKNOWN, UNKNOWN),
            # A local VM's guest kernel comes from its image without uname.
            "guest_kernel": ("6.1.0-18-amd64", "6.1.0-17-amd64", UNKNOWN),
            "guest_os": ("debian 12", UNKNOWN, UNKNOWN),
            "image_digest": (UNKNOWN, "sha256:ab12", UNKNOWN),
            "backend": ("prod", "prod", "b2"),
        }
        self.assertEqual(set(expected), set(FACTS))
        for name, values in expected.items():
            for j, value in zip((cloud, local, bare), values, strict=True):
                (g,) = group_failures([j], [name], since=0).groups
                self.assertEqual(g.key, (value,), name)

    def test_by_guest_os(self) -> None:
        """The failures all on one distribution's guests (issue 17)."""
        ubuntu = attrs.evolve(cloud_facts(), guest_os="ubuntu 24.04")
        jobs = newest_first(
            [
                job(1, "failed", ubuntu, reason="step 'commands' failed"),
                job(2, "failed", ubuntu, reason="step 'commands' failed"),
                job(3, "passed", ubuntu),
                job(4, "passed", cloud_facts()),
                job(5, "passed", cloud_facts()),
                job(6, "passed", local_facts()),
            ]
        )
        r = group_failures(jobs, check_by(["guest_os", "backend"]), since=0)
        self.assertEqual(
            [(g.key, g.failed, g.passed) for g in r.groups],
            [
                (("ubuntu 24.04", "prod"), 2, 1),
                (("debian 12", "prod"), 0, 2),
                ((UNKNOWN, "prod"), 0, 1),
            ],
        )

    def test_image_name_when_no_id(self) -> None:
        j = job(1, "failed", attrs.evolve(cloud_facts(), image_id=""))
        self.assertEqual(group_failures([j], ["image"], 0).groups[0].key, ("debian-12",))

    def test_bare_release_and_long_values(self) -> None:
        j = job(1, "failed", cloud_facts(kernel="3.8.0-8"))
        self.assertEqual(group_failures([j], ["host_kernel"], 0).groups[0].key, ("3.8.0-8",))
        j = job(2, "failed", cloud_facts(image="ami-" + "x" * 500))
        (value,) = group_failures([j], ["image"], 0).groups[0].key
        self.assertEqual(len(value), 200)

    def test_examples_are_capped(self) -> None:
        jobs = newest_first([job(n, "failed", cloud_facts()) for n in range(12)])
        (g,) = group_failures(jobs, ["host_kernel"], 0).groups
        self.assertEqual(g.failed, 12)
        self.assertEqual(
            [e.job_id for e in g.examples], ["job-11", "job-10", "job-9", "job-8", "job-7"]
        )
        self.assertEqual(len(g.examples), MAX_EXAMPLES)

    def test_most_failures_first(self) -> None:
        jobs = [
            job(1, "failed", cloud_facts(image="a")),
            job(2, "failed", cloud_facts(image="b")),
            job(3, "failed", cloud_facts(image="b")),
            job(4, "passed", cloud_facts(image="c")),
            job(5, "passed", cloud_facts(image="c")),
            job(6, "passed", cloud_facts(image="d")),
        ]
        r = group_failures(jobs, ["image"], 0)
        self.assertEqual([g.key[0] for g in r.groups], ["b", "a", "c", "d"])

    def test_reasons(self) -> None:
        self.assertEqual(reason_of(job(1, "failed", cloud_facts(), error="boom\n  x")), "boom x")
        steps = (StepResult("wait-running", 1.0, 3.0, "timeout", "last seen: pending"),)
        j = job(2, "failed", cloud_facts())
        assert j.result is not None
        j = attrs.evolve(j, result=attrs.evolve(j.result, steps=steps))
        self.assertEqual(reason_of(j), "wait-running timeout: last seen: pending")
        self.assertEqual(reason_of(job(3, "error", None)), "error")
        self.assertEqual(len(reason_of(job(4, "failed", None, reason="x" * 1000))), 200)

    def test_unknown_facts_are_refused(self) -> None:
        e = self.assertRaises(ConfigError, group_failures, SEED, ["host_kernel", "kernel"], 0)
        self.assertEqual(e.where, "by")
        self.assertIn("unknown fact 'kernel'", str(e))
        for name in FACTS:
            self.assertIn(name, str(e))
        e = self.assertRaises(ConfigError, check_by, [], "--by")
        self.assertIn("--by: name at least one fact", str(e))
        e = self.assertRaises(ConfigError, check_by, ["qemu", "qemu"])
        self.assertIn("'qemu' is named twice", str(e))

    def test_ages(self) -> None:
        self.assertEqual(parse_age("30m"), 1800.0)
        self.assertEqual(parse_age("12h"), 43200.0)
        self.assertEqual(parse_age("7d"), 7 * DAY)
        self.assertEqual(parse_age("3600"), 3600.0)
        self.assertEqual(parse_age("1.5h"), 5400.0)
        for bad in ("", "7 days", "-1d", "0", "1w", "d", "100000d"):
            e = self.assertRaises(ConfigError, parse_age, bad)
            self.assertEqual(e.where, "--since", bad)

    def test_json_round_trip(self) -> None:
        r = group_failures(SEED, ["host_kernel", "backend"], since=T0 - 7 * DAY)
        doc = report_to_dict(r)
        self.assertEqual(doc["groups"][0]["facts"], {"host_kernel": "3.8.0-8", "backend": "prod"})
        self.assertEqual(doc["groups"][0]["pass_rate"], 0.25)
        self.assertEqual(report_from_dict(json.loads(codec.dumps(doc))), r)
        for broken in ({}, dict(doc, groups=[{"facts": {}}]), dict(doc, cancelled=-1)):
            self.assertRaises(ValueError, report_from_dict, broken)


_STATES = st.sampled_from(["passed", "failed", "error", "cancelled", "queued", "running"])


@st.composite
def job_lists(draw: Any) -> list[Job]:
    specs = draw(
        st.lists(
            st.tuples(
                _STATES,
                st.floats(T0 - 10 * DAY, T0),
                st.sampled_from([OLD_KERNEL, NEW_KERNEL, None]),
                st.sampled_from(["8.2.1", "7.2.0"]),
                st.sampled_from(["a", "b"]),
            ),
            max_size=60,
        )
    )
    return newest_first(
        [
            job(
                n,
                state,
                None if kernel is None else local_facts(qemu, kernel=kernel),
                finished=finished,
                backend=backend,
            )
            for n, (state, finished, kernel, qemu, backend) in enumerate(specs)
        ]
    )


class CountTests(SynchronousTestCase):
    @given(
        job_lists(),
        st.lists(st.sampled_from(sorted(FACTS)), min_size=1, max_size=3, unique=True),
        st.floats(T0 - 10 * DAY, T0),
    )
    def test_counts_add_up(self, jobs: list[Job], by: list[str], since: float) -> None:
        r = group_failures(jobs, by, since)
        window = [j for j in jobs if j.state in FINAL_STATES and (j.finished or 0) >= since]
        counted = [j for j in window if j.state != "cancelled"]
        self.assertEqual(r.scanned, len(jobs))
        self.assertEqual(r.cancelled, len(window) - len(counted))
        self.assertEqual(r.total, len(counted))
        self.assertEqual(r.failed, sum(1 for j in counted if j.state in ("failed", "error")))
        self.assertEqual(len({g.key for g in r.groups}), len(r.groups))
        self.assertEqual(
            [g.failed for g in r.groups], sorted((g.failed for g in r.groups), reverse=True)
        )
        failed_ids = {j.id for j in counted if j.state != "passed"}
        for g in r.groups:
            self.assertEqual(g.total, g.passed + g.failed)
            self.assertGreater(g.total, 0)
            self.assertEqual(len(g.key), len(by))
            self.assertEqual(len(g.examples), min(g.failed, MAX_EXAMPLES))
            self.assertLessEqual({e.job_id for e in g.examples}, failed_ids)
            self.assertTrue(0.0 <= g.pass_rate <= 1.0)
        self.assertEqual(report_from_dict(report_to_dict(r)), r)

    @given(job_lists(), st.integers(1, 10))
    def test_a_tally_fed_in_pages_is_the_same(self, jobs: list[Job], page: int) -> None:
        tally = FailureTally(["backend", "qemu"], T0 - 5 * DAY)
        for i in range(0, len(jobs), page):
            for j in jobs[i : i + page]:
                tally.add(j)
        self.assertEqual(tally.report(), group_failures(jobs, ["backend", "qemu"], T0 - 5 * DAY))


# --- the scheduler: pages of its store ------------------------------------------------


class SchedulerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SQLiteJobStore.memory(clock=self.clock.seconds)
        self.s = Scheduler(
            self.clock,
            self.store,
            FakeWorkerPool(1),
            MemoryJournal(self.clock.seconds),
            cleaner=RecordingCleaner(),
            wall=self.clock.seconds,
        )

    def fill(self, n: int) -> None:
        """``n`` jobs, one finished each minute up to T0 (the newest last),
        every third failed on the old kernel; and a queued one."""
        for i in range(n):
            bad = i % 3 == 0
            facts = cloud_facts(OLD_KERNEL if bad else NEW_KERNEL)
            finished = T0 - (n - 1 - i) * 60.0
            j = attrs.evolve(
                job(i, "failed" if bad else "passed", facts, finished=finished),
                submitted=finished - 30,
            )
            self.store.sync.add(j)
        self.store.sync.add(job(n, "queued", None))

    def scan(self, *args: Any, **kw: Any) -> Any:
        d = self.s.failures(*args, **kw)
        for _ in range(1000):
            self.clock.advance(0)
        return self.successResultOf(d)

    def test_provides_the_interface(self) -> None:
        self.assertTrue(verifyObject(IScheduler, self.s))
        self.assertTrue(verifyObject(IScheduler, FakeScheduler()))

    def test_reads_pages_and_hands_the_reactor_back(self) -> None:
        self.fill(3 * PAGE)
        d = self.s.failures(["host_kernel"], since=0.0, limit=10_000)
        self.assertNoResult(d)  # one page read; the next after the reactor ran
        self.clock.advance(0)
        self.clock.advance(0)
        r = self.successResultOf(d)
        self.assertEqual(r.scanned, 3 * PAGE)
        self.assertEqual(r.total, 3 * PAGE)
        self.assertEqual([g.key for g in r.groups], [("3.8.0-8",), ("6.1.0-18-amd64",)])
        self.assertEqual(r.groups[0].failed, PAGE)
        self.assertTrue(r.complete)

    def test_stops_at_the_first_page_before_since(self) -> None:
        self.fill(4 * PAGE)
        # The newest PAGE + 10 jobs finished in the last PAGE + 10 minutes.
        r = self.scan(["backend"], since=T0 - (PAGE + 9) * 60.0)
        self.assertEqual(r.total, PAGE + 10)
        self.assertEqual(r.scanned, 3 * PAGE)  # the third page had none: stop
        self.assertTrue(r.complete)

    def test_a_cursor_pruned_mid_scan_makes_the_report_incomplete(self) -> None:
        self.fill(3 * PAGE)
        d = self.s.failures(["host_kernel"], since=0.0, limit=10_000)
        self.assertNoResult(d)  # the first page is read; the cursor is its last job
        # Retention prunes every finished job meanwhile (the cursor with them).
        self.store.sync.prune(T0 + 1, limit=10 * PAGE)
        for _ in range(10):
            self.clock.advance(0)
        r = self.successResultOf(d)
        self.assertEqual(r.scanned, PAGE)
        self.assertFalse(r.complete)

    def test_the_limit_bounds_the_reading(self) -> None:
        self.fill(PAGE + 50)
        r = self.scan(["backend"], since=0.0, limit=PAGE + 10)
        self.assertEqual((r.scanned, r.total, r.complete), (PAGE + 10, PAGE + 10, False))
        r = self.scan(["backend"], since=0.0, limit=PAGE + 50)
        self.assertEqual(r.scanned, PAGE + 50)

    def test_bad_arguments(self) -> None:
        e = self.failureResultOf(self.s.failures(["kernel"], 0.0), ConfigError).value
        self.assertIn("host_kernel", str(e))
        self.failureResultOf(self.s.failures(["backend"], 0.0, 0), ValueError)


# --- the AMP API -------------------------------------------------------------------


def connected(sched: Any, proto: type[DaemonAMP] = DaemonAMP) -> tuple[DaemonClient, Any]:
    client, server, pump = connectedServerAndClient(lambda: proto(sched), _ClientAMP)
    return DaemonClient(client, "iosim", API_VERSION, __version__), pump


class OldDaemon(DaemonAMP):
    """A daemon from before Failures."""

    def locateResponder(self, name: bytes) -> Any:
        return None if name == b"Failures" else super().locateResponder(name)


class APITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sched = FakeScheduler()
        self.sched.jobs = {j.id: j for j in SEED}
        self.client, self.pump = connected(self.sched)

    def result(self, d: Any) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def test_round_trip(self) -> None:
        since = T0 - 7 * DAY + 0.25
        r = self.result(self.client.failures(["host_kernel", "backend"], since, limit=500))
        self.assertEqual(self.sched.failure_calls, [(("host_kernel", "backend"), since, 500)])
        final = [j for j in SEED if j.final]
        expected = group_failures(final, ["host_kernel", "backend"], since)
        self.assertEqual(r, expected)
        self.assertEqual(r.groups[0].key, ("3.8.0-8", "prod"))

    def test_defaults(self) -> None:
        r = self.result(self.client.failures())
        self.assertEqual(self.sched.failure_calls, [(("host_kernel",), 0.0, 10_000)])
        self.assertEqual(r.by, ("host_kernel",))
        self.assertEqual(r.scanned, 9)  # the final jobs

    def test_bad_arguments_are_refused(self) -> None:
        proto = self.client._proto
        cases = [
            (
                {"by": amp.ListOf(amp.Unicode()).toString(["kernel"])},
                ["'by'", "unknown fact 'kernel'", "host_kernel, qemu"],
            ),
            ({"since": b"-5"}, ["'since'", "epoch seconds"]),
            ({"since": b"nan"}, ["'since'"]),
            ({"limit": b"100001"}, ["'limit'", "from 1 to 100000"]),
            ({"limit": b"0"}, ["'limit'"]),
        ]
        good = {
            "by": amp.ListOf(amp.Unicode()).toString(["backend"]),
            "since": b"0.0",
            "limit": b"10",
        }

        def raw(**kw: bytes) -> Any:
            # Caught before the pump: AMP ends the chain with an errback
            # that drops the connection once the answer is in.
            out: list[Any] = []
            proto.callRemoteString(b"Failures", **kw).addBoth(out.append)
            self.pump.flush()
            return out[0]

        for change, words in cases:
            answer = raw(**{**good, **change})
            self.assertIsInstance(answer, Failure)
            e = answer.value
            self.assertIsInstance(e, amp.RemoteAmpError)
            self.assertEqual(e.errorCode, b"BAD_REQUEST")
            for w in words:
                self.assertIn(w, str(e))
        # The connection stays up; the same request, well formed, works.
        self.assertIn(b"report", raw(**good))
        self.assertEqual(self.sched.failure_calls, [(("backend",), 0.0, 10)])

    def test_the_client_checks_too(self) -> None:
        self.assertRaises(BadRequest, self.client.failures, ["nope"], 0.0)
        self.assertRaises(BadRequest, self.client.failures, ["backend"], -1.0)

    def test_a_big_report_is_cut_to_fit(self) -> None:
        jobs = []
        for n in range(400):
            kernel = f"Linux {n:04d}-" + "k" * 190 + " #1 SMP x86_64"
            # Group n has (n % 7) + 1 failures.
            for k in range(n % 7 + 1):
                jobs.append(job(n * 10 + k, "failed", cloud_facts(kernel), reason="r" * 300))
        self.sched.jobs = {j.id: j for j in jobs}
        r = self.result(self.client.failures(["host_kernel"], 0.0))
        full = group_failures(newest_first(jobs), ["host_kernel"], 0.0)
        self.assertGreater(r.omitted, 0)
        self.assertEqual(len(r.groups) + r.omitted, 400)
        self.assertEqual(r.groups, full.groups[: len(r.groups)])
        self.assertEqual(r.groups[0].failed, 7)
        fitted = fit_report(full)
        self.assertLessEqual(len(fitted.data), amp.MAX_VALUE_LENGTH)

    def test_an_older_daemon(self) -> None:
        client, pump = connected(self.sched, OldDaemon)
        d = client.failures()
        pump.flush()
        e = self.failureResultOf(d, IncompatibleVersion).value
        self.assertIn("does not answer Failures", str(e))
        self.assertIn("upgrade the daemon", str(e))

    def test_scheduler_errors_are_typed(self) -> None:
        self.sched.boom = ConfigError("by", "no")
        d = self.client.failures()
        self.pump.flush()
        self.failureResultOf(d, BadRequest)


class ArgumentTests(SynchronousTestCase):
    def roundtrip(self, arg: amp.Argument, value: Any) -> Any:
        strings: dict[bytes, bytes] = {}
        arg.toBox(b"x", strings, {"x": value}, None)
        objects: dict[str, Any] = {}
        arg.fromBox(b"x", strings, objects, None)
        return objects["x"]

    @given(st.floats(0, 1e11))
    def test_epochs_round_trip(self, t: float) -> None:
        self.assertEqual(self.roundtrip(EpochArgument(), t), t)

    @given(st.lists(st.sampled_from(sorted(FACTS)), min_size=1, unique=True))
    def test_fact_names_round_trip(self, names: list[str]) -> None:
        self.assertEqual(self.roundtrip(FactNamesArgument(), names), names)

    @given(st.binary(max_size=200))
    def test_any_bytes_decode_or_bad_request(self, data: bytes) -> None:
        for arg in (EpochArgument(), FactNamesArgument()):
            try:
                arg.fromBox(b"x", {b"x": data}, {}, None)
            except BadRequest:
                pass


# --- the command line --------------------------------------------------------------


class CommandTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-failures-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        sock = os.path.join(self.dir, "txvmbot.sock")
        self.where = f"unix:path={sock}"
        now = reactor.seconds()
        self.sched = FakeScheduler(now=reactor.seconds)
        # The seed's jobs, as if they finished an hour ago; one 8 days ago.
        jobs = [
            attrs.evolve(j, finished=None if j.finished is None else j.finished - T0 + now - 3600)
            for j in SEED
        ]
        self.sched.jobs = {j.id: j for j in jobs}
        d = serverFromString(reactor, f"unix:{sock}:mode=600").listen(AMPServerFactory(self.sched))
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        args = build_parser().parse_args([*argv, "--connect", self.where])
        out, err = io.StringIO(), io.StringIO()
        streams = _Streams(out, err, args.json)
        environ = {"HOME": self.dir}
        endpoint, tls = connection_for(args, environ)
        prepared = args.action.prepare(args, environ)
        code = await execute(reactor, args, streams, endpoint, tls, prepared)
        return code, out.getvalue(), err.getvalue()

    async def test_table(self) -> None:
        code, out, err = await self.cli("failures", "--by", "host_kernel,qemu")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertIn("3 of 7 finished jobs failed since", lines[0])
        self.assertIn("by host_kernel, qemu; 1 cancelled, not counted", lines[0])
        self.assertEqual(
            lines[1].split(), ["HOST_KERNEL", "QEMU", "FAILED/TOTAL", "PASS", "RATE", "EXAMPLE"]
        )
        self.assertEqual(lines[2].split()[:5], ["3.8.0-8", "unknown", "3/4", "25.0%", "job-3:"])
        self.assertIn("job-3: worker running job job-3 died: SIGSEGV", lines[2])
        self.assertEqual(lines[3].split(), ["6.1.0-18-amd64", "unknown", "0/2", "100.0%"])
        self.assertEqual(lines[4].split(), ["6.1.0-18-amd64", "8.2.1", "0/1", "100.0%"])
        self.assertEqual(len(lines), 5)
        ((by, since, limit),) = self.sched.failure_calls
        self.assertEqual((by, limit), (("host_kernel", "qemu"), 10_000))
        self.assertLess(abs(since - (reactor.seconds() - 7 * DAY)), 60)

    async def test_json_and_since(self) -> None:
        code, out, err = await self.cli("failures", "--since", "30m", "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)  # stdout is the JSON alone
        self.assertEqual((doc["by"], doc["groups"]), (["host_kernel"], []))
        self.assertIn("no finished jobs since", err)
        code, out, err = await self.cli("failures", "--since", "9d", "--by", "backend", "--json")
        self.assertEqual(code, 0, err)
        (g,) = json.loads(out)["groups"]
        self.assertEqual((g["facts"], g["failed"], g["total"]), ({"backend": "prod"}, 4, 8))

    async def test_incomplete_is_said(self) -> None:
        code, out, err = await self.cli("failures", "--limit", "2")
        self.assertEqual(code, 0, err)
        self.assertIn("only the newest 2 finished jobs were read", out)


class RealSchedulerTests(TestCase):
    """The command against the real scheduler and store, on the reactor."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-failures-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        sock = os.path.join(self.dir, "txvmbot.sock")
        self.where = f"unix:path={sock}"
        self.store = SQLiteJobStore.memory()
        self.addCleanup(self.store.close)
        sched = Scheduler(
            reactor,
            self.store,
            FakeWorkerPool(1),
            MemoryJournal(),
            cleaner=RecordingCleaner(),
        )
        now = reactor.seconds()
        for i in range(PAGE * 2 + 7):
            kernel = OLD_KERNEL if i % 2 else NEW_KERNEL
            state = "failed" if i % 2 else "passed"
            j = job(i, state, cloud_facts(kernel), finished=now - 60, reason="boom")
            self.store.sync.add(attrs.evolve(j, submitted=now - 120 + i * 0.01))
        d = serverFromString(reactor, f"unix:{sock}:mode=600").listen(AMPServerFactory(sched))
        return d.addCallback(lambda port: self.addCleanup(port.stopListening))

    async def test_table(self) -> None:
        args = build_parser().parse_args(["failures", "--since", "1h", "--connect", self.where])
        out, err = io.StringIO(), io.StringIO()
        prepared = args.action.prepare(args, {})
        code = await execute(reactor, args, _Streams(out, err, None), self.where, None, prepared)
        self.assertEqual(code, 0, err.getvalue())
        lines = out.getvalue().splitlines()
        self.assertIn(f"{PAGE + 3} of {2 * PAGE + 7} finished jobs failed", lines[0])
        self.assertEqual(
            lines[2].split(),
            ["3.8.0-8", f"{PAGE + 3}/{PAGE + 3}", "0.0%", f"job-{2 * PAGE + 5}:", "boom"],
        )
        self.assertEqual(lines[3].split(), ["6.1.0-18-amd64", f"0/{PAGE + 4}", "100.0%"])


class UsageTests(SynchronousTestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = run(list(argv), stdout=out, stderr=err, environ={}, _reactor=MemoryReactorClock())
        return code, out.getvalue(), err.getvalue()

    def test_bad_flags_exit_2_naming_the_flag(self) -> None:
        code, _, err = self.run_cli("failures", "--by", "host_kernel,kernel")
        self.assertEqual(code, 2)
        self.assertIn("txvmbot failures: error: --by: unknown fact 'kernel'", err)
        self.assertIn("host_kernel, qemu, accel", err)
        code, _, err = self.run_cli("failures", "--since", "last week")
        self.assertEqual(code, 2)
        self.assertIn("--since: expected a span such as 30m, 12h, 7d", err)
        code, _, err = self.run_cli("failures", "--limit", "0")
        self.assertEqual(code, 2)
        self.assertIn("--limit", err)

    def test_help_documents_the_facts(self) -> None:
        code, out, _ = self.run_cli("failures", "--help")
        self.assertEqual(code, 0)
        for name in FACTS:
            self.assertIn(f"  {name} ", out)
        self.assertIn("cancelled jobs are in no group", out)
        self.assertIn("3 the daemon cannot be reached", out)
