"""Test durations kept between runs, so the next run feeds longest first.

One JSON file per suite, ``<state_dir>/suites/<name>.durations.json``,
written atomically. A new measurement is blended with the old one (an
exponential moving average), so one slow run does not reorder the queue.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping

from txvmbot.errors import ConfigError, TxvmbotError

#: Weight of a new measurement against the recorded one.
NEW_WEIGHT = 0.5

_FORMAT = 1
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


class DurationsError(TxvmbotError):
    """A durations file cannot be read or written; names the file."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"suite durations {path}: {reason}")
        self.path = path
        self.reason = reason


def check_suite_name(name: str) -> str:
    """``name`` if it is a safe file name stem; else ConfigError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or set(name) == {"."}:
        raise ConfigError(
            "suite name",
            f"{name!r} is not a suite name: use 1 to 100 of A-Z a-z 0-9 . _ - (not only dots)",
        )
    return name


def durations_path(state_dir: str, suite_name: str) -> str:
    """Where the durations of ``suite_name`` live under ``state_dir``."""
    name = check_suite_name(suite_name)
    return os.path.join(state_dir, "suites", f"{name}.durations.json")


def _check_value(where: str, test_id: object, value: object) -> float:
    if not isinstance(test_id, str):
        raise ValueError(f"{where}: test id {test_id!r} is not a string")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where}: test {test_id!r}: {value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: test {test_id!r}: {value!r} is not a finite duration >= 0")
    return float(value)


def load(state_dir: str, suite_name: str) -> dict[str, float]:
    """Recorded seconds per test id of ``suite_name``; empty when the suite
    never ran. A file that is not what :func:`save` writes is a
    :class:`DurationsError` naming it (delete it to start afresh)."""
    path = durations_path(state_dir, suite_name)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise DurationsError(path, f"cannot read it: {e}") from e
    fix = "; delete the file to start afresh"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DurationsError(path, f"not valid JSON ({e}){fix}") from e
    if not isinstance(data, dict) or not isinstance(data.get("durations"), dict):
        raise DurationsError(path, f'expected an object with a "durations" object{fix}')
    if data.get("format") != _FORMAT:
        raise DurationsError(
            path, f"unknown format {data.get('format')!r}, expected {_FORMAT}{fix}"
        )
    try:
        return {tid: _check_value("durations", tid, v) for tid, v in data["durations"].items()}
    except ValueError as e:
        raise DurationsError(path, f"{e}{fix}") from e


def merge(
    old: Mapping[str, float], new: Mapping[str, float], weight: float = NEW_WEIGHT
) -> dict[str, float]:
    """``old`` updated with ``new``: a test in both gets
    ``weight * new + (1 - weight) * old``; a test in one keeps its value."""
    merged = dict(old)
    for tid, value in new.items():
        merged[tid] = weight * value + (1 - weight) * old[tid] if tid in old else value
    return merged


def save(
    state_dir: str,
    suite_name: str,
    new: Mapping[str, float],
    weight: float = NEW_WEIGHT,
) -> dict[str, float]:
    """Blend ``new`` (seconds per test id, from this run) into the recorded
    durations of ``suite_name`` and write them back atomically (a temp file
    and ``os.replace``: readers see the old file or the new, never half).
    Returns what was written."""
    if not 0 < weight <= 1:
        raise ConfigError("durations weight", f"must be in (0, 1], got {weight!r}")
    path = durations_path(state_dir, suite_name)
    try:
        checked = {tid: _check_value("new durations", tid, v) for tid, v in new.items()}
    except ValueError as e:
        raise DurationsError(path, str(e)) from e
    merged = merge(load(state_dir, suite_name), checked, weight)
    directory = os.path.dirname(path)
    body = json.dumps(
        {"format": _FORMAT, "suite": suite_name, "durations": merged},
        indent=1,
        sort_keys=True,
    )
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{suite_name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise DurationsError(path, f"cannot write in {directory}: {e}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise DurationsError(path, f"cannot write it: {e}") from e
    except BaseException:
        _unlink(tmp)
        raise
    return merged


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
