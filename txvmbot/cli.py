"""The ``txvmbot`` command: ``check`` runs one euca-style smoke check (or
several in a row), ``reap`` removes what earlier checks left behind.

Exit status: 0 passed, 1 failed (or interrupted), 2 bad usage or config.

Importing this module and building the parser import neither the reactor
nor the scenario, so ``txvmbot --help`` is fast; both are imported when a
command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import attrs

from txvmbot import __version__
from txvmbot.config import (
    TIMEOUT_FIELDS,
    CheckSettings,
    CloudConfig,
    CloudSettings,
    build_check_spec,
    build_cloud,
    check_cidr,
    check_endpoint,
    check_float,
    check_int,
    check_str,
    check_template,
    key_path,
    load_config,
    timeout_flag,
)
from txvmbot.errors import ConfigError
from txvmbot.model import DEFAULT_SSH_ENDPOINT, CheckSpec, Cloud, Timeouts

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from txvmbot.model import CheckResult, ReapReport

__all__ = ["build_parser", "main", "run", "spec_from_args", "cloud_from_args", "state_dir_for"]

CANCEL_REASON = "SIGINT/SIGTERM received"

_EPILOG = """\
examples:
  # one check against AWS, finding the newest Debian 12 image by name
  txvmbot check --endpoint https://ec2.eu-west-1.amazonaws.com --region eu-west-1 \\
      --image-name 'debian-12-amd64-*' --image-owner 136693071363 \\
      --ssh-user admin --ssh-key ~/.ssh/id_ed25519 --command 'uname -a'

  # ten checks in a row of a cloud from the config file, results as JSON
  txvmbot check --config clouds.toml --cloud prod --repeat 10 --json results.json

  # see what earlier checks left behind in that cloud, without removing it
  txvmbot reap --config clouds.toml --cloud prod --older-than 3600 --dry-run

exit status: 0 passed, 1 failed or interrupted, 2 bad usage or config.
"""

_CONFIG_NOTE = """\
Settings come from the flags, then from the cloud's table in --config, then
from the defaults shown. Credentials: access_key with secret_key or
secret_key_env in the config; else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
from the environment; else the named --profile.
"""


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=78)


def _default(name: str) -> Any:
    return attrs.fields_dict(CheckSpec)[name].default


def _add_common(p: argparse.ArgumentParser) -> None:
    """Flags every subcommand has: where the cloud is, config, state, output."""
    cloud = p.add_argument_group("cloud")
    cloud.add_argument(
        "--endpoint", metavar="URL", help="EC2 API URL (required unless in --config)"
    )
    cloud.add_argument("--region", metavar="R", help="region name (required unless in --config)")
    cloud.add_argument(
        "--signature-version",
        choices=("v4", "v2"),
        help="request signing: v4, or v2 for old Eucalyptus/OpenStack (default: v4)",
    )
    cloud.add_argument(
        "--profile", metavar="P", help="credentials profile (~/.aws/credentials) (default: none)"
    )
    files = p.add_argument_group("config and state")
    files.add_argument(
        "--config", metavar="FILE", help="TOML file with [clouds.NAME] tables (default: none)"
    )
    files.add_argument(
        "--cloud",
        metavar="NAME",
        help="which [clouds.NAME] of --config to use (default: the only one)",
    )
    files.add_argument(
        "--state-dir",
        metavar="DIR",
        help="holds journal.sqlite and evidence/ (default: state_dir from --config, "
        "else $XDG_STATE_HOME/txvmbot, else ~/.local/state/txvmbot)",
    )
    files.add_argument(
        "--json",
        metavar="FILE|-",
        help="also write the results as JSON to FILE, or to stdout with '-' (then the "
        "human output goes to stderr) (default: none)",
    )
    files.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log info messages to stderr, not only warnings and errors",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser. Builds nothing but the parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="txvmbot",
        description="Smoke-check EC2-API clouds: boot a fresh VM, ssh in, run commands, "
        "always clean up.",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"txvmbot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = Timeouts()
    check = sub.add_parser(
        "check",
        help="run a euca-style smoke check (keypair, image, instance, ssh, cleanup)",
        description=_wrap(
            "Run a euca-style smoke check: create a keypair and a security group, "
            "find the image, run an instance, wait for it to be running with an address, "
            "open port 22, optionally attach a floating IP, ssh in and run the commands, "
            "fetch the console log on failure, then terminate, revoke and delete everything."
        ),
        epilog=_CONFIG_NOTE,
        formatter_class=fmt,
    )
    _add_common(check)
    img = check.add_argument_group("image and instance")
    which = img.add_mutually_exclusive_group()
    which.add_argument("--image", metavar="ID", help="image id such as ami-0123 (or --image-name)")
    which.add_argument(
        "--image-name",
        metavar="PATTERN",
        help="image name filter, '*' wildcards; the newest match is used (or --image)",
    )
    img.add_argument(
        "--image-owner", metavar="O", help="only images of this owner id/alias (default: any)"
    )
    img.add_argument(
        "--instance-type",
        metavar="T",
        help=f"instance type (default: {_default('instance_type')})",
    )
    img.add_argument(
        "--parallel",
        metavar="N",
        type=int,
        help=f"instances to run at once in one check (default: {_default('parallel')})",
    )
    img.add_argument(
        "--floating-ip",
        action=argparse.BooleanOptionalAction,
        help="allocate and associate a floating (elastic) IP (default: no)",
    )
    img.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        help="fetch and keep the console log even when the check passes (default: on failure only)",
    )
    ssh = check.add_argument_group("ssh")
    ssh.add_argument(
        "--ssh",
        action=argparse.BooleanOptionalAction,
        help="ssh in and run the commands; --no-ssh stops at 'running' (default: yes)",
    )
    ssh.add_argument(
        "--ssh-user", metavar="U", help=f"user to log in as (default: {_default('ssh_user')})"
    )
    ssh.add_argument(
        "--ssh-key",
        metavar="PATH",
        help="private key to log in with; its public key is imported as the check's "
        "keypair (default: a new keypair per check)",
    )
    ssh.add_argument(
        "--ssh-endpoint",
        metavar="TEMPLATE",
        help="Twisted endpoint string to reach the instance's sshd, with {public_ip}, "
        "{private_ip}, {instance_id} or {index} filled in "
        f"(default: {DEFAULT_SSH_ENDPOINT.replace('%', '%%')})",
    )
    ssh.add_argument(
        "--ssh-cidr",
        metavar="CIDR",
        help=f"who may reach port 22 (default: {_default('ssh_cidr')})",
    )
    ssh.add_argument(
        "--command",
        metavar="CMD",
        action="append",
        dest="commands",
        help="command to run over ssh; repeat for several; replaces the config's list "
        f"(default: {' ; '.join(_default('commands'))})",
    )
    runs = check.add_argument_group("runs")
    runs.add_argument(
        "--repeat",
        metavar="K",
        type=int,
        default=1,
        help="run K checks in a row, then show the pass rate and per-step p50/p95 (default: 1)",
    )
    waits = check.add_argument_group("timeouts (seconds)")
    for name in TIMEOUT_FIELDS:
        waits.add_argument(
            timeout_flag(name),
            metavar="S",
            type=float,
            dest=f"timeout_{name}",
            help=f"{name.replace('_', ' ')} (default: {getattr(t, name):g})",
        )
    check.set_defaults(func=_cmd_check)

    reap = sub.add_parser(
        "reap",
        help="remove instances, groups, keypairs and addresses earlier checks left behind",
        description=_wrap(
            "Find what earlier checks created and did not remove (from the journal "
            "and by txvmbot's tags in the cloud) and remove it. Exits 1 if anything "
            "could not be removed."
        ),
        epilog=_CONFIG_NOTE,
        formatter_class=fmt,
    )
    _add_common(reap)
    what = reap.add_argument_group("reap")
    what.add_argument(
        "--older-than",
        metavar="SECONDS",
        type=float,
        help="only what was created more than SECONDS ago, so running checks are "
        "left alone (default: everything)",
    )
    what.add_argument(
        "--dry-run", action="store_true", help="only list what would be removed (default: off)"
    )
    reap.set_defaults(func=_cmd_reap)
    return parser


# --- from arguments to values ----------------------------------------------


def _load_cloud_config(args: argparse.Namespace) -> tuple[CloudConfig | None, str | None]:
    """The chosen [clouds.NAME] of --config, and the config's state_dir."""
    if args.config is None:
        if args.cloud is not None:
            raise ConfigError("--cloud", "needs --config FILE to look the cloud up in")
        return None, None
    config = load_config(args.config)
    return config.cloud(args.cloud), config.state_dir


def cloud_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], chosen: CloudConfig | None
) -> Cloud:
    """The :class:`Cloud` from flags over the chosen config table."""
    flags = CloudSettings(
        endpoint=None if args.endpoint is None else check_endpoint("--endpoint", args.endpoint),
        region=None if args.region is None else check_str("--region", args.region),
        signature_version=args.signature_version,
        profile=None if args.profile is None else check_str("--profile", args.profile),
    )
    if chosen is None:
        return build_cloud(CloudSettings(), flags, environ)
    return build_cloud(
        chosen.cloud, flags, environ, name=chosen.name, where=key_path("clouds", chosen.name)
    )


def _opt(value: Any, check: Callable[[str, object], Any], where: str) -> Any:
    return None if value is None else check(where, value)


def spec_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], chosen: CloudConfig | None = None
) -> CheckSpec:
    """The :class:`CheckSpec` of ``txvmbot check``: flags over the chosen
    config table over the defaults. Raises ConfigError naming the flag."""
    cloud = cloud_from_args(args, environ, chosen)
    timeouts = {}
    for name in TIMEOUT_FIELDS:
        value = getattr(args, f"timeout_{name}")
        if value is not None:
            timeouts[name] = check_float(timeout_flag(name), value)
    commands = None
    if args.commands is not None:
        commands = tuple(check_str("--command", c) for c in args.commands)
    flags = CheckSettings(
        image=_opt(args.image, check_str, "--image"),
        image_name=_opt(args.image_name, check_str, "--image-name"),
        image_owner=_opt(args.image_owner, check_str, "--image-owner"),
        instance_type=_opt(args.instance_type, check_str, "--instance-type"),
        ssh_user=_opt(args.ssh_user, check_str, "--ssh-user"),
        ssh_key=_opt(args.ssh_key, check_str, "--ssh-key"),
        ssh_endpoint=_opt(args.ssh_endpoint, check_template, "--ssh-endpoint"),
        ssh_cidr=_opt(args.ssh_cidr, check_cidr, "--ssh-cidr"),
        commands=commands,
        floating_ip=args.floating_ip,
        parallel=_opt(args.parallel, check_int, "--parallel"),
        console=args.console,
        ssh=args.ssh,
        timeouts=tuple(sorted(timeouts.items())),
    )
    spec = build_check_spec(cloud, chosen.check if chosen else CheckSettings(), flags)
    if spec.ssh_key is not None and spec.ssh_key.startswith("~"):
        spec = attrs.evolve(spec, ssh_key=os.path.expanduser(spec.ssh_key))
    return spec


def state_dir_for(flag: str | None, config: str | None, environ: Mapping[str, str]) -> str:
    """--state-dir, else the config's state_dir, else $XDG_STATE_HOME/txvmbot
    (if absolute, as the XDG spec asks), else ~/.local/state/txvmbot."""
    if flag is not None:
        return os.path.expanduser(check_str("--state-dir", flag))
    if config is not None:
        return os.path.expanduser(config)
    xdg = environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "txvmbot")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "txvmbot")


def _make_private_dir(path: str, where: str) -> None:
    """Create ``path`` (and parents) with mode 0700 if it does not exist."""
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(where, f"cannot create {path}: {e.strerror or e}") from None


# --- running ---------------------------------------------------------------


@attrs.define
class _Streams:
    stdout: IO[str]
    stderr: IO[str]
    json_path: str | None

    @property
    def human(self) -> IO[str]:
        """Where people's output goes: stderr when stdout carries JSON."""
        return self.stderr if self.json_path == "-" else self.stdout

    def write_json(self, doc: Any) -> None:
        if self.json_path is None:
            return
        text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
        if self.json_path == "-":
            self.stdout.write(text)
            self.stdout.flush()
            return
        tmp = f"{self.json_path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.json_path)
        self.human.write(f"JSON results written to {self.json_path}\n")


@attrs.define
class _Exit:
    """The exit code the command decided on; ``None`` if it never finished
    (the reactor was stopped under it)."""

    code: int | None = None


def _log_observer(stream: IO[str], verbose: bool) -> Any:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        textFileLogObserver,
    )

    level = LogLevel.info if verbose else LogLevel.warn
    return FilteringLogObserver(
        textFileLogObserver(stream), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )


class _CheckRun:
    """Runs the checks of one ``txvmbot check`` in a row and makes shutdown
    (SIGINT/SIGTERM) cancel the running one and wait for its cleanup."""

    def __init__(
        self,
        reactor: Any,
        spec: CheckSpec,
        *,
        repeat: int,
        journal: Any,
        evidence_root: str,
        streams: _Streams,
        exit: _Exit,
        handle_signals: bool,
    ) -> None:
        self._reactor = reactor
        self._spec = spec
        self._repeat = repeat
        self._journal = journal
        self._evidence_root = evidence_root
        self._streams = streams
        self._exit = exit
        self._handle_signals = handle_signals
        self._current: Any = None
        self._stopping = False
        self._done = False
        self._waiting: list[Deferred[None]] = []

    async def run(self) -> None:
        from twisted.python.failure import Failure

        from txvmbot.model import CheckResult, Facts
        from txvmbot.report import (
            format_result,
            format_summary,
            renderer_for,
            summarize,
            to_json,
        )
        from txvmbot.scenario import Check

        human = self._streams.human
        results: list[CheckResult] = []
        try:
            for i in range(self._repeat):
                if self._stopping:
                    break
                renderer = renderer_for(human, self._reactor)
                check = Check(
                    self._reactor,
                    self._spec,
                    journal=self._journal,
                    observer=renderer,
                    evidence_root=self._evidence_root,
                )
                self._current = check
                counter = f" {i + 1}/{self._repeat}" if self._repeat > 1 else ""
                human.write(f"check{counter} {check.check_id}: {_describe_spec(self._spec)}\n")
                human.flush()
                renderer.start()
                try:
                    result = await check.run()
                except Exception:
                    # A bug, not a check failure: the check's contract is to fire
                    # with passed=False. Report it as a failed check all the same.
                    f = Failure()
                    _log.failure("Check {check_id} broke", f, check_id=check.check_id)
                    result = CheckResult(
                        check_id=check.check_id,
                        passed=False,
                        steps=(),
                        facts=Facts(),
                        error=f"internal error: {f.getErrorMessage()}",
                    )
                finally:
                    renderer.stop()
                    self._current = None
                results.append(result)
                human.write(format_result(result))
                human.flush()
            summary = summarize(results)
            if self._repeat > 1:
                human.write(format_summary(summary))
            if self._stopping and len(results) < self._repeat:
                human.write(
                    f"interrupted: {len(results)} of {self._repeat} checks ran; "
                    "`txvmbot reap` removes anything left behind\n"
                )
            # Always an array, one object per check, whatever --repeat is.
            self._streams.write_json([to_json(r) for r in results])
            ok = bool(results) and all(r.passed for r in results) and not self._stopping
            self._exit.code = 0 if ok else 1
        finally:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def before_shutdown(self) -> Deferred[None] | None:
        """The reactor is stopping (a signal, usually): cancel the running
        check and make shutdown wait until its cleanup ran and the results
        were written. A second signal stops waiting."""
        from twisted.internet.defer import Deferred

        if self._done:
            return None
        self._stopping = True
        self._streams.stderr.write(
            f"{CANCEL_REASON}: cancelling, cleaning up (send it again to stop without "
            "waiting for cleanup)\n"
        )
        self._streams.stderr.flush()
        if self._current is not None:
            self._current.cancel(CANCEL_REASON)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if self._handle_signals:
            self._install_force_handlers()
        return d

    def _install_force_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def again(signum: int, frame: Any) -> None:
            # Only Python's own default from now on: a third signal kills us.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._reactor.callFromThread(self._force)

        signal.signal(signal.SIGINT, again)
        signal.signal(signal.SIGTERM, again)

    def _force(self) -> None:
        if self._done:
            return
        self._streams.stderr.write(
            "second signal: stopping without waiting for cleanup; resources may be "
            "left behind: run `txvmbot reap` to remove them\n"
        )
        self._streams.stderr.flush()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


def _describe_spec(spec: CheckSpec) -> str:
    image = spec.image or f"name {spec.image_name!r}"
    extra = f" x{spec.parallel}" if spec.parallel > 1 else ""
    return f"{spec.cloud.name} {spec.cloud.endpoint} ({spec.cloud.region}), {image}, {spec.instance_type}{extra}"


class _Log:
    """twisted.logger.Logger, created on first use (its import is not free)."""

    def __getattr__(self, name: str) -> Any:
        from twisted.logger import Logger

        return getattr(Logger(namespace="txvmbot.cli"), name)


_log = _Log()


def _open_journal(state_dir: str) -> Any:
    from txvmbot.journal import SQLiteJournal

    return SQLiteJournal(os.path.join(state_dir, "journal.sqlite"))


def _react(main_fn: Callable[[Any], Any], reactor: Any) -> None:
    """Run ``main_fn(reactor)`` under ``task.react``; swallow its SystemExit
    (the real exit code is in the command's :class:`_Exit`)."""
    from twisted.internet.task import react

    try:
        react(main_fn, (), _reactor=reactor)
    except SystemExit:
        pass


def _cmd_check(
    args: argparse.Namespace,
    streams: _Streams,
    environ: Mapping[str, str],
    reactor: Any,
) -> int:
    if args.repeat < 1:
        raise ConfigError("--repeat", f"must be at least 1, got {args.repeat}")
    chosen, config_state = _load_cloud_config(args)
    spec = spec_from_args(args, environ, chosen)
    state_dir = state_dir_for(args.state_dir, config_state, environ)
    evidence = os.path.join(state_dir, "evidence")
    _make_private_dir(state_dir, "--state-dir")
    _make_private_dir(evidence, "--state-dir")

    exit = _Exit()
    journal = _open_journal(state_dir)
    try:

        def go(r: Any) -> Any:
            from twisted.internet.defer import Deferred, ensureDeferred

            run = _CheckRun(
                r,
                spec,
                repeat=args.repeat,
                journal=journal,
                evidence_root=evidence,
                streams=streams,
                exit=exit,
                handle_signals=reactor is None,
            )
            r.addSystemEventTrigger("before", "shutdown", run.before_shutdown)
            # Start once the reactor runs, so its signal handlers are in place
            # before the first resource is created.
            started: Deferred[None] = Deferred()
            r.callWhenRunning(lambda: ensureDeferred(run.run()).chainDeferred(started))
            return started

        _react(go, reactor)
    finally:
        _close(journal)
    if exit.code is None:
        streams.stderr.write("txvmbot check: stopped before the check finished\n")
        return 1
    return exit.code


def _cmd_reap(
    args: argparse.Namespace,
    streams: _Streams,
    environ: Mapping[str, str],
    reactor: Any,
) -> int:
    older_than = None
    if args.older_than is not None:
        older_than = check_float("--older-than", args.older_than, positive=False)
    chosen, config_state = _load_cloud_config(args)
    cloud = cloud_from_args(args, environ, chosen)
    state_dir = state_dir_for(args.state_dir, config_state, environ)
    _make_private_dir(state_dir, "--state-dir")

    exit = _Exit()
    journal = _open_journal(state_dir)
    try:

        async def go(r: Any) -> None:
            from txvmbot.reaper import reap
            from txvmbot.report import format_reap, reap_to_json, renderer_for

            human = streams.human
            renderer = renderer_for(human, r)
            renderer.start()
            try:
                report: ReapReport = await reap(
                    r,
                    cloud,
                    journal=journal,
                    older_than=older_than,
                    dry_run=args.dry_run,
                    observer=renderer,
                )
            finally:
                renderer.stop()
            human.write(format_reap(report))
            human.flush()
            streams.write_json(reap_to_json(report))
            exit.code = 1 if report.errors else 0

        _react(go, reactor)
    finally:
        _close(journal)
    if exit.code is None:
        streams.stderr.write(
            "txvmbot reap: stopped before it finished; run it again to remove the rest\n"
        )
        return 1
    return exit.code


def _close(journal: Any) -> None:
    close = getattr(journal, "close", None)
    if close is not None:
        close()


def run(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    _reactor: Any = None,
) -> int:
    """Run the command line ``argv``; return the exit status.

    ``_reactor`` is for tests (a ``MemoryReactorClock``); without it the
    global reactor runs, with Twisted's signal handlers installed.
    """
    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    environ = os.environ if environ is None else environ
    parser = build_parser()
    try:
        args = _parse(parser, argv, stdout, stderr)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    streams = _Streams(stdout=stdout, stderr=stderr, json_path=args.json)

    from twisted.logger import globalLogBeginner, globalLogPublisher

    observer = _log_observer(stderr, args.verbose)
    if _reactor is None:
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    else:
        globalLogPublisher.addObserver(observer)
    try:
        code: int = args.func(args, streams, environ, _reactor)
        return code
    except ConfigError as e:
        stderr.write(f"txvmbot {args.command}: error: {e}\n")
        return 2
    finally:
        if _reactor is not None:
            globalLogPublisher.removeObserver(observer)


def _parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    stdout: IO[str],
    stderr: IO[str],
) -> argparse.Namespace:
    """``parser.parse_args`` writing to the given streams, not sys's."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = stdout, stderr
    try:
        return parser.parse_args(argv)
    finally:
        sys.stdout, sys.stderr = old


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
    _reactor: Any = None,
) -> int:
    """The console script: run ``argv`` and exit with its status."""
    raise SystemExit(run(argv, stdout=stdout, stderr=stderr, environ=environ, _reactor=_reactor))
