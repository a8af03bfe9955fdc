"""Regression tests for what a review of the first version found."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock

from txvmbot.daemon import codec
from txvmbot.daemon.settings import check_listen
from txvmbot.ec2.resources import terminate_and_wait
from txvmbot.errors import CloudError, ConfigError


def test_a_local_job_cannot_step_around_its_pool_cap_with_another_backend() -> None:
    with pytest.raises(ConfigError) as e:
        codec.spec_from_dict({"pool": "local", "backend": "x1"})
    assert e.value.where == "job.backend"
    assert codec.spec_from_dict({"pool": "local"}).backend == "local"


@pytest.mark.parametrize(
    "given, wanted",
    [
        ("unix:/run/t.sock", "unix:/run/t.sock:mode=600"),
        ("unix:/run/t.sock:mode=666", "unix:/run/t.sock:mode=600"),
        ("unix:path=/run/t.sock:lockfile=1", "unix:path=/run/t.sock:lockfile=1:mode=600"),
    ],
)
def test_unix_listeners_are_owner_only(given: str, wanted: str) -> None:
    assert check_listen(given, has_tls=False) == wanted


class _Cloud:
    """Answers like EC2: InstanceIds with an unknown id fails the whole call;
    a filter does not."""

    def __init__(self) -> None:
        self.states = {"i-live": "shutting-down"}
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, operation: str, params: dict[str, Any]) -> Deferred[Any]:
        self.calls.append((operation, params))
        if operation == "TerminateInstances":
            if "i-gone" in params["InstanceIds"]:
                raise CloudError(operation, "InvalidInstanceID.NotFound", "i-gone", 400)
            return succeed({})
        if "InstanceIds" in params:
            raise CloudError(operation, "InvalidInstanceID.NotFound", "i-gone", 400)
        (f,) = params["Filters"]
        found = [{"InstanceId": i, "State": {"Name": s}} for i, s in self.states.items()
                 if i in f["Values"]]
        self.states = {i: "terminated" for i in self.states}  # terminated by the next poll
        return succeed({"Reservations": [{"Instances": found}]})


def test_terminate_waits_for_the_live_instance_even_beside_an_unknown_one() -> None:
    cloud = _Cloud()
    clock = Clock()
    d = ensureDeferred(terminate_and_wait(cloud, clock, ["i-gone", "i-live"], 1.0, 4.0))  # type: ignore[arg-type]
    assert not d.called, "returned while i-live was still shutting down"
    clock.advance(1.0)
    assert d.called and d.result is None
    polls = [p for op, p in cloud.calls if op == "DescribeInstances"]
    assert len(polls) == 2 and all("Filters" in p for p in polls)
