"""User data for a job's machines (``--user-data FILE``).

On a cloud it is RunInstances' ``UserData``: the bytes of the file, sent
base64-encoded by the EC2 client, at most :data:`MAX_BYTES` before encoding
(EC2's limit). On a local cloud image it is merged with txvmbot's own
NoCloud ``user-data`` (:func:`merge_nocloud`), which creates the job's user
with its key and prints the ready marker: those must survive whatever the
user's file says.

- A ``#cloud-config`` file is merged into one ``#cloud-config`` document
  here: lists txvmbot needs (``users``, ``ssh_authorized_keys``) are
  appended to, txvmbot's ``final_message`` follows the user's, every other
  key is the user's.
- Anything else (a ``#!`` script, ``#include``, a jinja template, a MIME
  multi-part document) becomes a MIME multi-part user-data: the user's
  part(s), then txvmbot's ``#cloud-config`` with a ``Merge-Type`` that
  appends lists, which cloud-init merges itself.

Pure functions, no I/O but :func:`read_user_data`; errors are ConfigErrors
that name the flag (or job key) and the file.
"""

from __future__ import annotations

import zlib
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from txvmbot.errors import ConfigError

__all__ = ["MAX_BYTES", "merge_nocloud", "read_user_data", "user_data_text"]

#: EC2's limit on UserData, in bytes before base64; the same bound holds
#: for a local image's, so one file works on both.
MAX_BYTES = 16 * 1024
#: The most a gzip-compressed user data may expand to before it is merged.
_MAX_EXPANDED = 512 * 1024  # the seed is a 1 MiB vfat

#: cloud-init's content types by first line (cloudinit/handlers), longest
#: first; anything else is text/plain, which cloud-init ignores.
_PREFIXES = (
    ("#cloud-config-archive", "text/cloud-config-archive"),
    ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
    ("## template: jinja", "text/jinja2"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include-once", "text/x-include-once-url"),
    ("#part-handler", "text/part-handler"),
    ("#cloud-config", "text/cloud-config"),
    ("#include", "text/x-include-url"),
    ("#!", "text/x-shellscript"),
)

#: How cloud-init merges txvmbot's part into the user's (multi-part only):
#: lists appended, the user's keys kept.
MERGE_TYPE = "list(append)+dict(no_replace,recurse_list)+str()"


def _limit_message(size: int) -> str:
    return (
        f"{size} bytes is over the user data limit of {MAX_BYTES} bytes (16 KB, EC2's "
        "limit before base64); gzip it (cloud-init reads gzip) or fetch the rest with "
        "#include"
    )


def check_size(data: bytes, where: str, name: str = "user data") -> bytes:
    """``data`` if it is within :data:`MAX_BYTES` and not empty."""
    if not data:
        raise ConfigError(where, f"{name} is empty")
    if len(data) > MAX_BYTES:
        raise ConfigError(where, f"{name}: {_limit_message(len(data))}")
    return data


def read_user_data(path: str, flag: str = "--user-data") -> bytes:
    """The bytes of the user data file ``path``; a ConfigError names
    ``flag``, the file and why it cannot be used (unreadable, empty, over
    :data:`MAX_BYTES`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
            size = len(data)
            if size > MAX_BYTES:
                f.seek(0, 2)
                size = f.tell()
    except OSError as e:
        raise ConfigError(flag, f"cannot read {path}: {e.strerror or e}") from None
    if size > MAX_BYTES:
        raise ConfigError(flag, f"{path}: {_limit_message(size)}")
    return check_size(data, flag, path)


def _gunzipped(data: bytes, where: str, name: str) -> bytes:
    if not data.startswith(b"\x1f\x8b"):
        return data
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, _MAX_EXPANDED)
    except zlib.error as e:
        raise ConfigError(where, f"{name} starts as gzip but does not decompress: {e}") from None
    if d.unconsumed_tail or not d.eof:
        raise ConfigError(
            where, f"{name} is gzip that is truncated or expands past {_MAX_EXPANDED} bytes"
        )
    return out


def user_data_text(data: bytes, where: str, name: str = "user data") -> str:
    """``data`` as text (gunzipped first if it is gzip): a local cloud
    image's user data is merged with txvmbot's, so it must be UTF-8."""
    data = _gunzipped(data, where, name)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            where,
            f"{name} is not UTF-8 text ({e.reason} at byte {e.start}): on a local cloud "
            "image user data is merged with txvmbot's own cloud-config, so it must be text",
        ) from None


def _content_type(text: str) -> str:
    head = text.lstrip()[:64].lower()
    for prefix, ctype in _PREFIXES:
        if head.startswith(prefix):
            return ctype
    return "text/plain"


def _is_mime(text: str) -> bool:
    return "mime-version:" in text[:4096].lower()


def merge_nocloud(own: str, data: bytes, where: str = "--user-data", name: str = "user data") -> str:
    """txvmbot's own NoCloud ``user-data`` (a ``#cloud-config``) merged with
    the user's ``data``; see the module's docstring for how."""
    import yaml

    text = user_data_text(data, where, name)
    mine = yaml.safe_load(own)
    if not isinstance(mine, dict):  # pragma: no cover - nocloud_files makes a mapping
        raise ValueError("txvmbot's own user-data is not a mapping")
    if _is_mime(text):
        return _multipart(own, _mime_parts(text, where, name))
    ctype = _content_type(text)
    if ctype != "text/cloud-config":
        return _multipart(own, [(ctype, text)])
    try:
        theirs = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(where, f"{name} is #cloud-config but not valid YAML: {e}") from None
    if theirs is None:
        theirs = {}
    if not isinstance(theirs, dict):
        raise ConfigError(
            where,
            f"{name} is #cloud-config but a YAML {type(theirs).__name__}, not a mapping of keys",
        )
    merged = merge_cloud_config(theirs, mine)
    return "#cloud-config\n" + yaml.safe_dump(merged, sort_keys=False)


def merge_cloud_config(theirs: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """The user's cloud-config ``theirs`` with txvmbot's ``mine`` merged in:
    txvmbot's users and keys added (a user of the same name gets txvmbot's
    key), txvmbot's ``final_message`` printed after the user's, the user's
    ``hostname`` kept, any other key of txvmbot's set."""
    out = dict(theirs)
    for key, value in mine.items():
        if key == "users":
            out[key] = _merge_users(theirs.get(key), value)
        elif key == "ssh_authorized_keys":
            out[key] = _union(_as_list(theirs.get(key)), value)
        elif key == "final_message" and theirs.get(key):
            out[key] = f"{theirs[key]}\n{value}"
        elif key == "hostname" and key in theirs:
            continue
        else:
            out[key] = value
    return out


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return list(value)
    if isinstance(value, str):
        # cloud-init reads "users: a, b" as a list of names.
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def _union(first: list[Any], second: list[Any]) -> list[Any]:
    return first + [v for v in second if v not in first]


def _merge_users(theirs: Any, mine: list[Any]) -> list[Any]:
    users = _as_list(theirs)
    for entry in mine:
        if not isinstance(entry, dict):
            if entry not in users:
                users.append(entry)
            continue
        name = entry.get("name")
        for i, u in enumerate(users):
            if u == name:
                users[i] = dict(entry)
                break
            if isinstance(u, dict) and u.get("name") == name:
                merged = {**entry, **u}
                merged["ssh_authorized_keys"] = _union(
                    _as_list(u.get("ssh_authorized_keys")), entry.get("ssh_authorized_keys", [])
                )
                users[i] = merged
                break
        else:
            users.append(dict(entry))
    return users


def _mime_parts(text: str, where: str, name: str) -> list[tuple[str, str]]:
    import email

    msg = email.message_from_string(text)
    parts = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        try:
            body = payload.decode(part.get_content_charset() or "utf-8")
        except (LookupError, UnicodeDecodeError):
            raise ConfigError(
                where, f"{name}: a MIME part ({part.get_content_type()}) is not UTF-8 text"
            ) from None
        parts.append((part.get_content_type(), body))
    if not parts:
        raise ConfigError(where, f"{name} is a MIME message without any part")
    return parts


def _multipart(own: str, parts: list[tuple[str, str]]) -> str:
    msg = MIMEMultipart(boundary="==txvmbot-user-data==")
    for i, (ctype, body) in enumerate(parts, 1):
        maintype, _, subtype = ctype.partition("/")
        part = MIMEText(body, subtype if maintype == "text" else "plain", "utf-8")
        if maintype != "text":
            part.replace_header("Content-Type", f"{ctype}; charset=\"utf-8\"")
        part.add_header("Content-Disposition", "attachment", filename=f"user-{i}")
        msg.attach(part)
    mine = MIMEText(own, "cloud-config", "utf-8")
    mine.add_header("Content-Disposition", "attachment", filename="txvmbot")
    mine.add_header("Merge-Type", MERGE_TYPE)
    msg.attach(mine)
    return msg.as_string() + "\n"
