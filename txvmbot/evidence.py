"""Keeps the evidence of a check on disk (seed 000: the bug vanished before
it was captured; seed 004: the console log was the only clue)."""

from __future__ import annotations

import json
import os

import attrs
from twisted.logger import Logger

from txvmbot.model import CheckResult


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def step_table(result: CheckResult) -> str:
    rows = [f"{'step':<32} {'outcome':<10} {'seconds':>8}  detail"]
    for s in result.steps:
        rows.append(f"{s.name:<32} {s.outcome:<10} {s.duration:8.2f}  {s.detail}")
    return "\n".join(rows) + "\n"


def write_evidence(root: str, result: CheckResult) -> str:
    """Write console logs, ssh output, the step table, facts and the whole
    result as JSON under ``root/<check id>/``; return that directory."""
    from txvmbot.report import to_json

    path = os.path.join(root, _safe(result.check_id))
    os.makedirs(path, mode=0o700, exist_ok=True)

    def put(name: str, text: str) -> None:
        with open(os.path.join(path, name), "w", encoding="utf-8") as f:
            f.write(text)

    for instance_id, output in result.console:
        put(f"console-{_safe(instance_id)}.log", output)
    lines = []
    for c in result.commands:
        lines.append(f"$ {c.command}\n# exit status {c.exit_status} signal {c.signal}\n")
        lines.append("--- stdout\n" + c.stdout.decode("utf-8", "replace"))
        lines.append("--- stderr\n" + c.stderr.decode("utf-8", "replace") + "\n")
    if lines:
        put("ssh-output.txt", "".join(lines))
    put("steps.txt", step_table(result) + (f"\nerror: {result.error}\n" if result.error else ""))
    put("facts.json", json.dumps(result.facts.as_dict(), indent=2, sort_keys=True))
    put("result.json", json.dumps(to_json(result), indent=2, sort_keys=True))
    return path


def save_evidence(root: str | None, result: CheckResult, log: Logger) -> CheckResult:
    """``result`` with its evidence written under ``root`` (if given) and
    ``evidence_dir`` set. A write that fails (a full or read-only disk, a
    file where the directory should be) is an error in ``log`` naming the
    directory; the result comes back without ``evidence_dir``, never lost."""
    if not root:
        return result
    try:
        path = write_evidence(root, result)
    except OSError as e:
        log.error(
            "Check {check_id}: cannot save its evidence under {root}: {e}",
            check_id=result.check_id,
            root=root,
            e=e,
        )
        return result
    return attrs.evolve(result, evidence_dir=path)
