"""The status page's twisted.web resources.

Read-only pages (overview, a job, failures by fact), their HTML fragments
for the live parts, server-sent events from the scheduler's event stream,
the static CSS and JavaScript, ``/metrics``, and three POST actions
(cancel a job, drain or resume a backend) that need the page's CSRF token.

Events are coalesced: the scheduler's observer only marks what changed
(O(1) an event); every ``flush_interval`` each open stream gets one message
if something it shows changed. Twenty open pages cost the daemon twenty
small writes a flush, not twenty writes an event.

The scheduler (an IScheduler) answers every read with a Deferred, at once
with SQLite, later with a shared PostgreSQL store
(txvmbot.daemon.scheduling.sharedqueue); a page is written when its answer
fires (:func:`_answer`). With a shared store the hub also follows
the store's event notifications (``scheduler.notice``), so a page on one
daemon follows jobs that run on another.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.static import File

from txvmbot.daemon.jobs import Job, JobEvent
from txvmbot.daemon.scheduling.failures import FailureReport
from txvmbot.daemon.web import pages
from txvmbot.errors import TxvmbotError, UnknownJob

__all__ = ["EventHub", "WebUI"]

T = TypeVar("T")


def _answer(ui: Any, request: Request, result: Deferred[bytes]) -> int:
    """Answer ``request`` with ``result``'s bytes when it fires (unless the
    browser left meanwhile)."""
    gone: list[object] = []
    request.notifyFinish().addBoth(gone.append)

    def done(body: bytes) -> None:
        if not gone:
            request.write(body)
            request.finish()

    def failed(f: Failure) -> None:
        ui.log.failure("While answering {uri}", f, uri=request.uri)
        if not gone:
            request.setResponseCode(http.INTERNAL_SERVER_ERROR)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"internal error in the daemon; its log has the details\n")
            request.finish()

    result.addCallbacks(done, failed)
    return NOT_DONE_YET

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
#: Files of a job's evidence directory the page links to and serves.
EVIDENCE_SUFFIXES = (".log", ".txt", ".json", ".xml", ".subunit")
#: The most of one evidence file the page serves.
MAX_FILE_BYTES = 4 * 1024 * 1024
#: How long a rendered overview serves when no job event came.
OVERVIEW_TTL = 1.0
#: Open event streams at most (each holds a connection).
MAX_STREAMS = 200
HEARTBEAT = 15.0


class _Stream:
    def __init__(self, request: Request, job_id: str | None) -> None:
        self.request = request
        self.job_id = job_id
        self.pending = False
        self.ended = False


class EventHub:
    """Server-sent events for open pages, fed by ``scheduler.observe``."""

    log = Logger()

    def __init__(self, scheduler: Any, clock: Any, flush_interval: float = 0.5) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.flush_interval = flush_interval
        self.streams: list[_Stream] = []
        #: Bumped by every job event: what was rendered at the same
        #: generation is still true (up to its running times).
        self.generation = 0
        #: The generation the last flush told the open pages of: a page
        #: that refetches after a change message needs no newer render.
        self.told = 0
        self._final: set[str] = set()
        self._stop_observing: Callable[[], None] | None = None
        self._stop_noticing: Callable[[], None] | None = None
        # Jobs a notification came for: their streams end if they are final.
        self._noticed_jobs: set[str] = set()
        self._loop: LoopingCall | None = None
        self._beat: LoopingCall | None = None

    def start(self) -> None:
        self._stop_observing = self.scheduler.observe(self._observed)
        notice = getattr(self.scheduler, "notice", None)
        if notice is not None:  # a shared store: jobs of other daemons too
            self._stop_noticing = notice(self._noticed)
        self._loop = LoopingCall(self.flush)
        self._loop.clock = self.clock
        self._loop.start(self.flush_interval, now=False)
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = self.clock
        self._beat.start(HEARTBEAT, now=False)

    def stop(self) -> None:
        if self._stop_observing is not None:
            self._stop_observing()
            self._stop_observing = None
        if self._stop_noticing is not None:
            self._stop_noticing()
            self._stop_noticing = None
        for loop in (self._loop, self._beat):
            if loop is not None and loop.running:
                loop.stop()
        for s in list(self.streams):
            self._end(s)

    def _live(self, job_id: str) -> Deferred[bool]:
        """Whether the job is unfinished (an unknown one is not)."""
        got: Deferred[Job] = self.scheduler.get(job_id)
        return got.addCallbacks(lambda job: not job.final, lambda f: f.trap(UnknownJob) and False)

    def _noticed(self, job_id: str) -> None:
        """The shared store says ``job_id`` has new events (any daemon's)."""
        self.generation += 1
        self._noticed_jobs.add(job_id)
        for s in self.streams:
            if s.job_id is None or s.job_id == job_id:
                s.pending = True

    def _observed(self, job: Job, event: JobEvent) -> None:
        self.generation += 1
        if job.final:
            self._final.add(job.id)
        for s in self.streams:
            if s.job_id is None or s.job_id == job.id:
                s.pending = True

    def open(self, request: Request, job_id: str | None) -> bool:
        """Start an event stream on ``request``; False when too many are open.
        The stream of a job that is over (or unknown) ends at once."""
        if len(self.streams) >= MAX_STREAMS:
            return False
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = _Stream(request, job_id)
        request.notifyFinish().addBoth(lambda _: self._forget(stream))
        live = succeed(True) if job_id is None else self._live(job_id)

        def failed(f: Failure) -> None:
            self.log.failure("Event stream", f)
            self._end(stream)

        live.addCallback(self._started, stream).addErrback(failed)
        return True

    def _started(self, alive: bool, s: _Stream) -> None:
        """Follow ``s`` if its job is alive; else say it is over."""
        if s.ended:  # the browser left meanwhile
            return
        if not alive:
            s.request.write(b"event: end\ndata: final\n\n")
            self._end(s)
            return
        self.streams.append(s)
        s.request.write(b"retry: 2000\n\n")

    def flush(self) -> None:
        self.told = self.generation
        final, self._final = self._final, set()
        noticed, self._noticed_jobs = self._noticed_jobs, set()
        for s in list(self.streams):
            if s.pending:
                s.pending = False
                s.request.write(b"data: changed\n\n")
            if s.job_id is not None and s.job_id in final:
                self._end_final(s)
            elif s.job_id is not None and s.job_id in noticed:
                live = self._live(s.job_id)
                live.addCallback(self._end_unless, s)
                live.addErrback(lambda f: self.log.failure("Event stream", f))

    def _end_unless(self, alive: bool, s: _Stream) -> None:
        if not alive:
            self._end_final(s)

    def _end_final(self, s: _Stream) -> None:
        if not s.ended:
            s.request.write(b"event: end\ndata: final\n\n")
            self._end(s)

    def _heartbeat(self) -> None:
        for s in list(self.streams):
            s.request.write(b": keepalive\n\n")

    def _end(self, s: _Stream) -> None:
        if not s.ended:
            s.ended = True
            self._forget(s)
            s.request.finish()

    def _forget(self, s: _Stream) -> None:
        s.ended = True
        if s in self.streams:
            self.streams.remove(s)


class WebUI:
    """The status page of one daemon. ``site()`` is what its web listeners
    serve; ``start()``/``stop()`` the event stream."""

    log = Logger()

    def __init__(
        self,
        scheduler: Any,
        clock: Any,
        *,
        metrics: Resource | None = None,
        failures: Callable[[tuple[str, ...], float], Deferred[FailureReport]] | None = None,
        csrf: str | None = None,
        wall: Callable[[], float] = time.time,
        flush_interval: float = 0.5,
    ) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self.csrf = csrf or secrets.token_urlsafe(32)
        self.wall = wall
        self.failures = failures
        #: Failure reports shared by identical requests for a while.
        self.reports: dict[Any, Any] = {}
        self.hub = EventHub(scheduler, clock, flush_interval)
        #: The overview's body, rendered once for every open page that asks
        #: after the same change: (generation, until, body).
        self._overview: tuple[int, float, str] | None = None
        root = _Root(self)
        root.putChild(b"static", File(STATIC))
        root.putChild(b"jobs", _Jobs(self))
        root.putChild(b"backends", _Backends(self))
        root.putChild(b"events", _Events(self, None))
        root.putChild(b"failures", _Failures(self))
        if metrics is not None:
            root.putChild(b"metrics", metrics)
        self.root = root

    def site(self, allowed_hosts: tuple[str, ...] = ()) -> Site:
        """A site for one listener; with ``allowed_hosts`` it answers only
        requests whose Host (and Origin, if any) is one of them."""
        root: Resource = self.root
        if allowed_hosts:
            root = _HostCheck(self.root, frozenset(allowed_hosts))
        site = Site(root)
        site.displayTracebacks = False
        return site

    def start(self) -> None:
        self.hub.start()

    def stop(self) -> None:
        self.hub.stop()

    # -- helpers shared by the resources ------------------------------------

    def html(self, request: Request, title: str, body: str) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"content-security-policy", b"default-src 'self'")
        if _arg(request, "fragment"):
            return body.encode("utf-8")
        return pages.page(title, body, self.csrf)

    def check_post(self, request: Request) -> str | None:
        """Why a POST is refused, or None: it must carry the page's CSRF
        token, and come from this site if the browser says where from."""
        token = _arg(request, "csrf")
        if not hmac.compare_digest(token.encode(), self.csrf.encode()):
            return "missing or wrong CSRF token: use the buttons of the page"
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        allowed = getattr(request, "txvmbot_hosts", None) or {host}
        if origin and urlsplit(origin).netloc not in allowed:
            return f"a request from {origin} is not this page's"
        return None

    def overview_body(self, live: bool = False) -> Deferred[str]:
        """The overview, rendered again only after a job event or a second
        (its running times). A ``live`` page's refetch (``?fragment=1``,
        after a change message) needs only what the last change message told
        of: live pages cost one render per message (every flush interval at
        most), not one per job event since, however busy the daemon
        (bench/web_bench.py)."""
        now = self.clock.seconds()
        cached = self._overview
        fresh = self.hub.told if live else self.hub.generation
        if cached is not None and cached[0] >= fresh and now < cached[1]:
            return succeed(cached[2])
        generation = self.hub.generation
        parts: list[Deferred[Any]] = [
            self.scheduler.status(),
            self.scheduler.list(states={"running", "cleaning"}, limit=200),
            self.scheduler.list(limit=20),
        ]

        def render(parts: list[Any]) -> str:
            status, running, recent = parts
            body = pages.overview(status, running, recent, self.wall(), self.csrf)
            self._overview = (generation, now + OVERVIEW_TTL, body)
            return body

        return gatherResults(parts, consumeErrors=True).addCallback(render)

    def job(self, job_id: str) -> Deferred[Job | None]:
        """The Job, or None for an unknown one."""
        got: Deferred[Job | None] = self.scheduler.get(job_id)
        return got.addErrback(lambda f: f.trap(UnknownJob) and None)

    def job_events(self, job_id: str) -> Deferred[list[JobEvent]]:
        """The job's events so far."""
        events: list[JobEvent] = []

        def stopped(stop: Callable[[], None]) -> list[JobEvent]:
            stop()
            return events

        watching: Deferred[Callable[[], None]] = self.scheduler.watch(job_id, 0, events.append)
        return watching.addCallback(stopped)


class _HostCheck(Resource):
    """The root of a loopback listener's site: a request must name one of
    ``hosts`` (a page on 127.0.0.1 reached as evil.example, after DNS
    rebinding, must not answer)."""

    def __init__(self, root: Resource, hosts: frozenset[str]) -> None:
        super().__init__()
        self.root = root
        self.hosts = hosts

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if host not in self.hosts:
            return _Misdirected(host, self.hosts)
        request.txvmbot_hosts = self.hosts  # type: ignore[attr-defined]
        return self.root.getChildWithDefault(path, request)


class _Misdirected(Resource):
    isLeaf = True

    def __init__(self, host: str, hosts: frozenset[str]) -> None:
        super().__init__()
        self.host = host
        self.hosts = hosts

    def render(self, request: Request) -> bytes:
        names = " or ".join(sorted(self.hosts))
        return _refuse(request, 421, f"this page answers to {names}, not {self.host!r}")


def _arg(request: Request, name: str) -> str:
    values = (request.args or {}).get(name.encode(), [])
    return values[0].decode("utf-8", "replace") if values else ""


def _refuse(request: Request, code: int, why: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return (why + "\n").encode("utf-8")


class _Root(Resource):
    def __init__(self, ui: WebUI) -> None:
        super().__init__()
        self.ui = ui

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return super().getChild(path, request)

    def render_GET(self, request: Request) -> bytes | int:
        ui = self.ui

        def page(body: str) -> bytes:
            if _arg(request, "fragment"):
                return ui.html(request, "overview", body)
            return ui.html(request, "overview", pages.live("/events", "/?fragment=1", body))

        return _answer(ui, request, ui.overview_body(live=bool(_arg(request, "fragment"))).addCallback(page))


class _Events(Resource):
    isLeaf = True

    def __init__(self, ui: WebUI, job_id: str | None) -> None:
        super().__init__()
        self.ui = ui
        self.job_id = job_id

    def render_GET(self, request: Request) -> bytes | int:
        if not self.ui.hub.open(request, self.job_id):
            return _refuse(request, http.SERVICE_UNAVAILABLE, "too many open event streams")
        return NOT_DONE_YET


class _Jobs(Resource):
    def __init__(self, ui: WebUI) -> None:
        super().__init__()
        self.ui = ui

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Job(self.ui, path.decode("utf-8", "replace"))


class _Job(Resource):
    def __init__(self, ui: WebUI, job_id: str) -> None:
        super().__init__()
        self.ui = ui
        self.job_id = job_id

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        if path == b"events":
            return _Events(self.ui, self.job_id)
        if path == b"cancel":
            return _Action(self.ui, lambda: self.ui.scheduler.cancel(
                self.job_id, "cancelled from the web page"), f"/jobs/{self.job_id}")
        if path == b"files":
            return _Files(self.ui, self.job_id)
        return _NotFound(f"{self.job_id}/{path.decode('utf-8', 'replace')}")

    def render_GET(self, request: Request) -> bytes | int:
        def found(job: Job | None) -> Any:
            if job is None:
                request.setResponseCode(http.NOT_FOUND)
                return pages.not_found(f"no job {self.job_id}")
            return self.ui.job_events(job.id).addCallback(
                lambda events: self._page(request, job, events)
            )

        return _answer(self.ui, request, self.ui.job(self.job_id).addCallback(found))

    def _page(self, request: Request, job: Job, events: list[JobEvent]) -> bytes:
        where = job.result.evidence_dir if job.result is not None else None
        suite = _suite_results(where)
        files = _evidence_files(where)
        body = pages.job_page(job, events, self.ui.wall(), self.ui.csrf, suite=suite, files=files)
        if _arg(request, "fragment"):
            return self.ui.html(request, f"job {job.id}", body)
        if job.final:  # nothing more to follow
            return self.ui.html(request, f"job {job.id}", body)
        base = f"/jobs/{job.id}"
        return self.ui.html(request, f"job {job.id}", pages.live(f"{base}/events", f"{base}?fragment=1", body))


def _evidence_files(where: str | None) -> list[str]:
    if not where or not os.path.isdir(where):
        return []
    try:
        return sorted(f for f in os.listdir(where) if f.endswith(EVIDENCE_SUFFIXES))
    except OSError:
        return []


def _suite_results(where: str | None) -> Any:
    if not where:
        return None
    path = os.path.join(where, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {"counts": doc.get("counts"), "summary": doc.get("summary"), "tests": doc.get("tests")}


class _Files(Resource):
    def __init__(self, ui: WebUI, job_id: str) -> None:
        super().__init__()
        self.ui = ui
        self.job_id = job_id

    def getChild(self, path: bytes, request: Request) -> Resource:
        return _Evidence(self.ui, self.job_id, path.decode("utf-8", "replace"))


class _Evidence(Resource):
    """One file a job kept, once the job is known to have listed it."""

    isLeaf = True

    def __init__(self, ui: WebUI, job_id: str, name: str) -> None:
        super().__init__()
        self.ui = ui
        self.job_id = job_id
        self.name = name

    def render_GET(self, request: Request) -> bytes | int:
        def found(job: Job | None) -> bytes:
            if job is None:
                return _NotFound(f"no job {self.job_id}").render(request)
            where = job.result.evidence_dir if job.result is not None else None
            # Only files the page lists: no path of the request reaches the disk.
            if self.name not in _evidence_files(where):
                return _NotFound(f"job {self.job_id} kept no {self.name}").render(request)
            assert where is not None
            return _EvidenceFile(os.path.join(where, self.name)).render_GET(request)

        return _answer(self.ui, request, self.ui.job(self.job_id).addCallback(found))


class _EvidenceFile(Resource):
    """One kept file, whole up to :data:`MAX_FILE_BYTES` (a console log, a
    JUnit file), as text, or bytes for a subunit stream."""

    isLeaf = True

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Request) -> bytes:
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_FILE_BYTES and self.path.endswith(".log"):
                    # A console log's end is what explains a failure.
                    f.seek(size - MAX_FILE_BYTES)
                    data = b"[the first %d bytes are cut]\n" % (size - MAX_FILE_BYTES) + f.read()
                elif size > MAX_FILE_BYTES:
                    return _refuse(
                        request,
                        http.REQUEST_ENTITY_TOO_LARGE,
                        f"{size} bytes, more than the page serves; it is {self.path} "
                        "on the daemon's host",
                    )
                else:
                    data = f.read(MAX_FILE_BYTES)
        except OSError as err:
            return _refuse(request, http.NOT_FOUND, f"cannot read it: {err.strerror}")
        binary = self.path.endswith(".subunit")
        request.setHeader(
            b"content-type", b"application/octet-stream" if binary else b"text/plain; charset=utf-8"
        )
        request.setHeader(b"x-content-type-options", b"nosniff")
        return data


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def render(self, request: Request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        return pages.not_found(self.what)


class _Backends(Resource):
    def __init__(self, ui: WebUI) -> None:
        super().__init__()
        self.ui = ui

    def getChild(self, path: bytes, request: Request) -> Resource:
        name = path.decode("utf-8", "replace")
        return _Backend(self.ui, name)


class _Backend(Resource):
    def __init__(self, ui: WebUI, name: str) -> None:
        super().__init__()
        self.ui = ui
        self.name = name

    def getChild(self, path: bytes, request: Request) -> Resource:
        s = self.ui.scheduler
        if path == b"drain":
            return _Action(self.ui, lambda: s.drain(self.name), "/")
        if path == b"resume":
            return _Action(self.ui, lambda: s.resume(self.name), "/")
        return _NotFound(f"backends/{self.name}/{path.decode('utf-8', 'replace')}")


class _Action(Resource):
    """A POST that changes something: checked, started, and answered with
    a redirect at once (a cancel waits for cleanup; the page follows it
    live)."""

    isLeaf = True

    def __init__(self, ui: WebUI, act: Callable[[], Deferred[Any]], back: str) -> None:
        super().__init__()
        self.ui = ui
        self.act = act
        self.back = back

    def render_POST(self, request: Request) -> bytes:
        why = self.ui.check_post(request)
        if why is not None:
            return _refuse(request, http.FORBIDDEN, why)
        try:
            outcome = self.act()
        except (UnknownJob, TxvmbotError) as e:
            return _refuse(request, http.BAD_REQUEST, str(e))
        outcome.addErrback(self._failed)
        request.setResponseCode(http.SEE_OTHER)
        request.setHeader(b"location", self.back.encode("utf-8"))
        return b""

    def _failed(self, f: Failure) -> None:
        self.ui.log.failure("A web page action failed", f)

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"allow", b"POST")
        return _refuse(request, http.NOT_ALLOWED, "use the page's button (POST)")


class _Failures(Resource):
    isLeaf = True

    def __init__(self, ui: WebUI) -> None:
        super().__init__()
        self.ui = ui

    def render_GET(self, request: Request) -> bytes | int:
        from txvmbot.daemon.web.failures_page import render_failures

        return render_failures(self.ui, request)
