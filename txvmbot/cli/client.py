"""The daemon's commands: ``submit``, ``watch``, ``jobs``, ``show``,
``cancel``, ``drain``, ``resume``, ``status``, ``failures``.

Each connects to the daemon at ``--connect`` (else ``connect`` in the
config, else the unix socket in the state dir the daemon uses by default)
and prints what it got: for people by default, JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import attrs

from txvmbot.cli._common import (
    _CONFIG_NOTE,
    _Exit,
    _load_cloud_config,
    _react,
    _Streams,
    _wrap,
    add_cloud_flags,
    add_files_flags,
    state_dir_for,
)
from txvmbot.config import ClientTLSSettings, check_float, check_int, check_str, load_config
from txvmbot.errors import ConfigError

if TYPE_CHECKING:
    from txvmbot.daemon.api.client import ClientTLS, DaemonClient, JobList, JobSummary
    from txvmbot.daemon.jobs import BackendStatus, DaemonStatus, Job, JobEvent
    from txvmbot.daemon.scheduling.failures import FailureReport

__all__ = ["EXIT_UNREACHABLE", "add_parsers", "connection_for", "execute"]

#: Exit status when the daemon cannot be reached (or speaks another API).
EXIT_UNREACHABLE = 3
#: The most pages ``jobs --all`` fetches (at --limit 1000, a million jobs).
MAX_PAGES = 1000

JOB_STATES = ("queued", "running", "cleaning", "passed", "failed", "cancelled", "error")

_EXITS = """\
exit status: 0 done (for --wait and watch: the job passed), 1 the job failed,
was cancelled or errored, or the daemon refused the request (unknown job, not
allowed), 2 bad usage, config or request, 3 the daemon cannot be reached.
"""

_CONNECT_NOTE = """\
The daemon is found at --connect, else at `connect` in --config, else at
unix:path=STATE_DIR/txvmbot.sock (STATE_DIR as for `txvmbot check`: --state-dir,
state_dir in --config, $XDG_STATE_HOME/txvmbot, ~/.local/state/txvmbot). A
tcp:host=H:port=P endpoint needs a [tls] table in --config (ca, cert, key).
"""

_JSON_HELP = (
    "also write the result as JSON to FILE, or to stdout with '-' or no FILE (then "
    "the human output goes to stderr) (default: none)"
)


def _add_connect(p: argparse.ArgumentParser, *, with_files: bool = True) -> None:
    g = p.add_argument_group("daemon")
    g.add_argument(
        "--connect",
        metavar="ENDPOINT",
        help="where the daemon listens, a Twisted endpoint string such as "
        "unix:path=/run/txvmbot.sock or tcp:host=ci.example.com:port=8443 "
        "(default: see below)",
    )
    if with_files:
        f = p.add_argument_group("config and output")
        f.add_argument("--config", metavar="FILE", help="TOML config with connect, [tls]")
        f.add_argument(
            "--state-dir", metavar="DIR", help="the daemon's data dir, to find its socket"
        )
        f.add_argument("--json", metavar="FILE|-", nargs="?", const="-", help=_JSON_HELP)
        f.add_argument("-v", "--verbose", action="store_true", help="log info messages to stderr")


def add_parsers(sub: Any) -> None:
    from txvmbot.cli.check import add_check_settings
    from txvmbot.cli.suite import add_suite_flags

    fmt = argparse.RawDescriptionHelpFormatter
    epilog = _CONNECT_NOTE + "\n" + _EXITS

    p = sub.add_parser(
        "submit",
        help="queue a check as a job of the daemon (same settings as check)",
        description=_wrap(
            "Queue a check as a job of the daemon. The check's settings are built "
            "exactly as `txvmbot check` builds them (flags over the cloud's table in "
            "--config over the defaults); credentials are not sent: the daemon uses "
            "its own. With --wait, watch it live until it ends."
        ),
        epilog=_CONFIG_NOTE + "\n" + epilog,
        formatter_class=fmt,
    )
    add_cloud_flags(p)
    add_files_flags(p, json_optional=True)
    _add_connect(p, with_files=False)
    job = p.add_argument_group("job")
    job.add_argument(
        "--pool",
        metavar="NAME",
        help="run on the daemon's local VM pool NAME (the embedded default has 'local') "
        "instead of a cloud (default: a cloud)",
    )
    job.add_argument(
        "--backend",
        metavar="NAME",
        help="the pool the job runs on (default: 'ENDPOINT REGION' of the cloud)",
    )
    job.add_argument(
        "--priority", metavar="N", type=int, help="-1000 to 1000, higher first (default: 0)"
    )
    job.add_argument(
        "--bound", metavar="S", type=float, help="the job's overall time limit (default: 3600)"
    )
    job.add_argument(
        "--max-attempts",
        metavar="N",
        type=int,
        help="starts after infrastructure failures, 1 to 10 (default: 2)",
    )
    job.add_argument(
        "--wait", action="store_true", help="watch the job live until it ends; exit 0 if it passed"
    )
    job.add_argument(
        "--suite",
        action="store_true",
        help="submit a test suite (the suite flags below, as `txvmbot suite` takes them; "
        "--bound bounds the whole run) instead of a smoke check",
    )
    add_suite_flags(p, with_bound=False)
    add_check_settings(p)
    p.set_defaults(func=_cmd, action=_submit)

    def simple(
        name: str, help: str, action: Any, arg: str | None = None
    ) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=fmt)
        if arg is not None:
            q.add_argument(arg.lower(), metavar=arg)
        _add_connect(q)
        q.set_defaults(func=_cmd, action=action)
        return q

    simple("watch", "watch a job live until it ends; exit 0 if it passed", _watch, "JOB")
    jobs = simple("jobs", "list the daemon's jobs, newest first", _jobs)
    jobs.add_argument(
        "--state",
        action="append",
        dest="states",
        choices=JOB_STATES,
        metavar="STATE",
        help=f"only jobs in this state; repeat for several ({', '.join(JOB_STATES)})",
    )
    jobs.add_argument("--backend", metavar="NAME", help="only jobs of this backend")
    jobs.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=50,
        help="at most N jobs, 1 to 1000 (default: 50); with --all, N a page",
    )
    jobs.add_argument(
        "--before",
        metavar="JOB",
        help="the next page: the jobs listed after JOB (the last one of the previous page)",
    )
    jobs.add_argument(
        "--all",
        action="store_true",
        help=f"every matching job, fetched a page at a time (at most {MAX_PAGES} pages)",
    )
    simple("show", "show one job and its result", _show, "JOB")
    simple("cancel", "cancel a job; waits until its cleanup ran", _cancel, "JOB")
    simple("drain", "let running jobs of a backend finish; new ones wait", _drain, "BACKEND")
    simple("resume", "undo drain (or quarantine) of a backend", _resume, "BACKEND")
    simple("status", "the daemon's workers, queue and backends", _status)
    _add_failures(simple)


def _add_failures(simple: Any) -> None:
    from txvmbot.daemon.scheduling.failures import DEFAULT_LIMIT, FACTS, MAX_LIMIT

    p = simple(
        "failures",
        "finished jobs grouped by their environment facts, most failures first",
        _failures,
    )
    facts = "\n".join(f"  {f.name:<13} {f.help}" for f in FACTS.values())
    p.description = (
        _wrap(
            "The daemon's finished jobs grouped by environment facts (the host kernel, "
            "the QEMU version, the image, ...): one row per group with its failed and "
            "total jobs, its pass rate and a failed job with its reason, most failures "
            "first. Failed and error jobs fail; cancelled jobs are in no group and no "
            "pass rate. A job without a fact (no result, or a cloud fact of a local "
            "job) shows 'unknown'."
        )
        + "\n\nfacts:\n"
        + facts
    )
    p.add_argument(
        "--by",
        metavar="FACT[,FACT...]",
        default="host_kernel",
        help="the facts to group by, comma-separated (default: host_kernel; see facts above)",
    )
    p.add_argument(
        "--since",
        metavar="AGE",
        default="7d",
        help="only jobs that finished in the last AGE: 30m, 12h, 7d, or seconds (default: 7d)",
    )
    p.add_argument(
        "--limit",
        metavar="N",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"read at most the N newest finished jobs, 1 to {MAX_LIMIT} (default: {DEFAULT_LIMIT})",
    )


# --- connecting ----------------------------------------------------------------


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def connection_for(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[str, ClientTLSSettings | None]:
    """The endpoint string and TLS files to reach the daemon with."""
    config = load_config(args.config) if args.config is not None else None
    tls = config.tls if config is not None else None
    if args.connect is not None:
        return check_str("--connect", args.connect), tls
    if config is not None and config.connect is not None:
        return config.connect, tls
    state = state_dir_for(args.state_dir, config.state_dir if config else None, environ)
    return f"unix:path={_escape(os.path.join(state, 'txvmbot.sock'))}", tls


def _client_tls(tls: ClientTLSSettings | None) -> ClientTLS | None:
    if tls is None:
        return None
    from txvmbot.daemon.api.client import ClientTLS

    return ClientTLS(ca=tls.ca, cert=tls.cert, key=tls.key, server_name=tls.server_name)


# --- the commands ----------------------------------------------------------------


def _cmd(
    args: argparse.Namespace, streams: _Streams, environ: Mapping[str, str], reactor: Any
) -> int:
    prepared = args.action.prepare(args, environ) if hasattr(args.action, "prepare") else None
    endpoint, tls = connection_for(args, environ)
    exit = _Exit()

    def go(r: Any) -> Any:
        from twisted.internet.defer import ensureDeferred

        async def main() -> None:
            exit.code = await execute(r, args, streams, endpoint, tls, prepared)

        return ensureDeferred(main())

    _react(go, reactor)
    if exit.code is None:
        streams.stderr.write(f"txvmbot {args.command}: interrupted\n")
        return 1
    return exit.code


async def execute(
    reactor: Any,
    args: argparse.Namespace,
    streams: _Streams,
    endpoint: str,
    tls: ClientTLSSettings | None,
    prepared: Any = None,
) -> int:
    """Connect, run the command ``args`` names, print; the exit status.
    Every error is reported on ``streams.stderr``."""
    from txvmbot.daemon.api.client import connect
    from txvmbot.daemon.api.protocol import APIError, BadRequest
    from txvmbot.errors import DaemonUnavailable, UnknownJob

    err = streams.stderr
    name = f"txvmbot {args.command}"
    try:
        client = await connect(reactor, endpoint, tls=_client_tls(tls))
    except ConfigError as e:
        err.write(f"{name}: error: {e}\n")
        return 2
    except DaemonUnavailable as e:
        err.write(f"{name}: error: {e}\n")
        return EXIT_UNREACHABLE
    try:
        code: int = await args.action(client, args, streams, reactor, prepared)
        return code
    except DaemonUnavailable as e:
        err.write(f"{name}: error: {e}\n")
        return EXIT_UNREACHABLE
    except (BadRequest, ConfigError) as e:
        err.write(f"{name}: error: {e}\n")
        return 2
    except (APIError, UnknownJob) as e:
        err.write(f"{name}: error: {e}\n")
        return 1
    finally:
        await client.close()


def _job_spec_dict(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """The job ``submit`` sends: the CheckSpec exactly as ``check`` builds
    it, then the job's own keys; no credentials."""
    from txvmbot.cli.check import spec_from_args
    from txvmbot.daemon import codec
    from txvmbot.daemon.jobs import JobSpec

    if args.pool is not None:
        return _local_job_dict(args)
    chosen, _ = _load_cloud_config(args)
    if chosen is not None:
        # Credentials stay here: the daemon resolves its own, so neither a
        # secret nor a missing secret_key_env matters to a submit.
        chosen = attrs.evolve(
            chosen,
            cloud=attrs.evolve(
                chosen.cloud,
                access_key=None,
                secret_key=None,
                secret_key_env=None,
                session_token=None,
            ),
        )
    check = spec_from_args(args, {}, chosen)
    job: dict[str, Any] = {
        "check": check,
        "backend": f"{check.cloud.endpoint} {check.cloud.region}",
    }
    if args.backend is not None:
        job["backend"] = check_str("--backend", args.backend)
        if len(job["backend"]) > 200:
            raise ConfigError("--backend", "at most 200 characters")
    if args.priority is not None:
        job["priority"] = check_int("--priority", args.priority, minimum=-1000)
        if job["priority"] > 1000:
            raise ConfigError("--priority", f"must be at most 1000, got {args.priority}")
    if args.bound is not None:
        job["bound"] = check_float("--bound", args.bound)
    if args.max_attempts is not None:
        job["max_attempts"] = check_int("--max-attempts", args.max_attempts)
        if job["max_attempts"] > 10:
            raise ConfigError("--max-attempts", f"must be at most 10, got {args.max_attempts}")
    doc = codec.spec_to_dict(JobSpec(**job))
    codec.spec_from_dict(doc)  # the daemon's own check, before we connect
    return doc


def _local_job_dict(args: argparse.Namespace) -> dict[str, Any]:
    """A job on one of the daemon's local VM pools, by name: the daemon
    supplies the pool's image and settings."""
    import base64

    from txvmbot.cli.check import _CLOUD_ONLY, _CLOUD_ONLY_TIMEOUTS, user_data_from_args
    from txvmbot.daemon import codec

    for name in _CLOUD_ONLY:
        if getattr(args, name, None) not in (None, False):
            raise ConfigError("--" + name.replace("_", "-"), "not used with --pool")
    for name in _CLOUD_ONLY_TIMEOUTS:
        if getattr(args, f"timeout_{name}", None) is not None:
            raise ConfigError("--timeout-" + name.replace("_", "-"), "not used with --pool")
    for name in ("image", "image_dir", "accel", "memory", "keep_on_failure"):
        if getattr(args, name, None) is not None:
            raise ConfigError(
                "--" + name.replace("_", "-"), "set in the daemon's [pools.NAME], not per job"
            )
    doc: dict[str, Any] = {"pool": check_str("--pool", args.pool)}
    user_data = user_data_from_args(args, local=True)
    if user_data is not None:
        doc[codec.USER_DATA_KEY] = base64.b64encode(user_data).decode("ascii")
    if args.commands is not None:
        doc["commands"] = [check_str("--command", c) for c in args.commands]
    if args.ssh_user is not None:
        doc["ssh_user"] = args.ssh_user
    if args.console is not None:
        doc["console"] = bool(args.console)
    timeouts = {}
    for name in ("boot", "shutdown", "ssh", "ssh_connect", "command"):
        value = getattr(args, f"timeout_{name}", None)
        if value is not None:
            timeouts[name] = check_float("--timeout-" + name.replace("_", "-"), value)
    if timeouts:
        doc["timeouts"] = timeouts
    for key in ("backend", "priority", "bound", "max_attempts"):
        value = getattr(args, key)
        if value is not None:
            doc[key] = value
    codec.spec_from_dict(doc)  # the same checks the daemon makes, before we connect
    return doc


async def _copy_suite_results(
    client: DaemonClient, job_id: str, args: argparse.Namespace, streams: _Streams
) -> None:
    """``--junit``/``--subunit`` of ``submit --suite --wait``: copied from the
    job's evidence directory (the daemon runs on this host: its API is a
    unix socket or a loopback TLS port)."""
    import shutil

    job = await client.get(job_id)
    where = job.result.evidence_dir if job.result is not None else None
    for flag, path, name in (("--junit", args.junit, "results.xml"), ("--subunit", args.subunit, "results.subunit")):
        if not path:
            continue
        if not where:
            streams.stderr.write(f"txvmbot submit: {flag}: job {job_id} left no results\n")
            continue
        try:
            shutil.copyfile(os.path.join(where, name), path)
        except OSError as e:
            streams.stderr.write(f"txvmbot submit: {flag}: cannot copy {name} from {where}: {e}\n")
        else:
            streams.human.write(f"{flag}: {path}\n")


def _suite_job_dict(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """``submit --suite``: the machines' job, as a smoke job's would be,
    plus its ``suite`` table."""
    from txvmbot.cli.suite import suite_spec_from_args
    from txvmbot.daemon import codec

    commands, args.commands = args.commands, None
    if commands is not None:
        raise ConfigError("--command", "not used by a suite: --run is its test command")
    doc = _job_spec_dict(args, environ)
    target = codec.spec_from_dict(doc).check
    assert not isinstance(target, codec.SuiteSpec)
    doc["suite"] = codec.suite_to_dict(suite_spec_from_args(args, target))
    codec.spec_from_dict(doc)  # the daemon's own check, before we connect
    return doc


_SUITE_ONLY = ("name", "machines", "upload", "setup", "list", "tests", "run", "format",
               "test_timeout", "subunit", "junit", "group_regex", "no_group", "runner")


class _Submit:
    @staticmethod
    def prepare(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
        if getattr(args, "suite", False):
            return _suite_job_dict(args, environ)
        for name in _SUITE_ONLY:
            if getattr(args, name, None) is not None:
                raise ConfigError("--" + name.replace("_", "-"), "only used with --suite")
        return _job_spec_dict(args, environ)

    async def __call__(
        self,
        client: DaemonClient,
        args: argparse.Namespace,
        streams: _Streams,
        reactor: Any,
        spec: dict[str, Any],
    ) -> int:
        job = await client.submit(spec)
        if args.wait:
            code = await _follow(client, job, streams, reactor)
            if getattr(args, "suite", False):
                await _copy_suite_results(client, job.id, args, streams)
            return code
        streams.human.write(
            f"submitted job {job.id} ({job.state}) on backend {job.spec.backend!r}, "
            f"priority {job.spec.priority}\n  watch it: txvmbot watch {job.id}\n"
        )
        _print_json(streams, job)
        return 0


_submit = _Submit()


async def _follow(client: DaemonClient, job: Job, streams: _Streams, reactor: Any) -> int:
    """Watch ``job`` live with check's renderers until it is final."""
    from txvmbot.model import StepEvent
    from txvmbot.report import renderer_for

    human = streams.human
    human.write(f"job {job.id} on {job.spec.backend}: {job.state}\n")
    human.flush()
    renderer = renderer_for(human, reactor)

    def on_event(e: JobEvent) -> None:
        if e.kind == "step":
            renderer(StepEvent(name=e.step, state=e.state, at=e.at, detail=e.detail))  # type: ignore[arg-type]

    renderer.start()
    try:
        final = await client.watch(job.id, on_event)
    finally:
        renderer.stop()
    _print_final(streams, final)
    return 0 if final.state == "passed" else 1


def _print_final(streams: _Streams, job: Job) -> None:
    from txvmbot.report import format_result

    human = streams.human
    if job.result is not None:
        human.write(format_result(job.result))
    reason = f": {job.reason}" if job.reason else ""
    human.write(f"job {job.id} {job.state.upper()}{reason}\n")
    human.flush()
    _print_json(streams, job)


def _print_json(streams: _Streams, value: Any) -> None:
    """With --json: ``value`` (a Job, or a JSON-able value) as JSON."""
    from txvmbot.daemon import codec
    from txvmbot.daemon.jobs import Job

    streams.write_json(codec.job_to_dict(value) if isinstance(value, Job) else value)


async def _watch(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    job = await client.get(args.job)
    if job.final:
        _print_final(streams, job)
        return 0 if job.state == "passed" else 1
    return await _follow(client, job, streams, reactor)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _took(start: float | None, end: float | None) -> str:
    if start is None:
        return "-"
    if end is None:
        return "..."
    return f"{end - start:.1f}s"


def _table(rows: list[list[str]], out: IO[str]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


async def _jobs(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    if not 1 <= args.limit <= 1000:
        raise ConfigError("--limit", f"must be from 1 to 1000, got {args.limit}")
    jobs: list[JobSummary] = []
    before = args.before
    more = True
    for _ in range(MAX_PAGES if args.all else 1):
        page: JobList = await client.list(
            states=args.states, backend=args.backend, limit=args.limit, before=before
        )
        jobs.extend(page.jobs)
        more = page.more and bool(page.jobs)
        if not more:
            break
        before = page.jobs[-1].id
    _print_json(streams, [attrs.asdict(j) for j in jobs])
    out = streams.human
    if not jobs:
        out.write("no jobs\n")
        return 0
    rows = [["ID", "STATE", "BACKEND", "PRI", "SUBMITTED (UTC)", "TOOK", "IMAGE", "REASON"]]
    for j in jobs:
        rows.append(
            [
                j.id,
                j.state,
                j.backend if len(j.backend) <= 40 else j.backend[:39] + "…",
                str(j.priority),
                _when(j.submitted),
                _took(j.started, j.finished),
                j.image,
                " ".join(j.reason.split())[:60],
            ]
        )
    _table(rows, out)
    if more:
        out.write(f"(more jobs match: the next page is --before {jobs[-1].id}, or use --all)\n")
    return 0


async def _show(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    from txvmbot.report import format_result

    job = await client.get(args.job)
    _print_json(streams, job)
    c = job.spec.check
    out = streams.human
    lines = [
        f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""),
        f"  backend:   {job.spec.backend} (priority {job.spec.priority}, "
        f"bound {job.spec.bound:g}s, attempts {job.attempts}/{job.spec.max_attempts})",
        f"  target:    {job.spec.target}",
        f"  submitted: {_when(job.submitted)} UTC",
        f"  started:   {_when(job.started)}",
        f"  finished:  {_when(job.finished)}  took {_took(job.started, job.finished)}",
    ]
    from txvmbot.jobs.suite.spec import SuiteSpec

    if isinstance(c, SuiteSpec):
        lines.append(f"  run:       {c.run} ({c.format}, {c.machines} machine(s))")
    for cmd in getattr(c, "commands", ()) if getattr(c, "ssh", True) else ():
        lines.append(f"  command:   {cmd}")
    out.write("\n".join(lines) + "\n")
    if job.result is not None:
        out.write(format_result(job.result))
    return 0


async def _cancel(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    streams.human.write(f"cancelling job {args.job} (waiting for its cleanup)...\n")
    streams.human.flush()
    job = await client.cancel(args.job)
    reason = f": {job.reason}" if job.reason else ""
    streams.human.write(f"job {job.id} {job.state}{reason}\n")
    _print_json(streams, job)
    return 0


def _backend_line(b: BackendStatus) -> str:
    extra = f"; {b.reason}" if b.reason else ""
    return (
        f"backend {b.name}: {b.state} ({b.running} running with {b.instances} instances, "
        f"{b.queued} queued, capacity {b.capacity} instances){extra}\n"
    )


async def _drain(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    b = await client.drain(args.backend)
    streams.human.write(_backend_line(b))
    _print_json(streams, attrs.asdict(b))
    return 0


async def _resume(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    b = await client.resume(args.backend)
    streams.human.write(_backend_line(b))
    _print_json(streams, attrs.asdict(b))
    return 0


async def _status(
    client: DaemonClient, args: argparse.Namespace, streams: _Streams, reactor: Any, _: Any
) -> int:
    from txvmbot.daemon.api.protocol import status_to_dict

    s: DaemonStatus = await client.status()
    _print_json(streams, status_to_dict(s))
    out = streams.human
    out.write(
        f"txvmbot daemon {client.daemon_version} (API {s.api_version}) at {client.where}\n"
        f"  workers: {s.workers} ({s.busy_workers} busy)\n"
        f"  jobs:    {s.queue_depth} queued, {s.running} running\n"
    )
    if s.data_dir:
        free = "free space unknown" if s.data_dir_free < 0 else f"{s.data_dir_free / 2**20:.1f} MB free"
        out.write(f"  data:    {s.data_dir} ({free})\n")
    if s.writes_held:
        out.write(f"  HELD WRITES: {s.writes_held}\n")
    if s.refusing:
        out.write(f"  REFUSING NEW JOBS: {s.refusing}\n")
    if s.backends:
        rows = [["BACKEND", "STATE", "RUNNING", "INSTANCES", "QUEUED", "CAPACITY", "FAILURES", "REASON"]]
        for b in s.backends:
            rows.append(
                [
                    b.name,
                    b.state,
                    str(b.running),
                    f"{b.instances}",
                    str(b.queued),
                    str(b.capacity),
                    str(b.consecutive_failures),
                    b.reason,
                ]
            )
        _table(rows, out)
    return 0


class _Failures:
    @staticmethod
    def prepare(
        args: argparse.Namespace, environ: Mapping[str, str]
    ) -> tuple[tuple[str, ...], float]:
        """The facts to group by and the age in seconds, checked before
        connecting."""
        from txvmbot.daemon.scheduling.failures import MAX_LIMIT, check_by, parse_age

        by = check_by([n.strip() for n in args.by.split(",") if n.strip()], "--by")
        age = parse_age(args.since, "--since")
        if not 1 <= args.limit <= MAX_LIMIT:
            raise ConfigError("--limit", f"must be from 1 to {MAX_LIMIT}, got {args.limit}")
        return by, age

    async def __call__(
        self,
        client: DaemonClient,
        args: argparse.Namespace,
        streams: _Streams,
        reactor: Any,
        prepared: tuple[tuple[str, ...], float],
    ) -> int:
        from txvmbot.daemon.scheduling.failures import report_to_dict

        by, age = prepared
        since = max(0.0, reactor.seconds() - age)
        report = await client.failures(by=by, since=since, limit=args.limit)
        _print_json(streams, report_to_dict(report))
        _print_failures(report, streams.human)
        return 0


_failures = _Failures()


def _print_failures(report: FailureReport, out: IO[str]) -> None:
    """``report`` as a table: the facts, FAILED/TOTAL, PASS RATE, and the
    newest failed job of the group with its reason."""
    by = ", ".join(report.by)
    cancelled = f"; {report.cancelled} cancelled, not counted" if report.cancelled else ""
    if not report.groups:
        out.write(f"no finished jobs since {_when(report.since)} UTC{cancelled}\n")
    else:
        out.write(
            f"{report.failed} of {report.total} finished jobs failed since "
            f"{_when(report.since)} UTC, by {by}{cancelled}\n"
        )
        rows = [[*(n.upper() for n in report.by), "FAILED/TOTAL", "PASS RATE", "EXAMPLE"]]
        for g in report.groups:
            example = ""
            if g.examples:
                e = g.examples[0]
                example = f"{e.job_id}: {e.reason}"
                example = example if len(example) <= 70 else example[:69] + "…"
            rows.append(
                [
                    *(v if len(v) <= 40 else v[:39] + "…" for v in g.key),
                    f"{g.failed}/{g.total}",
                    f"{g.pass_rate * 100:.1f}%",
                    example,
                ]
            )
        _table(rows, out)
    if report.omitted:
        out.write(f"({report.omitted} groups with fewer failures left out: group by fewer facts)\n")
    if not report.complete:
        out.write(
            f"(only the newest {report.scanned} finished jobs were read: older ones in that "
            "time are missing; raise --limit)\n"
        )
