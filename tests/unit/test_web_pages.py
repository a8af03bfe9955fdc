"""The web pages as twisted.web.template renders them: hostile text (a job
id, backend, reason, error, step, fact, test or file name holding markup,
quotes and ampersands) comes out as text on every page and fragment, and
normal data keeps the elements, ids, classes and attributes that app.js,
the browser test and people rely on.

Pages are parsed back (html.parser, as a browser tokenizes, and
ElementTree, since the flattener writes well-formed markup) rather than
compared with snapshots."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote

import attrs
import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed

from tests.support.scheduler_harness import Harness
from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent
from txvmbot.daemon.scheduling.failures import FailureExample, FailureGroup, FailureReport
from txvmbot.daemon.web import WebUI, pages
from txvmbot.daemon.web.failures_page import failures_body
from txvmbot.model import Facts
from txvmbot.testing import make_job_spec

TOKEN = "csrf-token-for-tests"
#: Markup, both quotes, an attribute breaking out, an entity and a bare &.
HOSTILE = "<script>alert(1)</script>\"' onmouseover=\"alert(2)\" &amp; &"
#: The same, fit for a file name (no slash).
HOSTILE_FILE = "<img src=x onerror=alert(3)>\"'&amp;.log"
T = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


# --- reading pages back ------------------------------------------------------------


class _Tokens(HTMLParser):
    """Start tags and text, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def tokens(html: str) -> _Tokens:
    t = _Tokens()
    t.feed(html)
    t.close()
    return t


def assert_inert(html: str, *shown: str) -> _Tokens:
    """No markup came from the data: the only script is app.js, no element
    has an event handler, and each of ``shown`` is there as text or as an
    attribute's value, whole."""
    t = tokens(html)
    scripts = [a for tag, a in t.starts if tag == "script"]
    assert scripts in ([], [{"src": "/static/app.js"}]), scripts
    handlers = [(tag, a) for tag, a in t.starts if any(k.startswith("on") for k in a)]
    assert handlers == [], handlers
    assert not {"img", "iframe", "object", "embed"} & {tag for tag, _ in t.starts}
    assert "<script>alert" not in html and "<img" not in html
    text = "".join(t.text)
    values = [v for _, a in t.starts for v in a.values() if v is not None]
    for s in shown:
        assert s in text or any(s in v for v in values), (s, html)
    return t


def dom(html: str) -> ET.Element:
    """A page or fragment as an ElementTree (the flattener writes void
    elements closed and every attribute quoted)."""
    return ET.fromstring("<root>" + html.removeprefix("<!doctype html>") + "</root>")


def text(el: ET.Element | None) -> str:
    assert el is not None
    return "".join(el.itertext())


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, (path, [ET.tostring(f) for f in found])
    return found[0]


def cells(row: ET.Element) -> list[str]:
    return [text(c) for c in row if c.tag in ("td", "th")]


def assert_form(form: ET.Element, action: str, label: str, token: str = TOKEN) -> None:
    assert form.attrib == {"class": "inline", "method": "post", "action": action}
    (field,) = form.findall("input")
    assert field.attrib == {"type": "hidden", "name": "csrf", "value": token}
    assert text(one(form, "button")) == label


# --- the daemon's pages in memory --------------------------------------------------


class Web:
    """WebUI over a real Scheduler on a Clock (job ids start with ``ids``)."""

    def __init__(self, ids: str = "j", failures: Callable[..., Any] | None = None) -> None:
        self.h = Harness(ids=ids)
        self.ui = WebUI(self.h.s, self.h.clock, csrf=TOKEN, wall=self.h.clock.seconds, failures=failures)
        self.ui.start()
        self.http = StubTreq(self.ui.root)

    def get(self, path: str) -> tuple[int, Any, str]:
        d = self.http.get(f"http://127.0.0.1{path}")
        self.http.flush()
        resp = _result(d)
        return resp.code, resp.headers, _result(resp.text("utf-8"))


def _result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def _now(value: Any) -> Any:
    """A store's answer, whether it answers at once or with a Deferred."""
    return _result(value) if isinstance(value, Deferred) else value


@pytest.fixture
def web() -> Any:
    w = Web()
    yield w
    w.ui.stop()


def report(key: str = "3.8.0-8", job_id: str = "j1", reason: str = "boot: <kernel panic>") -> FailureReport:
    return FailureReport(
        by=("host_kernel",),
        since=0.0,
        groups=(
            FailureGroup((key,), passed=0, failed=2,
                         examples=(FailureExample(job_id, reason), FailureExample("j2", "no ssh"))),
            FailureGroup(("6.1.0-9",), passed=5, failed=0),
        ),
    )


def job(
    job_id: str = "j1",
    backend: str = "cloud-a",
    state: Any = "running",
    reason: str = "",
    started: float | None = T + 3,
    finished: float | None = None,
) -> Job:
    return Job(
        id=job_id, spec=make_job_spec(backend), state=state, submitted=T, started=started,
        finished=finished, attempts=1, reason=reason,
    )


def write_results(where: str, tests: list[dict[str, Any]], counts: dict[str, Any]) -> None:
    with open(os.path.join(where, "results.json"), "w") as f:
        json.dump({"counts": counts, "summary": {"makespan": 3.5, "end_spread": 0.2}, "tests": tests}, f)


# --- normal data: what the pages keep ----------------------------------------------


def test_the_overview_keeps_its_cards_alerts_tables_and_forms() -> None:
    status = DaemonStatus(
        api_version=1, workers=8, busy_workers=5, queue_depth=3, running=2,
        backends=(
            BackendStatus("cloud-a", 4, 2, 1, "active", instances=2),
            BackendStatus("cloud/b", 2, 0, 0, "quarantined", reason="3 failures in a row"),
        ),
        data_dir="/var/lib/txvmbot", data_dir_free=300 * 2**20, writes_held="disk full",
    )
    running = [job("j2", "cloud-b"), job("j1", "cloud-a")]
    recent = [job("j9", state="failed", reason="x" * 200, finished=T + 12)]
    root = dom(pages.overview(status, running, recent, T + 15, TOKEN))

    cards = root.findall("./div[@class='cards']/div[@class='card']")
    assert [(c.text, c.find("b").attrib["id"], text(c.find("b"))) for c in cards] == [  # type: ignore[union-attr]
        ("workers busy", "workers", "5/8"),
        ("queued", "queue", "3"),
        ("running", "running", "2"),
        ("free in /var/lib/txvmbot", "free", "300 MB"),
    ]
    held = one(root, "./p[@id='held']")
    assert held.attrib["class"] == "error" and text(held) == "Writes held: disk full"
    assert root.find("./p[@id='refusing']") is None
    assert [text(h) for h in root.findall("./h2")] == ["Backends", "Running", "Newest jobs"]

    backends, *groups, newest = root.findall("./div[@class='scroll']/table")
    head, a, b = backends.findall("tr")
    assert cells(head) == ["backend", "state", "running / cap", "queued", "why", ""]
    assert cells(a)[:5] == ["cloud-a", "active", "2/4", "1", ""]
    assert [td.get("class") for td in a.findall("td")] == [None, None, "num", "num", None, None]
    assert one(a, "td/span").attrib == {"class": "active"}
    assert_form(one(a, "td/form"), "/backends/cloud-a/drain", "drain")
    assert cells(b)[:5] == ["cloud/b", "quarantined", "0/2", "0", "3 failures in a row"]
    assert_form(one(b, "td/form"), "/backends/cloud%2Fb/resume", "resume")

    assert [text(h) for h in root.findall("./h3")] == ["cloud-a", "cloud-b"]  # sorted
    assert len(groups) == 2
    head, row = groups[0].findall("tr")
    assert cells(head) == ["job", "state", "target", "for", ""]
    assert cells(row)[:4] == ["j1", "running", running[1].spec.target, "12.0s"]
    assert one(row, "td/a").attrib == {"href": "/jobs/j1"}
    assert_form(one(row, "td/form"), "/jobs/j1/cancel", "cancel")

    head, row = newest.findall("tr")
    assert cells(head) == ["job", "state", "backend", "submitted (UTC)", "took", "reason"]
    assert cells(row) == ["j9", "failed", "cloud-a", "2023-11-14 22:13:20", "9.0s", "x" * 119 + "\u2026"]
    assert one(row, "td/span").attrib == {"class": "failed"}


def test_an_empty_overview_says_so() -> None:
    root = dom(pages.overview(DaemonStatus(1, 2, 0, 0, 0), [], [], T, TOKEN))
    assert [c.find("b").attrib["id"] for c in root.findall("./div[@class='cards']/div")] == [  # type: ignore[union-attr]
        "workers", "queue", "running"  # no data dir, no disk card
    ]
    td = one(root, ".//td[@class='muted']")
    assert td.attrib == {"colspan": "6", "class": "muted"} and td.text == "no backend has had a job yet"
    assert text(one(root, "./p[@class='muted']")) == "nothing runs"


def test_the_page_the_fragment_and_the_headers(web: Any) -> None:
    web.h.submit("cloud-a")
    code, headers, page = web.get("/")
    assert code == 200 and page.startswith("<!doctype html><html lang=\"en\">")
    for name, value in (
        ("content-type", "text/html; charset=utf-8"),
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("content-security-policy", "default-src 'self'"),
    ):
        assert headers.getRawHeaders(name) == [value]
    root = dom(page)
    assert text(one(root, "html/head/title")) == "overview - txvmbot"
    assert one(root, "html/head/link").attrib == {"rel": "stylesheet", "href": "/static/app.css"}
    assert one(root, ".//meta[@charset]").attrib == {"charset": "utf-8"}
    assert [a.attrib["href"] for a in root.findall("html/body/header//a")] == ["/", "/", "/failures", "/metrics"]
    live = one(root, "html/body/header/span")
    assert live.attrib == {"id": "live", "class": "muted"} and live.text == "connecting"
    assert one(root, "html/body/script").attrib == {"src": "/static/app.js"}
    follow = one(root, "html/body/main/div")
    assert follow.attrib == {"data-live": "/events", "data-fragment": "/?fragment=1"}

    code, headers, fragment = web.get("/?fragment=1")
    assert code == 200 and headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert "<html" not in fragment and "<main" not in fragment
    # What app.js puts in the live part is what the page had there.
    assert '<div data-live="/events" data-fragment="/?fragment=1">' + fragment + "</div></main>" in page


def test_the_job_page_keeps_steps_facts_console_tests_and_evidence(web: Any, tmp_path: Any) -> None:
    web.h.submit("cloud-a")
    web.h.clock.advance(2)
    web.h.pool.step("j0", "boot", "running", "pid 12")
    web.h.pool.step("j0", "boot", "passed")
    web.h.pool.step("j0", "wait-ssh", "running")
    code, _, body = web.get("/jobs/j0")
    root = dom(body)
    follow = one(root, "html/body/main/div")
    assert follow.attrib == {"data-live": "/jobs/j0/events", "data-fragment": "/jobs/j0?fragment=1"}
    assert text(one(root, "html/head/title")) == "job j0 - txvmbot"
    _, _, fragment = web.get("/jobs/j0?fragment=1")
    assert follow.find("h1") is not None and "<html" not in fragment
    frag = dom(fragment)
    h1 = one(frag, "h1")
    assert text(h1) == "job j0: running" and one(h1, "span").attrib == {"class": "running"}
    assert_form(one(frag, "p/form"), "/jobs/j0/cancel", "cancel")
    steps = one(frag, "div[@class='scroll']/table[@id='steps']")
    head, boot, ssh = steps.findall("tr")
    assert cells(head) == ["step", "state", "seconds", "detail"]
    assert [cells(boot)[i] for i in (0, 1, 3)] == ["boot", "passed", "pid 12"]
    assert [cells(ssh)[i] for i in (0, 1, 3)] == ["wait-ssh", "running", ""]
    assert [td.get("class") for td in boot.findall("td")] == [None, None, "num", None]
    assert one(ssh, "td/span").attrib == {"class": "running"}

    evidence = str(tmp_path)
    write_results(evidence, [
        {"test_id": "t02", "outcome": "passed", "worker": "worker-2", "duration": 2.0},
        {"test_id": "t01", "outcome": "failed", "worker": "worker-1", "duration": 1.0,
         "message": "exit status 3", "output": "about to fail"},
    ], {"passed": 1, "failed": 1})
    for name in ("console-vm1.log", "secret.key"):
        with open(os.path.join(evidence, name), "w") as f:
            f.write("kept")
    web.h.pool.finish("j0", passed=False, error="1 of 2 test(s) did not pass")
    stored = _now(web.h.store.get("j0"))
    assert stored is not None and stored.result is not None
    result = attrs.evolve(
        stored.result, evidence_dir=evidence, console=(("vm1", "a" * 5000 + "the end"),),
        facts=Facts(host_kernel="6.1.0-9", region="us-east-1"),
    )
    web.h.store.update(attrs.evolve(stored, result=result))
    _, _, body = web.get("/jobs/j0")
    root = one(dom(body), "html/body/main")
    assert root.find("div[@data-live]") is None  # a finished job's page follows nothing
    head = root.findall("p")[0]
    assert text(head).startswith(f"{stored.spec.target} on backend cloud-a; submitted 1970-01-12 13:46:40 UTC")
    assert head.find("form") is None and text(head).endswith(", attempt 1/2")
    assert [text(h) for h in root.findall("h2")] == ["Steps", "Tests", "Facts", "Console of vm1", "Evidence"]
    tests = one(root, "div/table[@id='tests']")
    assert [cells(r) for r in tests.findall("tr")] == [
        ["test", "outcome", "machine", "seconds", "why"],
        ["t01", "failed", "worker-1", "1.00", "exit status 3about to fail"],
        ["t02", "passed", "worker-2", "2.00", ""],
    ]
    assert one(tests, "tr/td/pre").text == "about to fail"
    assert "1 passed, 1 failed; makespan 3.5s, end spread 0.2s" in text(root)
    facts = [t for t in root.findall("div/table") if t.get("id") is None][0]
    assert [cells(r) for r in facts.findall("tr")] == [["host_kernel", "6.1.0-9"], ["region", "us-east-1"]]
    pre = one(root, "pre")
    assert len(pre.text or "") == pages.CONSOLE_TAIL and (pre.text or "").endswith("the end")
    assert [(a.attrib, a.text) for a in root.findall("ul/li/a")] == [
        ({"href": "/jobs/j0/files/console-vm1.log"}, "console-vm1.log"),
        ({"href": "/jobs/j0/files/results.json"}, "results.json"),
    ]


def test_the_failures_page_keeps_its_table_and_links(web: Any) -> None:
    w = Web(failures=lambda by, since: succeed(report()))
    code, _, body = w.get("/failures?by=host_kernel&since=2d")
    w.ui.stop()
    assert code == 200
    main = one(dom(body), "html/body/main")
    assert text(one(main, "h1")) == "Failures by host_kernel in the last 2d"
    chooser = main.findall("p")[0]
    assert chooser.text == "group by: "
    assert {a.text: a.attrib["href"] for a in chooser.findall("a")}["qemu"] == "/failures?by=qemu&since=2d"
    assert text(main.findall("p")[1]) == "2 failed of 7 finished jobs"
    table = one(main, "div[@class='scroll']/table[@id='groups']")
    head, bad, good = table.findall("tr")
    assert cells(head) == ["host_kernel", "failed/total", "pass rate", "examples"]
    assert cells(bad) == ["3.8.0-8", "2/2", "0%", "j1 boot: <kernel panic>j2 no ssh"]
    assert [td.get("class") for td in bad.findall("td")] == [None, "num", "num", None]
    examples = bad.findall("td")[-1]
    assert [c.tag for c in examples] == ["a", "br", "a"]
    assert [a.attrib["href"] for a in examples.findall("a")] == ["/jobs/j1", "/jobs/j2"]
    assert cells(good) == ["6.1.0-9", "0/5", "100%", ""]

    empty = dom(failures_body(FailureReport(by=("qemu", "host_kernel"), since=0.0), "qemu", "7d"))
    head, row = one(empty, "div/table").findall("tr")
    assert cells(head)[:2] == ["qemu", "host_kernel"]
    assert one(row, "td").attrib == {"colspan": "9", "class": "muted"} and cells(row) == ["no finished job"]
    notes = FailureReport(by=("qemu",), since=0.0, cancelled=2, complete=False, omitted=3)
    assert text(dom(failures_body(notes, "qemu", "7d")).findall("p")[1]) == (
        "0 failed of 0 finished jobs; 2 cancelled (not counted); older jobs were not read "
        "(limit reached); 3 groups with the fewest failures left out"
    )


def test_the_failures_page_errors_keep_their_codes(web: Any) -> None:
    code, _, body = web.get("/failures?by=colour")
    main = one(dom(body), "html/body/main")
    assert code == 400 and text(one(main, "h1")) == "Failures"
    assert "unknown fact" in text(one(main, "p[@class='failed']"))
    assert "by=host_kernel&since=7d" in [a.attrib["href"].split("?")[1] for a in main.findall("p/a")]
    code, _, body = web.get("/failures")
    assert code == 503 and text(one(dom(body), "html/body/main/p")) == "not available"

    def broken(by: Any, since: Any) -> Any:
        return fail(RuntimeError("the store is gone"))

    w = Web(failures=broken)
    code, _, body = w.get("/failures")
    w.ui.stop()
    assert code == 500 and text(one(dom(body), "html/body/main/p[@class='failed']")) == "the store is gone"


def test_not_found_pages(web: Any) -> None:
    code, headers, body = web.get("/jobs/nope")
    assert code == 404 and headers.getRawHeaders("content-type") == ["text/html"]  # twisted's default
    main = one(dom(body), "html/body/main")
    assert [text(e) for e in main] == ["Not found", "no job nope"]
    assert body.startswith("<!doctype html>") and text(one(dom(body), "html/head/title")) == "not found - txvmbot"


# --- hostile data: escaped everywhere -----------------------------------------------


def test_the_overview_escapes_what_jobs_and_backends_say() -> None:
    status = DaemonStatus(
        api_version=1, workers=2, busy_workers=1, queue_depth=0, running=1,
        backends=(BackendStatus(HOSTILE, 2, 1, 0, "quarantined", reason=HOSTILE),),
        data_dir=HOSTILE_FILE, data_dir_free=2**20, writes_held=HOSTILE, refusing=HOSTILE,
    )
    running = [job(HOSTILE, HOSTILE, reason=HOSTILE)]
    recent = [job(HOSTILE + "2", HOSTILE, state="failed", reason=HOSTILE, finished=T + 5)]
    html = pages.overview(status, running, recent, T + 9, HOSTILE)
    t = assert_inert(html, HOSTILE, f"free in {HOSTILE_FILE}", f"Writes held: {HOSTILE}",
                     f"New jobs refused: {HOSTILE}")
    root = dom(html)
    assert [text(h) for h in root.findall("h3")] == [HOSTILE]
    assert {a["href"] for tag, a in t.starts if tag == "a"} == {
        f"/jobs/{quote(HOSTILE)}", f"/jobs/{quote(HOSTILE + '2')}"
    }
    actions = {a["action"] for tag, a in t.starts if tag == "form"}
    assert actions == {f"/backends/{quote(HOSTILE, safe='')}/resume", f"/jobs/{quote(HOSTILE)}/cancel"}
    assert {a["value"] for tag, a in t.starts if tag == "input"} == {HOSTILE}


def test_every_page_and_fragment_of_a_hostile_job_is_escaped(tmp_path: Any) -> None:
    w = Web(ids=HOSTILE)
    job_id = HOSTILE + "0"
    w.h.submit(HOSTILE)
    w.h.pool.step(job_id, HOSTILE, "running", HOSTILE)
    url = "/jobs/" + quote(job_id, safe="")
    for path in ("/", "/?fragment=1", url, url + "?fragment=1"):
        code, _, html = w.get(path)
        assert code == 200
        assert_inert(html, job_id, HOSTILE)
    # The live part of the job's page follows the job by its (escaped) id.
    _, _, page = w.get(url)
    follow = one(dom(page), "html/body/main/div")
    assert follow.attrib == {"data-live": f"/jobs/{job_id}/events", "data-fragment": f"/jobs/{job_id}?fragment=1"}
    assert text(one(dom(page), "html/head/title")) == f"job {job_id} - txvmbot"

    evidence = str(tmp_path)
    write_results(evidence, [
        {"test_id": HOSTILE, "outcome": HOSTILE, "worker": HOSTILE, "duration": 1.0,
         "message": HOSTILE, "output": HOSTILE},
        {"test_id": HOSTILE, "outcome": "passed", "worker": HOSTILE, "duration": 1.0},
    ], {HOSTILE: 1})
    with open(os.path.join(evidence, HOSTILE_FILE), "w") as f:
        f.write("kept")
    w.h.pool.finish(job_id, passed=False, error=HOSTILE)
    stored = _now(w.h.store.get(job_id))
    assert stored is not None and stored.result is not None
    result = attrs.evolve(
        stored.result, evidence_dir=evidence, console=((HOSTILE, HOSTILE),),
        facts=Facts(host_kernel=HOSTILE, extra=((HOSTILE, HOSTILE),)),
    )
    w.h.store.update(attrs.evolve(stored, result=result, reason=HOSTILE))
    for path in (url, url + "?fragment=1"):
        code, _, html = w.get(path)
        assert code == 200
        assert_inert(html, job_id, HOSTILE, f"1 {HOSTILE}", HOSTILE_FILE)
    for path in ("/", "/?fragment=1"):  # the newest jobs: id, backend, reason
        code, _, html = w.get(path)
        assert code == 200
        assert_inert(html, job_id, HOSTILE)
    _, _, html = w.get(url + "?fragment=1")
    root = dom(html)
    outcomes = root.findall("div/table[@id='tests']/tr/td/span")
    assert [(o.attrib, o.text) for o in outcomes] == [({"class": HOSTILE}, HOSTILE), ({"class": "passed"}, "passed")]
    assert text(one(root, "h1")) == f"job {job_id}: failed"
    assert [text(h) for h in root.findall("h2")][-2:] == [f"Console of {HOSTILE}", "Evidence"]
    assert [(a.attrib["href"], a.text) for a in root.findall("ul/li/a")][0] == (
        f"/jobs/{quote(job_id)}/files/{quote(HOSTILE_FILE)}", HOSTILE_FILE
    )
    code, _, html = w.get("/jobs/" + quote(HOSTILE, safe="") + "nope")
    assert code == 404
    assert_inert(html, f"no job {HOSTILE}nope")
    code, _, html = w.get(url + "/" + quote(HOSTILE_FILE, safe=""))
    assert code == 404
    assert_inert(html, f"{job_id}/{HOSTILE_FILE}")
    w.ui.stop()


def test_the_failures_page_escapes_facts_reasons_and_what_was_asked() -> None:
    w = Web(failures=lambda by, since: succeed(report(HOSTILE, HOSTILE, HOSTILE)))
    code, _, html = w.get("/failures?since=" + quote("7d", safe=""))
    assert code == 200
    t = assert_inert(html, HOSTILE, f"{HOSTILE} {HOSTILE}")
    assert f"/jobs/{quote(HOSTILE)}" in {a.get("href") for _, a in t.starts}

    for query in ("by=" + quote(HOSTILE, safe=""), "since=" + quote(HOSTILE, safe="")):
        code, _, html = w.get("/failures?" + query)
        assert code == 400
        assert_inert(html, "<script>alert(1)</script>")
    # The chooser keeps what was asked in its links, as attribute values.
    links = [str(a["href"]) for tag, a in tokens(html).starts if tag == "a" and "by=qemu" in str(a["href"])]
    assert links and all("since=%3Cscript%3E" in href for href in links)
    w.ui.stop()

    def broken(by: Any, since: Any) -> Any:
        return fail(RuntimeError(HOSTILE))

    w = Web(failures=broken)
    code, _, html = w.get("/failures")
    w.ui.stop()
    assert code == 500
    assert_inert(html, HOSTILE)


def test_live_and_page_escape_their_own_arguments() -> None:
    inner = pages.render(pages.job_link(HOSTILE))
    wrapped = pages.live(HOSTILE, HOSTILE, inner)
    assert wrapped.endswith(inner + "</div>")
    assert_inert(wrapped, HOSTILE)
    assert one(dom(wrapped), "div").attrib == {"data-live": HOSTILE, "data-fragment": HOSTILE}
    page = pages.page(HOSTILE, wrapped).decode()
    assert_inert(page, HOSTILE)
    assert text(one(dom(page), "html/head/title")) == f"{HOSTILE} - txvmbot"
    assert page.count("<main>") == 1 and f"<main>{wrapped}</main>" in page


def test_steps_table_escapes_names_and_details() -> None:
    events = [JobEvent("j", 1, T, "step", "running", step=HOSTILE, detail=HOSTILE)]
    html = pages.render(pages.steps_table(pages.step_rows(events), T + 1))
    assert_inert(html, HOSTILE)
    assert cells(one(dom(html), "div/table/tr[td]")) == [HOSTILE, "running", "1.0s", HOSTILE]
