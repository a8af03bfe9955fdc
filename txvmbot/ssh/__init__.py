"""Run commands on a fresh machine over ssh, with twisted.conch.

The server is reached through a Twisted client endpoint string
(``tcp:host=127.0.0.1:port=2222``, ``unix:path=/run/vm.sock``...). Host keys
are accepted whatever they are (every machine is new) and their fingerprint
is recorded; no known_hosts file is read or written and ~/.ssh is never
touched.

``run_commands`` runs a list of commands over one connection and closes it;
``open_session`` holds a ``Session`` open for many ``Session.run`` calls,
``Session.start`` for a long-lived command talked to over its stdin and
stdout (a ``RemoteProcess``), and SFTP transfers: ``Session.upload`` (a file
or tree), and ``write_file``, ``read_file`` and ``remove_file`` for single
small files.
"""

from txvmbot.ssh._keys import (
    fingerprint_sha256,
    generate_key,
    key_type,
    load_private_key,
    public_openssh,
)
from txvmbot.ssh._process import RemoteProcess
from txvmbot.ssh._protocol import Session, open_session
from txvmbot.ssh._run import run_commands, wait_for_ssh
from txvmbot.ssh._values import (
    SSHAuthenticationError,
    SSHCommandFailed,
    SSHCommandTimeout,
    SSHConnectError,
    SSHFileError,
    SSHFileMissing,
    SSHFileTimeout,
    SSHFileTooLarge,
    SSHHostKeyError,
    SSHOutcome,
    SSHUploadError,
    SSHUploadTimeout,
    SSHWaitTimeout,
    UploadResult,
)

__all__ = [
    "RemoteProcess",
    "SSHAuthenticationError",
    "SSHCommandFailed",
    "SSHCommandTimeout",
    "SSHConnectError",
    "SSHFileError",
    "SSHFileMissing",
    "SSHFileTimeout",
    "SSHFileTooLarge",
    "SSHHostKeyError",
    "SSHOutcome",
    "SSHUploadError",
    "SSHUploadTimeout",
    "SSHWaitTimeout",
    "Session",
    "UploadResult",
    "fingerprint_sha256",
    "generate_key",
    "key_type",
    "load_private_key",
    "open_session",
    "public_openssh",
    "run_commands",
    "wait_for_ssh",
]
