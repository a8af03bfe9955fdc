"""The worker: one process, one check at a time, driven by the daemon over AMP.

:class:`Worker` is the AMP side: RunJob runs a :class:`~txvmbot.jobs.smoke.Check`
whose journal is the daemon's (:class:`RemoteJournal`) and whose step events
stream back as they happen; CancelJob cancels it (cleanup runs, then RunJob
answers with the cancelled result).

``WorkerChild`` is the same thing as an ampoule ``AMPChild`` (Shutdown, Ping),
the class the pool starts. ampoule's package imports the global reactor when
it is imported, so ``WorkerChild`` is built on first access (a module
``__getattr__``), never when this module is imported: the worker's
bootstrap installs its reactor first.

The worker counts each job's EC2 API attempts (:class:`ApiCallCounter`,
given to the check as its client's ``api_observer``) and sends the counts
with the result, for the daemon's metrics.

The worker writes nothing to stdout; its log goes to stderr as text and the
daemon keeps the tail. Credentials are never in a job: the EC2 client
resolves them from the worker's environment (the daemon's, passed on) or
profile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon import codec
from txvmbot.daemon.workers.protocol import (
    MAX_API_CALL_KINDS,
    MAX_API_CALL_NAME,
    MAX_PENDING_BYTES,
    MAX_RESULT_BYTES,
    ApiCalls,
    CancelJob,
    JobCrashed,
    JournalCreated,
    JournalDone,
    JournalIntend,
    JournalPending,
    MalformedArgument,
    RunJob,
    StepEventCmd,
    WorkerBusy,
    WorkerProtocolError,
    WorkerUp,
    encode_api_calls,
)
from txvmbot.errors import ConfigError
from txvmbot.interfaces import IJournal
from txvmbot.model import CheckResult, JournalEntry, StepEvent

__all__ = ["ApiCallCounter", "RemoteJournal", "Worker", "encode_result"]


class _Check(Protocol):
    check_id: str

    def run(self) -> Deferred[CheckResult]: ...

    def cancel(self, reason: str) -> None: ...


CheckFactory = Callable[..., _Check]


def _default_check_factory(reactor: Any, spec: Any, **kwargs: Any) -> _Check:
    from txvmbot.jobs.suite.spec import SuiteSpec
    from txvmbot.qemu.model import LocalSpec

    # A cloud's machines count their EC2 calls (local VMs make none).
    api_observer = kwargs.pop("api_observer", None)
    if isinstance(spec, SuiteSpec):
        from txvmbot.jobs.suite.job import SuiteJob

        return SuiteJob(reactor, spec, api_observer=api_observer, **kwargs)
    if isinstance(spec, LocalSpec):
        from txvmbot.jobs.smoke import LocalCheck

        return LocalCheck(reactor, spec, **kwargs)
    from txvmbot.jobs.smoke import Check

    return Check(reactor, spec, api_observer=api_observer, **kwargs)


def _warm_up() -> None:
    """Load what every job needs before this worker says it is ready, so a
    worker's first job does not pay for it: bench/daemon_bench.py measured
    a first job reaching its first step after ~700 ms, a later one after
    ~5 ms, the difference being botocore's EC2 model and the imports."""
    import txvmbot.ec2.machines  # noqa: F401
    import txvmbot.jobs.smoke  # noqa: F401
    import txvmbot.qemu.machines  # noqa: F401
    import txvmbot.ssh  # noqa: F401
    from txvmbot.ec2 import _botocore

    _botocore.api_version()


@implementer(IJournal)
class RemoteJournal:
    """The daemon's journal, seen from a worker running ``job_id``.

    Every method returns a Deferred that fires when the daemon has written
    the change to its own journal (on disk). It reads and writes only the
    job's own check: :meth:`pending` of another check, :meth:`checks` and
    :meth:`prune` fail with WorkerProtocolError (the reaper and retention run
    in the daemon, not here).
    """

    def __init__(self, protocol: amp.AMP, job_id: str, check_id: str) -> None:
        self.protocol = protocol
        self.job_id = job_id
        self.check_id = check_id

    def __repr__(self) -> str:
        return f"<RemoteJournal job={self.job_id} check={self.check_id}>"

    def intend(
        self,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None = None,
    ) -> Deferred[JournalEntry]:
        def entry(answer: dict[str, Any]) -> JournalEntry:
            return JournalEntry(
                check_id=check_id,
                seq=answer["seq"],
                kind=kind,
                name=name,
                endpoint=endpoint,
                region=region,
                created=answer["created"],
                parent_id=parent_id,
            )

        return self._call(
            JournalIntend,
            check_id=check_id,
            kind=kind,
            name=name,
            endpoint=endpoint,
            region=region,
            parent_id=parent_id,
        ).addCallback(entry)

    def created(self, entry: JournalEntry, resource_id: str) -> Deferred[JournalEntry]:
        return self._call(JournalCreated, seq=entry.seq, resource_id=resource_id).addCallback(
            lambda _: attrs.evolve(entry, resource_id=resource_id)
        )

    def done(self, entry: JournalEntry) -> Deferred[None]:
        return self._call(JournalDone, seq=entry.seq).addCallback(lambda _: None)

    def pending(self, check_id: str | None = None) -> Deferred[Sequence[JournalEntry]]:
        if check_id is None or check_id != self.check_id:
            return fail(
                WorkerProtocolError(
                    f"a worker reads only its own check's journal ({self.check_id}), "
                    f"not {check_id or 'all checks'}"
                )
            )

        def entries(answer: dict[str, Any]) -> Sequence[JournalEntry]:
            found = codec.loads(answer["entries"], "pending entries", MAX_PENDING_BYTES)
            try:
                return [JournalEntry(**d) for d in found]
            except TypeError as e:
                raise MalformedArgument(f"pending entries: {e}") from None

        return self._call(JournalPending, check_id=check_id).addCallback(entries)

    def checks(self, older_than: float | None = None) -> Deferred[Sequence[str]]:
        return fail(
            WorkerProtocolError("a worker's journal does not list checks; the daemon's reaper does")
        )

    def prune(self, done_before: float, limit: int = 500) -> Deferred[int]:
        return fail(
            WorkerProtocolError("a worker's journal does not prune; the daemon's retention does")
        )

    def close(self) -> None:
        """Nothing to close: the connection belongs to the worker."""

    def _call(self, command: type[amp.Command], **kwargs: Any) -> Deferred[Any]:
        try:
            return self.protocol.callRemote(command, job_id=self.job_id, **kwargs)
        except Exception:  # an argument over its limit: raised before sending
            return fail(Failure())


def encode_result(result: CheckResult, limit: int = MAX_RESULT_BYTES) -> bytes:
    """JSON of ``result``; if it is over ``limit``, command output and
    console logs are cut (the evidence directory keeps them whole) and the
    cut is said in ``error``."""
    data = codec.dumps(codec.result_to_dict(result))
    if len(data) <= limit:
        return data
    keep = 64 * 1024
    cut = attrs.evolve(
        result,
        commands=tuple(
            attrs.evolve(c, stdout=c.stdout[-keep:], stderr=c.stderr[-keep:])
            for c in result.commands
        ),
        console=tuple((k, v[-keep:]) for k, v in result.console),
        error=(result.error + "; " if result.error else "")
        + f"result cut to fit {limit} bytes: command output and console keep their last "
        f"{keep} bytes each",
    )
    data = codec.dumps(codec.result_to_dict(cut))
    if len(data) <= limit:
        return data
    bare = attrs.evolve(cut, commands=(), console=(), error=cut.error + "; output dropped")
    return codec.dumps(codec.result_to_dict(bare))


def _clip(name: str) -> str:
    """``name`` as at most MAX_API_CALL_NAME ASCII characters (it becomes a
    metric label value), never empty."""
    if not name.isascii():
        name = name.encode("ascii", "replace").decode("ascii")
    return name[:MAX_API_CALL_NAME] or "?"


class ApiCallCounter:
    """Counts one job's EC2 API attempts by (action, code): an
    ``api_observer`` for the job's EC2 client. At most MAX_API_CALL_KINDS
    pairs are kept apart; later new ones count under ("other", "other")."""

    def __init__(self, limit: int = MAX_API_CALL_KINDS) -> None:
        self._limit = limit
        self._counts: dict[tuple[str, str], list[int]] = {}

    def __call__(self, action: str, code: str, retrying: bool) -> None:
        key = (_clip(action), _clip(code))
        count = self._counts.get(key)
        if count is None:
            if len(self._counts) >= self._limit:
                key = ("other", "other")
            count = self._counts.setdefault(key, [0, 0])
        count[0] += 1
        if retrying:
            count[1] += 1

    def counts(self) -> tuple[ApiCalls, ...]:
        """What was counted, in the order first seen."""
        return tuple(ApiCalls(a, c, n, r) for (a, c), (n, r) in self._counts.items())


@attrs.define
class _Running:
    job_id: str
    check: _Check


class Worker(amp.AMP):
    """The worker's AMP protocol (without ampoule's Shutdown and Ping: see
    ``WorkerChild``). Runs one job at a time.

    :param reactor: the reactor checks run on; the global one by default,
        looked up when a job starts.
    :param check_factory: builds the check (tests pass a fake);
        :class:`txvmbot.jobs.smoke.Check` by default.
    :param count_api_calls: whether to give the check factory an
        ``api_observer`` keyword (an :class:`ApiCallCounter` per job) and
        send the counts with the result; by default only with the default
        factory (a fake factory need not take the keyword).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        check_factory: CheckFactory | None = None,
        *,
        count_api_calls: bool | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._check_factory = check_factory or _default_check_factory
        self._count_api_calls = (
            check_factory is None if count_api_calls is None else count_api_calls
        )
        self._running: _Running | None = None

    @property
    def running(self) -> str | None:
        """The id of the job running now, or None."""
        return None if self._running is None else self._running.job_id

    def _get_reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @RunJob.responder
    def run_job(
        self, job_id: str, check_id: str, spec: bytes, evidence_root: str
    ) -> Deferred[dict[str, bytes]]:
        if self._running is not None:
            raise WorkerBusy(
                f"cannot run job {job_id}: this worker is running job {self._running.job_id}"
            )
        try:
            job_spec = codec.spec_from_dict(codec.loads(spec, "spec", codec.MAX_SPEC_BYTES))
        except ConfigError as e:
            raise MalformedArgument(f"job {job_id}: {e}") from None
        check_spec = job_spec.check
        journal = RemoteJournal(self, job_id, check_id)
        counter = ApiCallCounter() if self._count_api_calls else None
        extra: dict[str, Any] = {} if counter is None else {"api_observer": counter}
        try:
            check = self._check_factory(
                self._get_reactor(),
                check_spec,
                journal=journal,
                observer=lambda event: self._send_event(job_id, event),
                evidence_root=evidence_root or None,
                check_id=check_id,
                **extra,
            )
        except Exception as e:
            self.log.failure("Cannot start job {job_id}", job_id=job_id)
            raise JobCrashed(f"job {job_id}: cannot start the check: {e!r}") from None
        self._running = _Running(job_id, check)
        self.log.info("Running job {job_id} (check {check_id})", job_id=job_id, check_id=check_id)

        def answered(result: CheckResult) -> dict[str, bytes]:
            self.log.info(
                "Job {job_id} finished: {outcome}",
                job_id=job_id,
                outcome="passed" if result.passed else f"failed: {result.error}",
            )
            answer = {"result": encode_result(result)}
            counts = () if counter is None else counter.counts()
            if counts:
                answer["api_calls"] = encode_api_calls(counts)
            return answer

        def crashed(f: Failure) -> Failure:
            self.log.failure("Job {job_id} crashed", f, job_id=job_id)
            return Failure(JobCrashed(f"job {job_id}: {f.getErrorMessage()}"))

        def over(passthrough: Any) -> Any:
            self._running = None
            return passthrough

        return check.run().addCallbacks(answered, crashed).addBoth(over)

    @WorkerUp.responder
    def hello(self) -> dict[str, int]:
        import os

        _warm_up()
        return {"pid": os.getpid()}

    @CancelJob.responder
    def cancel_job(self, job_id: str, reason: str) -> dict[str, bool]:
        if self._running is None or self._running.job_id != job_id:
            self.log.info("Cancel of job {job_id}: not running here", job_id=job_id)
            return {"cancelling": False}
        self._running.check.cancel(reason)
        return {"cancelling": True}

    def _send_event(self, job_id: str, event: StepEvent) -> None:
        """Stream a step event to the daemon. Called by the check's step
        runner; must not raise. Events go out in order on the one
        connection, ahead of the RunJob answer."""
        try:
            d = self.callRemote(
                StepEventCmd, job_id=job_id, event=codec.dumps(codec.step_event_to_dict(event))
            )
        except Exception:
            self.log.failure("Cannot send step event of job {job_id}", job_id=job_id)
            return
        d.addErrback(
            lambda f: self.log.warn(
                "The daemon refused a step event of job {job_id}: {reason}",
                job_id=job_id,
                reason=f.getErrorMessage(),
            )
        )


_child_class: type[Worker] | None = None


def _build_child_class() -> type[Worker]:
    """``Worker`` plus ampoule's AMPChild: Shutdown (exit cleanly), Ping (the
    pool's readiness probe) and exiting when the daemon's end of the pipe
    closes. Imports ampoule, hence the reactor: call only once the reactor
    is installed."""
    global _child_class
    if _child_class is None:
        from ampoule.child import AMPChild

        class WorkerChild(Worker, AMPChild):
            """A txvmbot worker as an ampoule child process."""

        WorkerChild.__module__ = __name__
        WorkerChild.__qualname__ = "WorkerChild"
        _child_class = WorkerChild
    return _child_class


def __getattr__(name: str) -> Any:
    if name == "WorkerChild":
        return _build_child_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
