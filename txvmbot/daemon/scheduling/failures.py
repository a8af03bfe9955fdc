"""Finished jobs grouped by their environment facts: which host kernel, which
QEMU, which image the failures share (seeds 000 and 003: every failure was
on one host kernel, and nobody had looked).

Pure: jobs in, a frozen :class:`FailureReport` out. The daemon feeds it its
newest finished jobs a page at a time (:meth:`Scheduler.failures
<txvmbot.daemon.scheduling.scheduler.Scheduler.failures>`); ``txvmbot failures``
prints the report as a table.

What counts: jobs in a final state that finished at or after ``since``.
``passed`` jobs pass; ``failed`` and ``error`` jobs fail (an ``error`` job
ended in the infrastructure, which is exactly what a bad host kernel looks
like). ``cancelled`` jobs are left out of every group and every pass rate:
someone stopped them, so they say nothing about the environment; the
report only counts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from attrs import field, frozen

from txvmbot.errors import ConfigError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from txvmbot.daemon.jobs import Job

__all__ = [
    "DEFAULT_BY",
    "DEFAULT_LIMIT",
    "FACTS",
    "MAX_AGE",
    "MAX_CHARS",
    "MAX_EXAMPLES",
    "MAX_LIMIT",
    "PAGE",
    "UNKNOWN",
    "Fact",
    "FailureExample",
    "FailureGroup",
    "FailureReport",
    "FailureTally",
    "check_by",
    "group_failures",
    "group_to_dict",
    "parse_age",
    "reason_of",
    "report_from_dict",
    "report_to_dict",
]

#: What a group shows for a fact a job's result does not carry (no result:
#: a job that ended before its machine said anything; a cloud fact of a
#: local job, or the other way round).
UNKNOWN = "unknown"
#: The failed jobs each group names, newest first.
MAX_EXAMPLES = 5
#: Fact values and reasons are cut to this many characters, so that one
#: odd value cannot crowd the other groups out of the daemon's answer.
MAX_CHARS = 200

DEFAULT_BY: tuple[str, ...] = ("host_kernel",)
#: How many of the newest finished jobs one report reads by default, and at
#: most (reading 10,000 takes about a second of the daemon's time).
DEFAULT_LIMIT = 10_000
MAX_LIMIT = 100_000
#: How many jobs the daemon reads from its store at a time when it makes a
#: report, handing the reactor back between pages: reading and decoding a
#: stored job cost about 110 us (build machine, 2026), so a page blocks it
#: for about 30 ms and 10,000 jobs take about a second in all.
PAGE = 250


@frozen
class Fact:
    """A name to group by, what it means, and how it is read from a job:
    ``read`` returns ``""`` when the job does not carry it."""

    name: str
    help: str
    read: Callable[[Job], str] = field(eq=False, repr=False)


def _facts_dict(job: Job) -> dict[str, str]:
    return job.result.facts.as_dict() if job.result is not None else {}


def _field(uname: str, index: int) -> str:
    """Word ``index`` of a uname line, or the whole (stripped) line when it
    is shorter, as a bare release would be."""
    words = uname.split()
    return words[index] if len(words) > index else uname.strip()


def _guest_kernel(job: Job) -> str:
    facts = _facts_dict(job)
    # `uname -a`: "Linux HOSTNAME RELEASE VERSION ...": the release is the
    # third word. A local VM also records the kernel its image was built with.
    return _field(facts.get("guest_uname", ""), 2) or facts.get("guest_kernel_version", "")


def _from(key: str) -> Callable[[Job], str]:
    return lambda job: _facts_dict(job).get(key, "")


#: The fact names ``by`` may use, in the order ``--help`` lists them.
FACTS: Mapping[str, Fact] = {
    f.name: f
    for f in (
        Fact(
            "host_kernel",
            "the kernel release of the host that ran the job (its `uname -r`)",
            lambda job: _field(_facts_dict(job).get("host_kernel", ""), 1),
        ),
        Fact("qemu", "the QEMU version of a local VM", _from("qemu_version")),
        Fact("accel", "the QEMU accelerator of a local VM (kvm or tcg)", _from("qemu_accel")),
        Fact(
            "image",
            "the image id, else its name (a local pool: its image directory)",
            lambda job: (
                _facts_dict(job).get("image_id", "") or _facts_dict(job).get("image_name", "")
            ),
        ),
        Fact("endpoint", "the cloud's endpoint URL, or local:POOL", _from("endpoint")),
        Fact(
            "api_version", "the EC2 API version the cloud was spoken to with", _from("api_version")
        ),
        Fact("guest_kernel", "the guest's kernel release (from its `uname -a`)", _guest_kernel),
        Fact(
            "guest_os",
            "the guest's distribution and release (its os-release: ID VERSION_ID)",
            _from("guest_os"),
        ),
        Fact(
            "image_digest",
            "the sha256 of a local VM image's manifest.json",
            _from("image_digest"),
        ),
        Fact("backend", "the daemon backend the job ran on", lambda job: job.spec.backend),
    )
}


def check_by(by: Iterable[str], where: str = "by") -> tuple[str, ...]:
    """``by`` as a tuple, checked: at least one name, each a key of
    :data:`FACTS`, none twice. Raises ConfigError naming ``where``."""
    names = tuple(by)
    valid = ", ".join(FACTS)
    if not names:
        raise ConfigError(where, f"name at least one fact to group by ({valid})")
    for name in names:
        if name not in FACTS:
            shown = name if len(name) <= 40 else name[:37] + "..."
            raise ConfigError(where, f"unknown fact {shown!r}; the facts are {valid}")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(where, f"fact {twice!r} is named twice")
    return names


_AGE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([smhd]?)")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: The oldest ``--since`` accepted: about a hundred years.
MAX_AGE = 36500 * 86400.0


def parse_age(text: str, where: str = "--since") -> float:
    """A span of time such as ``30m``, ``12h``, ``7d`` or ``3600`` (seconds)
    in seconds. Raises ConfigError naming ``where``."""
    m = _AGE.fullmatch(text.strip().lower())
    if m is None:
        raise ConfigError(
            where, f"expected a span such as 30m, 12h, 7d or a number of seconds, got {text!r}"
        )
    seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not 0 < seconds <= MAX_AGE:
        raise ConfigError(where, f"must be more than 0 and at most 36500d, got {text!r}")
    return seconds


# --- the report ----------------------------------------------------------------


@frozen
class FailureExample:
    """A failed job of a group and why it failed."""

    job_id: str
    reason: str


@frozen
class FailureGroup:
    """The finished jobs that share ``key``: one value per fact grouped by,
    :data:`UNKNOWN` where a job did not carry the fact."""

    key: tuple[str, ...]
    passed: int
    failed: int
    examples: tuple[FailureExample, ...] = ()

    @property
    def total(self) -> int:
        """Jobs that passed or failed (cancelled ones are not counted)."""
        return self.passed + self.failed

    @property
    def pass_rate(self) -> float:
        """Passed jobs over :attr:`total`, from 0.0 to 1.0."""
        return self.passed / self.total if self.total else 0.0


@frozen
class FailureReport:
    """Finished jobs grouped by ``by``, most failures first.

    ``since``: epoch seconds; only jobs that finished at or after it count.
    ``cancelled``: jobs cancelled in that time, in no group. ``scanned``:
    jobs read to make the report. ``complete`` is false when the reading
    stopped at its limit before it reached ``since``: older jobs may be
    missing. ``omitted``: groups left out (the fewest failures) so that the
    report fits one answer of the daemon.
    """

    by: tuple[str, ...]
    since: float
    groups: tuple[FailureGroup, ...] = ()
    cancelled: int = 0
    scanned: int = 0
    complete: bool = True
    omitted: int = 0

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups)

    @property
    def failed(self) -> int:
        return sum(g.failed for g in self.groups)


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def reason_of(job: Job) -> str:
    """Why a failed job failed, in one line: its reason, else its result's
    error, else its first step that did not pass."""
    if job.reason:
        return _cut(job.reason)
    if job.result is not None:
        if job.result.error:
            return _cut(job.result.error)
        for step in job.result.steps:
            if step.outcome not in ("passed", "skipped"):
                return _cut(f"{step.name} {step.outcome}: {step.detail}")
    return job.state


@attrs.define
class _Counts:
    passed: int = 0
    failed: int = 0
    examples: list[FailureExample] = attrs.Factory(list)


class FailureTally:
    """A report built one job at a time, so that a caller reading pages of
    jobs keeps counts, never the jobs. Feed it newest first: the examples
    are the first failures it sees."""

    def __init__(self, by: Iterable[str], since: float) -> None:
        # Here, not at the top: the CLI's parser lists FACTS, and building it
        # must not import the daemon's job values.
        from txvmbot.daemon.jobs import FINAL_STATES

        self._final = FINAL_STATES
        self.by = check_by(by)
        self.since = float(since)
        self.scanned = 0
        self.cancelled = 0
        self._groups: dict[tuple[str, ...], _Counts] = {}
        self._readers = [FACTS[name].read for name in self.by]

    def counts(self, job: Job) -> bool:
        """Whether ``job`` is in the report's time: final, and finished at
        or after ``since``."""
        return job.state in self._final and job.finished is not None and job.finished >= self.since

    def add(self, job: Job) -> None:
        self.scanned += 1
        if not self.counts(job):
            return
        if job.state == "cancelled":
            self.cancelled += 1
            return
        key = tuple(_cut(read(job)) or UNKNOWN for read in self._readers)
        c = self._groups.get(key)
        if c is None:
            c = self._groups[key] = _Counts()
        if job.state == "passed":
            c.passed += 1
        else:
            c.failed += 1
            if len(c.examples) < MAX_EXAMPLES:
                c.examples.append(FailureExample(job.id, reason_of(job)))

    def report(self, complete: bool = True) -> FailureReport:
        groups = sorted(
            (
                FailureGroup(key, c.passed, c.failed, tuple(c.examples))
                for key, c in self._groups.items()
            ),
            key=lambda g: (-g.failed, -g.total, g.key),
        )
        return FailureReport(
            by=self.by,
            since=self.since,
            groups=tuple(groups),
            cancelled=self.cancelled,
            scanned=self.scanned,
            complete=complete,
        )


def group_failures(
    jobs: Iterable[Job], by: Sequence[str], since: float, complete: bool = True
) -> FailureReport:
    """Group the finished ``jobs`` (newest first) that finished at or after
    ``since`` by the facts named in ``by`` (keys of :data:`FACTS`).

    Each group counts its passed and its failed jobs (states ``failed`` and
    ``error``) and names up to :data:`MAX_EXAMPLES` failed ones with their
    reasons; groups come most failures first. Cancelled jobs are in no group
    and no pass rate (see the module docstring); unfinished jobs and those
    that finished before ``since`` are skipped. Raises ConfigError for an
    unknown name in ``by``, listing the valid ones.
    """
    tally = FailureTally(by, since)
    for job in jobs:
        tally.add(job)
    return tally.report(complete)


# --- JSON ------------------------------------------------------------------------


def report_to_dict(report: FailureReport) -> dict[str, Any]:
    """``report`` as a JSON-able dict; groups carry their ``total`` and
    ``pass_rate`` too, for readers of ``--json``."""
    return {
        "by": list(report.by),
        "since": report.since,
        "cancelled": report.cancelled,
        "scanned": report.scanned,
        "complete": report.complete,
        "omitted": report.omitted,
        "groups": [group_to_dict(report.by, g) for g in report.groups],
    }


def group_to_dict(by: Sequence[str], g: FailureGroup) -> dict[str, Any]:
    return {
        "facts": dict(zip(by, g.key, strict=True)),
        "passed": g.passed,
        "failed": g.failed,
        "total": g.total,
        "pass_rate": g.pass_rate,
        "examples": [{"job_id": e.job_id, "reason": e.reason} for e in g.examples],
    }


def report_from_dict(d: Mapping[str, Any]) -> FailureReport:
    """The inverse of :func:`report_to_dict`. Raises ValueError for a
    malformed document."""
    try:
        by = tuple(str(n) for n in d["by"])
        groups = tuple(
            FailureGroup(
                key=tuple(str(g["facts"][n]) for n in by),
                passed=_count(g["passed"]),
                failed=_count(g["failed"]),
                examples=tuple(
                    FailureExample(str(e["job_id"]), str(e["reason"])) for e in g["examples"]
                ),
            )
            for g in d["groups"]
        )
        return FailureReport(
            by=by,
            since=float(d["since"]),
            groups=groups,
            cancelled=_count(d["cancelled"]),
            scanned=_count(d["scanned"]),
            complete=bool(d["complete"]),
            omitted=_count(d["omitted"]),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed failure report: {e!r}") from None


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"malformed failure report: expected a count, got {value!r}")
    return value


def scan_failures(
    clock: Any,
    list_page: Callable[..., Deferred[Sequence[Job]]],
    get: Callable[[str], Deferred[Job | None]],
    by: Sequence[str],
    since: float,
    limit: int = 10_000,
) -> Deferred[FailureReport]:
    """A Deferred FailureReport of the newest ``limit`` finished jobs, read
    a page at a time through ``list_page(states=, limit=, before=)`` and
    ``get(job_id)`` (IJobStore's, each a Deferred; the reactor runs
    between pages), those that finished at or after ``since`` grouped by
    the facts named in ``by``. Fails with ConfigError for an unknown name
    in ``by``.

    Jobs are read newest submitted first, and reading stops at the first
    page in which no job finished at or after ``since``: a job that sat
    queued since before a whole page of older jobs finished (a backend
    drained for long) may be missed. The report is not ``complete`` when
    ``limit`` stopped the reading first.
    """
    from twisted.internet.defer import ensureDeferred, fail
    from twisted.internet.task import deferLater

    from txvmbot.daemon.jobs import FINAL_STATES

    try:
        if limit < 1:
            raise ValueError(f"failures limit must be at least 1, not {limit!r}")
        tally = FailureTally(by, since)
    except Exception:
        return fail()

    async def scan() -> FailureReport:
        before: str | None = None
        while tally.scanned < limit:
            want = min(PAGE, limit - tally.scanned)
            page = await list_page(states=FINAL_STATES, limit=want, before=before)
            for job in page:
                tally.add(job)
            if len(page) < want or not any(tally.counts(job) for job in page):
                # A short page after a cursor job that retention pruned
                # meanwhile says nothing of the older jobs.
                gone = before is not None and (await get(before)) is None
                return tally.report(complete=not gone)
            before = page[-1].id
            await deferLater(clock, 0, lambda: None)
        return tally.report(complete=False)

    return ensureDeferred(scan())
