"""A job's lifecycle (``txvmbot.daemon.scheduling.lifecycle``): the machine
allows exactly the transitions of the scheduler's table as it was written
by hand (``_TRANSITIONS``), each through its named input; every other move
raises the scheduler's AssertionError; the final states take no input."""

from __future__ import annotations

import pytest
from automat import NoTransition

from txvmbot.daemon.jobs import FINAL_STATES
from txvmbot.daemon.scheduling.lifecycle import (
    LIFECYCLE,
    TRANSITIONS,
    JobLifecycle,
    lifecycle,
    move,
)

STATES = ["queued", "running", "cleaning", "passed", "failed", "cancelled", "error"]
FINAL = ["passed", "failed", "cancelled", "error"]
INPUTS = ["start", "clean", "retry", "succeed", "fail", "cancel", "give_up"]

#: The scheduler's table before the machine: state -> the states it may go to.
BEFORE: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"cleaning"} | FINAL_STATES),
    "cleaning": frozenset({"queued", "cleaning"} | FINAL_STATES),
}
ALLOWED = sorted((old, new) for old, to in BEFORE.items() for new in to)
ILLEGAL = sorted((old, new) for old in STATES for new in STATES if (old, new) not in ALLOWED)

#: The lifecycle as this file expects it: (state, input, next state).
TABLE = [
    ("queued", "start", "running"),
    ("queued", "cancel", "cancelled"),
    ("running", "clean", "cleaning"),
    ("running", "succeed", "passed"),
    ("running", "fail", "failed"),
    ("running", "cancel", "cancelled"),
    ("running", "give_up", "error"),
    ("cleaning", "clean", "cleaning"),
    ("cleaning", "retry", "queued"),
    ("cleaning", "succeed", "passed"),
    ("cleaning", "fail", "failed"),
    ("cleaning", "cancel", "cancelled"),
    ("cleaning", "give_up", "error"),
]
REFUSED = [(s, i) for s in STATES for i in INPUTS if not any(r[:2] == (s, i) for r in TABLE)]


def test_the_table_is_the_one_these_tests_walk() -> None:
    assert sorted(LIFECYCLE) == sorted(TABLE)
    assert len(set(LIFECYCLE)) == len(LIFECYCLE)
    assert set(FINAL) == FINAL_STATES
    assert [name for name in INPUTS if callable(getattr(JobLifecycle, name, None))] == INPUTS


def test_the_machine_allows_what_the_hand_written_table_allowed() -> None:
    assert {old: to for old, to in TRANSITIONS.items() if to} == BEFORE
    assert sorted((old, new) for old, _, new in TABLE) == ALLOWED
    assert {s: TRANSITIONS[s] for s in FINAL} == {s: frozenset() for s in FINAL}


def test_each_input_leads_to_one_state_wherever_it_is_taken() -> None:
    leads = {i: {new for _, upon, new in TABLE if upon == i} for i in INPUTS}
    assert all(len(to) == 1 for to in leads.values()), leads


@pytest.mark.parametrize(("old", "upon", "new"), TABLE)
def test_an_input_moves_the_machine_and_returns_the_new_state(
    old: str, upon: str, new: str
) -> None:
    machine = lifecycle(old)
    assert getattr(machine, upon)() == new
    # The machine is in ``new`` now: it refuses what ``new`` refuses.
    for refused in (i for s, i in REFUSED if s == new):
        with pytest.raises(NoTransition):
            getattr(machine, refused)()


@pytest.mark.parametrize(("old", "new"), ALLOWED)
def test_every_transition_of_the_table_is_allowed(old: str, new: str) -> None:
    assert move("j1", old, new) == new


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_every_other_move_is_the_schedulers_assertion_error(old: str, new: str) -> None:
    with pytest.raises(AssertionError) as e:
        move("j1", old, new)
    assert str(e.value) == f"job j1: {old} -> {new} is not a transition"


@pytest.mark.parametrize(("old", "new"), [("lost", "running"), ("queued", "gone"), ("", "")])
def test_a_state_the_lifecycle_does_not_know_is_refused_as_well(old: str, new: str) -> None:
    with pytest.raises(AssertionError, match=f"^job j1: {old} -> {new} is not a transition$"):
        move("j1", old, new)


@pytest.mark.parametrize("final", FINAL)
@pytest.mark.parametrize("upon", INPUTS)
def test_a_final_state_takes_no_input(final: str, upon: str) -> None:
    machine = lifecycle(final)
    with pytest.raises(NoTransition):
        getattr(machine, upon)()
    for new in STATES:
        with pytest.raises(AssertionError, match=f"^job j1: {final} -> {new} is not a"):
            move("j1", final, new)


@pytest.mark.parametrize(("state", "upon"), REFUSED)
def test_an_input_without_a_row_is_refused(state: str, upon: str) -> None:
    with pytest.raises(NoTransition):
        getattr(lifecycle(state), upon)()


def test_one_machine_follows_a_job_through_its_life() -> None:
    """Retried after an infrastructure failure, recovered while cleaning,
    then passed: one machine, each input from where the last one left it."""
    job = lifecycle("queued")
    assert [
        job.start(),
        job.clean(),
        job.retry(),
        job.start(),
        job.clean(),
        job.clean(),
        job.succeed(),
    ] == ["running", "cleaning", "queued", "running", "cleaning", "cleaning", "passed"]
    with pytest.raises(NoTransition):
        job.cancel()


def test_an_unknown_state_has_no_machine() -> None:
    with pytest.raises(KeyError):
        lifecycle("lost")
