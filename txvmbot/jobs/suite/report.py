"""A suite run's summary, for people and for JSON: counts, makespan, each
machine's busy time and the end spread (seed 002: workers that end minutes
apart waste the machines that finished first)."""

from __future__ import annotations

from typing import Any

from txvmbot.jobs.suite.spec import SuiteResult


def summary_dict(result: SuiteResult) -> dict[str, Any]:
    s = result.spread
    doc: dict[str, Any] = {
        "name": result.name,
        "check_id": result.machines.check_id,
        "passed": result.passed,
        "counts": result.counts,
        "error": result.error,
        "evidence_dir": result.machines.evidence_dir,
        "machines": [
            {
                "worker": t.worker,
                "busy": round(t.busy, 3),
                "start": t.start,
                "end": t.end,
                "machines": list(t.machines),
            }
            for t in result.times
        ],
    }
    if s is not None:
        doc.update(
            makespan=round(s.makespan, 3),
            end_spread=round(s.end_spread, 3),
            end_spread_share=round(s.end_spread_share, 4),
            lower_bound=round(s.lower_bound, 3),
            fixed_cost=round(s.fixed_cost, 3),
            between_tests=round(s.between, 3),
            makespan_over_lower_bound=round(s.ratio, 4),
        )
    return doc


def format_summary(result: SuiteResult) -> str:
    """The lines printed at the end of a run."""
    c = result.counts
    lines = []
    for t in result.tests:
        if t.outcome not in ("passed", "skipped"):
            tries = f" (attempt {t.attempts})" if t.attempts > 1 else ""
            lines.append(f"{t.outcome.upper():8} {t.test_id} on {t.worker or '-'}{tries}: {t.message}")
    verdict = "PASSED" if result.passed else "FAILED"
    lines.append(
        f"{verdict} suite {result.name}: {len(result.tests)} test(s), {c['passed']} passed, "
        f"{c['failed']} failed, {c['timeout']} timed out, {c['infra']} infrastructure trouble, "
        f"{c['skipped']} skipped"
    )
    if result.error:
        lines.append(f"error: {result.error}")
    s = result.spread
    if s is not None:
        lines.append(
            f"makespan {s.makespan:.2f}s (lower bound {s.lower_bound:.2f}s with "
            f"{s.fixed_cost:.2f}s a command and {s.between:.2f}s between tests, x{s.ratio:.3f}); "
            f"end spread {s.end_spread:.2f}s = {100 * s.end_spread_share:.1f}% of the makespan"
        )
        for m in result.times:
            lines.append(f"  {m.worker}: busy {m.busy:.2f}s on {', '.join(m.machines)}")
    if result.machines.evidence_dir:
        lines.append(f"evidence: {result.machines.evidence_dir}")
    return "\n".join(lines) + "\n"
