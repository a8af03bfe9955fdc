"""What the CLI shows: JSON for machines, a live table or plain lines for people,
and the summary of repeated checks.

Everything here takes its output stream (and, for anything timed, its clock)
as a parameter; nothing here writes anywhere else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import IO, Any

from attrs import frozen

from txvmbot.model import CheckResult, ReapReport, StepEvent, StepResult

__all__ = [
    "LiveTable",
    "PlainLines",
    "RepeatSummary",
    "StepStats",
    "failing_step",
    "format_reap",
    "format_result",
    "format_summary",
    "nearest_rank",
    "reap_to_json",
    "renderer_for",
    "summarize",
    "summary_to_json",
    "to_json",
]

JSON_SCHEMA = "txvmbot.check/1"
_BAD = ("failed", "timeout", "cancelled")


def _text(data: bytes | str) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", errors="replace")
    return data


# --- JSON ------------------------------------------------------------------


def to_json(result: CheckResult) -> dict[str, Any]:
    """A JSON-ready dict of ``result``: times are numbers (epoch seconds and
    seconds), bytes are decoded as UTF-8 with replacement characters; facts
    (with their extras) are one object; console and host keys are arrays of
    ``[name, text]`` pairs."""
    failing = failing_step(result)
    started = min((s.started for s in result.steps), default=None)
    ended = max((s.started + s.duration for s in result.steps), default=None)
    return {
        "schema": JSON_SCHEMA,
        "check_id": result.check_id,
        "passed": result.passed,
        "error": result.error,
        "failed_step": failing.name if failing else None,
        "started": started,
        "duration": (ended - started) if started is not None and ended is not None else None,
        "evidence_dir": result.evidence_dir,
        "steps": [
            {
                "name": s.name,
                "started": s.started,
                "duration": s.duration,
                "outcome": s.outcome,
                "detail": s.detail,
            }
            for s in result.steps
        ],
        "commands": [
            {
                "command": c.command,
                "exit_status": c.exit_status,
                "signal": c.signal,
                "ok": c.ok,
                "stdout": _text(c.stdout),
                "stderr": _text(c.stderr),
            }
            for c in result.commands
        ],
        "facts": result.facts.as_dict(),
        # Pairs stay pairs (lossless, in order): [[instance, text], ...].
        "console": [[k, _text(v)] for k, v in result.console],
        "host_keys": [[k, _text(v)] for k, v in result.host_keys],
    }


def reap_to_json(report: ReapReport) -> dict[str, Any]:
    return {
        "schema": "txvmbot.reap/1",
        "dry_run": report.dry_run,
        "found": list(report.found),
        "removed": list(report.removed),
        "errors": list(report.errors),
    }


# --- summaries -------------------------------------------------------------


def failing_step(result: CheckResult) -> StepResult | None:
    """The first step that failed, timed out or was cancelled."""
    for s in result.steps:
        if s.outcome in _BAD:
            return s
    return None


def nearest_rank(values: Sequence[float], percent: float) -> float:
    """The nearest-rank percentile: the smallest value such that at least
    ``percent`` % of ``values`` are at or below it."""
    if not values:
        raise ValueError("no values")
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent}")
    ordered = sorted(values)
    rank = math.ceil(percent / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@frozen
class StepStats:
    """One step across repeated checks. ``p50``/``p95`` are over the
    durations of the runs where the step passed (a timed-out step would
    report its bound, not the cloud's speed); ``None`` if it never passed."""

    name: str
    passed: int
    failed: int
    skipped: int
    p50: float | None
    p95: float | None


@frozen
class RepeatSummary:
    total: int
    passed: int
    failed: int
    steps: tuple[StepStats, ...]

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


def summarize(results: Sequence[CheckResult]) -> RepeatSummary:
    """Pass rate and per-step duration percentiles, steps in the order they
    first appeared."""
    order: list[str] = []
    durations: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for r in results:
        for s in r.steps:
            if s.name not in counts:
                order.append(s.name)
                counts[s.name] = [0, 0, 0]
                durations[s.name] = []
            if s.outcome == "passed":
                counts[s.name][0] += 1
                durations[s.name].append(s.duration)
            elif s.outcome == "skipped":
                counts[s.name][2] += 1
            else:
                counts[s.name][1] += 1
    stats = tuple(
        StepStats(
            name=n,
            passed=counts[n][0],
            failed=counts[n][1],
            skipped=counts[n][2],
            p50=nearest_rank(durations[n], 50) if durations[n] else None,
            p95=nearest_rank(durations[n], 95) if durations[n] else None,
        )
        for n in order
    )
    passed = sum(1 for r in results if r.passed)
    return RepeatSummary(
        total=len(results), passed=passed, failed=len(results) - passed, steps=stats
    )


def summary_to_json(summary: RepeatSummary) -> dict[str, Any]:
    return {
        "total": summary.total,
        "passed": summary.passed,
        "failed": summary.failed,
        "pass_rate": summary.pass_rate,
        "steps": [
            {
                "name": s.name,
                "passed": s.passed,
                "failed": s.failed,
                "skipped": s.skipped,
                "p50": s.p50,
                "p95": s.p95,
            }
            for s in summary.steps
        ],
    }


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def format_summary(summary: RepeatSummary) -> str:
    """The pass rate and a table of per-step p50/p95 durations."""
    lines = [
        f"{summary.passed}/{summary.total} checks passed "
        f"({summary.pass_rate:.0%}), {summary.failed} failed"
    ]
    if summary.steps:
        width = max(len("step"), *(len(s.name) for s in summary.steps))
        lines.append(f"  {'step':<{width}}  {'p50':>8}  {'p95':>8}  passed  failed  skipped")
        for s in summary.steps:
            lines.append(
                f"  {s.name:<{width}}  {_secs(s.p50):>8}  {_secs(s.p95):>8}  "
                f"{s.passed:>6}  {s.failed:>6}  {s.skipped:>7}"
            )
    return "\n".join(lines) + "\n"


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 3] + "..."


_SHOWN_LINES = 3


def format_result(result: CheckResult) -> str:
    """The final word on one check: passed or failed, the failing step and
    its reason, the commands' exit statuses and where the evidence is."""
    total = sum(s.duration for s in result.steps)
    lines: list[str] = []
    if result.passed:
        lines.append(f"PASSED check {result.check_id} ({len(result.steps)} steps, {total:.1f}s)")
    else:
        lines.append(f"FAILED check {result.check_id}")
        bad = failing_step(result)
        if bad is not None:
            reason = bad.detail or bad.outcome
            lines.append(f"  failing step: {bad.name} ({bad.outcome} after {bad.duration:.1f}s)")
            lines.append(f"  reason: {reason}")
        said = (
            bad is not None
            and bad.detail
            and (bad.detail in result.error or result.error in bad.detail)
        )
        if result.error and not said:
            lines.append(f"  error: {result.error}")
    for c in result.commands:
        status = f"exit {c.exit_status}" if c.exit_status is not None else f"signal {c.signal}"
        lines.append(f"  $ {c.command}  [{status}]")
        if not c.ok:
            tail = _last_line(_text(c.stderr)) or _last_line(_text(c.stdout))
            if tail:
                lines.append(f"    {tail}")
        else:
            # What a smoke command said is the point of running it: its
            # first lines (the rest is in the JSON and the evidence).
            out = _text(c.stdout).splitlines()
            lines += [f"    {line[:200]}" for line in out[:_SHOWN_LINES]]
            if len(out) > _SHOWN_LINES:
                lines.append(f"    ... ({len(out) - _SHOWN_LINES} more lines)")
    if result.evidence_dir:
        lines.append(f"  evidence: {result.evidence_dir}")
    return "\n".join(lines) + "\n"


def format_reap(report: ReapReport) -> str:
    verb = "would remove" if report.dry_run else "found"
    lines = [f"{verb}: {len(report.found)} leaked resource(s)"]
    lines += [f"  {item}" for item in report.found]
    if not report.dry_run:
        lines.append(f"removed: {len(report.removed)}")
        lines += [f"  {item}" for item in report.removed]
    if report.errors:
        lines.append(f"errors: {len(report.errors)}")
        lines += [f"  {item}" for item in report.errors]
    return "\n".join(lines) + "\n"


# --- live rendering --------------------------------------------------------


class _Row:
    __slots__ = ("name", "state", "started", "at", "detail")

    def __init__(self, name: str, at: float) -> None:
        self.name = name
        self.state = "running"
        self.started = at
        self.at = at
        self.detail = ""


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis if cut."""
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


class LiveTable:
    """A table of steps redrawn in place on a terminal.

    Call it with each :class:`StepEvent` (it is an observer); between events
    a 1 s ``LoopingCall`` driven by ``clock`` redraws it so running steps'
    elapsed times move. ``start()`` before the first event, ``stop()`` after
    the last. ``clock`` is an ``IReactorTime`` (the reactor, or a ``Clock``
    in tests); ``clock.seconds()`` is compared with ``StepEvent.at``, so both
    must be epoch seconds.
    """

    def __init__(
        self, stream: IO[str], clock: Any, *, width: int = 100, interval: float = 1.0
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._width = width
        self._interval = interval
        self._rows: dict[str, _Row] = {}
        self._drawn = 0
        self._loop: Any = None

    def start(self) -> None:
        from twisted.internet.task import LoopingCall

        self._loop = LoopingCall(self.redraw)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.redraw()

    def __call__(self, event: StepEvent) -> None:
        row = self._rows.get(event.name)
        if row is None or (event.state == "running" and row.state != "running"):
            row = self._rows[event.name] = _Row(event.name, event.at)
        row.state = event.state
        row.at = event.at
        if event.detail:
            row.detail = event.detail
        self.redraw()

    def lines(self) -> list[str]:
        now = self._clock.seconds()
        name_w = max([len("step"), *(len(r.name) for r in self._rows.values())])
        head = f"{'step':<{name_w}}  {'state':<9}  {'elapsed':>8}  last seen"
        out = [_fit(head, self._width)]
        for r in self._rows.values():
            end = now if r.state == "running" else r.at
            elapsed = max(end - r.started, 0.0)
            fixed = f"{r.name:<{name_w}}  {r.state:<9}  {elapsed:>7.1f}s  "
            detail = _fit(" ".join(r.detail.split()), self._width - len(fixed))
            out.append(_fit(fixed + detail, self._width).rstrip())
        return out

    def redraw(self) -> None:
        lines = self.lines()
        parts = []
        if self._drawn:
            # Move to the start of the table drawn last time.
            parts.append(f"\x1b[{self._drawn}F")
        for line in lines:
            parts.append(f"\x1b[2K{line}\n")
        self._stream.write("".join(parts))
        self._stream.flush()
        self._drawn = len(lines)


class _Plain:
    """What :class:`PlainLines` knows of one step: when its run began, the
    start event it held back, and the state and detail it last printed."""

    __slots__ = ("started", "held", "state", "detail")

    def __init__(self, held: StepEvent) -> None:
        self.started = held.at
        self.held: StepEvent | None = held
        self.state = ""
        self.detail = ""


class PlainLines:
    """One line per change of a step's state or detail, with a UTC timestamp:
    for logs and pipes.

    A step's bare start (``running`` with no detail) is held back: the
    step's first line comes with its first detail, or is its end line if it
    ends without one. A ``running`` update whose detail is unchanged prints
    nothing; the end line has the duration, and the detail only if it is
    not the one printed last for the step. ``stop()`` prints the held
    starts of steps that never said more, so no step goes unmentioned.
    """

    def __init__(self, stream: IO[str], clock: Any = None) -> None:
        self._stream = stream
        self._steps: dict[str, _Plain] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for step in self._steps.values():
            if step.held is not None:
                self._write(step.held, "")
                step.held = None

    def __call__(self, event: StepEvent) -> None:
        detail = " ".join(event.detail.split())
        step = self._steps.get(event.name)
        if event.state == "running":
            if step is None or step.state not in ("", "running"):
                # A new run of the step (the first, or a retry after it ended).
                step = self._steps[event.name] = _Plain(event)
            if not detail or (step.state == "running" and detail == step.detail):
                return
            step.held = None
            step.state, step.detail = "running", detail
            self._write(event, detail)
            return
        took = f" ({event.at - step.started:.1f}s)" if step is not None else ""
        shown = detail if step is None or detail != step.detail else ""
        if step is not None:
            step.held = None
            step.state = event.state
        self._write(event, shown, took)

    def _write(self, event: StepEvent, detail: str, took: str = "") -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.at))
        stamp += f".{int((event.at % 1) * 1000):03d}Z"
        tail = f"  {detail}" if detail else ""
        self._stream.write(f"{stamp}  {event.name}  {event.state}{took}{tail}\n")
        self._stream.flush()


def renderer_for(stream: IO[str], clock: Any) -> LiveTable | PlainLines:
    """A live table on a terminal, plain lines anywhere else."""
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        import shutil

        return LiveTable(stream, clock, width=shutil.get_terminal_size().columns - 1)
    return PlainLines(stream, clock)
