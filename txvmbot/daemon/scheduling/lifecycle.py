"""A job's lifecycle, an automat machine: every transition written down once,
in the table of ``_build``::

    queued --start--> running --clean--> cleaning --clean--> cleaning
      |                  |                  |       (the daemon cleans up again after a restart)
      |                  |                  +--retry--> queued
      |                  |                  |       (an infrastructure failure, attempts left)
      |                  |                  +--succeed | fail | cancel | give_up--> final
      |                  +--succeed | fail | cancel | give_up--> final
      +--cancel--> cancelled

    final: passed (by succeed), failed (fail), cancelled (cancel), error (give_up)

The final states (passed, failed, cancelled, error) take no input. Each
input leads to one state wherever it is taken (its output returns that
state's name), so the scheduler, which names the state a job goes to, gives
the input that leads there with :func:`move`: ``-> running`` is ``start``,
``-> cleaning`` ``clean``, ``-> queued`` ``retry``, and ``-> passed``,
``failed``, ``cancelled``, ``error`` are ``succeed``, ``fail``, ``cancel``,
``give_up``. A move the job's state has no row for raises AssertionError
(the scheduler moved a job where it never goes: a bug); the machine itself
raises automat's NoTransition for an input it has no row for.

The job's state stays in one place, ``Job.state`` (stored, shared by
daemons, taken over): no machine lives with a job. A machine is made in the
job's state for one transition (:func:`move`, :func:`lifecycle`): about 3
microseconds, and two small objects that are garbage at once. A machine
held by each job would cost ~220 bytes each (2 MB for the 10,000 queued
jobs a daemon may hold, two more objects each for the garbage collector),
and keep a second copy of the state that could drift from the stored one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast, get_args

from automat import NoTransition, TypeMachine, TypeMachineBuilder

from txvmbot.daemon.jobs import FINAL_STATES, JobState

__all__ = ["LIFECYCLE", "TRANSITIONS", "JobLifecycle", "lifecycle", "move"]


class JobLifecycle(Protocol):
    """The inputs of a job's lifecycle: what can happen to a job. Each
    returns the state it led to."""

    def start(self) -> JobState:
        """A worker takes the queued job: -> running."""

    def clean(self) -> JobState:
        """The job's resources are being cleaned up: -> cleaning. From
        running: the worker reports its first cleanup step, or it died and
        the daemon cleans up after it. From cleaning: the daemon cleans up
        again after a job it (or another daemon) died under while cleaning."""

    def retry(self) -> JobState:
        """The cleanup after an infrastructure failure is over and the job
        has attempts left: -> queued."""

    def succeed(self) -> JobState:
        """The check passed: -> passed."""

    def fail(self) -> JobState:
        """The check failed: -> failed."""

    def cancel(self) -> JobState:
        """The job ends cancelled (at once if queued; a running job once
        its worker or cleanup has stopped): -> cancelled."""

    def give_up(self) -> JobState:
        """The job ends in error (no attempts left after an infrastructure
        failure): -> error."""


class _Job:
    """The machine's core: nothing. The job's state is in ``Job.state``;
    the machine only says where an input leads from there."""

    __slots__ = ()


def _build() -> tuple[
    TypeMachine[JobLifecycle, _Job],
    dict[str, Any],
    tuple[tuple[str, str, str], ...],
]:
    """The lifecycle, every transition once: the state an input is legal
    in, and the state it leads to (the input's output returns that state's
    name). An input without a row in a state is illegal there. Returns the
    machine, its states by name, and the table's ``(state, input, next
    state)`` names."""
    builder = TypeMachineBuilder(JobLifecycle, _Job)
    queued = builder.state("queued")  # the first state is the initial one
    running = builder.state("running")
    cleaning = builder.state("cleaning")
    passed = builder.state("passed")
    failed = builder.state("failed")
    cancelled = builder.state("cancelled")
    error = builder.state("error")
    L = JobLifecycle
    table: list[tuple[Any, Callable[..., JobState], Any]]
    # fmt: off
    table = [
        # in state  upon        goes to
        (queued,    L.start,    running),
        (queued,    L.cancel,   cancelled),

        (running,   L.clean,    cleaning),
        (running,   L.succeed,  passed),
        (running,   L.fail,     failed),
        (running,   L.cancel,   cancelled),
        (running,   L.give_up,  error),

        (cleaning,  L.clean,    cleaning),
        (cleaning,  L.retry,    queued),
        (cleaning,  L.succeed,  passed),
        (cleaning,  L.fail,     failed),
        (cleaning,  L.cancel,   cancelled),
        (cleaning,  L.give_up,  error),

        # passed, failed, cancelled, error: final, no input.
    ]
    # fmt: on
    for old, upon, new in table:
        old.upon(upon).to(new).returns(new.name)
    states = {s.name: s for s in (queued, running, cleaning, passed, failed, cancelled, error)}
    names = tuple((old.name, upon.__name__, new.name) for old, upon, new in table)
    return builder.build(), states, names


_Machine, _STATES, LIFECYCLE = _build()
"""The machine's rows by name: ``(state, input, next state)``."""

#: The lifecycle's transitions, from the machine's rows: state -> the states
#: it may go to (a final state: none).
TRANSITIONS: Mapping[str, frozenset[str]] = {
    state: frozenset(new for old, _, new in LIFECYCLE if old == state) for state in _STATES
}

#: The input that leads to each state (see the module's doc).
_INPUT_TO: dict[str, str] = {new: upon for _, upon, new in LIFECYCLE}
_moves = {(upon, new) for _, upon, new in LIFECYCLE}
assert len(_moves) == len(_INPUT_TO) == len({u for u, _ in _moves}), "an input, a state"
assert set(_STATES) == set(get_args(JobState)), "the machine's states are JobState's"
assert {s for s, to in TRANSITIONS.items() if not to} == FINAL_STATES, "final: no input"
del _moves

_CORE = _Job()


def lifecycle(state: str) -> JobLifecycle:
    """A machine in ``state`` (KeyError: no such state), to give the input
    of one transition; NoTransition for an input ``state`` has no row for."""
    return _Machine(_CORE, _STATES[state])


def move(job_id: str, old: str, new: str) -> JobState:
    """Move job ``job_id`` from ``old`` to ``new`` through the machine, by
    the input that leads to ``new``; return ``new``. Raises AssertionError
    (``job J: OLD -> NEW is not a transition``) if the lifecycle has no
    such transition: the caller has a bug."""
    state, upon = _STATES.get(old), _INPUT_TO.get(new)
    done: str | None = None
    if state is not None and upon is not None:
        try:
            done = getattr(_Machine(_CORE, state), upon)()
        except NoTransition:
            pass
    if done != new:
        raise AssertionError(f"job {job_id}: {old} -> {new} is not a transition")
    return cast(JobState, done)
