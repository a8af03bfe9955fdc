"""The status page's HTML, from frozen values to text: nothing here does
I/O. Pages are ``twisted.web.template`` trees (``tags``), flattened at once
(:func:`render`): every value that came from a job, a cloud or a guest is
the text or an attribute of a tag, so the flattener escapes it.

A page's body is kept flattened (the overview is rendered once for twenty
live pages), and the flattener takes no markup as it is: :func:`page` and
:func:`live` flatten their own tags and place such a body inside."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import attrs
from twisted.python.failure import Failure
from twisted.web.template import Flattenable, Tag, flatten, tags

from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent

#: What the page shows of each console log, from its end.
CONSOLE_TAIL = 4000

#: The flattener writes no doctype; it comes before the <html> tree.
DOCTYPE = b"<!doctype html>"


def render(root: Flattenable) -> str:
    """``root`` flattened to HTML, at once: the trees here hold no
    Deferred, so :func:`flatten` has written everything when it returns."""
    out: list[bytes] = []
    failed: list[Failure] = []
    done = flatten(None, root, out.append)
    done.addErrback(failed.append)
    if failed:
        failed[0].raiseException()
    if not done.called:
        done.cancel()
        raise ValueError("a page's tree holds a Deferred: it must be flattened at once")
    return b"".join(out).decode("utf-8")


def when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def took(start: float | None, end: float | None, now: float) -> str:
    if start is None:
        return "-"
    return f"{(end if end is not None else now) - start:.1f}s"


def _document(title: str, main: Flattenable) -> Tag:
    return tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(title, " - txvmbot"),
            tags.link(rel="stylesheet", href="/static/app.css"),
        ),
        tags.body(
            tags.header(
                tags.a("txvmbot", href="/"),
                tags.nav(
                    tags.a("overview", href="/"),
                    tags.a("failures", href="/failures"),
                    tags.a("metrics", href="/metrics"),
                ),
                tags.span("connecting", id="live", class_="muted"),
            ),
            Tag("main")(main),  # not in twisted's list of tags
            tags.script(src="/static/app.js"),
        ),
    )


def page(title: str, body: str, csrf: str = "") -> bytes:
    """A whole page around ``body``, HTML that :func:`render` made."""
    shell = render(_document(title, ()))
    # Text and attributes are escaped, so "<main></main>" is that tag.
    before, hole, after = shell.rpartition("<main></main>")
    assert hole, shell
    return DOCTYPE + f"{before}<main>{body}</main>{after}".encode()


def live(source: str, fragment: str, inner: str) -> str:
    """A part of the page that follows ``source`` (server-sent events) and
    fetches ``fragment`` for its fresh HTML; ``inner`` is HTML that
    :func:`render` made, and what ``fragment`` answers."""
    empty = render(tags.div(**{"data-live": source, "data-fragment": fragment}))
    return empty.removesuffix("</div>") + inner + "</div>"


# The rows of the overview's tables (up to 200 running jobs) are made with
# Tag(name, attributes, children): a third of the cost of tags.name(...).


def _td(child: Flattenable, class_: str = "") -> Tag:
    return Tag("td", attributes={"class": class_} if class_ else {}, children=[child])


def _form(action: str, label: str, csrf: str) -> Tag:
    return Tag(
        "form",
        attributes={"class": "inline", "method": "post", "action": action},
        children=[
            Tag("input", attributes={"type": "hidden", "name": "csrf", "value": csrf}),
            Tag("button", children=[label]),
        ],
    )


def job_link(job_id: str) -> Tag:
    return Tag("a", attributes={"href": f"/jobs/{quote(job_id)}"}, children=[job_id])


def _state(state: str) -> Tag:
    return Tag("span", attributes={"class": state}, children=[state])


def _head_row(*names: str) -> Tag:
    return tags.tr([tags.th(name) for name in names])


def _table(head: Tag, rows: Flattenable, **attributes: str) -> Tag:
    return tags.div(class_="scroll")(tags.table(head, rows, **attributes))


# --- overview -------------------------------------------------------------------


def overview(
    status: DaemonStatus, running: Sequence[Job], recent: Sequence[Job], now: float, csrf: str
) -> str:
    """Workers, queue depth, each backend (cap, running, queued, drained or
    quarantined and why), running jobs by backend, the newest jobs."""
    return render(_overview_tree(status, running, recent, now, csrf))


def _overview_tree(
    status: DaemonStatus, running: Sequence[Job], recent: Sequence[Job], now: float, csrf: str
) -> list[Tag]:
    cards = tags.div(class_="cards")(
        [
            tags.div(class_="card")(label, tags.b(value, id=key))
            for key, label, value in (
                ("workers", "workers busy", f"{status.busy_workers}/{status.workers}"),
                ("queue", "queued", str(status.queue_depth)),
                ("running", "running", str(status.running)),
                *_disk_card(status),
            )
        ]
    )
    alerts = [
        tags.p(f"{label}: {text}", class_="error", id=key)
        for key, label, text in (
            ("held", "Writes held", status.writes_held),
            ("refusing", "New jobs refused", status.refusing),
        )
        if text
    ]
    backend_rows = [_backend_row(b, csrf) for b in status.backends] or [
        tags.tr(tags.td("no backend has had a job yet", colspan="6", class_="muted"))
    ]
    backends = [
        tags.h2("Backends"),
        _table(_head_row("backend", "state", "running / cap", "queued", "why", ""), backend_rows),
    ]
    by_backend: dict[str, list[Job]] = {}
    for job in running:
        by_backend.setdefault(job.spec.backend, []).append(job)
    groups: list[Tag] = []
    for backend in sorted(by_backend):
        items = [
            Tag("tr", children=[
                _td(job_link(j.id)),
                _td(_state(j.state)),
                _td(j.spec.target),
                _td(took(j.started, None, now), "num"),
                _td(_form(f"/jobs/{quote(j.id)}/cancel", "cancel", csrf)),
            ])
            for j in by_backend[backend]
        ]
        groups += [
            tags.h3(backend),
            _table(_head_row("job", "state", "target", "for", ""), items),
        ]
    recent_rows = [
        Tag("tr", children=[
            _td(job_link(j.id)),
            _td(_state(j.state)),
            _td(j.spec.backend),
            _td(when(j.submitted)),
            _td(took(j.started, j.finished, now), "num"),
            _td(_cut(j.reason, 120)),
        ])
        for j in recent
    ]
    return [
        cards,
        *alerts,
        *backends,
        tags.h2("Running"),
        *(groups or [tags.p("nothing runs", class_="muted")]),
        tags.h2("Newest jobs"),
        _table(
            _head_row("job", "state", "backend", "submitted (UTC)", "took", "reason"), recent_rows
        ),
    ]


def _disk_card(status: DaemonStatus) -> tuple[tuple[str, str, str], ...]:
    """The data dir's free space, when the daemon keeps its jobs there."""
    if not status.data_dir:
        return ()
    free = "?" if status.data_dir_free < 0 else f"{status.data_dir_free / 2**20:.0f} MB"
    return (("free", f"free in {status.data_dir}", free),)


def _backend_row(b: BackendStatus, csrf: str) -> Tag:
    action = "resume" if b.state != "active" else "drain"
    return Tag("tr", children=[
        _td(b.name),
        _td(_state(b.state)),
        _td(f"{b.instances}/{b.capacity}", "num"),
        _td(str(b.queued), "num"),
        _td(b.reason),
        _td(_form(f"/backends/{quote(b.name, safe='')}/{action}", action, csrf)),
    ])


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


def steps_table(rows: Sequence[StepRow], now: float) -> Tag:
    """The steps, one run a row, with how long each took (so far)."""
    body = [
        Tag("tr", children=[
            _td(r.name),
            _td(_state(r.state)),
            _td(took(r.started, r.ended, now), "num"),
            _td(_cut(r.detail, 300)),
        ])
        for r in rows
    ] or [tags.tr(tags.td("no step yet", colspan="4", class_="muted"))]
    return _table(_head_row("step", "state", "seconds", "detail"), body, id="steps")


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
    return render(_job_tree(job, events, now, csrf, suite=suite, files=files))


def _job_tree(
    job: Job,
    events: Sequence[JobEvent],
    now: float,
    csrf: str,
    *,
    suite: Mapping[str, Any] | None = None,
    files: Sequence[str] = (),
) -> list[Tag]:
    spec = job.spec
    parts = [
        tags.h1("job ", job.id, ": ", _state(job.state)),
        tags.p(
            f"{spec.target} on backend {spec.backend}; submitted {when(job.submitted)} UTC, "
            f"took {took(job.started, job.finished, now)}, "
            f"attempt {job.attempts}/{spec.max_attempts}",
            () if job.final else (" ", _form(f"/jobs/{quote(job.id)}/cancel", "cancel", csrf)),
        ),
    ]
    if job.reason:
        parts.append(tags.p(job.reason))
    parts += [tags.h2("Steps"), steps_table(step_rows(events), now)]
    result = job.result
    if suite is not None:
        parts += suite_section(suite)
    if result is not None:
        facts = result.facts.as_dict()
        rows = [tags.tr(tags.th(k), tags.td(v)) for k, v in sorted(facts.items()) if v]
        parts += [tags.h2("Facts"), tags.div(class_="scroll")(tags.table(rows))]
        for name, text in result.console:
            parts += [tags.h2("Console of ", name), tags.pre(text[-CONSOLE_TAIL:])]
    if files:
        links = [
            tags.li(tags.a(f, href=f"/jobs/{quote(job.id)}/files/{quote(f)}")) for f in files
        ]
        parts += [tags.h2("Evidence"), tags.ul(links)]
    return parts


def suite_section(doc: Mapping[str, Any]) -> list[Tag]:
    """A suite's results (its results.json): counts, then every test that
    did not pass with its output, then the passed ones."""
    counts = doc.get("counts") or {}
    summary = doc.get("summary") or {}
    tests = [t for t in doc.get("tests") or [] if isinstance(t, Mapping)]
    bad = [t for t in tests if t.get("outcome") not in ("passed", "skipped")]
    good = [t for t in tests if t.get("outcome") in ("passed", "skipped")]
    line = ", ".join(f"{v} {k}" for k, v in counts.items())
    if "makespan" in summary:
        line += f"; makespan {summary['makespan']}s, end spread {summary.get('end_spread')}s"

    def row(t: Mapping[str, Any], why: Flattenable) -> Tag:
        return tags.tr(
            tags.td(str(t.get("test_id"))),
            tags.td(_state(str(t.get("outcome")))),
            tags.td(str(t.get("worker"))),
            tags.td(f"{float(t.get('duration') or 0):.2f}", class_="num"),
            tags.td(why),
        )

    rows = [
        row(t, (str(t.get("message")), tags.pre(str(t.get("output") or "")[-3000:])))
        for t in bad
    ] + [row(t, ()) for t in good]
    head = _head_row("test", "outcome", "machine", "seconds", "why")
    return [tags.h2("Tests"), tags.p(line), _table(head, rows, id="tests")]


def not_found(what: str) -> bytes:
    return DOCTYPE + render(_document("not found", (tags.h1("Not found"), tags.p(what)))).encode()
