"""JSON forms of txvmbot's values, for the AMP wire and the daemon's store.

One format each way, strict on the way in: a job spec is validated by the
same code as a ``[clouds.NAME]`` table of the config file, and every error
names the key that was wrong (``job.timeouts.running``). Secrets never
travel in a job: the daemon resolves credentials itself.

A check result's form is versioned (:data:`RESULT_SCHEMA`, its ``schema``
key): results stored by an older daemon, or sent by an older worker, are
brought up to date as they are read (:func:`kind_from_v1`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

from txvmbot.daemon.jobs import FINAL_STATES, Job, JobEvent, JobSpec
from txvmbot.errors import ConfigError
from txvmbot.jobs.suite.spec import SuiteSpec, Upload
from txvmbot.model import (
    CheckResult,
    CheckSpec,
    CommandResult,
    Facts,
    FailureKind,
    RetryPolicy,
    StepEvent,
    StepResult,
    Timeouts,
)
from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts

#: The largest JSON document accepted from a client or a worker.
MAX_DOCUMENT_BYTES = 1 << 20
#: The largest job spec accepted.
MAX_SPEC_BYTES = 64 * 1024

_JOB_KEYS = ("backend", "priority", "bound", "max_attempts")
#: A job's user data travels base64-encoded (it may be gzip); a job stored
#: before it existed has no such key.
USER_DATA_KEY = "user_data_base64"
_SECRET_KEYS = ("access_key", "secret_key", "secret_key_env", "session_token")


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode("utf-8")


def loads(data: bytes, where: str, limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse JSON ``data``; errors name ``where``."""
    if len(data) > limit:
        raise ConfigError(where, f"{len(data)} bytes is over the limit of {limit}")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(where, f"not valid JSON: {e}") from None


# --- job specs ---------------------------------------------------------------


def _changed(value: Any, default: Any) -> dict[str, Any]:
    return {
        a.name: getattr(value, a.name)
        for a in attrs.fields(type(value))
        if getattr(value, a.name) != getattr(default, a.name)
    }


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """A job spec as a JSON-able dict, in the shape of a config cloud table
    plus the job's own keys. Credentials are left out. A suite is its
    machines' spec plus a ``suite`` table."""
    if isinstance(spec.check, SuiteSpec):
        inner = spec_to_dict(attrs.evolve(spec, check=spec.check.target))
        inner["suite"] = suite_to_dict(spec.check)
        return inner
    if isinstance(spec.check, LocalSpec):
        return _local_to_dict(spec, spec.check)
    check = spec.check
    cloud = check.cloud
    d: dict[str, Any] = {
        "backend": spec.backend,
        "priority": spec.priority,
        "bound": spec.bound,
        "max_attempts": spec.max_attempts,
        "endpoint": cloud.endpoint,
        "region": cloud.region,
        "signature_version": cloud.signature_version,
    }
    if cloud.profile:
        d["profile"] = cloud.profile
    retry = _changed(cloud.retry, RetryPolicy())
    if retry:
        d["retry"] = retry
    defaults = CheckSpec(cloud=cloud, image="x")
    for a in attrs.fields(CheckSpec):
        if a.name in ("cloud", "timeouts", "user_data"):
            continue
        v = getattr(check, a.name)
        if v is None or (v == getattr(defaults, a.name) and a.name not in ("image",)):
            continue
        d[a.name] = list(v) if isinstance(v, tuple) else v
    timeouts = _changed(check.timeouts, Timeouts())
    if timeouts:
        d["timeouts"] = timeouts
    _user_data_to(d, check.user_data)
    return d


def _user_data_to(d: dict[str, Any], user_data: bytes | None) -> None:
    if user_data is not None:
        d[USER_DATA_KEY] = base64.b64encode(user_data).decode("ascii")


def _user_data_from(data: Mapping[str, Any], where: str) -> bytes | None:
    """A job's user data, checked as ``--user-data`` is (at most 16 KB)."""
    from txvmbot.userdata import check_size

    if USER_DATA_KEY not in data:
        return None
    key = f"{where}.{USER_DATA_KEY}"
    raw = data[USER_DATA_KEY]
    if not isinstance(raw, str):
        raise ConfigError(key, f"expected a base64 string, found {type(raw).__name__}")
    try:
        value = base64.b64decode(raw.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise ConfigError(key, f"not valid base64: {e}") from None
    return check_size(value, key)


def spec_from_dict(
    data: Any, where: str = "job", pools: Mapping[str, LocalPool] | None = None
) -> JobSpec:
    """Validate a decoded job spec into a JobSpec. Raises ConfigError naming
    the key (``job.commands``).

    A spec with a ``pool`` key is a local VM job. With ``pools`` (the
    daemon's, on the public side) the pool is looked up by name and a
    client may not send its settings; without (the daemon's own store and
    its workers) the settings travel in ``pool_settings``.
    """
    if isinstance(data, Mapping) and "suite" in data:
        job = spec_from_dict({k: v for k, v in data.items() if k != "suite"}, where, pools)
        if isinstance(job.check, SuiteSpec):  # pragma: no cover - the key was removed
            raise ConfigError(f"{where}.suite", "a suite cannot hold a suite")
        return attrs.evolve(job, check=suite_from_dict(data["suite"], f"{where}.suite", job.check))
    if isinstance(data, Mapping) and "pool" in data:
        return _local_from_dict(data, where, pools)
    from txvmbot.config import (
        CheckSettings,
        CloudSettings,
        build_check_spec,
        build_cloud,
        check_float,
        check_int,
        check_str,
        parse_cloud_table,
    )

    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a table (JSON object), found {type(data).__name__}")
    for key in _SECRET_KEYS:
        if key in data:
            raise ConfigError(
                f"{where}.{key}",
                "credentials are not accepted in a job; the daemon resolves them "
                "(its config, environment or profile)",
            )
    table = {k: v for k, v in data.items() if k not in _JOB_KEYS and k != USER_DATA_KEY}
    user_data = _user_data_from(data, where)
    backend_raw = data.get("backend")
    priority = 0
    bound = 3600.0
    max_attempts = 2
    if "priority" in data:
        priority = check_int(f"{where}.priority", data["priority"], minimum=-1000)
        if priority > 1000:
            raise ConfigError(f"{where}.priority", f"must be at most 1000, got {priority}")
    if "bound" in data:
        bound = check_float(f"{where}.bound", data["bound"])
    if "max_attempts" in data:
        max_attempts = check_int(f"{where}.max_attempts", data["max_attempts"], minimum=1)
        if max_attempts > 10:
            raise ConfigError(f"{where}.max_attempts", f"must be at most 10, got {max_attempts}")
    parsed = parse_cloud_table("job", table, where)
    try:
        cloud = build_cloud(parsed.cloud, CloudSettings(), {}, name="job", where=where)
        check = build_check_spec(cloud, parsed.check, CheckSettings())
    except ConfigError as e:
        # build_* name command-line flags; in a job they are keys.
        key = e.where.lstrip("-").replace("-", "_")
        if not key.startswith(where):
            key = f"{where}.{key}"
        raise ConfigError(key, e.message) from None
    except ValueError as e:
        raise ConfigError(where, str(e)) from None
    if backend_raw is None:
        backend = f"{cloud.endpoint} {cloud.region}"
    else:
        backend = check_str(f"{where}.backend", backend_raw)
        if len(backend) > 200:
            raise ConfigError(f"{where}.backend", "at most 200 characters")
    check = attrs.evolve(check, cloud=attrs.evolve(cloud, name=backend), user_data=user_data)
    return JobSpec(check=check, backend=backend, priority=priority, bound=bound,
                   max_attempts=max_attempts)


# --- results ------------------------------------------------------------------

#: The version of a check result's JSON form, written as its ``schema`` key.
#: 1 (no ``schema`` key): no failure kinds. 2: ``kind``, the result's
#: FailureKind (null when it passed), and ``step_kinds``, one per step (null
#: for a step that passed or was skipped). Both are new top-level keys, so
#: a reader of version 1 still reads a version 2 result (ignoring them); a
#: version 1 result is read with the kinds derived by :func:`kind_from_v1`.
RESULT_SCHEMA = 2

# What version 1 had instead of kinds: the scheduler guessed from the error
# text whether a failure was the infrastructure's, and whether a result was
# that of a cancelled check. Used for version 1 results only.
_V1_INFRASTRUCTURE = re.compile(
    r"TransportError|WorkerDied|worker running job \S+ died|gave up after|\bHTTP 5\d\d\b"
)


def infrastructure_failure_v1(error: str) -> bool:
    """Whether version 1 took a failed check's ``error`` for the
    infrastructure's (the transport, an exhausted retry, a 5xx from the
    cloud, a dead worker). For results of version 1 only: a result of
    version 2 says so itself (``CheckResult.kind``)."""
    return bool(_V1_INFRASTRUCTURE.search(error))


def _step_kind_v1(step: StepResult) -> FailureKind | None:
    if step.outcome in ("passed", "skipped"):
        return None
    if step.outcome == "cancelled":
        return FailureKind.CANCELLED
    if step.outcome == "timeout":
        return FailureKind.TIMEOUT
    if infrastructure_failure_v1(step.detail):
        return FailureKind.INFRASTRUCTURE
    return FailureKind.TEST


def kind_from_v1(
    passed: bool, error: str, steps: tuple[StepResult, ...]
) -> tuple[FailureKind | None, tuple[StepResult, ...]]:
    """The migration of a version 1 result: its kind, and its steps with
    theirs, derived once, as version 1's scheduler judged the result.

    Cancelled if its error starts with "cancelled" or a step was cancelled
    (what the scheduler took for a check cancelled under it); else the
    infrastructure's if the error names a transport error, a dead worker,
    an exhausted retry or an HTTP 5xx (what counted towards quarantine);
    else timed out if the first step that did not pass timed out; else the
    test's."""
    steps = tuple(attrs.evolve(s, kind=_step_kind_v1(s)) for s in steps)
    if passed:
        return None, steps
    if error.lower().startswith("cancelled") or any(s.outcome == "cancelled" for s in steps):
        return FailureKind.CANCELLED, steps
    if infrastructure_failure_v1(error):
        return FailureKind.INFRASTRUCTURE, steps
    failing = next((s for s in steps if s.outcome in ("failed", "timeout")), None)
    if failing is not None and failing.outcome == "timeout":
        return FailureKind.TIMEOUT, steps
    return FailureKind.TEST, steps


def _kind_to(kind: FailureKind | None) -> str | None:
    return None if kind is None else kind.value


def _kind_from(value: Any, where: str) -> FailureKind | None:
    if value is None:
        return None
    try:
        return FailureKind(value)
    except ValueError:
        known = ", ".join(k.value for k in FailureKind)
        raise ConfigError(where, f"unknown failure kind {value!r} (known: {known})") from None


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _step_to_dict(s: StepResult) -> dict[str, Any]:
    # The kind travels in step_kinds: a version 1 reader takes StepResult(**s).
    return {
        "name": s.name,
        "started": s.started,
        "duration": s.duration,
        "outcome": s.outcome,
        "detail": s.detail,
    }


def result_to_dict(r: CheckResult) -> dict[str, Any]:
    return {
        "schema": RESULT_SCHEMA,
        "check_id": r.check_id,
        "passed": r.passed,
        "kind": _kind_to(r.kind),
        "error": r.error,
        "evidence_dir": r.evidence_dir,
        "steps": [_step_to_dict(s) for s in r.steps],
        "step_kinds": [_kind_to(s.kind) for s in r.steps],
        "facts": r.facts.as_dict(),
        "commands": [
            {
                "command": c.command,
                "exit_status": c.exit_status,
                "signal": c.signal,
                "stdout": _text(c.stdout),
                "stderr": _text(c.stderr),
            }
            for c in r.commands
        ],
        "console": [list(p) for p in r.console],
        "host_keys": [list(p) for p in r.host_keys],
    }


def result_from_dict(d: Mapping[str, Any]) -> CheckResult:
    """The inverse of :func:`result_to_dict` (for data we wrote ourselves,
    or a worker sent: a malformed one raises ConfigError). A version 1
    result (no ``schema`` key) gets its kinds from :func:`kind_from_v1`; a
    newer version than this code's is read for the keys it knows."""
    try:
        version = d.get("schema", 1)
        if type(version) is not int or version < 1:
            raise ConfigError("result.schema", f"expected a version number, found {version!r}")
        facts_d = dict(d.get("facts", {}))
        known = {a.name for a in attrs.fields(Facts)} - {"extra"}
        facts = Facts(
            **{k: str(v) for k, v in facts_d.items() if k in known},
            extra=tuple(sorted((k, str(v)) for k, v in facts_d.items() if k not in known)),
        )
        passed = bool(d["passed"])
        error = str(d.get("error", ""))
        steps = tuple(StepResult(**s) for s in d.get("steps", []))
        kind: FailureKind | None
        if version == 1:
            kind, steps = kind_from_v1(passed, error, steps)
        else:
            kind = _kind_from(d.get("kind"), "result.kind")
            step_kinds = d.get("step_kinds", [None] * len(steps))
            if not isinstance(step_kinds, list) or len(step_kinds) != len(steps):
                raise ConfigError("result.step_kinds", f"expected a list of {len(steps)} kinds")
            steps = tuple(
                attrs.evolve(s, kind=_kind_from(k, f"result.step_kinds[{i}]"))
                for i, (s, k) in enumerate(zip(steps, step_kinds, strict=True))
            )
        return CheckResult(
            check_id=str(d["check_id"]),
            passed=passed,
            error=error,
            evidence_dir=d.get("evidence_dir"),
            steps=steps,
            facts=facts,
            commands=tuple(
                CommandResult(
                    command=c["command"],
                    exit_status=c["exit_status"],
                    signal=c.get("signal"),
                    stdout=c.get("stdout", "").encode("utf-8"),
                    stderr=c.get("stderr", "").encode("utf-8"),
                )
                for c in d.get("commands", [])
            ),
            console=tuple((str(a), str(b)) for a, b in d.get("console", [])),
            host_keys=tuple((str(a), str(b)) for a, b in d.get("host_keys", [])),
            kind=kind,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError("result", f"malformed check result: {e!r}") from None


# --- jobs and events ---------------------------------------------------------


def job_to_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "spec": spec_to_dict(job.spec),
        "state": job.state,
        "submitted": job.submitted,
        "started": job.started,
        "finished": job.finished,
        "attempts": job.attempts,
        "reason": job.reason,
        "result": None if job.result is None else result_to_dict(job.result),
    }


def job_from_dict(d: Mapping[str, Any]) -> Job:
    state = d["state"]
    if state not in FINAL_STATES | {"queued", "running", "cleaning"}:
        raise ConfigError("job.state", f"unknown state {state!r}")
    return Job(
        id=str(d["id"]),
        spec=spec_from_dict(d["spec"]),
        state=state,
        submitted=float(d["submitted"]),
        started=None if d.get("started") is None else float(d["started"]),
        finished=None if d.get("finished") is None else float(d["finished"]),
        attempts=int(d.get("attempts", 0)),
        reason=str(d.get("reason", "")),
        result=None if d.get("result") is None else result_from_dict(d["result"]),
    )


def event_to_dict(e: JobEvent) -> dict[str, Any]:
    return attrs.asdict(e)


def event_from_dict(d: Mapping[str, Any]) -> JobEvent:
    try:
        return JobEvent(**d)
    except TypeError as e:
        raise ConfigError("event", f"malformed job event: {e}") from None


def step_event_to_dict(e: StepEvent) -> dict[str, Any]:
    return attrs.asdict(e)


def step_event_from_dict(d: Mapping[str, Any]) -> StepEvent:
    try:
        return StepEvent(**d)
    except TypeError as e:
        raise ConfigError("step event", f"malformed step event: {e}") from None


# --- local VM jobs -------------------------------------------------------------

_LOCAL_KEYS = (
    "pool", "pool_settings", "commands", "ssh_user", "console", "timeouts", USER_DATA_KEY
)


def _local_to_dict(spec: JobSpec, check: LocalSpec) -> dict[str, Any]:
    d: dict[str, Any] = {
        "backend": spec.backend,
        "priority": spec.priority,
        "bound": spec.bound,
        "max_attempts": spec.max_attempts,
        "pool": check.pool.name,
        "pool_settings": attrs.asdict(check.pool),
        "commands": list(check.commands),
        "ssh_user": check.ssh_user,
        "console": check.console,
    }
    timeouts = _changed(check.timeouts, LocalTimeouts())
    if timeouts:
        d["timeouts"] = timeouts
    _user_data_to(d, check.user_data)
    return d


def _local_from_dict(
    data: Mapping[str, Any], where: str, pools: Mapping[str, LocalPool] | None
) -> JobSpec:
    from txvmbot.config import check_bool, check_commands, check_float, check_int, check_str

    for key in data:
        if key not in _LOCAL_KEYS + _JOB_KEYS:
            raise ConfigError(
                f"{where}.{key}",
                f"unknown key for a local VM job; expected one of "
                f"{', '.join(sorted(_LOCAL_KEYS + _JOB_KEYS))}",
            )
    name = check_str(f"{where}.pool", data["pool"])
    if pools is not None:
        if "pool_settings" in data:
            raise ConfigError(f"{where}.pool_settings", "set by the daemon, not by a job")
        if name not in pools:
            known = ", ".join(sorted(pools)) or "none"
            raise ConfigError(f"{where}.pool", f"the daemon has no pool {name!r} (it has: {known})")
        pool = pools[name]
    elif "pool_settings" in data:
        raw = data["pool_settings"]
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where}.pool_settings", "expected a table")
        try:
            pool = LocalPool(**raw)
        except TypeError as e:
            raise ConfigError(f"{where}.pool_settings", str(e)) from None
    else:
        pool = LocalPool(name=name)
    timeouts: dict[str, float] = {}
    if "timeouts" in data:
        t = data["timeouts"]
        if not isinstance(t, Mapping):
            raise ConfigError(f"{where}.timeouts", "expected a table of seconds")
        fields = {a.name for a in attrs.fields(LocalTimeouts)}
        for key, value in t.items():
            if key not in fields:
                raise ConfigError(
                    f"{where}.timeouts.{key}", f"unknown; expected one of {', '.join(sorted(fields))}"
                )
            timeouts[key] = check_float(f"{where}.timeouts.{key}", value)
    check = LocalSpec(
        pool=pool,
        commands=check_commands(f"{where}.commands", data["commands"])
        if "commands" in data
        else ("uname -a",),
        ssh_user=check_str(f"{where}.ssh_user", data["ssh_user"]) if "ssh_user" in data else "root",
        console=check_bool(f"{where}.console", data["console"]) if "console" in data else False,
        timeouts=LocalTimeouts(**timeouts),
        user_data=_user_data_from(data, where),
    )
    priority = check_int(f"{where}.priority", data.get("priority", 0), minimum=-1000)
    if priority > 1000:
        raise ConfigError(f"{where}.priority", f"must be at most 1000, got {priority}")
    max_attempts = check_int(f"{where}.max_attempts", data.get("max_attempts", 2), minimum=1)
    if max_attempts > 10:
        raise ConfigError(f"{where}.max_attempts", f"must be at most 10, got {max_attempts}")
    # A local job's backend is its pool: the pool's cap (max_vms) and its
    # drain apply by that name, and a job may not step around them.
    backend = name
    if "backend" in data and data["backend"] != name:
        raise ConfigError(f"{where}.backend", f"a local job runs on its pool, {name!r}")
    return JobSpec(
        check=check,
        backend=backend,
        priority=priority,
        bound=check_float(f"{where}.bound", data.get("bound", 3600.0)),
        max_attempts=max_attempts,
    )


# --- suites --------------------------------------------------------------------

_SUITE_KEYS = ("name", "run", "machines", "format", "tests", "list", "uploads", "setup",
               "test_timeout", "bound", "group_regex", "group", "runner")
#: At most this many test ids travel in a job (longer lists: --list CMD).
MAX_SUITE_TESTS = 20000


def suite_to_dict(suite: SuiteSpec) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": suite.name,
        "machines": suite.machines,
        "format": suite.format,
        "test_timeout": suite.test_timeout,
        "bound": suite.bound,
    }
    if suite.run:
        d["run"] = suite.run
    if suite.tests:
        d["tests"] = list(suite.tests)
    if suite.list_command:
        d["list"] = suite.list_command
    if suite.uploads:
        d["uploads"] = [[u.source, u.dest] for u in suite.uploads]
    if suite.setup:
        d["setup"] = list(suite.setup)
    if suite.group_regex is not None:
        d["group_regex"] = suite.group_regex
    if not suite.group:
        d["group"] = False
    if suite.runner:
        d["runner"] = suite.runner
    return d


def suite_from_dict(data: Any, where: str, target: CheckSpec | LocalSpec) -> SuiteSpec:
    """Validate a job's ``suite`` table on ``target``. Raises ConfigError
    naming the key (``job.suite.run``)."""
    from txvmbot.config import check_bool, check_commands, check_float, check_int, check_str

    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a table (JSON object), found {type(data).__name__}")
    for key in data:
        if key not in _SUITE_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown; expected one of {', '.join(_SUITE_KEYS)}")

    def strings(key: str, limit: int) -> tuple[str, ...]:
        raw = data.get(key, [])
        if not isinstance(raw, list) or len(raw) > limit:
            raise ConfigError(f"{where}.{key}", f"expected a list of at most {limit} strings")
        return tuple(check_str(f"{where}.{key}[{i}]", v) for i, v in enumerate(raw))

    uploads = []
    raw_uploads = data.get("uploads", [])
    if not isinstance(raw_uploads, list) or len(raw_uploads) > 100:
        raise ConfigError(f"{where}.uploads", "expected a list of at most 100 [source, dest] pairs")
    for i, pair in enumerate(raw_uploads):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ConfigError(f"{where}.uploads[{i}]", "expected [source, dest]")
        uploads.append(
            Upload(check_str(f"{where}.uploads[{i}]", pair[0]), check_str(f"{where}.uploads[{i}]", pair[1]))
        )
    try:
        return SuiteSpec(
            target=target,
            name=check_str(f"{where}.name", data.get("name", "suite")),
            run=check_str(f"{where}.run", data["run"]) if "run" in data else "",
            machines=check_int(f"{where}.machines", data.get("machines", 1)),
            format=data.get("format", "exit"),
            tests=strings("tests", MAX_SUITE_TESTS),
            list_command=check_str(f"{where}.list", data["list"]) if "list" in data else "",
            uploads=tuple(uploads),
            setup=check_commands(f"{where}.setup", data["setup"]) if "setup" in data else (),
            test_timeout=check_float(f"{where}.test_timeout", data.get("test_timeout", 300.0)),
            bound=check_float(f"{where}.bound", data.get("bound", 3600.0)),
            group_regex=(
                check_str(f"{where}.group_regex", data["group_regex"]) if "group_regex" in data else None
            ),
            group=check_bool(f"{where}.group", data.get("group", True)),
            runner=check_str(f"{where}.runner", data["runner"]) if "runner" in data else "",
        )
    except ConfigError as e:
        if e.where.startswith(where):
            raise
        # SuiteSpec names command-line flags; in a job they are keys.
        raise ConfigError(f"{where}.{e.where.lstrip('-').replace('-', '_')}", e.message) from None
