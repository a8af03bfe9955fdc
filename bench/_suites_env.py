"""The environment of bench/real_suites.py: a dedicated unprivileged user,
its virtual environment with third-party test suites installed from PyPI
(cached between runs, keyed by what is installed), commands run as that user
over the loopback sshd, and what the runners report (subunit v2, JUnit XML,
txvmbot's JSON) read into one outcome per test.

Third-party suites never run as root here (DESIGN.md, "Real suites and real
guests"): as root, Twisted's own test_logfile chmods the host's /dev/null.
Root only creates the user and the cache directory it owns, and starts the
sshd that logs in as that user; everything else runs in that user's ssh
sessions. Every wait is bounded; only 127.0.0.1 is used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

#: The user the suites run as, and where its environments are kept.
USER = "txvmbot-bench"
CACHE = "/var/tmp/txvmbot-bench"
#: Debian's interpreter: the pyenv python on PATH lives under /root (0700).
SYSTEM_PYTHON = "/usr/bin/python3"

#: What an outcome is called here: txvmbot's words (passed, failed, skipped,
#: timeout, infra), and "xfail" for an expected failure a native runner
#: reported (subunit's xfail, pytest's xfail, which its JUnit XML writes as
#: <skipped type="pytest.xfail">). An xfail counts as passed, as txvmbot
#: counts subunit's; uxsuccess counts as failed.
_SUBUNIT = {
    "success": "passed",
    "xfail": "xfail",
    "fail": "failed",
    "uxsuccess": "failed",
    "skip": "skipped",
}


class BenchError(Exception):
    """The bench cannot go on; the message says what to do."""


# --- the host -------------------------------------------------------------------


def _debian_package_installed(package: str) -> bool:
    p = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, timeout=30
    )
    return p.returncode == 0 and "install ok installed" in p.stdout


def check_host() -> None:
    """Root, and the Debian packages the bench needs (each named with how to
    install it)."""
    if os.geteuid() != 0:
        raise BenchError("run as root: it creates the bench user and starts an sshd that logs in as it")
    missing = [
        pkg
        for pkg, path in (
            ("python3-venv", None),
            ("openssh-server", "/usr/sbin/sshd"),
            ("openssh-client", "/usr/bin/ssh"),
            ("passwd", "/usr/sbin/useradd"),
        )
        if not _debian_package_installed(pkg) or (path is not None and not os.path.exists(path))
    ]
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        missing.insert(0, "python3")
    if missing:
        raise BenchError(
            "missing Debian packages: "
            + " ".join(missing)
            + f"; install them with `apt-get install -y {' '.join(missing)}` (bin/setup does)"
        )


def ensure_user(name: str, home: str) -> pwd.struct_passwd:
    """The unprivileged account the suites run as: created (a system user
    with its own group, a shell and ``home``) if missing, and unlocked (no
    password: without PAM, sshd refuses a locked account whatever the key)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        os.makedirs(os.path.dirname(home), mode=0o755, exist_ok=True)
        subprocess.run(
            ["useradd", "--system", "--user-group", "--create-home", "--home-dir", home,
             "--shell", "/bin/bash", name],
            check=True, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        print(f"created user {name} (home {home})", flush=True)
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise BenchError(f"user {name} is root: third-party suites never run as root")
    with open("/etc/shadow") as f:
        locked = any(line.startswith(f"{name}:!") for line in f)
    if locked:
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True, timeout=60)
    return entry


# --- commands as the user, over the loopback sshd ---------------------------------


@attrs.frozen
class Ran:
    """One ssh command: exit status, output, and its wall time (ssh's
    connection included)."""

    code: int
    stdout: bytes
    stderr: bytes
    wall: float

    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def tail(self, lines: int = 15) -> str:
        both = (self.stdout[-4000:] + b"\n" + self.stderr[-4000:]).decode("utf-8", "replace")
        return "\n".join(both.strip().splitlines()[-lines:])


@attrs.frozen
class Remote:
    """``ssh`` (OpenSSH's client) to ``user``@127.0.0.1:``port`` with
    ``key``: one session per command, as txvmbot's machines are reached."""

    user: str
    port: int
    key: str

    def argv(self, command: str) -> list[str]:
        return [
            "ssh", "-F", "/dev/null", "-n", "-i", self.key, "-p", str(self.port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", f"{self.user}@127.0.0.1", command,
        ]  # fmt: skip

    def run(self, command: str, timeout: float) -> Ran:
        """Run ``command`` in the user's login shell; bounded by ``timeout``
        (then the ssh client is killed, which ends the session)."""
        start = time.perf_counter()
        try:
            p = subprocess.run(self.argv(command), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"ssh command did not end within {timeout:g}s: {command}") from e
        return Ran(p.returncode, p.stdout, p.stderr, time.perf_counter() - start)


# --- the environment ------------------------------------------------------------


@attrs.frozen
class Requirements:
    """What the bench installs: ``packages`` from PyPI as pip resolves them,
    and ``sdists``, projects whose source distributions (with their tests)
    are downloaded, unpacked under src/ and installed from that sdist."""

    packages: tuple[str, ...]
    sdists: tuple[str, ...]

    def key(self) -> str:
        text = json.dumps([SYSTEM_PYTHON, self.packages, self.sdists])
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@attrs.frozen
class Env:
    """One prepared environment, owned by the bench user."""

    directory: str

    @property
    def venv(self) -> str:
        return os.path.join(self.directory, "venv")

    @property
    def bin(self) -> str:
        return os.path.join(self.venv, "bin")

    @property
    def work(self) -> str:
        return os.path.join(self.directory, "work")

    def source(self, project: str) -> str:
        """The unpacked sdist of ``project`` (``python-dateutil==4.0.0``)."""
        def norm(name: str) -> str:
            return re.sub(r"[-_.]+", "_", name).lower()

        name, _, version = project.partition("==")
        src = os.path.join(self.directory, "src")
        for d in sorted(os.listdir(src)):
            d_name, _, d_version = d.rpartition("-")
            if norm(d_name) == norm(name) and d_version == version:
                return os.path.join(src, d)
        raise BenchError(f"{project}: no unpacked sdist under {src} (found {os.listdir(src)})")

    def versions(self, remote: Remote) -> dict[str, str]:
        """Name (lowercase, dashes) to version of what the venv holds, as
        ``pip list`` says (``pip freeze`` names sdists by their file)."""
        ran = remote.run(f"{shlex.quote(self.bin)}/python -m pip list --format=json", timeout=120)
        try:
            found = json.loads(ran.text())
        except ValueError:
            return {}
        return {str(p["name"]).lower().replace("_", "-"): str(p["version"]) for p in found}

    @property
    def offline(self) -> str:
        """A directory whose ``python`` runs the venv's with no network."""
        return os.path.join(self.directory, "offline")

    def session(self, directory: str) -> str:
        """The shell prefix of every command, native or txvmbot's: the
        offline ``python``, then the venv, first on PATH (stestr runs
        ``python`` too), then ``cd directory``."""
        return (
            f"export PATH={shlex.quote(self.offline)}:{shlex.quote(self.bin)}:$PATH"
            f" && cd {shlex.quote(directory)} && "
        )


#: Run as namespace root in a fresh network namespace: bring its loopback
#: up, then map back to the bench user (a nested user namespace) and exec
#: the real interpreter. Arguments: uid gid python args...
_LO_UP = """\
import fcntl, os, socket, struct, sys
uid, gid, real, *args = sys.argv[1:]
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    ifr = fcntl.ioctl(s, 0x8913, struct.pack("16sh", b"lo", 0))  # SIOCGIFFLAGS
    flags = struct.unpack("16sh", ifr)[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", flags | 1))  # SIOCSIFFLAGS, IFF_UP
os.execvp("unshare", ["unshare", "--user", f"--map-user={uid}", f"--map-group={gid}", "--", real, *args])
"""


def install_offline_python(env: Env, remote: Remote, owner: pwd.struct_passwd) -> float:
    """Write ``env.offline``/python: the venv's python in a network
    namespace of its own (an unprivileged user namespace, then one mapped
    back to the bench user's uid and gid), with only a loopback. Third-party
    suites reach nothing but themselves: openstackclient's tests, say, name
    a 192.168.x auth URL that only a mock should ever see. Checks that it
    works (only a loopback, up; the same uid) and returns what one start
    costs, s. Raises BenchError where user namespaces are not allowed."""
    os.makedirs(env.offline, mode=0o755, exist_ok=True)
    helper = os.path.join(env.offline, "lo_up.py")
    with open(helper, "w") as f:
        f.write(_LO_UP)
    wrapper = os.path.join(env.offline, "python")
    real = os.path.join(env.bin, "python")
    with open(wrapper, "w") as f:
        f.write(
            "#!/bin/sh\n# the venv's python with no network but its own loopback (bench/_suites_env.py)\n"
            f"exec unshare --user --map-root-user --net -- {SYSTEM_PYTHON} -I -S {shlex.quote(helper)} "
            f"{owner.pw_uid} {owner.pw_gid} {shlex.quote(real)} \"$@\"\n"
        )
    os.chmod(helper, 0o644)
    os.chmod(wrapper, 0o755)
    # Interfaces, not a connection out: if the namespace were missing, a
    # probe connection would leave the host.
    probe = (
        "import os, socket\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "socket.create_connection(s.getsockname(), timeout=5).close()\n"
        "print(','.join(n for _, n in socket.if_nameindex()), os.getuid(), os.getgid())\n"
    )
    ran = remote.run(f"{shlex.quote(wrapper)} -c {shlex.quote(probe)}", timeout=60)
    want = f"lo {owner.pw_uid} {owner.pw_gid}"
    if ran.code != 0 or ran.text().strip() != want:
        raise BenchError(
            f"the suites run with no network, in a network namespace of an unprivileged user "
            f"namespace (util-linux unshare), and that did not work here (expected {want!r}):\n"
            f"{ran.tail()}\nallow user namespaces (sysctl user.max_user_namespaces, "
            "kernel.unprivileged_userns_clone=1)"
        )
    return ran.wall


def _setup_script(env: Env, reqs: Requirements) -> str:
    q = shlex.quote
    sdists = " ".join(q(s) for s in reqs.sdists)
    packages = " ".join(q(p) for p in reqs.packages)
    return f"""set -eu
cd {q(env.directory)}
rm -rf venv src sdists work freeze.txt
{SYSTEM_PYTHON} -m venv venv
venv/bin/python -m pip download -q --no-binary :all: --no-deps -d sdists {sdists}
mkdir src
for f in sdists/*; do tar xzf "$f" -C src; done
venv/bin/python -m pip install -q {packages} sdists/*
# Compile now: the first timed run should not pay for it.
venv/bin/python -m compileall -q -j 2 src venv/lib >/dev/null 2>&1 || true
mkdir -p work/trial
venv/bin/python -m pip freeze > freeze.txt
"""


def prepare_env(
    remote: Remote, cache: str, reqs: Requirements, owner: pwd.struct_passwd, rebuild: bool = False
) -> Env:
    """The environment for ``reqs`` under ``cache``, made (as the bench user,
    over ssh) unless an earlier run left it complete. Bounded to 15 minutes."""
    os.makedirs(cache, mode=0o755, exist_ok=True)
    env = Env(os.path.join(cache, f"env-{reqs.key()}"))
    ready = os.path.join(env.directory, "READY")
    if os.path.exists(ready) and not rebuild:
        print(f"environment: {env.directory} (cached; --rebuild-env to make it anew)", flush=True)
        return env
    if os.path.exists(ready):
        os.remove(ready)
    os.makedirs(env.directory, mode=0o755, exist_ok=True)
    os.chown(env.directory, owner.pw_uid, owner.pw_gid)
    print(f"environment: making {env.directory} as {remote.user} (pip, a few minutes)...", flush=True)
    log = os.path.join(env.directory, "setup.log")
    command = f"( {_setup_script(env, reqs)} ) > {shlex.quote(log)} 2>&1"
    ran = remote.run(f"bash -c {shlex.quote(command)}", timeout=900)
    if ran.code != 0:
        with open(log, errors="replace") as f:
            tail = "\n".join(f.read().splitlines()[-30:])
        raise BenchError(f"making the environment failed (exit {ran.code}); {log} ends:\n{tail}")
    with open(ready, "w") as f:
        f.write(f"made in {ran.wall:.0f}s\n")
    print(f"environment: made in {ran.wall:.0f}s", flush=True)
    return env


def remove_stale_envs(cache: str, keep: Env) -> list[str]:
    """Environments of other requirements left under ``cache`` (env-*):
    removed, since they are keyed by what they hold and no longer used."""
    gone = []
    for d in sorted(os.listdir(cache)):
        path = os.path.join(cache, d)
        if d.startswith("env-") and path != keep.directory and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


# --- outcomes -------------------------------------------------------------------


def subunit_outcomes(data: bytes) -> tuple[dict[str, str], int]:
    """Test id to outcome from a subunit v2 stream, read by python-subunit
    and testtools (stray bytes between packets are ignored), and how many
    results it holds: a suite may run one id more than once (Twisted's
    does: test modules that import another's TestCase), the last counts."""
    import subunit
    import testtools

    found: dict[str, str] = {}
    results = 0

    def on_test(test: Mapping[str, Any]) -> None:
        nonlocal results
        status = test["status"]
        if status in (None, "exists", "inprogress"):
            return
        results += 1
        found[test["id"]] = _SUBUNIT.get(status, status)

    result = testtools.StreamToDict(on_test)
    stream = subunit.ByteStreamToStreamResult(io.BytesIO(data), non_subunit_name="stdout")
    result.startTestRun()
    try:
        stream.run(result)
    finally:
        result.stopTestRun()
    return found, results


def junit_key(classname: str, name: str) -> str:
    return f"{classname}::{name}" if classname else name


def pytest_junit_key(node_id: str) -> str:
    """The key of a pytest node id as pytest's --junitxml names its testcase
    (``mangle_test_address``): ``tests/test_x.py::TestX::test_y[1-2]`` is
    classname ``tests.test_x.TestX``, name ``test_y[1-2]``."""
    path, bracket, params = node_id.partition("[")
    names = path.split("::")
    if len(names) < 2:
        return node_id
    names[0] = re.sub(r"\.py$", "", names[0].replace("/", "."))
    names[-1] += bracket + params
    return junit_key(".".join(names[:-1]), names[-1])


def junit_outcomes(data: bytes) -> tuple[dict[str, str], int]:
    """Testcase (``classname::name``) to outcome from a JUnit XML report:
    <failure> or <error> failed, pytest's <skipped type="pytest.xfail">
    xfail, any other <skipped> skipped, else passed; and how many testcases
    it holds."""
    found: dict[str, str] = {}
    cases = list(ET.fromstring(data).iter("testcase"))
    for case in cases:
        key = junit_key(case.get("classname") or "", case.get("name") or "")
        if case.find("failure") is not None or case.find("error") is not None:
            found[key] = "failed"
        elif (skipped := case.find("skipped")) is not None:
            found[key] = "xfail" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            found[key] = "passed"
    return found, len(cases)


def txvmbot_outcomes(doc: Mapping[str, Any]) -> dict[str, str]:
    """Test id to outcome from ``txvmbot suite --json``: passed, failed,
    skipped, timeout or infra."""
    return {str(t["test_id"]): str(t["outcome"]) for t in doc["tests"]}


@attrs.frozen
class Counts:
    passed: int
    failed: int
    skipped: int
    other: int  # timeout, infra: txvmbot's own troubles

    @classmethod
    def of(cls, outcomes: Mapping[str, str]) -> Counts:
        """Counted in txvmbot's words: an xfail is passed."""
        c = Counter(_plain(o) for o in outcomes.values())
        return cls(c["passed"], c["failed"], c["skipped"], sum(c.values()) - c["passed"] - c["failed"] - c["skipped"])

    def triple(self) -> tuple[int, int, int]:
        return (self.passed, self.failed, self.skipped)


def _plain(outcome: str) -> str:
    return "passed" if outcome == "xfail" else outcome


def differences(
    native: Mapping[str, str], other: Mapping[str, str]
) -> list[tuple[str, str, str]]:
    """(id, native outcome, other outcome) of every test whose outcome
    differs in txvmbot's words (an xfail is passed), "absent" where one
    side has no such test; sorted by id."""
    return [
        (t, native.get(t, "absent"), other.get(t, "absent"))
        for t in sorted(set(native) | set(other))
        if _plain(native.get(t, "absent")) != _plain(other.get(t, "absent"))
    ]


def short(items: Sequence[str], n: int = 10) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
