"""The failures page: recent failures grouped by any environment fact, with
counts and pass rates per group, so "all failures are on host kernel
3.8.0-8" is one click (seeds 000 and 003)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request

from txvmbot.daemon.failures import FACTS, FailureReport, check_by, parse_age
from txvmbot.daemon.web.pages import _job_link, e
from txvmbot.errors import ConfigError

DEFAULT_BY = "host_kernel"
DEFAULT_SINCE = "7d"


def render_failures(ui: Any, request: Request) -> bytes | int:
    args = request.args or {}
    by_text = (args.get(b"by") or [DEFAULT_BY.encode()])[0].decode("utf-8", "replace")
    since_text = (args.get(b"since") or [DEFAULT_SINCE.encode()])[0].decode("utf-8", "replace")
    try:
        by = check_by([b for b in by_text.split(",") if b], "by")
        age = parse_age(since_text, "since")
    except ConfigError as err:
        request.setResponseCode(http.BAD_REQUEST)
        return ui.html(request, "failures", f"<h1>Failures</h1><p class=failed>{e(err)}</p>{_chooser('', since_text)}")
    if ui.failures is None:
        request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return ui.html(request, "failures", "<h1>Failures</h1><p>not available</p>")
    gone: list[object] = []
    request.notifyFinish().addBoth(gone.append)

    def answer(report: FailureReport) -> None:
        if not gone:  # the browser may have left while the jobs were read
            request.write(ui.html(request, "failures", failures_body(report, by_text, since_text)))
            request.finish()

    def failed(f: Failure) -> None:
        ui.log.failure("The failures page", f)
        if not gone:
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            why = f"<h1>Failures</h1><p class=failed>{e(f.getErrorMessage())}</p>"
            request.write(ui.html(request, "failures", why))
            request.finish()

    shared_report(ui, by, age).addCallbacks(answer, failed)
    return NOT_DONE_YET


#: How long one failures report serves identical requests (reloads, tabs):
#: a report reads up to 10,000 jobs from the store, about a second of the
#: reactor's time in pages.
REPORT_TTL = 10.0


def shared_report(ui: Any, by: tuple[str, ...], age: float) -> Deferred[FailureReport]:
    """The report for ``by`` over the last ``age`` seconds; a report made
    less than :data:`REPORT_TTL` ago serves again (reloads, other tabs)."""
    now = ui.clock.seconds()
    for key in [k for k, (expires, _) in ui.reports.items() if expires <= now]:
        del ui.reports[key]
    key = (by, age)
    if key in ui.reports:
        return succeed(ui.reports[key][1])

    def keep(report: FailureReport) -> FailureReport:
        ui.reports[key] = (ui.clock.seconds() + REPORT_TTL, report)
        return report

    return maybeDeferred(ui.failures, by, ui.wall() - age).addCallback(keep)


def _chooser(by_text: str, since_text: str) -> str:
    links = " ".join(
        f'<a href="/failures?{urlencode({"by": name, "since": since_text})}">{e(name)}</a>'
        for name in FACTS
    )
    return f"<p>group by: {links}</p>"


def failures_body(report: FailureReport, by_text: str, since_text: str) -> str:
    head = (
        f"<h1>Failures by {e(', '.join(report.by))} in the last {e(since_text)}</h1>"
        f"{_chooser(by_text, since_text)}"
        f"<p>{report.failed} failed of {report.total} finished jobs"
        + (f"; {report.cancelled} cancelled (not counted)" if report.cancelled else "")
        + ("" if report.complete else "; older jobs were not read (limit reached)")
        + (f"; {report.omitted} groups with the fewest failures left out" if report.omitted else "")
        + "</p>"
    )
    cols = "".join(f"<th>{e(name)}</th>" for name in report.by)
    rows = []
    for g in report.groups:
        key = "".join(f"<td>{e(v)}</td>" for v in g.key)
        examples = "<br>".join(
            f"{_job_link(x.job_id)} {e(x.reason)}" for x in g.examples
        )
        rows.append(
            f"<tr>{key}<td class=num>{g.failed}/{g.total}</td>"
            f"<td class=num>{100 * g.pass_rate:.0f}%</td><td>{examples}</td></tr>"
        )
    table = (
        f"<div class=scroll><table id=groups><tr>{cols}<th>failed/total</th><th>pass rate</th>"
        f"<th>examples</th></tr>{''.join(rows) or '<tr><td colspan=9 class=muted>no finished job</td></tr>'}"
        "</table></div>"
    )
    return head + table


__all__ = ["failures_body", "render_failures"]
