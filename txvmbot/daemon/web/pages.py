"""The status page's HTML, from frozen values to text: nothing here does
I/O. Every value that came from a job, a cloud or a guest is escaped."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

import attrs

from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent

#: What the page shows of each console log, from its end.
CONSOLE_TAIL = 4000


def e(value: object) -> str:
    return escape(str(value), quote=True)


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def took(start: float | None, end: float | None, now: float) -> str:
    if start is None:
        return "-"
    return f"{(end if end is not None else now) - start:.1f}s"


def page(title: str, body: str, csrf: str = "") -> bytes:
    """A whole page around ``body``."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} - txvmbot</title>"
        '<link rel=stylesheet href="/static/app.css"></head><body>'
        '<header><a href="/">txvmbot</a><nav><a href="/">overview</a>'
        '<a href="/failures">failures</a><a href="/metrics">metrics</a></nav>'
        '<span id=live class=muted>connecting</span></header>'
        f"<main>{body}</main>"
        '<script src="/static/app.js"></script></body></html>'
    ).encode()


def live(source: str, fragment: str, inner: str) -> str:
    """A part of the page that follows ``source`` (server-sent events) and
    fetches ``fragment`` for its fresh HTML."""
    return f'<div data-live="{e(source)}" data-fragment="{e(fragment)}">{inner}</div>'


def _form(action: str, label: str, csrf: str) -> str:
    return (
        f'<form class=inline method=post action="{e(action)}">'
        f'<input type=hidden name=csrf value="{e(csrf)}">'
        f"<button>{e(label)}</button></form>"
    )


def _job_link(job_id: str) -> str:
    return f'<a href="/jobs/{quote(job_id)}">{e(job_id)}</a>'


def _state(state: str) -> str:
    return f'<span class="{e(state)}">{e(state)}</span>'


# --- overview -------------------------------------------------------------------


def overview(
    status: DaemonStatus, running: Sequence[Job], recent: Sequence[Job], now: float, csrf: str
) -> str:
    """Workers, queue depth, each backend (cap, running, queued, drained or
    quarantined and why), running jobs by backend, the newest jobs."""
    cards = "".join(
        f'<div class=card>{label}<b id="{key}">{value}</b></div>'
        for key, label, value in (
            ("workers", "workers busy", f"{status.busy_workers}/{status.workers}"),
            ("queue", "queued", status.queue_depth),
            ("running", "running", status.running),
            *_disk_card(status),
        )
    )
    alerts = "".join(
        f'<p class=error id="{key}">{e(label)}: {e(text)}</p>'
        for key, label, text in (
            ("held", "Writes held", status.writes_held),
            ("refusing", "New jobs refused", status.refusing),
        )
        if text
    )
    rows = "".join(_backend_row(b, csrf) for b in status.backends) or (
        "<tr><td colspan=6 class=muted>no backend has had a job yet</td></tr>"
    )
    backends = (
        "<h2>Backends</h2><div class=scroll><table><tr><th>backend</th><th>state</th>"
        "<th>running / cap</th><th>queued</th><th>why</th><th></th></tr>"
        f"{rows}</table></div>"
    )
    by_backend: dict[str, list[Job]] = {}
    for job in running:
        by_backend.setdefault(job.spec.backend, []).append(job)
    groups = []
    for backend in sorted(by_backend):
        items = "".join(
            f"<tr><td>{_job_link(j.id)}</td><td>{_state(j.state)}</td><td>{e(j.spec.target)}</td>"
            f"<td class=num>{took(j.started, None, now)}</td><td>{_form(f'/jobs/{quote(j.id)}/cancel', 'cancel', csrf)}</td></tr>"
            for j in by_backend[backend]
        )
        groups.append(
            f"<h3>{e(backend)}</h3><div class=scroll><table><tr><th>job</th><th>state</th>"
            f"<th>target</th><th>for</th><th></th></tr>{items}</table></div>"
        )
    running_html = "<h2>Running</h2>" + ("".join(groups) or "<p class=muted>nothing runs</p>")
    recent_rows = "".join(
        f"<tr><td>{_job_link(j.id)}</td><td>{_state(j.state)}</td><td>{e(j.spec.backend)}</td>"
        f"<td>{e(when(j.submitted))}</td><td class=num>{took(j.started, j.finished, now)}</td>"
        f"<td>{e(_cut(j.reason, 120))}</td></tr>"
        for j in recent
    )
    recent_html = (
        "<h2>Newest jobs</h2><div class=scroll><table><tr><th>job</th><th>state</th>"
        f"<th>backend</th><th>submitted (UTC)</th><th>took</th><th>reason</th></tr>{recent_rows}"
        "</table></div>"
    )
    return f"<div class=cards>{cards}</div>{alerts}{backends}{running_html}{recent_html}"


def _disk_card(status: DaemonStatus) -> tuple[tuple[str, str, str], ...]:
    """The data dir's free space, when the daemon keeps its jobs there."""
    if not status.data_dir:
        return ()
    free = "?" if status.data_dir_free < 0 else f"{status.data_dir_free / 2**20:.0f} MB"
    return (("free", f"free in {status.data_dir}", free),)


def _backend_row(b: BackendStatus, csrf: str) -> str:
    action = "resume" if b.state != "active" else "drain"
    button = _form(f"/backends/{quote(b.name, safe='')}/{action}", action, csrf)
    return (
        f"<tr><td>{e(b.name)}</td><td>{_state(b.state)}</td>"
        f"<td class=num>{b.instances}/{b.capacity}</td><td class=num>{b.queued}</td>"
        f"<td>{e(b.reason)}</td><td>{button}</td></tr>"
    )


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


# --- a job ------------------------------------------------------------------------


@attrs.frozen
class StepRow:
    """One run of one step, from its events."""

    name: str
    state: str
    started: float
    ended: float | None
    detail: str


def step_rows(events: Iterable[JobEvent]) -> list[StepRow]:
    """The step table: one row per run of a step (a suite runs "boot" again
    for a fresh machine), in the order the steps started."""
    rows: list[StepRow] = []
    open_rows: dict[str, int] = {}
    for ev in events:
        if ev.kind != "step":
            continue
        i = open_rows.get(ev.step)
        if i is None:
            open_rows[ev.step] = len(rows)
            rows.append(StepRow(ev.step, ev.state, ev.at, None, ev.detail))
            i = open_rows[ev.step]
        row = rows[i]
        detail = ev.detail or row.detail
        if ev.state == "running":
            rows[i] = attrs.evolve(row, detail=detail)
        else:
            rows[i] = attrs.evolve(row, state=ev.state, ended=ev.at, detail=detail)
            del open_rows[ev.step]
    return rows


def steps_table(rows: Sequence[StepRow], now: float) -> str:
    body = "".join(
        f"<tr><td>{e(r.name)}</td><td>{_state(r.state)}</td>"
        f"<td class=num>{took(r.started, r.ended, now)}</td><td>{e(_cut(r.detail, 300))}</td></tr>"
        for r in rows
    ) or "<tr><td colspan=4 class=muted>no step yet</td></tr>"
    return (
        "<div class=scroll><table id=steps><tr><th>step</th><th>state</th><th>seconds</th>"
        f"<th>detail</th></tr>{body}</table></div>"
    )


def job_page(
    job: Job,
    events: Sequence[JobEvent],
    now: float,
    csrf: str,
    *,
    suite: Mapping[str, Any] | None = None,
    files: Sequence[str] = (),
) -> str:
    """The step table as it runs, durations, facts, the console tail, a
    suite's test results, links to the kept evidence."""
    head = (
        f"<h1>job {e(job.id)}: {_state(job.state)}</h1>"
        f"<p>{e(job.spec.target)} on backend {e(job.spec.backend)}; submitted "
        f"{e(when(job.submitted))} UTC, took {took(job.started, job.finished, now)}, "
        f"attempt {job.attempts}/{job.spec.max_attempts}"
        + ("" if job.final else " " + _form(f"/jobs/{quote(job.id)}/cancel", "cancel", csrf))
        + "</p>"
        + (f"<p>{e(job.reason)}</p>" if job.reason else "")
    )
    parts = [head, "<h2>Steps</h2>", steps_table(step_rows(events), now)]
    result = job.result
    if suite is not None:
        parts.append(suite_section(suite))
    if result is not None:
        facts = result.facts.as_dict()
        rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in sorted(facts.items()) if v)
        parts.append(f"<h2>Facts</h2><div class=scroll><table>{rows}</table></div>")
        for name, text in result.console:
            tail = text[-CONSOLE_TAIL:]
            parts.append(f"<h2>Console of {e(name)}</h2><pre>{e(tail)}</pre>")
    if files:
        links = "".join(
            f'<li><a href="/jobs/{quote(job.id)}/files/{quote(f)}">{e(f)}</a></li>' for f in files
        )
        parts.append(f"<h2>Evidence</h2><ul>{links}</ul>")
    return "".join(parts)


def suite_section(doc: Mapping[str, Any]) -> str:
    """A suite's results (its results.json): counts, then every test that
    did not pass with its output, then the passed ones."""
    counts = doc.get("counts") or {}
    summary = doc.get("summary") or {}
    tests = [t for t in doc.get("tests") or [] if isinstance(t, Mapping)]
    bad = [t for t in tests if t.get("outcome") not in ("passed", "skipped")]
    good = [t for t in tests if t.get("outcome") in ("passed", "skipped")]
    line = ", ".join(f"{e(v)} {e(k)}" for k, v in counts.items())
    spread = ""
    if "makespan" in summary:
        spread = (
            f"; makespan {e(summary['makespan'])}s, end spread {e(summary.get('end_spread'))}s"
        )
    rows = "".join(
        f"<tr><td>{e(t.get('test_id'))}</td><td>{_state(str(t.get('outcome')))}</td>"
        f"<td>{e(t.get('worker'))}</td><td class=num>{float(t.get('duration') or 0):.2f}</td>"
        f"<td>{e(t.get('message'))}<pre>{e(str(t.get('output') or '')[-3000:])}</pre></td></tr>"
        for t in bad
    )
    ok_rows = "".join(
        f"<tr><td>{e(t.get('test_id'))}</td><td>{_state(str(t.get('outcome')))}</td>"
        f"<td>{e(t.get('worker'))}</td><td class=num>{float(t.get('duration') or 0):.2f}</td><td></td></tr>"
        for t in good
    )
    return (
        f"<h2>Tests</h2><p>{line}{spread}</p><div class=scroll><table id=tests><tr><th>test</th>"
        f"<th>outcome</th><th>machine</th><th>seconds</th><th>why</th></tr>{rows}{ok_rows}"
        "</table></div>"
    )


def not_found(what: str) -> bytes:
    return page("not found", f"<h1>Not found</h1><p>{e(what)}</p>")
