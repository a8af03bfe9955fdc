"""The JSON forms of txvmbot.daemon.codec: what a job spec may say."""

from __future__ import annotations

import pytest

from txvmbot.daemon import codec
from txvmbot.errors import ConfigError


def test_a_local_job_cannot_step_around_its_pool_cap_with_another_backend() -> None:
    with pytest.raises(ConfigError) as e:
        codec.spec_from_dict({"pool": "local", "backend": "x1"})
    assert e.value.where == "job.backend"
    assert codec.spec_from_dict({"pool": "local"}).backend == "local"
