"""The TOML config: strict parsing, errors that name their key, layering."""

from __future__ import annotations

import ipaddress
import math
import os
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from txvmbot.config import (
    TIMEOUT_FIELDS,
    CheckSettings,
    CloudSettings,
    Config,
    build_check_spec,
    build_cloud,
    check_cidr,
    load_config,
    parse_config,
    parse_config_text,
)
from txvmbot.errors import ConfigError
from txvmbot.model import CheckSpec, Credentials, RetryPolicy, Timeouts

PATH = "/etc/txvmbot/clouds.toml"

FULL = """
state_dir = "state"

[clouds.prod]
endpoint = "https://ec2.example.com/services/compute"
region = "RegionOne"
signature_version = "v2"
access_key = "AK"
secret_key_env = "PROD_SECRET"
image_name = "debian-12-*"
image_owner = "123456789012"
instance_type = "m1.small"
ssh_user = "debian"
ssh_key = "keys/id_ed25519"
ssh_endpoint = "tcp:host={public_ip}:port=2222"
ssh_cidr = "203.0.113.0/24"
commands = ["uname -a", "true"]
floating_ip = true
address_domain = "standard"
parallel = 3
console = true
ssh = false

[clouds.prod.timeouts]
running = 600
ssh = 90.5

[clouds.prod.retry]
max_attempts = 3
base_delay = 0.5

[clouds.dev]
endpoint = "http://127.0.0.1:5000/"
region = "us-east-1"
"""


def parse(text: str) -> Config:
    return parse_config_text(text, PATH)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def test_full_config() -> None:
    config = parse(FULL)
    assert config.names() == ("prod", "dev")
    assert config.state_dir == "/etc/txvmbot/state"
    prod = config.cloud("prod")
    cloud = build_cloud(
        prod.cloud, CloudSettings(), {"PROD_SECRET": "s3cret"}, name="prod", where="clouds.prod"
    )
    assert cloud.endpoint == "https://ec2.example.com/services/compute"
    assert cloud.region == "RegionOne"
    assert cloud.name == "prod"
    assert cloud.signature_version == "v2"
    assert cloud.credentials == Credentials("AK", "s3cret")
    assert cloud.retry == RetryPolicy(max_attempts=3, base_delay=0.5)
    spec = build_check_spec(cloud, prod.check, CheckSettings())
    assert spec == CheckSpec(
        cloud=cloud,
        image_name="debian-12-*",
        image_owner="123456789012",
        instance_type="m1.small",
        ssh_user="debian",
        ssh_key="/etc/txvmbot/keys/id_ed25519",
        ssh_endpoint="tcp:host={public_ip}:port=2222",
        ssh_cidr="203.0.113.0/24",
        commands=("uname -a", "true"),
        floating_ip=True,
        address_domain="standard",
        parallel=3,
        console=True,
        ssh=False,
        timeouts=Timeouts(running=600.0, ssh=90.5),
    )
    assert "s3cret" not in repr(cloud) and "s3cret" not in repr(prod)


def test_secret_never_in_repr() -> None:
    config = parse(
        '[clouds.a]\nendpoint = "http://h/"\nregion = "r"\naccess_key = "AK"\nsecret_key = "zz9"'
    )
    assert "zz9" not in repr(config)


def test_only_cloud_is_chosen_without_a_name() -> None:
    assert parse('[clouds.one]\nregion = "r"').cloud(None).name == "one"


@pytest.mark.parametrize(
    "name, where, words",
    [
        (None, "--cloud", ["prod", "dev", "--cloud"]),
        ("nope", "--cloud", ["nope", "prod, dev", PATH]),
    ],
)
def test_choosing_a_cloud(name: str | None, where: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse(FULL).cloud(name)
    assert info.value.where == where
    for w in words:
        assert w in str(info.value)


CLOUD = '[clouds.prod]\nendpoint = "https://e/"\nregion = "r"\n'

# (config text, the key path the error must name, words the message must hold)
BAD: list[tuple[str, str, list[str]]] = [
    ('colour = "blue"', "colour", ["unknown key"]),
    ("clouds = 3", "clouds", ["a table", "integer 3"]),
    ('state_dir = ""', "state_dir", ["non-empty string"]),
    ("[clouds]\nprod = 1", "clouds.prod", ["a table"]),
    (CLOUD + "regoin = 'x'", "clouds.prod.regoin", ["unknown key", "region"]),
    (CLOUD + "parallel = true", "clouds.prod.parallel", ["integer", "boolean True"]),
    (CLOUD + "parallel = 0", "clouds.prod.parallel", ["at least 1", "got 0"]),
    (CLOUD + "parallel = 2.0", "clouds.prod.parallel", ["integer", "float 2.0"]),
    (CLOUD + "parallel = '2'", "clouds.prod.parallel", ["integer", "string '2'"]),
    (CLOUD + "floating_ip = 1", "clouds.prod.floating_ip", ["true or false", "integer 1"]),
    (CLOUD + "console = 'yes'", "clouds.prod.console", ["true or false"]),
    (
        CLOUD + "address_domain = 'classic'",
        "clouds.prod.address_domain",
        ['"vpc" or "standard"', "Eucalyptus", "'classic'"],
    ),
    (CLOUD + "address_domain = true", "clouds.prod.address_domain", ["a string", "boolean"]),
    (CLOUD + "ssh = 0", "clouds.prod.ssh", ["true or false"]),
    (CLOUD + "commands = 'uname'", "clouds.prod.commands", ["array of strings"]),
    (CLOUD + "commands = ['ok', 3]", "clouds.prod.commands[1]", ["a string", "integer 3"]),
    (CLOUD + "commands = ['ok', ' ']", "clouds.prod.commands[1]", ["non-empty"]),
    (CLOUD + "signature_version = 'v3'", "clouds.prod.signature_version", ['"v4"', "'v3'"]),
    (CLOUD + "ssh_cidr = '10.0.0.1/8'", "clouds.prod.ssh_cidr", ["CIDR", "10.0.0.0/8"]),
    (CLOUD + "ssh_cidr = '300.1.1.1/32'", "clouds.prod.ssh_cidr", ["CIDR", "300.1.1.1"]),
    (CLOUD + "ssh_endpoint = 'tcp:host={ip'", "clouds.prod.ssh_endpoint", ["template"]),
    (CLOUD + "ssh_endpoint = 'tcp:host={ip}'", "clouds.prod.ssh_endpoint", ["{ip}", "{public_ip}"]),
    (CLOUD + "image = 'ami-1'\nimage_name = 'x'", "clouds.prod.image", ["not both"]),
    (CLOUD + "access_key = 'AK'", "clouds.prod.secret_key", ["required"]),
    (CLOUD + "secret_key = 'S'", "clouds.prod.access_key", ["required"]),
    (
        CLOUD + "access_key = 'A'\nsecret_key = 'S'\nsecret_key_env = 'E'",
        "clouds.prod.secret_key",
        ["not both"],
    ),
    (CLOUD + "timeouts = 5", "clouds.prod.timeouts", ["a table"]),
    (
        CLOUD + "[clouds.prod.timeouts]\nrunning = -1",
        "clouds.prod.timeouts.running",
        ["greater than 0", "-1"],
    ),
    (
        CLOUD + "[clouds.prod.timeouts]\nrunning = 0",
        "clouds.prod.timeouts.running",
        ["greater than 0"],
    ),
    (
        CLOUD + "[clouds.prod.timeouts]\nssh = true",
        "clouds.prod.timeouts.ssh",
        ["number", "boolean"],
    ),
    (CLOUD + "[clouds.prod.timeouts]\nssh = inf", "clouds.prod.timeouts.ssh", ["finite"]),
    (CLOUD + "[clouds.prod.timeouts]\nssh = nan", "clouds.prod.timeouts.ssh", ["finite"]),
    (
        CLOUD + "[clouds.prod.timeouts]\nrunnning = 1",
        "clouds.prod.timeouts.runnning",
        ["unknown key", "running"],
    ),
    (
        CLOUD + "[clouds.prod.timeouts]\npoll_interval = 20",
        "clouds.prod.timeouts.poll_max_interval",
        ["at least", "poll_interval"],
    ),
    (
        CLOUD + "[clouds.prod.retry]\nmax_attempts = 0",
        "clouds.prod.retry.max_attempts",
        ["at least 1"],
    ),
    (
        CLOUD + "[clouds.prod.retry]\nmax_attempts = 1.5",
        "clouds.prod.retry.max_attempts",
        ["integer"],
    ),
    (
        CLOUD + "[clouds.prod.retry]\nbase_delay = -0.1",
        "clouds.prod.retry.base_delay",
        ["at least 0"],
    ),
    (CLOUD + "[clouds.prod.retry]\nmax_delay = 0.1", "clouds.prod.retry.max_delay", ["base_delay"]),
    (CLOUD + "[clouds.prod.retry]\nbackoff = 2", "clouds.prod.retry.backoff", ["unknown key"]),
    ('[clouds.prod]\nendpoint = "ftp://e/"', "clouds.prod.endpoint", ["http(s) URL", "ftp://e/"]),
    ('[clouds.prod]\nendpoint = "ec2.example.com"', "clouds.prod.endpoint", ["http(s) URL"]),
    ('[clouds.prod]\nendpoint = "https://"', "clouds.prod.endpoint", ["http(s) URL"]),
    (
        '[clouds.prod]\nendpoint = "https://h:99999/"',
        "clouds.prod.endpoint",
        ["http(s) URL", "Port out of range"],
    ),
    ("[clouds.prod]\nendpoint = 443", "clouds.prod.endpoint", ["a string", "integer 443"]),
    ('[clouds.prod]\nregion = ""', "clouds.prod.region", ["non-empty"]),
    ('[clouds.""]\nregion = "r"', 'clouds.""', ["name"]),
]


@pytest.mark.parametrize("text, where, words", BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_its_key(text: str, where: str, words: list[str]) -> None:
    e = error_of(text)
    assert e.where == where
    assert str(e).startswith(f"{where}: ")
    assert PATH in e.message
    for w in words:
        assert w in e.message, e.message


def test_missing_file_names_it(tmp_path: Any) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.where == "--config"
    assert path in info.value.message


def test_syntax_error_names_file_and_line(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[clouds.a]\nregion = "r"\nendpoint = \n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(path) in info.value.message
    assert "line 3" in info.value.message


def test_not_utf8(tmp_path: Any) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"state_dir = '\xff'")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(str(path))


def test_load_reads_the_file(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FULL)
    config = load_config(str(path))
    assert config.path == str(path)
    assert config.state_dir == str(tmp_path / "state")


# --- layering --------------------------------------------------------------


def test_flags_over_config_over_defaults() -> None:
    prod = parse(FULL).cloud("prod")
    cloud = build_cloud(
        prod.cloud,
        CloudSettings(region="RegionTwo", signature_version="v4"),
        {"PROD_SECRET": "s"},
        name="prod",
    )
    assert (cloud.region, cloud.signature_version) == ("RegionTwo", "v4")
    assert cloud.endpoint == "https://ec2.example.com/services/compute"
    spec = build_check_spec(
        cloud,
        prod.check,
        CheckSettings(
            image="ami-1",
            parallel=1,
            ssh=True,
            commands=("id",),
            timeouts=(("ssh", 5.0),),
        ),
    )
    # --image replaces the config's image_name; the rest merges field by field.
    assert (spec.image, spec.image_name) == ("ami-1", None)
    assert (spec.parallel, spec.ssh, spec.commands) == (1, True, ("id",))
    assert spec.instance_type == "m1.small"
    assert spec.timeouts == Timeouts(running=600.0, ssh=5.0)
    # Untouched by both: the model's default.
    bare = build_check_spec(cloud, CheckSettings(), CheckSettings(image_name="x"))
    defaults = CheckSpec(cloud=cloud, image_name="x")
    assert bare == defaults


def test_endpoint_and_region_are_required() -> None:
    with pytest.raises(ConfigError) as info:
        build_cloud(CloudSettings(region="r"), CloudSettings(), {})
    assert info.value.where == "--endpoint"
    with pytest.raises(ConfigError) as info:
        build_cloud(CloudSettings(endpoint="http://h/"), CloudSettings(), {}, where="clouds.x")
    assert info.value.where == "--region"
    assert "clouds.x" in info.value.message


def test_image_is_required() -> None:
    cloud = build_cloud(CloudSettings(endpoint="http://h/", region="r"), CloudSettings(), {})
    with pytest.raises(ConfigError) as info:
        build_check_spec(cloud, CheckSettings(), CheckSettings())
    assert info.value.where == "--image"
    assert "--image-name" in info.value.message


def test_secret_from_a_missing_variable() -> None:
    prod = parse(FULL).cloud("prod")
    with pytest.raises(ConfigError) as info:
        build_cloud(prod.cloud, CloudSettings(), {}, where="clouds.prod")
    assert info.value.where == "clouds.prod.secret_key_env"
    assert "PROD_SECRET" in info.value.message


def test_credentials_from_the_environment() -> None:
    base = CloudSettings(endpoint="http://h/", region="r")
    env = {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S", "AWS_SESSION_TOKEN": "T"}
    assert build_cloud(base, CloudSettings(), env).credentials == Credentials("A", "S", "T")
    # A named profile is the EC2 client's to resolve.
    withprofile = build_cloud(base, CloudSettings(profile="p"), env)
    assert withprofile.credentials is None and withprofile.profile == "p"
    assert build_cloud(base, CloudSettings(), {}).credentials is None


def test_timeouts_consistent_across_layers() -> None:
    cloud = build_cloud(CloudSettings(endpoint="http://h/", region="r"), CloudSettings(), {})
    with pytest.raises(ConfigError) as info:
        build_check_spec(
            cloud,
            CheckSettings(image="a", timeouts=(("poll_max_interval", 2.0),)),
            CheckSettings(timeouts=(("poll_interval", 3.0),)),
        )
    assert info.value.where == "--timeout-poll-max-interval"
    assert "--timeout-poll-interval" in info.value.message


@pytest.mark.parametrize(
    "given, normal",
    [("10.1.0.0/16", "10.1.0.0/16"), ("203.0.113.5", "203.0.113.5/32"), ("::/0", "::/0")],
)
def test_cidr_normalized(given: str, normal: str) -> None:
    assert check_cidr("x", given) == normal


# --- properties ------------------------------------------------------------


def toml_str(s: str) -> str:
    """A TOML basic string: escape quotes, backslashes and control characters."""
    return (
        '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or c in '"\\\x7f' else c for c in s) + '"'
    )


def toml_value(v: Any) -> str:
    """A tiny TOML writer for the values these tests generate."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def toml_doc(clouds: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in clouds.items():
        out.append(f"[clouds.{toml_str(name)}]")
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        for k, v in table.items():
            if not isinstance(v, dict):
                out.append(f"{k} = {toml_value(v)}")
        for sub, values in subtables.items():
            out.append(f"[clouds.{toml_str(name)}.{sub}]")
            for k, v in values.items():
                out.append(f"{k} = {toml_value(v)}")
    return "\n".join(out) + "\n"


text = st.text(min_size=1, max_size=20).filter(lambda s: s.strip() != "")
seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False) | st.integers(1, 10**6)
cloud_tables = st.fixed_dictionaries(
    {
        "endpoint": st.sampled_from(["http://127.0.0.1:5000/", "https://ec2.example.com/x"]),
        "region": text,
    },
    optional={
        "signature_version": st.sampled_from(["v4", "v2"]),
        "profile": text,
        "image": text,
        "image_owner": text,
        "instance_type": text,
        "ssh_user": text,
        "ssh_key": text.map(lambda s: "/keys/" + s),
        "ssh_endpoint": st.sampled_from(
            ["tcp:host={public_ip}:port=22", "tcp:host=127.0.0.1:port={index}", "unix:/s"]
        ),
        "ssh_cidr": st.builds(
            lambda a, p: str(ipaddress.ip_network(f"{a}/{p}", strict=False)),
            st.ip_addresses(v=4),
            st.integers(0, 32),
        ),
        "commands": st.lists(text, max_size=3),
        "floating_ip": st.booleans(),
        "address_domain": st.sampled_from(["vpc", "standard"]),
        "parallel": st.integers(1, 50),
        "console": st.booleans(),
        "ssh": st.booleans(),
        "timeouts": st.fixed_dictionaries(
            {}, optional={k: seconds for k in TIMEOUT_FIELDS if not k.startswith("poll")}
        ),
        "retry": st.fixed_dictionaries(
            {},
            optional={
                "max_attempts": st.integers(1, 20),
                "request_timeout": seconds,
                "max_elapsed": seconds,
            },
        ),
    },
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(text, cloud_tables, min_size=1, max_size=3))
def test_valid_configs_round_trip(clouds: dict[str, dict[str, Any]]) -> None:
    config = parse(toml_doc(clouds))
    assert config.names() == tuple(clouds)
    for name, table in clouds.items():
        chosen = config.cloud(name)
        cloud = build_cloud(chosen.cloud, CloudSettings(), {}, name=name)
        assert cloud.endpoint == table["endpoint"]
        assert cloud.region == table["region"]
        assert cloud.signature_version == table.get("signature_version", "v4")
        assert cloud.profile == table.get("profile")
        assert cloud.retry == RetryPolicy(**table.get("retry", {}))
        spec = build_check_spec(cloud, chosen.check, CheckSettings(image_name="fallback"))
        expected: dict[str, Any] = {
            k: v
            for k, v in table.items()
            if k in attrs.fields_dict(CheckSpec) and k not in ("timeouts", "image")
        }
        if "commands" in expected:
            expected["commands"] = tuple(expected["commands"])
        assert spec == CheckSpec(
            cloud=cloud,
            image_name="fallback",
            timeouts=Timeouts(**table.get("timeouts", {})),
            **expected,
        )
        if "image" in table:
            assert build_check_spec(cloud, chosen.check, CheckSettings()).image == table["image"]


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.datetimes()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
known_keys = st.sampled_from(
    [
        "endpoint",
        "region",
        "signature_version",
        "access_key",
        "secret_key",
        "secret_key_env",
        "image",
        "image_name",
        "ssh_cidr",
        "ssh_endpoint",
        "commands",
        "parallel",
        "floating_ip",
        "address_domain",
        "timeouts",
        "retry",
        "ssh",
        "console",
        "junk",
    ]
)
near_valid = st.fixed_dictionaries(
    {
        "clouds": st.dictionaries(
            st.text(max_size=5),
            st.dictionaries(
                known_keys,
                toml_values
                | st.dictionaries(
                    st.sampled_from([*TIMEOUT_FIELDS, "max_attempts", "x"]), toml_scalars
                ),
                max_size=6,
            ),
            max_size=3,
        )
    },
    optional={"state_dir": toml_values},
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(toml_values, st.dictionaries(st.text(max_size=8), toml_values), near_valid))
def test_junk_raises_only_config_error(data: Any) -> None:
    try:
        config = parse_config(data if isinstance(data, dict) else {"clouds": data}, PATH)
    except ConfigError as e:
        assert e.where and e.message
        return
    for chosen in config.clouds:
        try:
            cloud = build_cloud(chosen.cloud, CloudSettings(), {"E": "v"}, name=chosen.name)
            build_check_spec(cloud, chosen.check, CheckSettings())
        except ConfigError:
            pass


@settings(max_examples=200)
@given(st.text(max_size=200))
def test_junk_text_raises_only_config_error(junk: str) -> None:
    try:
        parse(junk)
    except ConfigError:
        pass


def test_no_float_surprises() -> None:
    # 1e400 is inf in TOML too.
    e = error_of(CLOUD + "[clouds.prod.timeouts]\nssh = 1e400")
    assert e.where == "clouds.prod.timeouts.ssh"
    assert math.isinf(float("1e400"))


def test_paths_relative_to_the_config() -> None:
    c = parse_config_text('state_dir = "~/s"\n[clouds.a]\nssh_key = "k"', "rel/c.toml")
    assert c.state_dir == "~/s"
    assert c.cloud("a").check.ssh_key == os.path.join("rel", "k")


def test_odd_names_are_quoted_in_key_paths() -> None:
    e = error_of('[clouds."my cloud"]\nparallel = 0')
    assert e.where == 'clouds."my cloud".parallel'
