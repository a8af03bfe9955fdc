"""The daemon's pool of worker processes, built on ampoule's process machinery.

From ampoule we use the parts that start and talk to a child: its
``ProcessStarter`` (with our bootstrap, our Python, our reactor), its
``AMPConnector`` (AMP over the child's fds 3 and 4), its ``AMPChild``
(Shutdown) and its commands. We do not use ``ampoule.pool.ProcessPool``:
it picks the child for a call itself (a cancel could not reach the worker
running the job), schedules its timers on the global reactor, and tells of a
dead worker only at info level. Here each worker is known by the job it runs.

ampoule's package imports the global reactor when it is imported, and the
daemon imports this module before its reactor is chosen: ampoule is imported
only inside methods that run once the reactor runs.

A worker that dies while it runs a job (killed, crashed, exited) fails the
job's Deferred with :class:`~txvmbot.errors.WorkerDied` (exit status or
signal, and the last lines it wrote to stderr; its ``kind`` is
``FailureKind.INFRASTRUCTURE``) and is logged at error level
with the same facts; the pool starts a new worker in its place.

Two optional hooks feed the daemon's metrics: ``on_worker_death`` is told
of each worker that died unasked, ``on_api_calls`` of the EC2 API calls a
job's worker counted (sent with its result).
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ProcessDone, ProcessTerminated
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from txvmbot.daemon import codec
from txvmbot.daemon.interfaces import IWorkerPool
from txvmbot.daemon.jobs import Job, check_id_for
from txvmbot.daemon.workers.protocol import (
    MAX_EVENT_BYTES,
    MAX_RESULT_BYTES,
    ApiCalls,
    CancelJob,
    JournalCreated,
    JournalDone,
    JournalIntend,
    JournalPending,
    JournalWriteFailed,
    MalformedArgument,
    RunJob,
    StepEventCmd,
    UnknownJobError,
    WorkerProtocolError,
    WorkerUp,
    decode_api_calls,
)
from txvmbot.errors import ConfigError, TxvmbotError, WorkerDied
from txvmbot.model import CheckResult, Facts, FailureKind, JournalEntry, StepEvent

__all__ = [
    "AmpoulePool",
    "PoolError",
    "PoolFull",
    "PoolNotRunning",
    "WorkerInfo",
    "WorkerStartFailed",
    "describe_exit",
]

#: How many lines of a worker's stderr are kept for WorkerDied.
STDERR_TAIL_LINES = 20
_MAX_LINE = 2000

_STEP_STATES = frozenset({"running", "passed", "failed", "timeout", "cancelled", "skipped"})


class PoolError(TxvmbotError):
    """The pool cannot take or run a job; the message says why."""


class PoolFull(PoolError):
    """run() was called with every worker busy (the scheduler must call it
    only while ``busy < size``)."""


class PoolNotRunning(PoolError):
    """run() before start() or after stop()."""


class WorkerStartFailed(PoolError):
    """A worker process exited before it answered its first WorkerUp."""

    def __init__(self, worker: str, status: str, stderr_tail: str = "") -> None:
        tail = f"; last stderr:\n{stderr_tail}" if stderr_tail else ""
        super().__init__(f"worker {worker} exited while starting: {status}{tail}")
        self.worker = worker
        self.status = status
        self.stderr_tail = stderr_tail


def describe_exit(reason: Failure) -> str:
    """``"exit status 3"``, ``"killed by signal 9 (SIGKILL)"``..."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            name = signal.Signals(value.signal).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {value.signal} ({name})"
    if isinstance(value, ProcessTerminated | ProcessDone) and value.exitCode is not None:
        return f"exit status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


@frozen
class WorkerInfo:
    """What the pool knows about one worker, for status and tests."""

    name: str
    pid: int | None
    state: str
    job_id: str | None
    jobs_run: int


_WorkerState = Literal["starting", "ready", "busy", "stopping", "dead"]


@attrs.define(eq=False)
class _JobRun:
    job_id: str
    check_id: str
    on_event: Callable[[StepEvent], Any]
    journal: Any
    spec: bytes
    result: Deferred[CheckResult]
    worker: _Worker | None = None
    entries: dict[int, JournalEntry] = attrs.Factory(dict)
    timer: Any = None
    finished: bool = False
    killed_because: str = ""


@attrs.define(eq=False)
class _Worker:
    name: str
    parent: _ParentAMP
    connector: Any = None
    state: _WorkerState = "starting"
    job: _JobRun | None = None
    jobs_run: int = 0
    ended: Deferred[None] = attrs.Factory(Deferred)
    ready: Deferred[None] = attrs.Factory(Deferred)
    tail: collections.deque[str] = attrs.Factory(
        lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    partial: bytes = b""
    #: The process's pid, kept from its start: Twisted's process transport
    #: forgets it (sets it to None) before it tells of the exit, and the
    #: line that logs a death must still name it.
    pid: int | None = None

    def stderr_tail(self) -> str:
        lines = list(self.tail)
        if self.partial:
            lines.append(self.partial.decode("utf-8", "replace")[:_MAX_LINE])
        return "\n".join(lines[-STDERR_TAIL_LINES:])


class _ParentAMP(amp.AMP):
    """The daemon's end of one worker's connection: answers the worker's
    step events and journal commands for the job it runs now, and nothing
    about any other job."""

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.worker: _Worker | None = None

    def _job(self, job_id: str, check_id: str | None = None) -> _JobRun:
        run = None if self.worker is None else self.worker.job
        if run is None or run.job_id != job_id or run.finished:
            raise UnknownJobError(f"job {job_id} is not running on this worker")
        if check_id is not None and check_id != run.check_id:
            raise UnknownJobError(f"job {job_id} runs check {run.check_id}, not {check_id}")
        return run

    def _entry(self, run: _JobRun, seq: int) -> JournalEntry:
        try:
            return run.entries[seq]
        except KeyError:
            raise MalformedArgument(
                f"check {run.check_id} has no journal entry {seq} known to this worker"
            ) from None

    def _write(self, run: _JobRun, what: str, call: Callable[[], Any]) -> Deferred[Any]:
        def failed(f: Failure) -> Failure:
            self.log.error(
                "Journal write for job {job_id} failed ({what}): {reason}",
                job_id=run.job_id,
                what=what,
                reason=f.getErrorMessage(),
            )
            return Failure(JournalWriteFailed(f"{what}: {f.getErrorMessage()}"))

        return maybeDeferred(call).addErrback(failed)

    @StepEventCmd.responder
    def step_event(self, job_id: str, event: bytes) -> dict[str, Any]:
        run = self._job(job_id)
        try:
            data = codec.loads(event, "step event", MAX_EVENT_BYTES)
            step = codec.step_event_from_dict(data)
            if step.state not in _STEP_STATES or not isinstance(step.name, str):
                raise ConfigError("step event", f"unknown state {step.state!r}")
        except ConfigError as e:
            raise MalformedArgument(str(e)) from None
        try:
            run.on_event(step)
        except Exception:
            self.log.failure("Event listener of job {job_id} failed", job_id=job_id)
        return {}

    @JournalIntend.responder
    def journal_intend(
        self,
        job_id: str,
        check_id: str,
        kind: str,
        name: str,
        endpoint: str,
        region: str,
        parent_id: str | None,
    ) -> Deferred[dict[str, Any]]:
        run = self._job(job_id, check_id)

        def written(entry: JournalEntry) -> dict[str, Any]:
            run.entries[entry.seq] = entry
            return {"seq": entry.seq, "created": entry.created}

        return self._write(
            run,
            f"intend {kind} {name}",
            lambda: run.journal.intend(check_id, kind, name, endpoint, region, parent_id),
        ).addCallback(written)

    @JournalCreated.responder
    def journal_created(self, job_id: str, seq: int, resource_id: str) -> Deferred[dict[str, Any]]:
        run = self._job(job_id)
        entry = self._entry(run, seq)

        def written(new: JournalEntry) -> dict[str, Any]:
            run.entries[seq] = new
            return {}

        return self._write(
            run,
            f"record {entry.kind} {resource_id}",
            lambda: run.journal.created(entry, resource_id),
        ).addCallback(written)

    @JournalDone.responder
    def journal_done(self, job_id: str, seq: int) -> Deferred[dict[str, Any]]:
        run = self._job(job_id)
        entry = self._entry(run, seq)

        def written(_: object) -> dict[str, Any]:
            run.entries[seq] = attrs.evolve(entry, done=True)
            return {}

        return self._write(
            run,
            f"mark {entry.kind} {entry.resource_id or entry.name} done",
            lambda: run.journal.done(entry),
        ).addCallback(written)

    @JournalPending.responder
    def journal_pending(self, job_id: str, check_id: str) -> Deferred[dict[str, Any]]:
        run = self._job(job_id, check_id)

        def read(entries: list[JournalEntry]) -> dict[str, Any]:
            for e in entries:
                run.entries[e.seq] = e
            return {"entries": codec.dumps([attrs.asdict(e) for e in entries])}

        return self._write(
            run, f"read the pending entries of check {check_id}", lambda: run.journal.pending(check_id)
        ).addCallback(read)


def _ampoule() -> tuple[type[Any], type[Any]]:
    """ampoule's ProcessStarter and AMPConnector, subclassed to use our
    reactor and Python and to report stderr and exit to the pool. Imported
    here, not at module level: importing ampoule imports the reactor."""
    from ampoule.main import FROM_CHILD, TO_CHILD, AMPConnector, ProcessStarter

    class Connector(AMPConnector):
        def __init__(self, proto: _ParentAMP, worker: _Worker, pool: AmpoulePool) -> None:
            super().__init__(proto, name=worker.name)
            self.worker = worker
            self.pool = pool

        def errReceived(self, data: bytes) -> None:
            self.pool._stderr(self.worker, data)

        def processEnded(self, status: Failure) -> None:
            # Tell the pool first, so a job's Deferred fails with WorkerDied
            # before AMP fails the RunJob call with the bare ProcessTerminated.
            self.pool._ended(self.worker, status)
            self.amp.connectionLost(status)

    class Starter(ProcessStarter):
        def __init__(self, reactor: Any, python: str, **kw: Any) -> None:
            super().__init__(**kw)
            self.reactor = reactor
            self.python = python

        def start_worker(self, connector: Any, child_class: type[Any]) -> None:
            """Start one worker speaking AMP through ``connector``."""
            from twisted.python import reflect

            self._checkRoundTrip(child_class)
            self.startPythonProcess(connector, self.childReactor, reflect.qual(child_class))

        def startPythonProcess(self, prot: Any, *args: str) -> Any:
            self.reactor.spawnProcess(
                prot,
                self.python,
                (self.python, "-c", self.bootstrap, *self.args, *args),
                env=self.env,
                path=self.path,
                childFDs={0: "w", 1: "r", 2: "r", TO_CHILD: "w", FROM_CHILD: "r"},
            )
            return prot.amp, prot.finished

    return Starter, Connector


@implementer(IWorkerPool)
class AmpoulePool:
    """``size`` worker processes, each running one job at a time.

    :param reactor: runs the processes and the timers.
    :param size: how many workers (and so how many jobs at once).
    :param recycle_after: a worker is replaced after this many jobs (0:
        never).
    :param evidence_root: where workers keep the evidence of failed checks.
    :param env: the workers' environment (credentials for the EC2 client
        come from it); the daemon's own by default. txvmbot's directory is
        put first on its PYTHONPATH.
    :param python: the interpreter the workers run.
    :param job_timeout: a backstop: a job that runs longer is ended by
        killing its worker (SIGKILL; the job fails with WorkerDied; the
        journal keeps what it created for the next cleanup or the reaper).
        The scheduler's own per-job bound, which cancels and so cleans up,
        should be the shorter.
    :param bootstrap: the workers' ``python -c`` program; txvmbot's
        (:data:`txvmbot.daemon.workers.bootstrap.BOOTSTRAP`) by default. Tests
        pass ampoule's to show what it does.
    :param stop_timeout: how long stop() waits for a worker to exit (and
        for running jobs to clean up after their cancel) before killing it.
    :param on_worker_death: called with the id of the job a worker ran, or
        None, each time a worker dies unasked (killed, crashed, exited while
        running a job, starting or idle); not for a worker that exits when
        told to (stop, recycling).
    :param on_api_calls: called with a job's id and the EC2 API calls its
        worker counted (:class:`~txvmbot.daemon.workers.protocol.ApiCalls`),
        when the worker sent any with the result.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        size: int,
        recycle_after: int,
        evidence_root: str,
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        job_timeout: float | None = None,
        bootstrap: str | None = None,
        stop_timeout: float = 60.0,
        on_worker_death: Callable[[str | None], object] | None = None,
        on_api_calls: Callable[[str, Sequence[ApiCalls]], object] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if recycle_after < 0:
            raise ValueError(f"recycle_after must be 0 (never) or more, got {recycle_after}")
        if job_timeout is not None and not job_timeout > 0:
            raise ValueError(f"job_timeout must be positive, got {job_timeout}")
        self.reactor = reactor
        self._size = size
        self.recycle_after = recycle_after
        self.evidence_root = evidence_root
        self.env = dict(os.environ if env is None else env)
        self.python = python
        self.job_timeout = job_timeout
        self.bootstrap = bootstrap
        self.stop_timeout = stop_timeout
        self.on_worker_death = on_worker_death
        self.on_api_calls = on_api_calls
        self._workers: list[_Worker] = []
        self._jobs: dict[str, _JobRun] = {}
        self._waiting: collections.deque[_JobRun] = collections.deque()
        self._state: Literal["new", "starting", "running", "stopping", "stopped"] = "new"
        self._counter = 0
        self._start_failures = 0
        self._respawn_call: Any = None
        self._starter: Any = None
        self._connector_class: Any = None

    def __repr__(self) -> str:
        return f"<AmpoulePool {self._state} size={self._size} busy={self.busy}>"

    # -- IWorkerPool -------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def busy(self) -> int:
        """Jobs accepted and not finished (running, or waiting for a worker
        that is being replaced)."""
        return len(self._jobs)

    def start(self) -> Deferred[None]:
        """Start ``size`` workers; fire when each answered a WorkerUp. Fails
        with WorkerStartFailed if one exits first (call stop() then)."""
        if self._state != "new":
            raise PoolError(f"the pool was already started (it is {self._state})")
        self._state = "starting"
        Starter, Connector = _ampoule()
        from txvmbot.daemon.workers import bootstrap

        self._connector_class = Connector
        self._starter = Starter(
            self.reactor,
            self.python,
            bootstrap=self.bootstrap or bootstrap.BOOTSTRAP,
            env=self._child_env(),
            childReactor="default",
        )
        workers = [self._spawn() for _ in range(self._size)]

        def all_ready(_: object) -> None:
            if self._state != "starting":
                raise PoolNotRunning("the pool was stopped while its workers started")
            self._state = "running"
            self.log.info("Worker pool started: {size} workers", size=self._size)
            self._dispatch()

        def failed(f: Failure) -> Failure:
            if self._state != "starting":
                # stop() was called meanwhile and shuts the workers down;
                # none is replaced.
                return Failure(PoolNotRunning("the pool was stopped while its workers started"))
            self._state = "running"  # so that stop() stops the others
            first: Any = f.value  # a FirstError
            return first.subFailure

        return DeferredList(
            [w.ready for w in workers], fireOnOneErrback=True, consumeErrors=True
        ).addCallbacks(all_ready, failed)

    def run(
        self,
        job: Job,
        on_event: Callable[[StepEvent], Any],
        journal: Any,
    ) -> Deferred[CheckResult]:
        """Run ``job`` in a free worker; see IWorkerPool.run.

        Raises PoolFull if ``busy >= size`` and PoolNotRunning before
        start() or after stop(), synchronously. The Deferred fires with the
        CheckResult (a cancelled job's too) or fails with WorkerDied.
        """
        if self._state != "running":
            raise PoolNotRunning(f"the worker pool is {self._state}; cannot run job {job.id}")
        if self.busy >= self._size:
            raise PoolFull(
                f"all {self._size} workers are busy; job {job.id} must wait for one "
                f"(running: {', '.join(sorted(self._jobs))})"
            )
        if job.id in self._jobs:
            raise PoolError(f"job {job.id} is already running in the pool")
        spec = codec.dumps(codec.spec_to_dict(job.spec))
        run = _JobRun(
            job_id=job.id,
            check_id=check_id_for(job),
            on_event=on_event,
            journal=journal,
            spec=spec,
            result=Deferred(),
        )
        self._jobs[job.id] = run
        self._waiting.append(run)
        self._dispatch()
        return run.result

    def cancel(self, job_id: str, reason: str) -> None:
        """Cancel a job of this pool. Running: the worker cancels the check,
        cleans up, and run()'s Deferred fires with the cancelled result.
        Waiting for a worker: it fires with a cancelled result now. A job
        the pool does not have (finished already) is ignored."""
        run = self._jobs.get(job_id)
        if run is None:
            self.log.info("Cancel of job {job_id}: not in the pool", job_id=job_id)
        elif run.worker is None:
            self._waiting.remove(run)
            self._finish(run, _cancelled_result(run.check_id, reason))
        else:
            self._send_cancel(run, reason)

    def stop(self) -> Deferred[None]:
        """Cancel running jobs (they clean up), shut every worker down and
        fire when all have exited. A worker that does not exit within
        ``stop_timeout`` is killed."""
        if self._state in ("stopping", "stopped"):
            return succeed(None)
        self._state = "stopping"
        if self._respawn_call is not None and self._respawn_call.active():
            self._respawn_call.cancel()
        while self._waiting:
            run = self._waiting.popleft()
            self._finish(run, Failure(PoolNotRunning(f"the pool stopped before job {run.job_id} ran")))
        for run in list(self._jobs.values()):
            self._send_cancel(run, "the daemon is stopping")
        ds = []
        for w in list(self._workers):
            if w.state in ("ready", "starting"):
                self._shutdown(w)
            ds.append(self._bounded(w))

        def stopped(_: object) -> None:
            self._state = "stopped"
            self.log.info("Worker pool stopped")

        return DeferredList(ds, consumeErrors=True).addCallback(stopped)

    # -- introspection -----------------------------------------------------

    def workers(self) -> tuple[WorkerInfo, ...]:
        return tuple(
            WorkerInfo(
                name=w.name,
                pid=w.pid,
                state=w.state,
                job_id=None if w.job is None else w.job.job_id,
                jobs_run=w.jobs_run,
            )
            for w in self._workers
        )

    def pid_of(self, job_id: str) -> int | None:
        """The pid of the worker running ``job_id``, if one is."""
        run = self._jobs.get(job_id)
        return None if run is None or run.worker is None else run.worker.pid

    # -- workers -------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        import txvmbot
        from txvmbot.daemon.workers.bootstrap import PARENT_ENV

        env = dict(self.env)
        # The workers die with this process (see txvmbot.daemon.workers.bootstrap).
        env[PARENT_ENV] = str(os.getpid())
        ours = os.path.dirname(os.path.dirname(os.path.abspath(txvmbot.__file__)))
        paths = [ours] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ours]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def _spawn(self) -> _Worker:
        from txvmbot.daemon.workers import worker as worker_module

        self._counter += 1
        parent = _ParentAMP()
        w = _Worker(name=f"w{self._counter}", parent=parent)
        parent.worker = w
        self._workers.append(w)
        w.connector = self._connector_class(parent, w, self)
        self._starter.start_worker(w.connector, worker_module.WorkerChild)
        w.pid = w.connector.transport.pid
        self.log.info("Worker {worker} started (pid {pid})", worker=w.name, pid=w.pid)

        def pong(_: object) -> None:
            if w.state == "starting":
                w.state = "ready"
                self._start_failures = 0
                w.ready.callback(None)
                self._dispatch()

        def no_pong(f: Failure) -> None:
            if not w.ready.called:
                # The process is gone or going: _ended fails w.ready.
                self.log.debug("Worker {worker} did not answer WorkerUp: {f}", worker=w.name, f=f)

        parent.callRemote(WorkerUp).addCallbacks(pong, no_pong)
        return w

    def _stderr(self, w: _Worker, data: bytes) -> None:
        data = w.partial + data
        *lines, w.partial = data.split(b"\n")
        if len(w.partial) > _MAX_LINE:
            lines.append(w.partial)
            w.partial = b""
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip()[:_MAX_LINE]
            if not line:
                continue
            w.tail.append(line)
            self.log.info("[{worker}] {line}", worker=w.name, line=line)

    def _ended(self, w: _Worker, status: Failure) -> None:
        how = describe_exit(status)
        tail = w.stderr_tail()
        expected = w.state == "stopping" and w.job is None
        was = w.state
        w.state = "dead"
        if w in self._workers:
            self._workers.remove(w)
        run = w.job
        if run is not None:
            w.job = None
            if run.killed_because:
                how = f"{how}: {run.killed_because}"
            self.log.error(
                "Worker {worker} (pid {pid}) died while running job {job_id}: {status}; "
                "last stderr:\n{stderr_tail}",
                worker=w.name,
                pid=w.pid,
                job_id=run.job_id,
                status=how,
                stderr_tail=tail,
            )
            self._tell_death(run.job_id)
            self._finish(run, Failure(WorkerDied(run.job_id, how, tail)))
        elif expected:
            self.log.info("Worker {worker} exited: {status}", worker=w.name, status=how)
        else:
            self.log.error(
                "Worker {worker} (pid {pid}) died while {doing}: {status}; "
                "last stderr:\n{stderr_tail}",
                worker=w.name,
                pid=w.pid,
                doing="starting" if was == "starting" else "idle",
                status=how,
                stderr_tail=tail,
            )
            self._tell_death(None)
        if not w.ready.called:
            w.ready.errback(WorkerStartFailed(w.name, how, tail))
        if was == "starting":
            self._start_failures += 1
            if self._state == "running" and self._waiting:
                # Jobs waiting for this worker must not wait on a broken
                # install forever: fail the oldest, as an infrastructure
                # failure the scheduler may retry.
                waiting = self._waiting.popleft()
                self._finish(
                    waiting,
                    Failure(
                        WorkerDied(waiting.job_id, f"a new worker exited while starting: {how}", tail)
                    ),
                )
        w.ended.callback(None)
        if self._state == "running":
            self._replace()

    def _tell_death(self, job_id: str | None) -> None:
        if self.on_worker_death is None:
            return
        try:
            self.on_worker_death(job_id)
        except Exception:
            self.log.failure("The pool's on_worker_death hook failed")

    def _replace(self) -> None:
        """Start a worker in place of one that ended. After workers that
        died while starting, wait 1, 2, 4... up to 60 s first, so a broken
        install does not fork-loop."""
        if self._respawn_call is not None and self._respawn_call.active():
            return
        missing = self._size - len(self._workers)
        if missing <= 0:
            return
        if self._start_failures:
            delay = min(60.0, 2.0 ** (self._start_failures - 1))
            self.log.warn(
                "Starting a new worker in {delay}s ({n} failed to start in a row)",
                delay=delay,
                n=self._start_failures,
            )
            self._respawn_call = self.reactor.callLater(delay, self._respawn)
        else:
            self._respawn()

    def _respawn(self) -> None:
        self._respawn_call = None
        if self._state != "running":
            return
        while len(self._workers) < self._size:
            w = self._spawn()
            w.ready.addErrback(lambda f: None)  # _ended logged it and schedules the next
            if self._start_failures:
                break

    def _shutdown(self, w: _Worker) -> None:
        from ampoule.commands import Shutdown

        w.state = "stopping"

        def failed(f: Failure) -> None:
            if not f.check(ProcessTerminated, ProcessDone, ConnectionDone, ConnectionLost):
                self.log.warn("Shutdown of worker {worker}: {f}", worker=w.name, f=f.value)

        try:
            w.parent.callRemote(Shutdown).addErrback(failed)
        except Exception:
            self._kill(w)

    def _kill(self, w: _Worker) -> None:
        try:
            w.connector.signalProcess("KILL")
        except Exception:
            pass  # already gone

    def _bounded(self, w: _Worker) -> Deferred[None]:
        """``w.ended``, killing the worker if it has not exited within
        ``stop_timeout``."""
        if w.ended.called:
            return succeed(None)
        timer = self.reactor.callLater(self.stop_timeout, self._kill, w)
        # A fresh Deferred: w.ended may have other listeners.
        d: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if timer.active():
                timer.cancel()
            d.callback(None)
            return result

        w.ended.addBoth(done)
        return d

    # -- jobs ----------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._state != "running":
            return
        while self._waiting:
            free = [w for w in self._workers if w.state == "ready"]
            if not free:
                return
            self._assign(free[0], self._waiting.popleft())

    def _assign(self, w: _Worker, run: _JobRun) -> None:
        w.state = "busy"
        w.job = run
        run.worker = w
        self.log.info(
            "Job {job_id} (check {check_id}) runs on worker {worker} (pid {pid})",
            job_id=run.job_id,
            check_id=run.check_id,
            worker=w.name,
            pid=w.pid,
        )
        if self.job_timeout is not None:
            run.timer = self.reactor.callLater(self.job_timeout, self._timed_out, run)
        try:
            d = w.parent.callRemote(
                RunJob,
                job_id=run.job_id,
                check_id=run.check_id,
                spec=run.spec,
                evidence_root=self.evidence_root,
            )
        except Exception:
            self._job_answered(w, run, Failure())
            return
        d.addBoth(lambda outcome: self._job_answered(w, run, outcome))

    def _job_answered(self, w: _Worker, run: _JobRun, outcome: Any) -> None:
        if w.state == "dead" or run.finished:
            return  # _ended already failed the job with WorkerDied
        if isinstance(outcome, Failure):
            if outcome.check(ProcessTerminated, ProcessDone, ConnectionLost, ConnectionDone):
                return  # the process is ending: _ended will tell
            self.log.error(
                "Worker {worker} could not run job {job_id}: {reason}",
                worker=w.name,
                job_id=run.job_id,
                reason=outcome.getErrorMessage(),
            )
            result: CheckResult | Failure = outcome
        else:
            try:
                result = codec.result_from_dict(
                    codec.loads(outcome["result"], "result", MAX_RESULT_BYTES)
                )
            except ConfigError as e:
                result = Failure(
                    WorkerProtocolError(f"worker {w.name} sent a bad result for job {run.job_id}: {e}")
                )
            self._api_calls(w, run, outcome.get("api_calls"))
        w.job = None
        w.jobs_run += 1
        if self._state != "running":
            self._shutdown(w)
        elif self.recycle_after and w.jobs_run >= self.recycle_after:
            self.log.info("Recycling worker {worker} after {n} jobs", worker=w.name, n=w.jobs_run)
            self._shutdown(w)  # _ended starts its replacement once it has exited
        else:
            w.state = "ready"
        self._finish(run, result)

    def _api_calls(self, w: _Worker, run: _JobRun, raw: bytes | None) -> None:
        """Hand the API call counts that came with a result to
        ``on_api_calls``. Counts a worker left out (an older worker) or
        garbled are only lost: they never fail the job."""
        if raw is None or self.on_api_calls is None:
            return
        try:
            counts = decode_api_calls(raw)
        except MalformedArgument as e:
            self.log.warn(
                "Worker {worker} sent bad API call counts for job {job_id}; ignored: {error}",
                worker=w.name,
                job_id=run.job_id,
                error=e,
            )
            return
        try:
            self.on_api_calls(run.job_id, counts)
        except Exception:
            self.log.failure("The pool's on_api_calls hook failed")

    def _send_cancel(self, run: _JobRun, reason: str) -> None:
        w = run.worker
        if w is None or w.state == "dead":
            return
        self.log.info("Cancelling job {job_id}: {reason}", job_id=run.job_id, reason=reason)

        def failed(f: Failure) -> None:
            if not f.check(ProcessTerminated, ProcessDone, ConnectionDone, ConnectionLost):
                self.log.warn(
                    "Cancel of job {job_id} failed: {reason}",
                    job_id=run.job_id,
                    reason=f.getErrorMessage(),
                )

        try:
            w.parent.callRemote(CancelJob, job_id=run.job_id, reason=reason).addErrback(failed)
        except Exception:
            failed(Failure())

    def _timed_out(self, run: _JobRun) -> None:
        run.timer = None
        w = run.worker
        if run.finished or w is None:
            return
        self.log.error(
            "Job {job_id} ran past the pool's job timeout of {timeout}s: killing worker "
            "{worker} (pid {pid})",
            job_id=run.job_id,
            timeout=self.job_timeout,
            worker=w.name,
            pid=w.pid,
        )
        run.killed_because = f"the pool's job timeout of {self.job_timeout:g}s passed"
        self._kill(w)

    def _finish(self, run: _JobRun, outcome: CheckResult | Failure) -> None:
        if run.finished:
            return
        run.finished = True
        if run.timer is not None and run.timer.active():
            run.timer.cancel()
        run.timer = None
        self._jobs.pop(run.job_id, None)
        if isinstance(outcome, Failure):
            run.result.errback(outcome)
        else:
            run.result.callback(outcome)
        if self._state == "running":
            self._dispatch()


def _cancelled_result(check_id: str, reason: str) -> CheckResult:
    return CheckResult(
        check_id=check_id,
        passed=False,
        steps=(),
        facts=Facts(),
        error=f"cancelled: {reason}",
        kind=FailureKind.CANCELLED,
    )
