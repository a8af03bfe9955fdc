"""The step engine: named, bounded steps; polling with backoff; the undo stack.

A scenario is a sequence of steps. :class:`StepRunner` runs each one with a
bound, tells an observer when it starts, what it saw and how it ended, and
keeps a :class:`~txvmbot.model.StepResult` for each. When a step fails the
error says which step, how long it ran and what was seen last.

:func:`track` writes the journal before every create, and :class:`Cleanup`
undoes the journal newest first on every exit path.

Nothing here touches the global reactor: time comes in as an
:class:`~twisted.internet.interfaces.IReactorTime`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Generic, Literal, TypeVar, cast, overload

from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from txvmbot.errors import StepFailed, StepTimeout, TxvmbotError, failure_kind
from txvmbot.interfaces import IJournal
from txvmbot.model import FailureKind, JournalEntry, Outcome, StepEvent, StepResult

__all__ = [
    "Cleanup",
    "StepContext",
    "StepRunner",
    "StepSequence",
    "cleanup_failure_kind",
    "gather",
    "new_check_id",
    "poll",
    "track",
]

T = TypeVar("T")

_State = Literal["running", "passed", "failed", "timeout", "cancelled", "skipped"]

#: What a step's action may return: a value, a Deferred, or a coroutine.
Action = Callable[["StepContext"], "Deferred[T] | Coroutine[Deferred[Any], Any, T] | T"]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StepContext:
    """What a running step's action gets: its name, the clock, and
    :meth:`saw` to report progress."""

    def __init__(self, name: str, clock: IReactorTime, runner: StepRunner) -> None:
        self.name = name
        self.clock = clock
        self._runner = runner
        self._last_seen = ""
        self._finished = False

    @property
    def last_seen(self) -> str:
        """The text of the last :meth:`saw` call, ``""`` if none."""
        return self._last_seen

    def saw(self, text: str) -> None:
        """Record what the step saw last (``"instance i-1 pending"``).

        A timeout quotes it; watchers get a ``running`` event with it as
        detail. Ignored once the step has ended.
        """
        if self._finished:
            return
        self._last_seen = text
        self._runner._emit(self.name, "running", text)

    def __repr__(self) -> str:
        return f"<StepContext {self.name!r} last_seen={self._last_seen!r}>"


class _Step(Generic[T]):
    """One run of one step: ties the action, the bound and the caller's
    Deferred together and makes sure exactly one outcome is recorded."""

    def __init__(self, runner: StepRunner, name: str, bound: float) -> None:
        self.runner = runner
        self.name = name
        self.bound = bound
        self.ctx = StepContext(name, runner.clock, runner)
        self.result: Deferred[T] = Deferred(self._cancelled_by_caller)
        self.inner: Deferred[T] | None = None
        self.timer: IDelayedCall | None = None
        self.started = runner.wall()
        self.t0 = runner.clock.seconds()
        self.finished = False

    def start(self, action: Action[T]) -> Deferred[T]:
        self.runner._emit(self.name, "running", "")
        inner = cast(
            "Deferred[T]", maybeDeferred(cast(Callable[[StepContext], Any], action), self.ctx)
        )
        self.inner = inner
        inner.addCallbacks(self._succeeded, self._failed)
        if not self.finished:
            self.timer = self.runner.clock.callLater(self.bound, self._timed_out)
        return self.result

    def _finish(self, outcome: Outcome, detail: str, kind: FailureKind | None = None) -> None:
        self.finished = True
        self.ctx._finished = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        duration = self.runner.clock.seconds() - self.t0
        self.runner._record(
            StepResult(
                name=self.name,
                started=self.started,
                duration=duration,
                outcome=outcome,
                detail=detail,
                kind=kind,
            )
        )

    def _succeeded(self, value: T) -> None:
        if self.finished:
            return
        self._finish("passed", self.ctx.last_seen)
        self.result.callback(value)

    def _failed(self, f: Failure) -> None:
        if self.finished:
            # The step already ended (timeout or cancel): this is the
            # action's Deferred answering our cancel(), or a late failure.
            if not f.check(CancelledError):
                self.runner.log.warn(
                    "Step {step} failed after it had ended: {reason}",
                    step=self.name,
                    reason=_describe(f.value),  # type: ignore[arg-type]
                )
            return
        exc: BaseException = f.value  # type: ignore[assignment]
        if isinstance(exc, StepFailed) and exc.step == self.name:
            err: StepFailed = exc
        else:
            # Whose fault it is is decided here, from the error itself, and
            # travels with the step's result and the StepFailed.
            err = StepFailed(self.name, _describe(exc), failure_kind(exc))
            err.__cause__ = exc
        outcome: Outcome = "timeout" if isinstance(err, StepTimeout) else "failed"
        # Not log.failure: a failed step is an outcome, not a bug in txvmbot,
        # and trial would count it as an unhandled error in every test.
        self.runner.log.warn(
            "Step {step} {outcome}: {reason}", step=self.name, outcome=outcome, reason=err.reason
        )
        self.runner.log.debug("Step {step} traceback:\n{tb}", step=self.name, tb=f.getTraceback())
        self._finish(outcome, err.reason, err.kind)
        self.result.errback(Failure(err))

    def _timed_out(self) -> None:
        self.timer = None
        if self.finished:
            return
        err = StepTimeout(self.name, self.bound, self.ctx.last_seen)
        self.runner.log.warn("Step {step} timed out: {reason}", step=self.name, reason=err.reason)
        self._finish("timeout", err.reason, FailureKind.TIMEOUT)
        # Whatever the action does with the cancel, the bound holds: the
        # outcome is already decided and the caller hears it now.
        assert self.inner is not None
        self.inner.cancel()
        self.result.errback(Failure(err))

    def _cancelled_by_caller(self, result: Deferred[T]) -> None:
        if self.finished:
            return
        self.runner.log.info("Step {step} cancelled", step=self.name)
        self._finish("cancelled", "cancelled", FailureKind.CANCELLED)
        if self.inner is not None:
            self.inner.cancel()
        # Deferred.cancel errbacks ``result`` with CancelledError after this.


class StepRunner:
    """Runs named steps with bounds and keeps their results in order of
    completion.

    :param clock: measures durations and enforces bounds.
    :param observer: called with a :class:`~txvmbot.model.StepEvent` when a
        step starts, reports progress, and ends. Its exceptions are logged
        and otherwise ignored: a broken watcher never breaks a check.
    :param wall: epoch seconds for ``StepResult.started`` and
        ``StepEvent.at``.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        observer: Callable[[StepEvent], None] | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.observer = observer
        self.wall = wall
        self._results: list[StepResult] = []

    @property
    def results(self) -> tuple[StepResult, ...]:
        """Every step that ended (and every skip), in the order they ended."""
        return tuple(self._results)

    @overload
    def run(
        self, name: str, bound: float, action: Callable[[StepContext], Deferred[T]]
    ) -> Deferred[T]: ...

    @overload
    def run(
        self,
        name: str,
        bound: float,
        action: Callable[[StepContext], Coroutine[Deferred[Any], Any, T]],
    ) -> Deferred[T]: ...

    @overload
    def run(self, name: str, bound: float, action: Callable[[StepContext], T]) -> Deferred[T]: ...

    def run(self, name: str, bound: float, action: Action[T]) -> Deferred[T]:
        """Run ``action(ctx)`` as the step ``name``, for at most ``bound`` seconds.

        The Deferred fires with the action's result, or fails with:

        - :class:`StepFailed` for this step if the action failed (a
          StepFailed the action raised for this very step is kept as is);
        - :class:`StepTimeout` (``bound`` and ``ctx.last_seen`` in the
          message) if the bound passed: the action's Deferred is cancelled;
        - ``CancelledError`` if the caller cancelled it: the action's
          Deferred is cancelled and the step is recorded as ``cancelled``.
        """
        if not (isinstance(bound, int | float) and bound > 0 and math.isfinite(bound)):
            raise ValueError(f"step {name!r}: bound must be a positive number of seconds")
        return _Step[T](self, name, float(bound)).start(action)

    def skip(self, name: str, reason: str) -> None:
        """Record that step ``name`` did not run, and why."""
        self._record(
            StepResult(
                name=name, started=self.wall(), duration=0.0, outcome="skipped", detail=reason
            )
        )

    def _record(self, result: StepResult) -> None:
        self._results.append(result)
        self._emit(result.name, result.outcome, result.detail)

    def _emit(self, name: str, state: _State, detail: str) -> None:
        if self.observer is None:
            return
        try:
            self.observer(StepEvent(name=name, state=state, at=self.wall(), detail=detail))
        except Exception:
            self.log.failure("Step observer failed on {step} {state}", step=name, state=state)


def new_check_id() -> str:
    """Short, unique, and safe in resource names, tags and paths."""
    import uuid

    return uuid.uuid4().hex[:12]


class StepSequence:
    """A job's steps, with one way to stop them: :meth:`cancel` cancels the
    steps that run and refuses the ones after, so the job goes straight to
    its cleanup. Steps usually run one after another; a job that drives
    several machines (a suite) may run some side by side."""

    log = Logger()

    def __init__(self, steps: StepRunner, job_id: str) -> None:
        self.steps = steps
        self.job_id = job_id
        self.cancelled: str | None = None
        #: What kind of failure stopped the steps, set by :meth:`error_of`
        #: (None while they run, and when they all passed).
        self.kind: FailureKind | None = None
        self._current: set[Deferred[Any]] = set()

    def cancel(self, reason: str) -> None:
        if self.cancelled is None:
            self.cancelled = reason
            self.log.warn("Cancelling {job_id}: {reason}", job_id=self.job_id, reason=reason)
            for d in list(self._current):
                d.cancel()

    async def error_of(self, work: Coroutine[Any, Any, Any]) -> str:
        """Run a job's steps (``work``); return why they stopped, or "" if
        they all passed: the step error, the cancel, or (a bug of ours,
        logged with its traceback) an internal error. Never raises, so the
        job's cleanup always runs after it.

        What kind of failure it was is left in :attr:`kind`: the error's
        own (:func:`txvmbot.errors.failure_kind`), ``CANCELLED`` for any
        failure once the sequence was cancelled (what broke after the
        cancel is its consequence), ``TEST`` for a bug of ours (as ever,
        not the infrastructure's)."""
        self.kind = None
        try:
            await work
        except CancelledError:
            self.kind = FailureKind.CANCELLED
            return f"cancelled: {self.cancelled or 'cancelled'}"
        except TxvmbotError as e:
            self.kind = FailureKind.CANCELLED if self.cancelled is not None else e.kind
            return str(e)
        except Exception as e:
            self.log.failure("Unexpected error in {job_id}", job_id=self.job_id)
            self.kind = FailureKind.CANCELLED if self.cancelled is not None else FailureKind.TEST
            return f"internal error: {e!r}"
        return ""

    async def step(self, name: str, bound: float, action: Callable[[StepContext], Any]) -> Any:
        if self.cancelled is not None:
            raise CancelledError(self.cancelled)
        d = self.steps.run(name, bound, action)
        self._current.add(d)
        try:
            return await d
        finally:
            self._current.discard(d)


def cleanup_failure_kind(steps: Sequence[StepResult]) -> FailureKind:
    """The kind of a "cleanup failed" of a job whose own steps passed,
    from its cleanup steps (``cleanup`` and ``cleanup ...``, as
    :class:`Cleanup` names them): ``INFRASTRUCTURE`` if one failed in the
    infrastructure, else ``TIMEOUT`` if one passed its bound, else
    ``TEST``."""
    kinds = {
        s.kind
        for s in steps
        if (s.name == "cleanup" or s.name.startswith("cleanup ")) and s.outcome != "passed"
    }
    for kind in (FailureKind.INFRASTRUCTURE, FailureKind.TIMEOUT):
        if kind in kinds:
            return kind
    return FailureKind.TEST


async def gather(ds: list[Deferred[Any]]) -> list[Any]:
    """Wait for all; fail with the first failure; cancel the rest on cancel."""
    dl = DeferredList(ds, fireOnOneErrback=True, consumeErrors=True)
    try:
        results = await dl
    except CancelledError:
        for d in ds:
            d.cancel()
        raise
    except Exception as e:  # FirstError
        for d in ds:
            d.cancel()
        sub = getattr(e, "subFailure", None)
        if sub is not None:
            sub.raiseException()
        raise
    return [value for _ok, value in results]


def poll(
    ctx: StepContext,
    probe: Callable[[], Deferred[T]],
    ready: Callable[[T], bool],
    describe: Callable[[T], str],
    *,
    interval: float,
    max_interval: float,
) -> Deferred[T]:
    """Call ``probe`` until ``ready(value)``; fire with that value.

    Between probes, report ``describe(value)`` through ``ctx.saw`` and wait
    ``interval`` seconds, doubling up to ``max_interval``. There is no bound
    here: the step's bound ends the poll by cancelling it, which cancels
    the wait or the probe in flight and leaves no delayed call behind.
    Errors from ``probe``, ``ready`` and ``describe`` fail the poll at once
    (the API client already retried what was transient).
    """
    if not (interval > 0 and max_interval >= interval):
        raise ValueError(
            f"poll in step {ctx.name!r}: need 0 < interval <= max_interval, "
            f"got {interval!r} and {max_interval!r}"
        )

    async def loop() -> T:
        delay = interval
        while True:
            value: T = await probe()
            if ready(value):
                return value
            ctx.saw(describe(value))
            await deferLater(ctx.clock, delay)
            delay = min(delay * 2, max_interval)

    return Deferred.fromCoroutine(loop())


def track(
    journal: IJournal,
    check_id: str,
    kind: str,
    name: str,
    endpoint: str,
    region: str,
    create: Callable[[], Deferred[str]],
    parent_id: str | None = None,
) -> Deferred[str]:
    """Journal a resource, create it, journal its id; fire with the id.

    ``journal.intend`` is written (and on disk) before ``create`` is called,
    so a crash at any point leaves a trace. If ``create`` fails the entry
    stays pending with no resource id: the cloud may have acted before the
    answer was lost, so cleanup (and the reaper) look the resource up by
    ``name`` and the check's tag, which ``create`` must therefore set.
    If the journal cannot be written, ``create`` is never called.

    Each of the journal's answers (a Deferred: a worker's journal is the
    daemon's, over AMP) is awaited before going on.
    """

    async def go() -> str:
        entry = await journal.intend(check_id, kind, name, endpoint, region, parent_id)
        resource_id = await maybeDeferred(create)
        if not isinstance(resource_id, str) or not resource_id:
            raise TypeError(f"create for {kind} {name} returned {resource_id!r}, not a resource id")
        await journal.created(entry, resource_id)
        return resource_id

    return Deferred.fromCoroutine(go())


class Cleanup:
    """Undoes what a check's journal holds, newest first.

    :param journal: where the check recorded its resources.
    :param undo: deletes one entry's resource (by ``resource_id``, or by
        ``name``/tag when the id was never recorded); fires ``True`` when
        the resource is gone (including "it never existed"), ``False`` if
        it is still there.
    :param steps: each undo is a step of this runner, so it shows in the
        check's results and live table.
    :param bound: the bound of each undo step.
    """

    log = Logger()

    def __init__(
        self,
        journal: IJournal,
        undo: Callable[[JournalEntry], Deferred[bool]],
        steps: StepRunner,
        bound: float,
    ) -> None:
        self.journal = journal
        self.undo = undo
        self.steps = steps
        self.bound = bound

    def run(self, check_id: str) -> Deferred[tuple[str, ...]]:
        """Undo every pending entry of ``check_id``, newest first.

        Each undo runs as the step ``cleanup <kind> <id or name>``; on
        success the entry is marked done. A failure is recorded as a failed
        step and cleanup goes on with the next entry: the Deferred fires
        with the error messages (empty when all is clean) and does not fail.
        Entries that failed stay pending for the next run or the reaper.

        Cancelling the Deferred stops cleanup: the current undo is
        cancelled, the rest stay pending, and it fails with CancelledError.
        """

        async def go() -> tuple[str, ...]:
            errors: list[str] = []
            try:
                entries = await self.journal.pending(check_id)
            except Exception as e:
                self.log.failure(
                    "Cannot read the journal to clean up check {check}", check=check_id
                )
                return (f"cleanup of check {check_id}: {_describe(e)}",)
            for entry in entries:
                step = f"cleanup {entry.kind} {entry.resource_id or entry.name}"
                try:
                    await self.steps.run(step, self.bound, self._undo_one(step, entry))
                except CancelledError:
                    raise
                except Exception as e:
                    errors.append(str(e))
            if errors:
                self.log.warn(
                    "Cleanup of check {check} left {count} resource(s): {errors}",
                    check=check_id,
                    count=len(errors),
                    errors="; ".join(errors),
                )
            return tuple(errors)

        return Deferred.fromCoroutine(go())

    def _undo_one(
        self, step: str, entry: JournalEntry
    ) -> Callable[[StepContext], Coroutine[Deferred[Any], Any, None]]:
        async def action(ctx: StepContext) -> None:
            gone = await self.undo(entry)
            if not gone:
                raise StepFailed(
                    step, f"{entry.kind} {entry.resource_id or entry.name} still exists"
                )
            await self.journal.done(entry)

        return action
