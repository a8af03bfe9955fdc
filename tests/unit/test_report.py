"""JSON, the renderers and the repeat summary, against StringIO and a Clock."""

from __future__ import annotations

import io
import json
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txvmbot.model import CheckResult, CommandResult, Facts, ReapReport, StepEvent, StepResult
from txvmbot.report import (
    LiveTable,
    PlainLines,
    failing_step,
    format_reap,
    format_result,
    format_summary,
    nearest_rank,
    reap_to_json,
    renderer_for,
    summarize,
    to_json,
)

T0 = 1_700_000_000.0


def result(
    passed: bool = True, durations: dict[str, float] | None = None, **kw: object
) -> CheckResult:
    durations = durations or {"keypair": 1.0, "run-instances": 2.0}
    steps = []
    t = T0
    for name, d in durations.items():
        steps.append(StepResult(name=name, started=t, duration=d, outcome="passed"))
        t += d
    return CheckResult(
        check_id="c1",
        passed=passed,
        steps=tuple(steps),
        facts=Facts(region="r"),
        **kw,  # type: ignore[arg-type]
    )


def failed_result() -> CheckResult:
    return CheckResult(
        check_id="c2",
        passed=False,
        steps=(
            StepResult("keypair", T0, 0.5, "passed"),
            StepResult(
                "wait-running", T0 + 0.5, 300.0, "timeout", "did not finish; last seen: pending"
            ),
            StepResult("cleanup", T0 + 300.5, 2.0, "passed"),
        ),
        facts=Facts(endpoint="http://e/", extra=(("kvm", "no"),)),
        commands=(CommandResult("false", 1, b"out\xff", b"bad thing\n"),),
        console=(("i-1", "boot \x00log"),),
        host_keys=(("i-1", "ssh-ed25519 AAAA"),),
        error="step 'wait-running' failed: did not finish; last seen: pending",
        evidence_dir="/state/evidence/c2",
    )


def test_to_json_shape() -> None:
    doc = to_json(failed_result())
    # It is JSON: a round trip through the encoder changes nothing.
    assert json.loads(json.dumps(doc)) == doc
    assert doc["check_id"] == "c2" and doc["passed"] is False
    assert doc["failed_step"] == "wait-running"
    assert doc["started"] == T0 and doc["duration"] == pytest.approx(302.5)
    assert doc["steps"][1] == {
        "name": "wait-running",
        "started": T0 + 0.5,
        "duration": 300.0,
        "outcome": "timeout",
        "detail": "did not finish; last seen: pending",
    }
    assert doc["commands"] == [
        {
            "command": "false",
            "exit_status": 1,
            "signal": None,
            "ok": False,
            "stdout": "out\ufffd",
            "stderr": "bad thing\n",
        }
    ]
    assert doc["facts"]["endpoint"] == "http://e/" and doc["facts"]["kvm"] == "no"
    assert doc["console"] == [["i-1", "boot \x00log"]]
    assert doc["host_keys"] == [["i-1", "ssh-ed25519 AAAA"]]
    assert doc["evidence_dir"] == "/state/evidence/c2"
    assert doc["error"].startswith("step 'wait-running'")


def test_to_json_without_steps() -> None:
    doc = to_json(CheckResult("c", False, (), Facts(), error="boom"))
    assert doc["started"] is None and doc["duration"] is None and doc["failed_step"] is None


def test_reap_json() -> None:
    r = ReapReport(found=("instance i-1",), removed=("instance i-1",), errors=(), dry_run=False)
    assert reap_to_json(r)["removed"] == ["instance i-1"]
    assert "instance i-1" in format_reap(r)
    assert "would remove" in format_reap(ReapReport(found=("keypair k",), dry_run=True))


@pytest.mark.parametrize(
    "values, percent, expected",
    [
        ([15, 20, 35, 40, 50], 5, 15),
        ([15, 20, 35, 40, 50], 30, 20),
        ([15, 20, 35, 40, 50], 40, 20),
        ([15, 20, 35, 40, 50], 50, 35),
        ([15, 20, 35, 40, 50], 100, 50),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 25, 7),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 50, 8),
        ([3, 6, 7, 8, 8, 10, 13, 15, 16, 20], 75, 15),
        ([20, 3, 16, 6, 8, 15, 7, 13, 8, 10], 95, 20),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 50, 50),
        ([4.0], 95, 4.0),
    ],
)
def test_nearest_rank(values: list[float], percent: float, expected: float) -> None:
    assert nearest_rank(values, percent) == expected


def test_nearest_rank_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        nearest_rank([], 50)
    with pytest.raises(ValueError):
        nearest_rank([1], 0)


def test_summarize() -> None:
    results = [result(durations={"keypair": float(i), "run": 10.0 * i}) for i in range(1, 21)] + [
        failed_result()
    ]
    s = summarize(results)
    assert (s.total, s.passed, s.failed) == (21, 20, 1)
    assert s.pass_rate == pytest.approx(20 / 21)
    assert [x.name for x in s.steps] == ["keypair", "run", "wait-running", "cleanup"]
    keypair = s.steps[0]
    # keypair passed 21 times: 1..20 and 0.5
    assert (keypair.passed, keypair.failed) == (21, 0)
    assert keypair.p50 == 10.0 and keypair.p95 == 19.0
    run = s.steps[1]
    assert run.p50 == 100.0 and run.p95 == 190.0
    waiting = s.steps[2]
    assert (waiting.passed, waiting.failed, waiting.p50, waiting.p95) == (0, 1, None, None)
    text = format_summary(s)
    assert "20/21 checks passed (95%), 1 failed" in text
    assert "wait-running" in text and "190.0s" in text


def test_summarize_nothing() -> None:
    s = summarize([])
    assert (s.total, s.pass_rate, s.steps) == (0, 0.0, ())


def test_format_result() -> None:
    text = format_result(failed_result())
    assert text.startswith("FAILED check c2")
    assert "failing step: wait-running (timeout after 300.0s)" in text
    assert "last seen: pending" in text
    assert "$ false  [exit 1]" in text and "bad thing" in text
    assert "evidence: /state/evidence/c2" in text
    assert "error:" not in text  # the error only repeats the failing step's reason
    other = attrs.evolve(failed_result(), error="cleanup failed: group sg-1 in use")
    assert "error: cleanup failed: group sg-1 in use" in format_result(other)
    ok = format_result(result(commands=(CommandResult("uname -a", 0, b"Linux"),)))
    assert ok.startswith("PASSED check c1 (2 steps, 3.0s)")
    assert "$ uname -a  [exit 0]" in ok
    assert failing_step(result()) is None


def plain(events: list[StepEvent], stop: bool = True) -> list[str]:
    out = io.StringIO()
    r = PlainLines(out)
    r.start()
    for e in events:
        r(e)
    if stop:
        r.stop()
    return out.getvalue().splitlines()


def test_plain_lines() -> None:
    lines = plain(
        [
            StepEvent("keypair", "running", T0),
            StepEvent("keypair", "passed", T0 + 1.25, "key txvmbot-1"),
            StepEvent("wait-running", "failed", T0 + 2, "multi\nline"),
        ]
    )
    assert lines == [
        "2023-11-14T22:13:21.250Z  keypair  passed (1.2s)  key txvmbot-1",
        "2023-11-14T22:13:22.000Z  wait-running  failed  multi line",
    ]


def test_plain_lines_one_line_per_change() -> None:
    # What the engine sends for a step that polls: a bare start, the same
    # detail again and again, a new one, and the end with the last detail.
    lines = plain(
        [
            StepEvent("wait-running", "running", T0),
            StepEvent("wait-running", "running", T0 + 1, "pending"),
            StepEvent("wait-running", "running", T0 + 2, "pending"),
            StepEvent("wait-running", "running", T0 + 3, " pending\n"),
            StepEvent("wait-running", "running", T0 + 4, "running"),
            StepEvent("wait-running", "passed", T0 + 4.5, "running"),
            StepEvent("ssh", "running", T0 + 5),
            StepEvent("ssh", "passed", T0 + 6),
        ]
    )
    assert lines == [
        "2023-11-14T22:13:21.000Z  wait-running  running  pending",
        "2023-11-14T22:13:24.000Z  wait-running  running  running",
        "2023-11-14T22:13:24.500Z  wait-running  passed (4.5s)",
        "2023-11-14T22:13:26.000Z  ssh  passed (1.0s)",
    ]


def test_plain_lines_end_shows_a_new_detail() -> None:
    lines = plain(
        [
            StepEvent("wait-running", "running", T0),
            StepEvent("wait-running", "running", T0 + 1, "pending"),
            StepEvent("wait-running", "timeout", T0 + 3, "no answer in 3s; last seen: pending"),
            StepEvent("skipped-one", "skipped", T0 + 3, "not asked for"),
        ]
    )
    assert lines == [
        "2023-11-14T22:13:21.000Z  wait-running  running  pending",
        "2023-11-14T22:13:23.000Z  wait-running  timeout (3.0s)  no answer in 3s; last seen: pending",
        "2023-11-14T22:13:23.000Z  skipped-one  skipped  not asked for",
    ]


def test_plain_lines_a_rerun_starts_afresh() -> None:
    # A retried job runs its steps again: the second run is timed from its
    # own start and repeats a detail the first run printed.
    lines = plain(
        [
            StepEvent("boot", "running", T0, "qemu 1"),
            StepEvent("boot", "failed", T0 + 1, "qemu 1"),
            StepEvent("boot", "running", T0 + 10),
            StepEvent("boot", "running", T0 + 11, "qemu 1"),
            StepEvent("boot", "passed", T0 + 12, "qemu 1"),
        ]
    )
    assert lines == [
        "2023-11-14T22:13:20.000Z  boot  running  qemu 1",
        "2023-11-14T22:13:21.000Z  boot  failed (1.0s)",
        "2023-11-14T22:13:31.000Z  boot  running  qemu 1",
        "2023-11-14T22:13:32.000Z  boot  passed (2.0s)",
    ]


def test_plain_lines_stop_names_steps_that_never_said_more() -> None:
    events = [
        StepEvent("keypair", "running", T0),
        StepEvent("keypair", "passed", T0 + 1),
        StepEvent("wait-running", "running", T0 + 2),
    ]
    assert plain(events, stop=False) == ["2023-11-14T22:13:21.000Z  keypair  passed (1.0s)"]
    assert plain(events) == [
        "2023-11-14T22:13:21.000Z  keypair  passed (1.0s)",
        "2023-11-14T22:13:22.000Z  wait-running  running",
    ]


def test_plain_lines_from_the_engine() -> None:
    from txvmbot.engine import StepRunner

    clock = Clock()
    clock.advance(T0)
    out = io.StringIO()
    renderer = PlainLines(out, clock)
    steps = StepRunner(clock, renderer, wall=clock.seconds)

    def poll(ctx: Any) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        for i, state in enumerate(["pending", "pending", "pending", "running"]):
            clock.callLater(i + 1, ctx.saw, state)
        clock.callLater(4.5, done.callback, None)
        return done

    d = steps.run("wait-running", 60, poll)
    clock.pump([0.5] * 10)
    assert d.called
    renderer.stop()
    assert out.getvalue().splitlines() == [
        "2023-11-14T22:13:21.000Z  wait-running  running  pending",
        "2023-11-14T22:13:24.000Z  wait-running  running  running",
        "2023-11-14T22:13:24.500Z  wait-running  passed (4.5s)",
    ]


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_renderer_for() -> None:
    clock = Clock()
    assert isinstance(renderer_for(io.StringIO(), clock), PlainLines)
    assert isinstance(renderer_for(TTY(), clock), LiveTable)


def test_live_table_redraws_in_place() -> None:
    clock = Clock()
    clock.advance(T0)
    out = io.StringIO()
    table = LiveTable(out, clock, width=60)
    table.start()
    table(StepEvent("keypair", "running", T0))
    first = out.getvalue()
    assert "\x1b[" not in first.split("\n")[0].replace("\x1b[2K", "")
    assert "keypair  running        0.0s" in first
    # The clock ticks: elapsed moves without any event.
    clock.advance(1)
    assert "keypair  running        1.0s" in out.getvalue()
    # Redrawn over the two lines drawn before.
    assert "\x1b[2F" in out.getvalue()
    table(StepEvent("keypair", "passed", T0 + 1.5, "created txvmbot-abc"))
    table(StepEvent("run-instances", "running", T0 + 1.5, "x" * 200))
    clock.advance(3)
    assert table.lines() == [
        "step           state       elapsed  last seen",
        "keypair        passed         1.5s  created txvmbot-abc",
        "run-instances  running        2.5s  " + "x" * 23 + "…",
    ]
    table.stop()
    assert clock.getDelayedCalls() == []
    assert all(len(line) <= 60 for line in table.lines())


def test_live_table_restarted_step_resets_elapsed() -> None:
    clock = Clock()
    clock.advance(T0 + 10)
    table = LiveTable(io.StringIO(), clock)
    table(StepEvent("wait-ssh", "failed", T0 + 5))
    table(StepEvent("wait-ssh", "running", T0 + 8))
    assert "2.0s" in table.lines()[1]


def test_save_evidence(tmp_path: object) -> None:
    """Written under the root, or (the root unusable) logged and the result
    returned as it was; no root, nothing written."""
    import os

    from twisted.logger import Logger, LogLevel, capturedLogs

    from txvmbot.evidence import save_evidence

    log = Logger()
    r = attrs.evolve(failed_result(), evidence_dir=None)
    saved = save_evidence(str(tmp_path), r, log)
    assert saved.evidence_dir is not None
    assert "steps.txt" in os.listdir(saved.evidence_dir)
    assert save_evidence(None, r, log) is r
    blocker = os.path.join(str(tmp_path), "file")
    with open(blocker, "w") as f:
        f.write("not a directory\n")
    with capturedLogs() as events:
        assert save_evidence(os.path.join(blocker, "evidence"), r, log) is r
    (error,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert isinstance(error["e"], NotADirectoryError)
    assert error["check_id"] == r.check_id
