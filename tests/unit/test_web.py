"""The web status page's resources, driven in memory (treq's StubTreq over
the real resources, a real Scheduler on a Clock with a fake worker pool):
pages, fragments, actions with their CSRF token, served evidence, escaping,
and the coalesced event stream."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.web.test.requesthelper import DummyRequest

from tests.support.scheduler_harness import Harness
from txvmbot.daemon.jobs import JobEvent
from txvmbot.daemon.scheduling.failures import FailureExample, FailureGroup, FailureReport
from txvmbot.daemon.web import WebUI
from txvmbot.daemon.web.pages import step_rows

TOKEN = "csrf-token-for-tests"


class Web:
    def __init__(self, reports: list[tuple[tuple[str, ...], float]] | None = None) -> None:
        self.h = Harness()
        self.asked: list[tuple[tuple[str, ...], float]] = [] if reports is None else reports

        def failures(by: tuple[str, ...], since: float) -> Deferred[FailureReport]:
            self.asked.append((by, since))
            return succeed(FailureReport(
                by=by,
                since=since,
                groups=(
                    FailureGroup(("3.8.0-8",), passed=0, failed=2,
                                 examples=(FailureExample("j1", "boot: <kernel panic>"),)),
                    FailureGroup(("6.1.0-9",), passed=5, failed=0),
                ),
            ))

        self.ui = WebUI(self.h.s, self.h.clock, csrf=TOKEN, wall=self.h.clock.seconds, failures=failures)
        self.ui.start()
        self.http = StubTreq(self.ui.root)

    def get(self, path: str) -> tuple[int, str]:
        d = self.http.get(f"http://127.0.0.1{path}")
        self.http.flush()
        resp = _result(d)
        text = resp.text()
        for _ in range(20):  # a static file is produced in chunks
            self.http.flush()
        body = _result(text)
        return resp.code, body

    def post(self, path: str, data: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        d = self.http.post(
            f"http://127.0.0.1{path}", data=data, headers=headers or {}, allow_redirects=False
        )
        self.http.flush()
        resp = _result(d)
        return resp.code, _result(resp.text()), (resp.headers.getRawHeaders("location") or [""])[0]


def _result(d: Any) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@pytest.fixture
def web() -> Web:
    w = Web()
    yield w
    w.ui.stop()


def test_overview_shows_workers_backends_and_running_jobs(web: Web) -> None:
    web.h.submit("cloud-a")
    web.h.submit("cloud-b")
    web.h.s.drain("cloud-b")
    code, body = web.get("/")
    assert code == 200
    assert "<!doctype html>" in body and 'data-live="/events"' in body
    assert "j0" in body and "cloud-a" in body
    assert "draining" in body and 'name="csrf" value="csrf-token-for-tests"' in body
    assert 'href="/static/app.css"' in body and "cdn" not in body.lower()
    code, fragment = web.get("/?fragment=1")
    assert code == 200 and "<html" not in fragment and "j0" in fragment


def test_job_page_shows_steps_as_they_run_and_escapes_what_it_shows(web: Web) -> None:
    web.h.submit()
    web.h.pool.step("j0", "boot", "running", "pid 12 <b>bold</b>")
    code, body = web.get("/jobs/j0?fragment=1")
    assert code == 200
    assert "boot" in body and "running" in body
    assert "&lt;b&gt;bold&lt;/b&gt;" in body and "<b>bold</b>" not in body
    web.h.pool.step("j0", "boot", "passed")
    web.h.pool.step("j0", "wait-ssh", "running")
    _, body = web.get("/jobs/j0?fragment=1")
    assert body.index("boot") < body.index("wait-ssh")
    assert "passed" in body


def test_unknown_job_and_bad_paths_are_not_found(web: Web) -> None:
    assert web.get("/jobs/nope")[0] == 404
    web.h.submit()
    assert web.get("/jobs/j0/files/..%2F..%2Fetc%2Fpasswd")[0] == 404
    assert web.get("/jobs/j0/whatever")[0] == 404


def test_actions_need_the_csrf_token(web: Web) -> None:
    web.h.submit()
    code, why, _ = web.post("/jobs/j0/cancel", {})
    assert code == 403 and "CSRF" in why
    code, why, _ = web.post("/jobs/j0/cancel", {"csrf": "wrong"})
    assert code == 403
    code, why, _ = web.post(
        "/jobs/j0/cancel", {"csrf": TOKEN}, {"Origin": "http://evil.example", "Host": "127.0.0.1"}
    )
    assert code == 403 and "evil.example" in why
    assert web.h.state("j0") == "running"
    code, _, where = web.post("/jobs/j0/cancel", {"csrf": TOKEN})
    assert code == 303 and where == "/jobs/j0"
    web.h.pool.get("j0").finish_cancelled()
    assert web.h.state("j0") == "cancelled"


def test_drain_and_resume_a_backend(web: Web) -> None:
    web.h.submit("b")
    assert web.post("/backends/b/drain", {"csrf": TOKEN})[0] == 303
    assert web.h.s.status_now().backends[0].state == "draining"
    assert web.post("/backends/b/resume", {"csrf": TOKEN})[0] == 303
    assert web.h.s.status_now().backends[0].state == "active"
    assert web.get("/backends/b/drain")[0] == 405


def test_evidence_files_and_suite_results_are_shown(web: Web, tmp_path: Any) -> None:
    import attrs

    evidence = str(tmp_path)
    with open(os.path.join(evidence, "results.json"), "w") as f:
        json.dump(
            {
                "counts": {"passed": 1, "failed": 1},
                "summary": {"makespan": 3.5, "end_spread": 0.2},
                "tests": [
                    {"test_id": "t01", "outcome": "failed", "worker": "worker-1", "duration": 1.0,
                     "message": "exit status 3", "output": "about to fail"},
                    {"test_id": "t02", "outcome": "passed", "worker": "worker-2", "duration": 2.0},
                ],
            },
            f,
        )
    with open(os.path.join(evidence, "console-vm1.log"), "w") as f:
        f.write("kernel says hi")
    with open(os.path.join(evidence, "secret.key"), "w") as f:
        f.write("not for the page")
    web.h.submit()
    web.h.pool.finish("j0", passed=False, error="1 of 2 test(s) did not pass")
    job = web.h.store.sync.get("j0")
    stored = attrs.evolve(job, result=attrs.evolve(job.result, evidence_dir=evidence))
    web.h.store.update(stored)
    _, body = web.get("/jobs/j0")
    assert "t01" in body and "about to fail" in body and "exit status 3" in body
    assert "makespan 3.5s" in body
    assert "/jobs/j0/files/console-vm1.log" in body and "secret.key" not in body
    code, text = web.get("/jobs/j0/files/console-vm1.log")
    assert code == 200 and text == "kernel says hi"
    assert web.get("/jobs/j0/files/secret.key")[0] == 404


def test_failures_page_groups_by_the_fact_asked(web: Web) -> None:
    code, body = web.get("/failures?by=host_kernel&since=2d")
    assert code == 200
    assert "3.8.0-8" in body and "2/2" in body and "0%" in body
    assert "&lt;kernel panic&gt;" in body and '/jobs/j1' in body
    by, since = web.asked[-1]
    assert by == ("host_kernel",) and since == web.h.clock.seconds() - 2 * 86400
    assert "by=qemu" in body  # one click to group by another fact
    code, body = web.get("/failures?by=colour")
    assert code == 400 and "unknown fact" in body


def test_the_event_stream_coalesces_and_ends_with_the_job(web: Web) -> None:
    web.h.submit()
    overview = DummyRequest([b""])
    job = DummyRequest([b""])
    assert web.ui.hub.open(overview, None) and web.ui.hub.open(job, "j0")
    web.h.submit()
    for i in range(50):
        web.h.pool.step("j0", f"step{i}", "running")
    web.h.clock.advance(0.5)
    messages = b"".join(overview.written).count(b"data: changed")
    assert messages == 1  # 51 events, one message
    assert b"".join(job.written).count(b"data: changed") == 1
    web.h.pool.finish("j0")
    web.h.clock.advance(0.5)
    assert b"event: end" in b"".join(job.written) and job.finished
    assert not overview.finished
    web.h.clock.advance(15.0)
    assert b": keepalive" in b"".join(overview.written)
    web.ui.stop()
    assert overview.finished


def test_step_rows_keep_each_run_of_a_step() -> None:
    events = [
        JobEvent("j", 1, 10.0, "step", "running", step="boot"),
        JobEvent("j", 2, 11.0, "step", "running", step="boot", detail="pid 1"),
        JobEvent("j", 3, 12.0, "step", "passed", step="boot"),
        JobEvent("j", 4, 20.0, "step", "running", step="boot"),
        JobEvent("j", 5, 23.0, "step", "failed", step="boot", detail="no disk"),
    ]
    rows = step_rows(events)
    assert [(r.state, r.started, r.ended, r.detail) for r in rows] == [
        ("passed", 10.0, 12.0, "pid 1"),
        ("failed", 20.0, 23.0, "no disk"),
    ]


def test_the_overview_is_rendered_once_per_change(web: Web) -> None:
    web.h.submit()
    calls: list[int] = []
    real = web.h.s.status

    def counting() -> Any:
        calls.append(1)
        return real()

    web.h.s.status = counting  # type: ignore[method-assign]
    for _ in range(5):
        web.get("/?fragment=1")
    assert len(calls) == 1  # twenty pages refetching after one change: one render
    web.h.pool.step("j0", "boot", "running")
    web.get("/")  # a whole page shows every event at once
    assert len(calls) == 2
    web.h.pool.step("j0", "boot", "passed")
    web.get("/?fragment=1")  # live pages were not told of it yet: no render for them
    web.get("/?fragment=1")
    assert len(calls) == 2
    web.ui.hub.flush()  # the change message: the next refetch shows it
    _, body = web.get("/?fragment=1")
    web.get("/?fragment=1")
    assert len(calls) == 3
    web.h.clock.advance(1.5)  # running times move on
    web.get("/?fragment=1")
    assert len(calls) == 4


def test_the_stream_of_a_finished_or_unknown_job_ends_at_once(web: Web) -> None:
    web.h.submit()
    web.h.pool.finish("j0")
    for job_id in ("j0", "nope"):
        req = DummyRequest([b""])
        assert web.ui.hub.open(req, job_id)
        assert b"event: end" in b"".join(req.written) and req.finished
    assert web.ui.hub.streams == []
    _, body = web.get("/jobs/j0")
    assert "data-live" not in body  # a finished job's page follows nothing


def test_a_loopback_site_answers_to_its_own_names_only(web: Web) -> None:
    site = web.ui.site(allowed_hosts=("127.0.0.1:8080", "localhost:8080"))
    http = StubTreq(site.resource)
    web.h.submit()

    def get(host: str) -> int:
        d = http.get("http://127.0.0.1:8080/", headers={"Host": host})
        http.flush()
        return int(_result(d).code)

    assert get("127.0.0.1:8080") == 200 and get("localhost:8080") == 200
    assert get("evil.example:8080") == 421  # DNS rebinding
    d = http.post(
        "http://127.0.0.1:8080/jobs/j0/cancel", data={"csrf": TOKEN}, allow_redirects=False,
        headers={"Host": "127.0.0.1:8080", "Origin": "http://evil.example:8080"},
    )
    http.flush()
    assert _result(d).code == 403
    d = http.post(
        "http://127.0.0.1:8080/jobs/j0/cancel", data={"csrf": TOKEN}, allow_redirects=False,
        headers={"Host": "127.0.0.1:8080", "Origin": "http://127.0.0.1:8080"},
    )
    http.flush()
    assert _result(d).code == 303
