"""Where the access keys for a cloud come from: the standard AWS chain, minus
anything that needs the network.

Order, as botocore does it:

1. ``cloud.credentials`` from txvmbot's own config;
2. when ``cloud.profile`` is set, that profile only (an explicit profile
   beats the environment, as with ``aws --profile``): the shared credentials
   file, then the config file;
3. otherwise the environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``
   and ``AWS_SESSION_TOKEN`` (or the older ``AWS_SECURITY_TOKEN``);
4. otherwise the profile ``AWS_PROFILE`` (or ``AWS_DEFAULT_PROFILE``, or
   ``default``) in the shared credentials file
   (``AWS_SHARED_CREDENTIALS_FILE`` or ``~/.aws/credentials``), then in the
   config file (``AWS_CONFIG_FILE`` or ``~/.aws/config``, section
   ``[profile NAME]`` or ``[default]``).

Instance metadata and container credential endpoints are never consulted:
resolving credentials does no I/O but reading those two files.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping

from txvmbot.errors import ConfigError
from txvmbot.model import Cloud, Credentials

__all__ = ["resolve"]


def _expand(path: str, environ: Mapping[str, str]) -> str:
    if path.startswith("~"):
        home = environ.get("HOME")
        if home:
            return home + path[1:]
    return os.path.expanduser(path)


def _from_environ(environ: Mapping[str, str]) -> Credentials | None:
    access = environ.get("AWS_ACCESS_KEY_ID", "")
    secret = environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access and not secret:
        return None
    if not access or not secret:
        missing = "AWS_ACCESS_KEY_ID" if not access else "AWS_SECRET_ACCESS_KEY"
        present = "AWS_SECRET_ACCESS_KEY" if not access else "AWS_ACCESS_KEY_ID"
        raise ConfigError(
            missing, f"is not set but {present} is; set both or neither in the environment"
        )
    token = environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN") or None
    return Credentials(access_key=access, secret_key=secret, session_token=token)


def _from_file(path: str, section: str, where: str) -> Credentials | None:
    """Keys from ``section`` of the INI file at ``path``; None if the file or
    the section does not exist or has no key id."""
    if not os.path.isfile(path):
        return None
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError) as e:
        raise ConfigError(where, f"cannot read {path}: {e}") from e
    if not parser.has_section(section):
        return None
    values = {k.lower(): v.strip() for k, v in parser.items(section)}
    access = values.get("aws_access_key_id", "")
    secret = values.get("aws_secret_access_key", "")
    if not access and not secret:
        return None
    if not access or not secret:
        missing = "aws_access_key_id" if not access else "aws_secret_access_key"
        raise ConfigError(f"{path} [{section}]", f"{missing} is missing")
    token = values.get("aws_session_token") or values.get("aws_security_token") or None
    return Credentials(access_key=access, secret_key=secret, session_token=token)


def _from_profile(
    profile: str, environ: Mapping[str, str], looked: list[str]
) -> Credentials | None:
    shared = _expand(environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", environ)
    looked.append(f"profile [{profile}] in {shared}")
    creds = _from_file(shared, profile, "AWS_SHARED_CREDENTIALS_FILE")
    if creds is not None:
        return creds
    config = _expand(environ.get("AWS_CONFIG_FILE") or "~/.aws/config", environ)
    section = "default" if profile == "default" else f"profile {profile}"
    looked.append(f"[{section}] in {config}")
    return _from_file(config, section, "AWS_CONFIG_FILE")


def resolve(cloud: Cloud, environ: Mapping[str, str] = os.environ) -> Credentials:
    """The credentials to sign ``cloud``'s requests with.

    Raises ConfigError naming every place it looked when none has any.
    """
    if cloud.credentials is not None:
        return cloud.credentials
    looked: list[str] = []
    if cloud.profile:
        creds = _from_profile(cloud.profile, environ, looked)
        if creds is not None:
            return creds
        raise ConfigError(
            f"clouds.{cloud.name}.profile",
            f"no credentials for profile {cloud.profile!r}: looked in " + ", ".join(looked),
        )
    looked.append("cloud config (credentials)")
    creds = _from_environ(environ)
    if creds is not None:
        return creds
    looked.append("environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    profile = environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE") or "default"
    creds = _from_profile(profile, environ, looked)
    if creds is not None:
        return creds
    raise ConfigError(
        f"clouds.{cloud.name}.credentials",
        "no credentials found; looked in "
        + ", ".join(looked)
        + " (instance metadata is never consulted)",
    )
