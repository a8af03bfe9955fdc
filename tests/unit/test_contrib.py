"""The systemd unit, sysusers file and example config in contrib/: what a
packager ships. Always parsed with Python (the keys that make the daemon
start, stop and stay confined correctly); also checked by systemd's own
tools where they are installed (Debian's ``systemd`` package)."""

from __future__ import annotations

import configparser
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths

ROOT = Path(paths.ROOT)
CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "txvmbot.service"
SYSUSERS = CONTRIB / "txvmbot.sysusers"
CONFIG = CONTRIB / "txvmbot.toml"
STATE = "/var/lib/txvmbot"


def unit() -> configparser.ConfigParser:
    # strict: a key given twice is an error here (systemd would take the
    # last one silently); no interpolation: systemd's % specifiers are not
    # configparser's; keys keep their case.
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(), str(UNIT))
    return parser


def seconds(value: str) -> float:
    """A systemd time span of the forms used here: ``90``, ``90s``, ``2min``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value.strip())
    assert m, f"not a simple time span: {value!r}"
    n = float(m.group(1))
    return n * 60 if m.group(2) in ("min", "m") else n


def exec_start() -> list[str]:
    return shlex.split(unit()["Service"]["ExecStart"])


def test_unit_runs_twistd_in_the_foreground() -> None:
    service = unit()["Service"]
    assert service["Type"] == "simple"
    argv = exec_start()
    assert argv[0] == "/usr/bin/twistd"
    plugin = argv.index("txvmbot")
    # twistd's own options come before the plugin name, the daemon's after.
    assert "--nodaemon" in argv[:plugin]
    assert "--pidfile=" in argv[:plugin]  # no pid file: systemd has the pid
    assert argv[plugin + 1 :] == [
        "--config", "/etc/txvmbot/txvmbot.toml", "--data-dir", STATE,
    ]


def test_unit_runs_as_its_own_user_with_a_state_directory() -> None:
    service = unit()["Service"]
    assert (service["User"], service["Group"]) == ("txvmbot", "txvmbot")
    assert "DynamicUser" not in service
    assert service["StateDirectory"] == "txvmbot"  # /var/lib/txvmbot
    assert service["StateDirectoryMode"] == "0700"
    assert service["Environment"] == "XDG_STATE_HOME=/var/lib"


def test_unit_restarts_on_failure_and_stops_after_the_daemon_cleans_up() -> None:
    from txvmbot.daemon.workers.pool import AmpoulePool

    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert seconds(service["RestartSec"]) > 0
    assert service["KillMode"] == "mixed"
    # On SIGTERM the pool waits up to stop_timeout for its workers to clean
    # up; systemd must not SIGKILL them before that.
    stop_timeout = inspect.signature(AmpoulePool).parameters["stop_timeout"].default
    assert seconds(service["TimeoutStopSec"]) >= stop_timeout + 15
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_unit_hardening_leaves_qemu_working() -> None:
    service = unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert STATE in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] == "yes"
    # These would hide /dev/kvm or stop TCG's generated code.
    for breaks_qemu in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "MemoryDenyWriteExecute"):
        assert breaks_qemu not in service, breaks_qemu


def test_unit_arguments_are_the_daemons_options() -> None:
    """What follows ``txvmbot`` in ExecStart parses as the plugin's options,
    with the example config standing in for /etc/txvmbot/txvmbot.toml."""
    from txvmbot.tap import Options

    argv = exec_start()
    args = argv[argv.index("txvmbot") + 1 :]
    args[args.index("/etc/txvmbot/txvmbot.toml")] = str(CONFIG)
    options = Options()
    options.parseOptions(args)
    settings = options.settings
    assert settings.data_dir == STATE
    assert settings.socket_path == f"{STATE}/txvmbot.sock"
    (pool,) = settings.pools_by_name.values()
    assert pool.image_dir == f"{STATE}/image" and pool.run_dir == f"{STATE}/vms"


def test_example_config_serves_the_cli_too() -> None:
    from txvmbot.config import load_config

    assert load_config(str(CONFIG)).state_dir == STATE


def test_unit_default_state_dir_matches() -> None:
    """With the unit's environment, the defaults that derive from the state
    dir (the image `txvmbot image build` writes) land in the StateDirectory."""
    from txvmbot.daemon.settings import embedded_default
    from txvmbot.qemu.image import default_image_dir

    env = dict(kv.split("=", 1) for kv in unit()["Service"]["Environment"].split())
    env["HOME"] = "/nonexistent"  # not what decides it
    assert embedded_default(env).data_dir == STATE
    assert default_image_dir(env) == f"{STATE}/image"


def test_sysusers_line() -> None:
    lines = [
        shlex.split(line)
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["u", "txvmbot", "-", "txvmbot daemon", STATE, "/usr/sbin/nologin"] in lines
    assert ["m", "txvmbot", "kvm"] in lines


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package: systemd)")
    return path


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: a bad value or unknown key is only a warning
    (exit status 0), so any output about the unit fails the test too."""
    analyze = _tool("systemd-analyze")
    # verify checks that ExecStart's program exists: use this venv's twistd.
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    assert os.access(twistd, os.X_OK), twistd
    text = UNIT.read_text()
    assert text.count("\nExecStart=/usr/bin/twistd ") == 1
    text = text.replace("\nExecStart=/usr/bin/twistd ", f"\nExecStart={twistd} ")

    def verify(name: str, unit_text: str) -> tuple[int, list[str]]:
        copy = tmp_path / name
        copy.write_text(unit_text)
        p = subprocess.run(
            [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60
        )
        return p.returncode, [line for line in (p.stdout + p.stderr).splitlines() if name in line]

    assert verify("txvmbot.service", text) == (0, [])
    # The check can fail: a misspelt key is reported (as a warning).
    _, said = verify("broken.service", text.replace("KillMode=mixed", "KilMode=mixed"))
    assert any("KilMode" in line for line in said), said


def test_systemd_sysusers_creates_the_user(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    p = subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    (user,) = [line.split(":") for line in passwd if line.startswith("txvmbot:")]
    assert (user[5], user[6]) == (STATE, "/usr/sbin/nologin")
    groups = {line.split(":")[0]: line.split(":")[3] for line in
              (tmp_path / "etc" / "group").read_text().splitlines()}
    assert groups["kvm"] == "txvmbot" and "txvmbot" in groups
