"""Tests for the ``[daemon]`` table (txvmbot.daemon.settings): retention."""

from __future__ import annotations

import os
import tempfile

import pytest

from txvmbot.daemon.settings import DaemonSettings, load, parse_daemon_table
from txvmbot.errors import ConfigError

PATH = "/etc/txvmbot/config.toml"
ENV = {"HOME": "/home/u"}


def parse(**table: object) -> DaemonSettings:
    return parse_daemon_table({"data_dir": "/var/lib/txvmbot", **table}, PATH, ENV)


def test_keep_finished_days_defaults_to_30() -> None:
    assert parse().keep_finished_days == 30.0
    assert DaemonSettings(data_dir="/d").keep_finished_days == 30.0


@pytest.mark.parametrize("given, wanted", [(7, 7.0), (0.5, 0.5), (365, 365.0), (0, 0.0)])
def test_keep_finished_days_valid(given: object, wanted: float) -> None:
    """Whole or fractional days; 0 keeps finished jobs forever."""
    s = parse(keep_finished_days=given)
    assert s.keep_finished_days == wanted
    assert isinstance(s.keep_finished_days, float)


@pytest.mark.parametrize("bad", [-1, -0.5, "30", True, float("nan"), float("inf"), [30]])
def test_keep_finished_days_invalid_names_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse(keep_finished_days=bad)
    assert e.value.where == "daemon.keep_finished_days"
    assert "daemon.keep_finished_days" in str(e.value)
    assert PATH in str(e.value)
    assert "0 keeps finished jobs forever" in str(e.value)


def test_keep_finished_days_from_a_toml_file() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.toml")
        with open(path, "w") as f:
            f.write('[daemon]\ndata_dir = "state"\nkeep_finished_days = 2.5\n')
        s = load(path, ENV)
        assert s.keep_finished_days == 2.5
        with open(path, "w") as f:
            f.write("[daemon]\nkeep_finished_days = -3\n")
        with pytest.raises(ConfigError) as e:
            load(path, ENV)
        assert e.value.where == "daemon.keep_finished_days"
        assert "-3" in str(e.value)


def test_an_unknown_key_lists_keep_finished_days() -> None:
    with pytest.raises(ConfigError) as e:
        parse(keep_finished=3)
    assert "keep_finished_days" in str(e.value)
