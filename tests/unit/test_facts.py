"""The guest facts read in the same ssh round trip as ``uname -a``: the
os-release parsing (real samples, empty, garbage) and how the smoke job
splits the command's output. The command itself runs against a real shell
here and against real guests in tests/integration/test_local.py."""

from __future__ import annotations

import os
import subprocess

from hypothesis import given
from hypothesis import strategies as st

from txvmbot.facts import (
    GUEST_FACTS_COMMAND,
    MAX_GUEST_OS,
    guest_os,
    parse_os_release,
    split_guest_facts,
)
from txvmbot.jobs.smoke import UNAME, judge
from txvmbot.model import CommandResult

DEBIAN = """\
PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"""

UBUNTU = """\
PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.1 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=noble
"""

FEDORA = """\
NAME="Fedora Linux"
VERSION="40 (Cloud Edition)"
ID=fedora
VERSION_ID=40
VERSION_CODENAME=""
PLATFORM_ID="platform:f40"
PRETTY_NAME="Fedora Linux 40 (Cloud Edition)"
ANSI_COLOR="0;38;2;60;110;180"
# a comment
CPE_NAME="cpe:/o:fedoraproject:fedora:40"
"""

DEBIAN_SID = """\
PRETTY_NAME="Debian GNU/Linux trixie/sid"
NAME="Debian GNU/Linux"
VERSION_CODENAME=trixie
ID=debian
"""

BUSYBOX = "BusyBox v1.36.1 (Debian 1:1.36.1-6) multi-call binary.\n"
UNAME_A = "Linux vm-1 6.1.0-18-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 x86_64 GNU/Linux"


def test_distributions() -> None:
    assert guest_os(DEBIAN) == "debian 12"
    assert guest_os(UBUNTU) == "ubuntu 24.04"
    assert guest_os(FEDORA) == "fedora 40"
    # No VERSION_ID (a testing release): its PRETTY_NAME.
    assert guest_os(DEBIAN_SID) == "Debian GNU/Linux trixie/sid"
    assert guest_os("ID=Arch\n") == "arch"


def test_parsing_quotes_and_comments() -> None:
    values = parse_os_release(FEDORA)
    assert values["VERSION_CODENAME"] == "" and values["CPE_NAME"].startswith("cpe:/o:")
    assert "# a comment" not in values
    assert parse_os_release('NAME=\'single quoted\'\nX="a \\"b\\" \\$c"\n') == {
        "NAME": "single quoted",
        "X": 'a "b" $c',
    }


def test_busybox_banner() -> None:
    assert guest_os(BUSYBOX) == "busybox 1.36.1"


def test_empty_and_garbage_are_unknown_not_errors() -> None:
    for text in ("", "\n\n", "cat: /etc/os-release: No such file", "\x00\xff==\n=x\nid=lower\n"):
        assert guest_os(text) == ""
    assert len(guest_os("PRETTY_NAME=" + "x" * 500)) == MAX_GUEST_OS
    assert guest_os("ID=debian\nVERSION_ID=12\x00\x07\n") == "debian 12"


@given(st.text())
def test_any_text_gives_a_short_printable_line(text: str) -> None:
    found = guest_os(text)
    assert len(found) <= MAX_GUEST_OS and found.isprintable()


def test_split_uname_and_os_release() -> None:
    assert split_guest_facts(UNAME_A + "\n" + DEBIAN) == (UNAME_A, "debian 12")
    assert split_guest_facts(UNAME_A + "\n" + BUSYBOX) == (UNAME_A, "busybox 1.36.1")
    assert split_guest_facts(UNAME_A + "\n") == (UNAME_A, "")
    assert split_guest_facts("") == ("", "")


def result(stdout: str, exit_status: int = 0, command: str = UNAME) -> CommandResult:
    return CommandResult(command, exit_status, stdout.encode())


def test_judge_splits_the_facts_command_off() -> None:
    done = judge([result(UNAME_A + "\n" + UBUNTU), result("hi\n", command="echo hi")])
    assert (done.uname, done.guest_os, done.failures) == (UNAME_A, "ubuntu 24.04", ())
    assert [r.command for r in done.results] == ["echo hi"]
    # uname failed: neither fact, and no failure of the user's commands.
    done = judge([result("", exit_status=127), result("hi\n", command="echo hi")])
    assert (done.uname, done.guest_os, done.failures) == ("", "", ())


def test_command_in_a_real_shell() -> None:
    """One line of uname, then this host's os-release (or nothing), exit 0."""
    assert UNAME == GUEST_FACTS_COMMAND
    p = subprocess.run(
        ["sh", "-c", GUEST_FACTS_COMMAND], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0, p.stderr
    uname, found = split_guest_facts(p.stdout)
    assert uname == subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
    if os.path.exists("/etc/os-release"):
        with open("/etc/os-release") as f:
            assert found == guest_os(f.read()) != ""
