"""A real OpenSSH sshd on 127.0.0.1, started by a test and stopped by its pid.

Everything it needs (host key, authorized_keys, pid file, log) lives in a
temporary directory; nothing under ~/.ssh or /etc/ssh is read or written.
The privilege separation directory /run/sshd is created if missing. It
offers the "sftp" subsystem (OpenSSH's sftp-server).

By default it logs in as the user who started it. Started by root with
``user=NAME``, it logs in as that user only (``AllowUsers``, no root login):
benchmarks run third-party test suites that way, never as root (Twisted's
own suite, run as root, chmods the host's /dev/null; see DESIGN.md).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from tests.support.servers import free_port, stop, wait_for_port

SSHD_PATH = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = "/run/sshd"
#: OpenSSH's SFTP server (package openssh-sftp-server, which openssh-server
#: depends on), offered as the "sftp" subsystem for the upload tests.
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@attrs.frozen
class SSHD:
    """A running sshd."""

    port: int
    pid: int
    host_key_fingerprint: str
    host_key_type: str
    user: str
    endpoint: str
    directory: str
    log_path: str

    def log(self) -> str:
        """What sshd wrote so far (it runs with -e: the log is on stderr)."""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _require(path_or_name: str, package: str) -> str:
    found = path_or_name if os.path.isabs(path_or_name) else shutil.which(path_or_name)
    if not found or not os.access(found, os.X_OK):
        raise RuntimeError(
            f"{path_or_name} not found: the ssh integration tests need OpenSSH; "
            f"install it with `apt-get install -y {package}`"
        )
    return found


def keygen_fingerprint(public_key_path: str) -> tuple[str, str]:
    """``ssh-keygen -lf``: the SHA256 fingerprint and the key type, e.g.
    ``("SHA256:abc...", "ED25519")``."""
    keygen = _require(SSH_KEYGEN, "openssh-client")
    out = subprocess.run(
        [keygen, "-E", "sha256", "-lf", public_key_path],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    # "256 SHA256:xxxx comment (ED25519)"
    return out[1], out[-1].strip("()")


def _config(
    directory: str, port: int, extra: list[str], sftp: bool = True, user: str | None = None
) -> str:
    path = os.path.join(directory, "sshd_config")
    # sshd keeps the first value of a keyword: who may log in is decided here.
    who = ["PermitRootLogin prohibit-password"] if user is None else ["PermitRootLogin no", f"AllowUsers {user}"]
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {directory}/host_ed25519",
        f"PidFile {directory}/sshd.pid",
        f"AuthorizedKeysFile {directory}/authorized_keys",
        "StrictModes no",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        *who,
        "UseDNS no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        *([f"Subsystem sftp {SFTP_SERVER}"] if sftp else []),
        *extra,
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _login_user(user: str | None) -> pwd.struct_passwd | None:
    """The account sshd logs in as, when it is not the current user: it must
    exist, have a shell and not be locked (without PAM, sshd refuses a
    locked account whatever the key), and only root can start such an sshd."""
    if user is None or user == pwd.getpwuid(os.getuid()).pw_name:
        return None
    if os.geteuid() != 0:
        raise RuntimeError(f"only root can start an sshd that logs in as another user ({user})")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise RuntimeError(f"no user {user!r}: create it first (useradd)") from None
    if not os.access(entry.pw_shell, os.X_OK) or entry.pw_shell.endswith("nologin"):
        raise RuntimeError(f"user {user!r} has no login shell ({entry.pw_shell}): usermod -s /bin/sh {user}")
    try:
        with open("/etc/shadow") as f:
            hashes = dict(line.split(":", 2)[:2] for line in f if line.count(":") >= 2)
    except OSError:
        hashes = {}
    if hashes.get(user, "").startswith("!"):
        raise RuntimeError(
            f"user {user!r} is locked, and sshd without PAM refuses it: "
            f"usermod -p '*' {user} (no password, not locked)"
        )
    return entry


@contextmanager
def sshd_server(
    authorized_keys: list[str], port: int | None = None, *, sftp: bool = True, user: str | None = None
) -> Iterator[SSHD]:
    """Start ``sshd -D -e`` on 127.0.0.1 (a free port unless ``port`` is
    given) accepting ``authorized_keys`` lines for the current user, or,
    started by root, for ``user`` only; with the "sftp" subsystem unless
    ``sftp`` is False; stop it by pid on exit. Raises RuntimeError if
    OpenSSH is missing or ``user`` cannot log in."""
    sshd = _require(SSHD_PATH, "openssh-server")
    _require(SFTP_SERVER, "openssh-sftp-server")
    keygen = _require(SSH_KEYGEN, "openssh-client")
    login = _login_user(user)
    if os.geteuid() == 0:
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="txvmbot-sshd-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        host_key = os.path.join(directory, "host_ed25519")
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "txvmbot-test-host", "-f", host_key],
            check=True,
            capture_output=True,
            timeout=30,
        )
        fingerprint, kind = keygen_fingerprint(host_key + ".pub")
        keys_path = os.path.join(directory, "authorized_keys")
        with open(keys_path, "w") as f:
            f.write("".join(line.strip() + "\n" for line in authorized_keys))
        os.chmod(keys_path, 0o600)
        if login is not None:
            # sshd reads authorized_keys as the user who logs in.
            os.chown(keys_path, login.pw_uid, login.pw_gid)
            os.chmod(directory, 0o711)
        port = free_port() if port is None else port
        # OpenSSH >= 9.8 penalises addresses that fail to authenticate by
        # refusing them for a while: tests fail auth on purpose, from
        # 127.0.0.1. Older sshd does not know the option; then leave it out.
        config = _config(directory, port, ["PerSourcePenalties no"], sftp, user)
        check = subprocess.run(
            [sshd, "-t", "-f", config], capture_output=True, text=True, timeout=30
        )
        if check.returncode != 0 and "PerSourcePenalties" in check.stderr:
            config = _config(directory, port, [], sftp, user)
            check = subprocess.run(
                [sshd, "-t", "-f", config], capture_output=True, text=True, timeout=30
            )
        if check.returncode != 0:
            raise RuntimeError(f"sshd -t rejected {config}: {check.stderr.strip()}")
        log_path = os.path.join(directory, "sshd.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", config],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            wait_for_port(port, proc, timeout=30)
        except RuntimeError as e:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"{e}; sshd log:\n{f.read()}") from e
        yield SSHD(
            port=port,
            pid=proc.pid,
            host_key_fingerprint=fingerprint,
            host_key_type=kind,
            user=pwd.getpwuid(os.getuid()).pw_name if login is None else login.pw_name,
            endpoint=f"tcp:host=127.0.0.1:port={port}",
            directory=directory,
            log_path=log_path,
        )
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(directory, ignore_errors=True)
