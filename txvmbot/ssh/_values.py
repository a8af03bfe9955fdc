"""What running commands over ssh produces, and how it fails."""

from __future__ import annotations

from attrs import frozen

from txvmbot.errors import SSHError
from txvmbot.model import CommandResult


@frozen
class SSHOutcome:
    """One ssh session: the host key the server presented and the result of
    every command, in order. A non-zero exit is a result, not an error."""

    host_key_fingerprint: str
    host_key_type: str
    results: tuple[CommandResult, ...]


class SSHConnectError(SSHError):
    """No authenticated ssh session could be set up.

    ``reason`` is the short cause ("connection refused", "timed out after 10s
    while exchanging keys"); ``transient`` is False when retrying cannot help
    (a malformed endpoint string).
    """

    def __init__(self, endpoint: str, user: str, reason: str, *, transient: bool = True) -> None:
        super().__init__(f"ssh to {endpoint} as {user}: {reason}")
        self.endpoint = endpoint
        self.user = user
        self.reason = reason
        self.transient = transient


class SSHAuthenticationError(SSHConnectError):
    """The server rejected our key for this user."""


class SSHHostKeyError(SSHConnectError):
    """The server's host key could not be parsed, or changed mid-session."""


class SSHWaitTimeout(SSHError):
    """``wait_for_ssh`` passed its bound: says how many attempts over how long
    and what the last one saw."""

    def __init__(
        self, endpoint: str, user: str, bound: float, attempts: int, elapsed: float, last_error: str
    ) -> None:
        super().__init__(
            f"ssh to {endpoint} as {user}: not ready after {attempts} attempt"
            f"{'' if attempts == 1 else 's'} over {elapsed:.1f}s (bound {bound:g}s); "
            f"last error: {last_error or 'none'}"
        )
        self.endpoint = endpoint
        self.user = user
        self.bound = bound
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error


class SSHCommandFailed(SSHError):
    """A command could not be run to its end (channel refused, connection
    lost). ``partial`` is what that command produced before it failed
    (exit_status None); ``results`` are the commands that completed before
    it."""

    def __init__(
        self,
        endpoint: str,
        user: str,
        command: str,
        reason: str,
        partial: CommandResult,
        results: tuple[CommandResult, ...] = (),
        host_key_fingerprint: str = "",
        host_key_type: str = "",
    ) -> None:
        super().__init__(f"ssh to {endpoint} as {user}: command {command!r} {reason}")
        self.endpoint = endpoint
        self.user = user
        self.command = command
        self.reason = reason
        self.partial = partial
        self.results = results
        self.host_key_fingerprint = host_key_fingerprint
        self.host_key_type = host_key_type


class SSHCommandTimeout(SSHCommandFailed):
    """A command ran longer than its bound. It was sent SIGKILL (best effort),
    its channel and the connection were closed; ``partial`` keeps the output
    that arrived in time. (``Session.run`` closes only the command's channel:
    the session stays open for the caller to use or close.)"""

    def __init__(
        self,
        endpoint: str,
        user: str,
        command: str,
        bound: float,
        partial: CommandResult,
        results: tuple[CommandResult, ...] = (),
        host_key_fingerprint: str = "",
        host_key_type: str = "",
    ) -> None:
        seen = _last_line(partial)
        reason = f"did not finish within {bound:g}s" + (f"; last output: {seen}" if seen else "")
        super().__init__(
            endpoint, user, command, reason, partial, results, host_key_fingerprint, host_key_type
        )
        self.bound = bound


@frozen
class UploadResult:
    """What one ``Session.upload`` copied: regular files, directories
    created (or found and reused), file bytes, and the wall-clock seconds it
    took."""

    files: int
    directories: int
    bytes: int
    seconds: float


class SSHUploadError(SSHError):
    """Copying ``local_path`` to ``remote_path`` over SFTP failed.

    ``reason`` names the file or directory it was at and, when the server
    refused something, the server's own message ("No such file", "Permission
    denied") and SFTP status code. ``lost`` is True when the ssh connection
    itself went away (the machine, not the upload, failed).
    """

    def __init__(
        self,
        endpoint: str,
        user: str,
        local_path: str,
        remote_path: str,
        reason: str,
        *,
        lost: bool = False,
    ) -> None:
        super().__init__(
            f"ssh to {endpoint} as {user}: upload {local_path!r} to {remote_path!r}: {reason}"
        )
        self.endpoint = endpoint
        self.user = user
        self.local_path = local_path
        self.remote_path = remote_path
        self.reason = reason
        self.lost = lost


class SSHUploadTimeout(SSHUploadError):
    """An upload passed its bound. Its sftp channel was closed (the session
    stays open); ``bytes_done`` were written in all, and ``in_progress``
    names the files being written then, with their bytes done and size."""

    def __init__(
        self,
        endpoint: str,
        user: str,
        local_path: str,
        remote_path: str,
        bound: float,
        bytes_done: int,
        in_progress: tuple[tuple[str, int, int], ...],
    ) -> None:
        at = "; ".join(f"{name}: {done} of {size} bytes" for name, done, size in in_progress)
        reason = f"did not finish within {bound:g}s after {bytes_done} bytes" + (
            f"; was writing {at}" if at else ""
        )
        super().__init__(endpoint, user, local_path, remote_path, reason)
        self.bound = bound
        self.bytes_done = bytes_done
        self.in_progress = in_progress


class SSHFileError(SSHError):
    """Writing, reading or removing one remote file over SFTP
    (``Session.write_file``, ``read_file``, ``remove_file``) failed.

    ``operation`` is "write", "read" or "remove"; ``reason`` names the step
    ("open for writing", "read at offset 65536") and, when the server refused
    something, its own message ("No such file", "Permission denied") and SFTP
    status code. ``lost`` is True when the ssh connection itself went away.
    """

    def __init__(
        self,
        endpoint: str,
        user: str,
        operation: str,
        path: str,
        reason: str,
        *,
        lost: bool = False,
    ) -> None:
        super().__init__(f"ssh to {endpoint} as {user}: {operation} {path!r}: {reason}")
        self.endpoint = endpoint
        self.user = user
        self.operation = operation
        self.path = path
        self.reason = reason
        self.lost = lost


class SSHFileMissing(SSHFileError):
    """``read_file``: there is no file at ``path`` (the server said "No such
    file" when asked to open it)."""


class SSHFileTooLarge(SSHFileError):
    """``read_file``: the file holds more than ``limit`` bytes; ``size`` is
    its size as the server stated it (or, if it grew while being read, the
    bytes read before reading stopped). Nothing of it is returned;
    ``removed`` says whether it was removed (asked with ``remove=True``)."""

    def __init__(
        self, endpoint: str, user: str, path: str, size: int, limit: int, *, removed: bool
    ) -> None:
        reason = f"the file is {size} bytes, over the limit of {limit} bytes" + (
            " (removed)" if removed else ""
        )
        super().__init__(endpoint, user, "read", path, reason)
        self.size = size
        self.limit = limit
        self.removed = removed


class SSHFileTimeout(SSHFileError):
    """A file transfer passed its ``bound``. Its sftp channel was closed (the
    session stays open); ``bytes_done`` were written or read by then, of
    ``size`` (None if not known yet). A file being read is not removed."""

    def __init__(
        self,
        endpoint: str,
        user: str,
        operation: str,
        path: str,
        bound: float,
        bytes_done: int,
        size: int | None,
    ) -> None:
        reason = f"did not finish within {bound:g}s" + (
            f" after {bytes_done} of {size} bytes" if size else ""
        )
        super().__init__(endpoint, user, operation, path, reason)
        self.bound = bound
        self.bytes_done = bytes_done
        self.size = size


def _last_line(result: CommandResult) -> str:
    """The last non-empty line of output, shortened, for error messages."""
    for stream in (result.stderr, result.stdout):
        lines = [line for line in stream.decode("utf-8", "replace").splitlines() if line.strip()]
        if lines:
            line = lines[-1].strip()
            return repr(line if len(line) <= 200 else line[:197] + "...")
    return ""
