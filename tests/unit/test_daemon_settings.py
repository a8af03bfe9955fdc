"""Tests for the ``[daemon]`` table (txvmbot.daemon.settings): retention."""

from __future__ import annotations

import os
import tempfile

import pytest

from txvmbot.daemon.settings import DaemonSettings, check_listen, load, parse_daemon_table
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


def test_the_web_page_is_off_unless_configured() -> None:
    assert parse().web == ()


def test_web_listeners_follow_the_api_rules() -> None:
    s = parse(web=["unix:/run/txvmbot/web.sock"])
    assert s.web == ("unix:/run/txvmbot/web.sock:mode=600",)
    tls = {"ca": "ca.pem", "cert": "c.pem", "key": "k.pem"}
    assert parse(web="ssl:8443", tls=tls).web == ("ssl:8443",)
    loop = parse(web=["tcp:8080:interface=127.0.0.1"], web_insecure_loopback=True)
    assert loop.web == ("tcp:8080:interface=127.0.0.1",) and loop.web_insecure_loopback


@pytest.mark.parametrize(
    "table, says",
    [
        ({"web": ["tcp:8080"]}, "plain TCP web listener"),
        ({"web": ["tcp:8080:interface=127.0.0.1"]}, "web_insecure_loopback = true"),
        ({"web": ["tcp:8080:interface=0.0.0.0"], "web_insecure_loopback": True}, "127.0.0.1 only"),
        ({"web": ["tcp:8080"], "web_insecure_loopback": True}, "127.0.0.1 only"),
        # Twisted's parser knows escapes: this would bind 0.0.0.0.
        ({"web": ["tcp:8080:interface=127.0.0.1:interfac\\e=0.0.0.0"],
          "web_insecure_loopback": True}, "127.0.0.1 only"),
        ({"web": ["tcp:8080:interface=127.0.0.1 "], "web_insecure_loopback": True}, "127.0.0.1 only"),
        ({"web": ["tcp6:8080:interface=\\:\\:1"], "web_insecure_loopback": True}, "plain TCP"),
        ({"web": ["ssl:8443"]}, "needs a [daemon.tls] table"),
        ({"web": []}, "expected endpoint strings"),
        ({"web_insecure_loopback": "yes"}, "expected true or false"),
    ],
)
def test_bad_web_listeners_name_the_key(table: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(**table)
    assert e.value.where.startswith("daemon.web")
    assert says in str(e.value)


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


# --- the shared PostgreSQL store (issue 9) ------------------------------------

SECRET = "hunter2-s3cret"
DSN = f"postgresql://txvmbot:{SECRET}@db.example:5432/jobs"


def test_sqlite_is_the_default_store() -> None:
    s = parse()
    assert s.store_dsn is None and not s.shared
    assert s.lease == 30.0 and s.host


def test_store_dsn_from_the_file_or_the_environment_never_shown() -> None:
    s = parse(store=DSN, host="runner-1", lease=12)
    assert s.shared and s.store_dsn == DSN and s.host == "runner-1" and s.lease == 12.0
    assert SECRET not in repr(s)
    s = parse_daemon_table({"data_dir": "/d", "store_dsn_env": "TXV_DSN"}, PATH, {"TXV_DSN": DSN})
    assert s.store_dsn == DSN and SECRET not in repr(s)


@pytest.mark.parametrize(
    ("table", "env", "where", "says"),
    [
        ({"store": DSN, "store_dsn_env": "X"}, {}, "daemon.store", "not both"),
        ({"store_dsn_env": "NOPE"}, {}, "daemon.store_dsn_env (the variable NOPE)", "not set"),
        ({"store": "mysql://u:" + SECRET + "@h/db"}, {}, "daemon.store", "postgresql://"),
        ({"store": f"host=h password={SECRET} dbname='jobs"}, {}, "daemon.store",
         "not a PostgreSQL connection string"),
        ({"store": DSN, "lease": 1}, {}, "daemon.lease", "at least 3 seconds"),
    ],
)
def test_bad_store_settings_name_the_key_and_never_the_password(
    table: dict[str, object], env: dict[str, str], where: str, says: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_daemon_table({"data_dir": "/d", **table}, PATH, env)
    assert e.value.where == where and says in e.value.message
    assert SECRET not in str(e.value)


def test_the_database_is_described_without_its_password() -> None:
    from txvmbot.daemon.stores.postgres.db import describe_dsn

    text = describe_dsn(DSN)
    assert text == "postgresql database jobs as txvmbot on db.example:5432"
    assert SECRET not in describe_dsn(f"host=/run/pg dbname=j user=u password={SECRET}")
    assert describe_dsn("::garbage::") == "postgresql database (DSN not shown)"


def test_min_free_mb_defaults_to_50_and_0_turns_it_off() -> None:
    assert parse().min_free_mb == 50.0
    assert parse(min_free_mb=0).min_free_mb == 0.0
    assert parse(min_free_mb=2.5).min_free_mb == 2.5


@pytest.mark.parametrize("bad", [-1, "50", True, float("nan")])
def test_min_free_mb_invalid_names_the_key(bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        parse(min_free_mb=bad)
    assert e.value.where == "daemon.min_free_mb"
    assert PATH in str(e.value)
