"""Cloud jobs for the daemon end-to-end tests, against the session's moto:
the ``image`` fixture (an AMI moto offers), ``fresh_moto`` (moto reset
first) and ``job_args`` (the submit flags of a job on them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import checkrun
from tests.support.servers import Moto


@pytest.fixture
def image(moto: Moto) -> str:
    images = checkrun.ec2(moto.url).describe_images(Owners=["amazon"])["Images"]
    return str(sorted(i["ImageId"] for i in images)[0])


@pytest.fixture
def fresh_moto(moto: Moto) -> Iterator[Moto]:
    moto.reset()
    yield moto


def job_args(moto: Moto, image: str, *extra: str) -> list[str]:
    return ["--endpoint", moto.url, "--region", checkrun.REGION, "--image", image, "--no-ssh",
            "--timeout-poll-interval", "0.2", "--timeout-poll-max-interval", "0.5", *extra]
