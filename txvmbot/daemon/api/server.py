"""The daemon's side of the AMP API: one :class:`DaemonAMP` per client
connection, answering with an :class:`~txvmbot.daemon.interfaces.IScheduler`.

Nothing a client sends can hurt the daemon or other clients: a bad argument
is a :class:`~txvmbot.daemon.api.protocol.BadRequest`, an error of the scheduler
a typed AMP error, and a bug an :class:`~txvmbot.daemon.api.protocol.InternalError`
(logged with its traceback) — the connection stays up in every case. Only a
box AMP itself cannot parse (a broken frame) drops that one connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, maybeDeferred
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from txvmbot import __version__
from txvmbot.daemon import codec
from txvmbot.daemon.api.protocol import (
    API_VERSION,
    MIN_API_VERSION,
    APIError,
    BadRequest,
    Cancel,
    Drain,
    Failures,
    Fitted,
    Get,
    Hello,
    InternalError,
    JobEventCmd,
    List,
    NotAllowed,
    Resume,
    Status,
    Submit,
    UnknownJobError,
    Unwatch,
    Watch,
    WatchEnded,
    backend_to_dict,
    fit_document,
    fit_report,
    job_summary,
    status_to_dict,
)
from txvmbot.daemon.groupcommit import GroupCommit
from txvmbot.daemon.interfaces import IScheduler
from txvmbot.daemon.jobs import FINAL_STATES, BackendStatus, Job, JobEvent, JobSpec
from txvmbot.errors import ConfigError, TxvmbotError, UnknownJob

__all__ = ["AMPServerFactory", "DaemonAMP"]

#: How many jobs one connection may watch at once.
MAX_WATCHES = 100

_log = Logger(namespace="txvmbot.daemon.api.server")


def _job_doc(job: Job) -> Fitted:
    return fit_document(codec.job_to_dict(job), "result", describe=lambda: f"job {job.id}")


class _Watch:
    """One job watched by one connection: events queue here and go out one
    at a time (the next once the client answered the last), so a slow
    client costs memory for its own queue only and order is kept."""

    def __init__(self, proto: DaemonAMP, job_id: str) -> None:
        self.proto = proto
        self.job_id = job_id
        self.queue: deque[Fitted] = deque()
        self.stop: Callable[[], Any] | None = None
        self.started = False
        self.sending = False
        self.done = False
        self.end_state: str | None = None

    def event(self, event: JobEvent) -> None:
        """The scheduler's listener."""
        if self.done or self.end_state is not None:
            return
        try:
            doc = fit_document(
                codec.event_to_dict(event), "detail", describe=lambda: f"event of job {self.job_id}"
            )
        except Exception:
            # Never raise into the scheduler: this watcher misses one event.
            _log.failure("While encoding an event of job {job_id}", job_id=self.job_id)
        else:
            self.queue.append(doc)
        if event.kind == "state" and event.state in FINAL_STATES:
            self.end_state = event.state
        self.pump()

    def end(self, state: str) -> None:
        if self.end_state is None:
            self.end_state = state
        self.pump()

    def start(self) -> None:
        self.started = True
        self.pump()

    def pump(self) -> None:
        while self.started and not self.sending and not self.done:
            if self.queue:
                self.sending = True
                d = self.proto.callRemote(JobEventCmd, event=self.queue.popleft())
                d.addErrback(self._refused)
                d.addBoth(self._sent)
                return
            if self.end_state is not None:
                state = self.end_state
                self.unsubscribe()
                self.proto._forget(self)
                d = self.proto.callRemote(WatchEnded, job_id=self.job_id, state=state)
                d.addErrback(self._refused)
            return

    def _sent(self, _: object) -> None:
        self.sending = False
        self.pump()

    def _refused(self, f: Failure) -> None:
        if self.proto.connected:
            _log.warn(
                "Client {peer} refused an event of job {job_id}: {why}",
                peer=self.proto.peer,
                job_id=self.job_id,
                why=f.getErrorMessage(),
            )

    def unsubscribe(self) -> None:
        self.done = True
        self.queue.clear()
        stop, self.stop = self.stop, None
        if stop is not None:
            try:
                stop()
            except Exception:
                _log.failure("While unsubscribing from job {job_id}", job_id=self.job_id)


class DaemonAMP(amp.AMP):
    """The server protocol of one client connection."""

    log = _log

    def __init__(
        self, scheduler: Any, daemon_version: str = __version__, pools: Any = None
    ) -> None:
        super().__init__()
        self._scheduler = scheduler
        self._daemon_version = daemon_version
        # The daemon's local VM pools, by name: a job names one, the daemon
        # supplies its settings.
        self._pools = pools if pools is not None else {}
        self._watches: dict[str, _Watch] = {}
        self._starting: list[_Watch] = []
        # The submits of the read being handled: stored with one commit
        # when it ends (see dataReceived), each answered once stored.
        self._submits: GroupCommit[JobSpec, Job | TxvmbotError] = GroupCommit(
            self._submit_many, in_flight=None
        )
        # A box is being handled: a Watch answered now goes out when its
        # handling ends, and its events only after that (ampBoxReceived).
        self._in_box = False
        self.connected = False
        self.peer = "?"

    # --- the connection -----------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.connected = True
        try:
            self.peer = str(self.transport.getPeer())  # type: ignore[union-attr]
        except Exception:
            self.peer = "?"
        self.log.debug("Client connected: {peer}", peer=self.peer)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        watches = list(self._watches.values()) + self._starting
        self._watches.clear()
        self._starting = []
        for w in watches:
            w.unsubscribe()
        self.log.debug(
            "Client {peer} disconnected ({watches} watches ended)",
            peer=self.peer,
            watches=len(watches),
        )
        super().connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        """Handle one read; then store all the submits it held with one
        commit (group commit) and answer them. A commit costs several times
        an insert, so a client that pipelines submits gets them stored many
        to a commit, and none is answered before it is stored."""
        self._submits.hold()
        try:
            super().dataReceived(data)
        finally:
            self._submits.release()

    def _submit_many(self, specs: list[JobSpec]) -> Deferred[Sequence[Job | TxvmbotError]]:
        submitted: Deferred[Sequence[Job | TxvmbotError]] = self._scheduler.submit_many(specs)
        return submitted

    def locateResponder(self, name: bytes) -> Any:
        responder = super().locateResponder(name)
        if responder is None:
            return None  # AMP answers UnhandledCommand; the connection stays up.

        def guarded(box: amp.AmpBox) -> Deferred[Any]:
            d: Deferred[Any] = maybeDeferred(responder, box)
            d.addErrback(self._undecodable, name)
            return d

        return guarded

    def _undecodable(self, f: Failure, name: bytes) -> Failure:
        """Failures AMP would answer with a QuitBox (dropping the
        connection): arguments that did not decode, answers that did not
        encode. Turn them into non-fatal typed errors."""
        if f.check(amp.RemoteAmpError):
            return f
        command = name.decode("ascii", "replace")
        if f.check(BadRequest):
            return Failure(
                amp.RemoteAmpError(b"BAD_REQUEST", f"{command}: {f.getErrorMessage()}", local=f)
            )
        self.log.failure(
            "While answering {command} from {peer}", f, command=command, peer=self.peer
        )
        return Failure(
            amp.RemoteAmpError(
                b"INTERNAL_ERROR",
                f"{command}: internal error in the daemon; its log has the details",
                local=f,
            )
        )

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        if self._submits.waiting and box.get(b"_command") != b"Submit":
            # Keep a pipeline's order: a Drain or Status sent after a Submit
            # sees it stored and queued.
            self._submits.flush()
        self._in_box = True
        try:
            super().ampBoxReceived(box)
        finally:
            self._in_box = False
        # A Watch answered while its box was handled has been sent by now:
        # only now may its events follow.
        starting, self._starting = self._starting, []
        for w in starting:
            if not w.done:
                w.start()

    def unhandledError(self, failure: Failure) -> None:
        """A request that asked for no answer failed: AMP would drop the
        connection; say so in the log and keep serving instead."""
        if failure.check(amp.RemoteAmpError):
            self.log.warn(
                "Client {peer} sent a request that failed and asked for no answer: {why}",
                peer=self.peer,
                why=failure.getErrorMessage(),
            )
            return
        super().unhandledError(failure)

    def _forget(self, w: _Watch) -> None:
        if self._watches.get(w.job_id) is w:
            del self._watches[w.job_id]

    # --- errors -------------------------------------------------------------

    def _translate(self, e: BaseException, command: str, tb: Failure | None = None) -> Exception:
        """The API error to answer with for exception ``e``."""
        if isinstance(e, APIError):
            return e
        if isinstance(e, UnknownJob):
            return UnknownJobError(str(e), e.job_id)
        if isinstance(e, ConfigError):
            return BadRequest(str(e))
        if isinstance(e, CancelledError):
            return NotAllowed(f"{command}: cancelled in the daemon")
        if isinstance(e, TxvmbotError):
            return NotAllowed(str(e))
        self.log.failure(
            "While answering {command} from {peer}",
            tb or Failure(e),
            command=command,
            peer=self.peer,
        )
        return InternalError(f"{command}: internal error in the daemon; its log has the details")

    def _call(
        self,
        command: str,
        fn: Callable[..., Any],
        *args: Any,
        then: Callable[[Any], Any] = lambda r: r,
    ) -> Deferred[Any]:
        """``then(fn(*args))``, with any error (synchronous or not, in
        either) translated to an API error."""

        def translate(f: Failure) -> Failure:
            return Failure(self._translate(f.value or Exception(), command, f))

        d: Deferred[Any] = maybeDeferred(fn, *args)
        d.addCallback(then)
        d.addErrback(translate)
        return d

    # --- responders ---------------------------------------------------------

    @Hello.responder
    def hello(self, api_version: int, client: str) -> dict[str, Any]:
        self.log.debug(
            "Client {peer}: {client}, API {api_version}",
            peer=self.peer,
            client=client,
            api_version=api_version,
        )
        return {
            "api_version": API_VERSION,
            "min_api_version": MIN_API_VERSION,
            "daemon_version": self._daemon_version,
        }

    @Submit.responder
    def submit(self, spec: dict[str, Any]) -> Deferred[dict[str, Any]]:
        def go() -> Deferred[Any]:
            job_spec = codec.spec_from_dict(spec, "spec", self._pools)
            # Outside a read (a box handed over directly) it goes at once.
            return self._submits.add(job_spec).addCallback(_refused)

        return self._call("Submit", go, then=lambda job: {"job": _job_doc(job)})

    @Get.responder
    def get(self, job_id: str) -> Deferred[dict[str, Any]]:
        return self._call(
            "Get", self._scheduler.get, job_id, then=lambda job: {"job": _job_doc(job)}
        )

    @List.responder
    def list_jobs(
        self, states: list[str] | None, backend: str | None, limit: int, before: str | None = None
    ) -> Deferred[dict[str, Any]]:
        wanted = frozenset(states) if states else None

        # One more than asked for tells whether there are more.
        def answer(jobs: Any) -> dict[str, Any]:
            jobs = list(jobs)
            more = len(jobs) > limit
            docs: list[dict[str, Any]] = []
            size = 2
            for job in jobs[:limit]:
                doc = job_summary(job)
                n = len(codec.dumps(doc)) + 1
                if size + n > amp.MAX_VALUE_LENGTH:
                    more = True
                    break
                docs.append(doc)
                size += n
            return {"jobs": docs, "more": more}

        return self._call(
            "List", self._scheduler.list, wanted, backend, limit + 1, before, then=answer
        )

    @Watch.responder
    def watch(self, job_id: str, after_seq: int) -> Deferred[dict[str, Any]]:
        if job_id in self._watches:
            raise NotAllowed(f"job {job_id} is already watched on this connection")
        if len(self._watches) >= MAX_WATCHES:
            raise NotAllowed(
                f"this connection already watches {MAX_WATCHES} jobs; end a watch first"
            )
        w = _Watch(self, job_id)
        self._watches[job_id] = w
        answered: Deferred[dict[str, Any]] = Deferred()

        async def go() -> None:
            await self._scheduler.get(job_id)  # UnknownJob before subscribing
            w.stop = await self._scheduler.watch(job_id, after_seq, w.event)
            job = await self._scheduler.get(job_id)
            if job.final:
                # No event after after_seq says so (the client has seen it).
                w.end(job.state)

        def ready(_: object) -> None:
            # The answer goes out when ``answered`` fires (AMP's callbacks
            # run then), or, while its box is still being handled, when
            # that ends; the events may follow only after it.
            answered.callback({"ok": True})
            if self._in_box:
                self._starting.append(w)
            elif not w.done:
                w.start()

        def failed(f: Failure) -> None:
            w.unsubscribe()
            self._forget(w)
            answered.errback(Failure(self._translate(f.value or Exception(), "Watch", f)))

        ensureDeferred(go()).addCallbacks(ready, failed)
        return answered

    @Unwatch.responder
    def unwatch(self, job_id: str) -> dict[str, Any]:
        w = self._watches.pop(job_id, None)
        if w is None:
            raise UnknownJobError(f"job {job_id} is not watched on this connection", job_id)
        w.unsubscribe()
        return {"ok": True}

    @Cancel.responder
    def cancel(self, job_id: str) -> Deferred[dict[str, Any]]:
        return self._call(
            "Cancel", self._scheduler.cancel, job_id, then=lambda job: {"job": _job_doc(job)}
        )

    def _backend(self, command: str, fn: Callable[[str], Any], backend: str) -> Deferred[Any]:
        def status(result: BackendStatus) -> dict[str, Any]:
            return {"backend": backend_to_dict(result)}

        return self._call(command, fn, backend, then=status)

    @Drain.responder
    def drain(self, backend: str) -> Deferred[dict[str, Any]]:
        return self._backend("Drain", self._scheduler.drain, backend)

    @Resume.responder
    def resume(self, backend: str) -> Deferred[dict[str, Any]]:
        return self._backend("Resume", self._scheduler.resume, backend)

    @Status.responder
    def status(self) -> Deferred[dict[str, Any]]:
        return self._call(
            "Status", self._scheduler.status, then=lambda s: {"status": status_to_dict(s)}
        )

    @Failures.responder
    def failures(self, by: list[str], since: float, limit: int) -> Deferred[dict[str, Any]]:
        return self._call(
            "Failures",
            self._scheduler.failures,
            by,
            since,
            limit,
            then=lambda report: {"report": fit_report(report)},
        )


def _refused(result: Job | TxvmbotError) -> Job:
    """A submit's result: its Job, or the error that refused it alone."""
    if isinstance(result, TxvmbotError):
        raise result
    return result


class AMPServerFactory(Factory):
    """Builds a :class:`DaemonAMP` for each client, all answering with
    ``scheduler``."""

    def __init__(
        self, scheduler: Any, daemon_version: str = __version__, pools: Any = None
    ) -> None:
        if not IScheduler.providedBy(scheduler):
            raise TypeError(
                f"{scheduler!r} does not provide IScheduler; is it marked with "
                "@implementer(IScheduler)?"
            )
        self.scheduler = scheduler
        self.daemon_version = daemon_version
        self.pools = pools

    def buildProtocol(self, addr: Any) -> DaemonAMP:
        p = DaemonAMP(self.scheduler, self.daemon_version, self.pools)
        p.factory = self
        return p
