"""``--user-data``: reading the file (size, errors that name the flag and
the file) and merging it with txvmbot's own NoCloud cloud-config."""

from __future__ import annotations

import email
import gzip
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from txvmbot.errors import ConfigError
from txvmbot.qemu import _image_errors
from txvmbot.qemu.image import make_nocloud_seed, nocloud_files, read_vfat_file
from txvmbot.qemu.model import READY_MARKER
from txvmbot.userdata import (
    MAX_BYTES,
    MERGE_TYPE,
    merge_cloud_config,
    merge_nocloud,
    read_user_data,
    user_data_text,
)

PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHoxqk+0JekBYt7ed4e9HGR7wOP76iL1oLr4dfktgY2F t"


def own(user: str = "debian") -> str:
    return nocloud_files(PUB, user=user)["user-data"]


# --- reading ------------------------------------------------------------------


def test_read_user_data_takes_up_to_the_limit(tmp_path: Path) -> None:
    p = tmp_path / "ud"
    p.write_bytes(b"#!/bin/sh\n" + b"x" * (MAX_BYTES - 10))
    assert len(read_user_data(str(p))) == MAX_BYTES


def test_read_user_data_errors_name_the_flag_the_file_and_the_size(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#cloud-config\n" + b"#" * 20000)
    with pytest.raises(ConfigError) as e:
        read_user_data(str(big))
    assert e.value.where == "--user-data"
    assert str(big) in e.value.message and "20014 bytes" in e.value.message
    assert "16384" in e.value.message and "16 KB" in e.value.message

    with pytest.raises(ConfigError, match=r"--user-data: cannot read .*missing: No such file"):
        read_user_data(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"--user-data: cannot read .*: Is a directory"):
        read_user_data(str(tmp_path))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"--user-data: {empty} is empty"):
        read_user_data(str(empty))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_read_user_data_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "secret"
    p.write_bytes(b"#!/bin/sh\n")
    p.chmod(0)
    with pytest.raises(ConfigError, match=rf"--user-data: cannot read {p}: Permission denied"):
        read_user_data(str(p))


def test_user_data_text_needs_utf8_and_reads_gzip() -> None:
    with pytest.raises(ConfigError, match=r"--user-data: ud.bin is not UTF-8 text .*at byte 1"):
        user_data_text(b"#\xff\xfe", "--user-data", "ud.bin")
    assert user_data_text(gzip.compress(b"#!/bin/sh\necho hi\n"), "x") == "#!/bin/sh\necho hi\n"
    with pytest.raises(ConfigError, match="gzip that is truncated"):
        user_data_text(gzip.compress(b"#!/bin/sh\n")[:-6], "x")
    with pytest.raises(ConfigError, match="expands past"):
        user_data_text(gzip.compress(b" " * (2 << 20)), "x")


# --- merging a #cloud-config ----------------------------------------------------


def test_cloud_config_keeps_txvmbots_user_key_and_marker() -> None:
    theirs = (
        "#cloud-config\n"
        "packages: [python3-pytest]\n"
        "hostname: theirs\n"
        "final_message: all done\n"
        "users:\n"
        "  - name: alice\n"
        "    ssh_authorized_keys: [ssh-ed25519 AAAA alice]\n"
        "runcmd:\n"
        "  - [touch, /tmp/ran]\n"
    )
    text = merge_nocloud(own(), theirs.encode())
    assert text.startswith("#cloud-config\n")
    merged = yaml.safe_load(text)
    assert merged["packages"] == ["python3-pytest"]
    assert merged["runcmd"] == [["touch", "/tmp/ran"]]
    assert merged["hostname"] == "theirs"
    assert merged["final_message"] == f"all done\n{READY_MARKER}"
    names = [u if isinstance(u, str) else u["name"] for u in merged["users"]]
    assert names == ["alice", "default", "debian"]
    debian = merged["users"][2]
    assert debian["ssh_authorized_keys"] == [PUB] and debian["sudo"] == "ALL=(ALL) NOPASSWD:ALL"


def test_a_user_of_the_same_name_gets_txvmbots_key_too() -> None:
    theirs = {"users": ["default", {"name": "debian", "shell": "/bin/bash",
                                    "ssh_authorized_keys": ["ssh-ed25519 AAAA mine"]}]}
    merged = merge_cloud_config(theirs, yaml.safe_load(own()))
    assert merged["users"][0] == "default" and len(merged["users"]) == 2
    debian = merged["users"][1]
    assert debian["shell"] == "/bin/bash"  # theirs wins where both say
    assert debian["ssh_authorized_keys"] == ["ssh-ed25519 AAAA mine", PUB]
    assert debian["sudo"] == "ALL=(ALL) NOPASSWD:ALL"
    named = merge_cloud_config({"users": "debian, bob"}, yaml.safe_load(own()))
    assert [u if isinstance(u, str) else u["name"] for u in named["users"]] == [
        "debian", "bob", "default"]
    assert named["users"][0]["ssh_authorized_keys"] == [PUB]


def test_root_keeps_root_login_and_its_key() -> None:
    theirs = b"#cloud-config\ndisable_root: true\nssh_authorized_keys: [ssh-rsa AAAA x]\n"
    merged = yaml.safe_load(merge_nocloud(own("root"), theirs))
    assert merged["disable_root"] is False
    assert merged["ssh_authorized_keys"] == ["ssh-rsa AAAA x", PUB]
    assert merged["final_message"] == READY_MARKER
    assert yaml.safe_load(merge_nocloud(own("root"), b"#cloud-config\n")) == yaml.safe_load(own("root"))


def test_bad_cloud_config_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--user-data: ud is #cloud-config but not valid YAML"):
        merge_nocloud(own(), b"#cloud-config\nusers: [a\n", name="ud")
    with pytest.raises(ConfigError, match="a YAML list, not a mapping"):
        merge_nocloud(own(), b"#cloud-config\n- a\n- b\n")
    with pytest.raises(ConfigError, match="--user-data: user data is not UTF-8"):
        merge_nocloud(own(), b"#cloud-config\nx: \xff\n")


cloud_keys = st.dictionaries(
    st.sampled_from(["packages", "runcmd", "write_files", "hostname", "users", "final_message",
                     "ssh_authorized_keys", "timezone"]),
    st.one_of(st.text(max_size=20), st.lists(st.text(max_size=10), max_size=3)),
    max_size=6,
)


@given(cloud_keys)
def test_any_cloud_config_merge_keeps_what_txvmbot_needs(theirs: dict[str, object]) -> None:
    text = "#cloud-config\n" + yaml.safe_dump(theirs)
    merged = yaml.safe_load(merge_nocloud(own(), text.encode()))
    debian = [u for u in merged["users"] if isinstance(u, dict) and u.get("name") == "debian"]
    assert debian and PUB in debian[0]["ssh_authorized_keys"]
    assert merged["final_message"].endswith(READY_MARKER)
    for key, value in theirs.items():
        if key not in ("users", "final_message", "ssh_authorized_keys"):
            assert merged[key] == value


# --- anything else: MIME multi-part ------------------------------------------------


def _parts(text: str) -> list[tuple[str, str, dict[str, str]]]:
    msg = email.message_from_string(text)
    assert msg.is_multipart() and "MIME-Version: 1.0" in text
    out = []
    for p in msg.walk():
        if p.is_multipart():
            continue
        out.append((p.get_content_type(), p.get_payload(decode=True).decode(), dict(p.items())))
    return out


def test_a_shell_script_goes_first_then_txvmbots_cloud_config() -> None:
    script = "#!/bin/sh\necho from-the-user > /dev/console\n"
    parts = _parts(merge_nocloud(own(), script.encode()))
    assert [(t, b) for t, b, _ in parts] == [("text/x-shellscript", script),
                                            ("text/cloud-config", own())]
    assert parts[1][2]["Merge-Type"] == MERGE_TYPE


@pytest.mark.parametrize(
    ("first", "ctype"),
    [("#include\nhttp://127.0.0.1/x\n", "text/x-include-url"),
     ("## template: jinja\n#cloud-config\nhostname: {{ v1.local_hostname }}\n", "text/jinja2"),
     ("#cloud-boothook\n#!/bin/sh\ntrue\n", "text/cloud-boothook"),
     ("just words\n", "text/plain")],
)
def test_other_kinds_keep_their_type(first: str, ctype: str) -> None:
    parts = _parts(merge_nocloud(own(), first.encode()))
    assert parts[0][:2] == (ctype, first) and parts[1][0] == "text/cloud-config"


def test_a_users_mime_document_keeps_its_parts() -> None:
    from email.mime.multipart import MIMEMultipart
    from email.mime.text import MIMEText

    theirs = MIMEMultipart()
    theirs.attach(MIMEText("#cloud-config\npackages: [git]\n", "cloud-config"))
    theirs.attach(MIMEText("#!/bin/sh\ntrue\n", "x-shellscript"))
    parts = _parts(merge_nocloud(own(), theirs.as_bytes()))
    assert [t for t, _, _ in parts] == ["text/cloud-config", "text/x-shellscript",
                                        "text/cloud-config"]
    assert parts[0][1] == "#cloud-config\npackages: [git]\n" and parts[2][1] == own()


@pytest.mark.skipif(
    not (_image_errors.find_tool("mkfs.vfat") and _image_errors.find_tool("mtype")),
    reason="needs dosfstools and mtools",
)
def test_the_seed_holds_the_merged_user_data(tmp_path: Path) -> None:
    seed = make_nocloud_seed(str(tmp_path), PUB, user="debian",
                             user_data=b"#cloud-config\npackages: [git]\n")
    merged = yaml.safe_load(read_vfat_file(seed, "user-data"))
    assert merged["packages"] == ["git"] and merged["final_message"] == READY_MARKER


# --- in a job spec (the daemon's wire and store) ---------------------------------


def _cloud_job(user_data: bytes | None) -> object:
    from txvmbot.daemon.jobs import JobSpec
    from txvmbot.model import CheckSpec, Cloud

    check = CheckSpec(cloud=Cloud("http://127.0.0.1:5000", "us-east-1"), image="ami-1",
                      user_data=user_data)
    return JobSpec(check=check, backend="b")


@given(st.binary(min_size=1, max_size=MAX_BYTES))
def test_cloud_job_round_trips_its_user_data(data: bytes) -> None:
    from txvmbot.daemon import codec

    doc = codec.spec_to_dict(_cloud_job(data))  # type: ignore[arg-type]
    assert set(doc) >= {"user_data_base64"} and "user_data" not in doc
    back = codec.spec_from_dict(codec.loads(codec.dumps(doc), "spec"))
    assert back.check.user_data == data  # type: ignore[union-attr]


def test_local_job_round_trips_and_a_pool_job_takes_it() -> None:
    from txvmbot.daemon import codec
    from txvmbot.daemon.jobs import JobSpec
    from txvmbot.qemu.model import LocalPool, LocalSpec

    pool = LocalPool(name="cloudy", image_dir="/i", run_dir="/r")
    spec = JobSpec(check=LocalSpec(pool=pool, user_data=b"#!/bin/sh\n"), backend="cloudy")
    doc = codec.spec_to_dict(spec)
    assert codec.spec_from_dict(doc).check.user_data == b"#!/bin/sh\n"  # type: ignore[union-attr]
    public = {"pool": "cloudy", "user_data_base64": "IyEvYmluL3NoCg=="}
    job = codec.spec_from_dict(public, "spec", {"cloudy": pool})
    assert job.check.user_data == b"#!/bin/sh\n"  # type: ignore[union-attr]
    assert "#!/bin/sh" not in repr(job) and "IyEv" not in repr(job)


def test_jobs_stored_before_user_data_still_load() -> None:
    from txvmbot.daemon import codec

    stored = {"id": "j1", "state": "passed", "submitted": 1.0, "attempts": 1,
              "spec": {"backend": "b", "bound": 3600.0, "endpoint": "http://127.0.0.1:5000",
                       "image": "ami-1", "max_attempts": 2, "priority": 0,
                       "region": "us-east-1", "signature_version": "v4"}}
    assert codec.job_from_dict(stored).spec.check.user_data is None  # type: ignore[union-attr]
    local = dict(stored, spec={"pool": "local", "commands": ["true"]})
    assert codec.job_from_dict(local).spec.check.user_data is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "message"),
    [(7, "expected a base64 string, found int"),
     ("not base64!", "not valid base64"),
     ("", "user data is empty"),
     ("eHh4" * 5462, "16386 bytes is over the user data limit")],
)
def test_bad_user_data_in_a_job_names_the_key(value: object, message: str) -> None:
    from txvmbot.daemon import codec

    for doc in ({"endpoint": "http://127.0.0.1:5000", "region": "r", "image": "ami-1"},
                {"pool": "local"}):
        with pytest.raises(ConfigError, match=message) as e:
            codec.spec_from_dict(dict(doc, user_data_base64=value), "spec")
        assert e.value.where == "spec.user_data_base64"


def test_suite_local_takes_an_image_by_name_and_user_data(tmp_path: Path) -> None:
    """``suite --local --image NAME --user-data FILE``: the suite's machines
    are local VMs on that image, each with the user data."""
    from txvmbot.cli import build_parser
    from txvmbot.cli.check import target_from_args
    from txvmbot.cli.suite import suite_spec_from_args

    state = tmp_path / "state"
    (state / "images" / "deb").mkdir(parents=True)
    ud = tmp_path / "ud"
    ud.write_bytes(b"#cloud-config\npackages: [git]\n")
    tests = tmp_path / "tests"
    tests.write_text("a.test\n")
    args = build_parser().parse_args(
        ["suite", "--local", "--image", "deb", "--user-data", str(ud), "--state-dir", str(state),
         "--run", "true {test}", "--tests", str(tests), "--machines", "2"])
    target, _, _ = target_from_args(args, {"HOME": str(tmp_path)})
    spec = suite_spec_from_args(args, target)
    assert spec.target.pool.image_dir == str(state / "images" / "deb")
    assert spec.target.user_data == ud.read_bytes() and spec.machines == 2
    args.user_data = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="--user-data: cannot read"):
        target_from_args(args, {"HOME": str(tmp_path)})
