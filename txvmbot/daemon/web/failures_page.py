"""The failures page: recent failures grouped by any environment fact, with
counts and pass rates per group, so "all failures are on host kernel
3.8.0-8" is one click (seeds 000 and 003). Rendered from
``twisted.web.template`` tags, so every fact, reason and job id is escaped
by the flattener."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.template import Flattenable, Tag, tags

from txvmbot.daemon.scheduling.failures import (
    FACTS,
    FailureExample,
    FailureReport,
    check_by,
    parse_age,
)
from txvmbot.daemon.web.pages import job_link, render
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
        why = render((tags.h1("Failures"), tags.p(str(err), class_="failed"), _chooser(since_text)))
        return ui.html(request, "failures", why)
    if ui.failures is None:
        request.setResponseCode(http.SERVICE_UNAVAILABLE)
        return ui.html(request, "failures", render((tags.h1("Failures"), tags.p("not available"))))
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
            why = render((tags.h1("Failures"), tags.p(f.getErrorMessage(), class_="failed")))
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

    return ui.failures(by, ui.wall() - age).addCallback(keep)


def _chooser(since_text: str) -> Tag:
    links: list[Flattenable] = []
    for name in FACTS:
        href = f"/failures?{urlencode({'by': name, 'since': since_text})}"
        links += [" ", tags.a(name, href=href)]
    return tags.p("group by:", links)


def failures_body(report: FailureReport, by_text: str, since_text: str) -> str:
    """The page's HTML (what :meth:`WebUI.html` places in a page)."""
    return render(_failures_tree(report, since_text))


def _failures_tree(report: FailureReport, since_text: str) -> list[Tag]:
    notes = [
        f"{report.failed} failed of {report.total} finished jobs",
        f"; {report.cancelled} cancelled (not counted)" if report.cancelled else "",
        "" if report.complete else "; older jobs were not read (limit reached)",
        f"; {report.omitted} groups with the fewest failures left out" if report.omitted else "",
    ]
    rows = [
        tags.tr(
            [tags.td(v) for v in g.key],
            tags.td(f"{g.failed}/{g.total}", class_="num"),
            tags.td(f"{100 * g.pass_rate:.0f}%", class_="num"),
            tags.td(_examples(g.examples)),
        )
        for g in report.groups
    ] or [tags.tr(tags.td("no finished job", colspan="9", class_="muted"))]
    head = tags.tr(
        [tags.th(name) for name in report.by],
        tags.th("failed/total"),
        tags.th("pass rate"),
        tags.th("examples"),
    )
    return [
        tags.h1(f"Failures by {', '.join(report.by)} in the last {since_text}"),
        _chooser(since_text),
        tags.p("".join(notes)),
        tags.div(class_="scroll")(tags.table(head, rows, id="groups")),
    ]


def _examples(examples: Sequence[FailureExample]) -> list[Flattenable]:
    """Each example job, a link and its reason, one a line."""
    out: list[Flattenable] = []
    for x in examples:
        out += [tags.br(), job_link(x.job_id), " ", x.reason]
    return out[1:]


__all__ = ["failures_body", "render_failures"]
