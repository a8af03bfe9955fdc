"""``txvmbot suite``: a whole test suite across fresh machines, fed from one
queue, on a cloud or on local VMs; results as subunit, JUnit XML and JSON."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import IO, Any

from txvmbot.cli._common import (
    _close,
    _Exit,
    _open_journal,
    _react,
    _Streams,
    _wrap,
    add_cloud_flags,
    add_files_flags,
)
from txvmbot.cli.check import (
    add_check_settings,
    target_from_args,
)
from txvmbot.config import check_float, check_int, check_str
from txvmbot.errors import ConfigError

CANCEL_REASON = "SIGINT/SIGTERM received"

_EXAMPLE = """\
example (a Python unittest suite on 3 local Debian VMs, results for Jenkins;
the image built by 'txvmbot image build --distro debian --name mylib
--package python3-subunit'):
  txvmbot suite --local --image mylib --name mylib --machines 3 \\
      --upload ./src:/root/src --setup 'cd /root/src && ./prepare' \\
      --runner 'cd /root/src && python3 {runner_py} --discover .' \\
      --format subunit --junit results.xml --subunit results.subunit

  (one runner a machine; with neither --list nor --tests, the runners list
  the tests: unittest discovery from '.', every test module loaded once)

example (a pytest suite, read back from the JUnit XML pytest writes):
  txvmbot suite --name mylib --machines 2 --config clouds.toml --cloud ci \\
      --upload ./src:src --list 'cd src && python3 -m pytest --collect-only -q | grep ::' \\
      --run 'cd src && python3 -m pytest -p no:cacheprovider --junitxml={junit} @{tests_file}' \\
      --format junit --junit results.xml

Exit status: 0 when every test passed (or was skipped), 1 when any failed,
timed out or could not run, 2 for bad usage.
"""


def add_suite_flags(p: argparse.ArgumentParser, *, with_bound: bool = True) -> None:
    """The flags of a suite run: shared by ``suite`` and ``submit --suite``
    (whose job ``--bound`` is also the run's)."""
    s = p.add_argument_group("suite")
    s.add_argument(
        "--name",
        metavar="NAME",
        help="the suite's name: its recorded test durations are kept under it (default: suite)",
    )
    s.add_argument(
        "--machines", metavar="N", type=int, help="fresh machines, booted in parallel (default: 1)"
    )
    s.add_argument(
        "--upload",
        metavar="SRC:DEST",
        action="append",
        help="copy a local file or directory tree to every machine before the tests, "
        "over SFTP (repeatable)",
    )
    s.add_argument(
        "--setup",
        metavar="CMD",
        action="append",
        help="run on every machine after the uploads; a machine whose setup fails is "
        "replaced once (repeatable)",
    )
    which = s.add_mutually_exclusive_group()
    which.add_argument(
        "--list",
        metavar="CMD",
        help="run once on the first ready machine; prints test ids, one a line "
        "(with --runner, give neither --list nor --tests to let the runners list them)",
    )
    which.add_argument("--tests", metavar="FILE", help="test ids, one a line ('-' for stdin)")
    s.add_argument(
        "--run",
        metavar="CMD",
        help="the test command: {test} is one test id; a batch is {tests} (shell-quoted, "
        "space-separated) or {tests_file} (the path of a file on the machine with the "
        "batch's ids, one a line, uploaded over SFTP: for --load-list and batches too "
        "long for a command line); {junit} is the path the command writes JUnit XML to "
        "(--format junit; a fresh path for every command)",
    )
    s.add_argument(
        "--runner",
        metavar="CMD",
        help="instead of --run: a long-lived runner started once per machine, fed batch "
        "after batch of ids on its stdin, one a line, writing subunit v2 (--format "
        "subunit); {runner_py} is txvmbot's own, uploaded: 'python3 {runner_py}' runs "
        "unittest ids, 'python3 {runner_py} --trial' trial ids, 'python3 {runner_py} "
        "--pytest ARGS' pytest node ids (collected once with ARGS); it needs "
        "python-subunit on the machine. Without --list and --tests, every machine's "
        "runner lists the tests before the first batch (loading every test module "
        "once): '{runner_py} --discover DIR' (unittest discovery, with -t TOP, -p "
        "PATTERN) or test names ('{runner_py} --trial twisted.test'); with --pytest, "
        "what it collects",
    )
    s.add_argument(
        "--format",
        choices=("exit", "subunit", "junit"),
        help="exit: one test per command, its exit status is its result; subunit: the "
        "command's stdout is a subunit v2 stream; junit: the command writes JUnit XML "
        "to {junit}, fetched over SFTP when it ends (default: exit)",
    )
    grouping = s.add_mutually_exclusive_group()
    grouping.add_argument(
        "--group-regex",
        metavar="RE",
        help="tests whose ids match RE (from the start) to the same string run in the "
        "same batch, in order, as stestr's --group-regex (default: by class: "
        "pkg.mod.Class.test_x and tests/x.py::Class::test_y go with their class)",
    )
    grouping.add_argument(
        "--no-group",
        action="store_true",
        default=None,
        help="do not keep any tests together: batches are cut by time alone",
    )
    s.add_argument(
        "--test-timeout",
        metavar="S",
        type=float,
        help="bound of one test; past it the test fails and its machine is replaced (default: 300)",
    )
    if with_bound:
        s.add_argument("--bound", metavar="S", type=float, help="bound of the whole run (default: 3600)")
    out = p.add_argument_group("suite results")
    out.add_argument("--subunit", metavar="FILE", help="one merged subunit v2 stream (default: none)")
    out.add_argument("--junit", metavar="FILE", help="JUnit XML for Jenkins and GitLab (default: none)")


def add_parser(sub: Any) -> None:
    suite = sub.add_parser(
        "suite",
        help="run a test suite across fresh machines, fed from one queue",
        description=_wrap(
            "Boot N fresh machines (a cloud's instances, or local VMs with --local), copy "
            "files and run setup on each, then let every machine pull the next test from "
            "one queue, longest first by the durations of earlier runs, until none is "
            "left. A hung test fails and its machine is replaced; a machine that dies "
            "gives its test to another once. Everything is cleaned up at the end."
        ),
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cloud_flags(suite)
    add_files_flags(suite)
    suite.add_argument(
        "--local", action="store_true", help="run on fresh local QEMU VMs (default: a cloud)"
    )
    add_suite_flags(suite)
    add_check_settings(suite)
    suite.set_defaults(func=_cmd_suite)


def _read_tests(path: str) -> tuple[str, ...]:
    import sys

    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("--tests", f"cannot read {path}: {e}") from None
    ids: dict[str, None] = {}
    for line in text.splitlines():
        if line.strip():
            ids.setdefault(line.strip(), None)
    if not ids:
        raise ConfigError("--tests", f"{path} lists no test ids")
    return tuple(ids)


def _upload(value: str) -> Any:
    from txvmbot.jobs.suite.spec import Upload

    source, sep, dest = value.rpartition(":")
    if not sep or not source or not dest:
        raise ConfigError("--upload", f"{value!r} is not SRC:DEST")
    source = os.path.abspath(os.path.expanduser(source))
    if not os.path.exists(source):
        raise ConfigError("--upload", f"{source} does not exist")
    return Upload(source, dest)


def suite_spec_from_args(args: argparse.Namespace, target: Any) -> Any:
    """The :class:`SuiteSpec` of ``suite`` and ``submit --suite``: flags over
    defaults, on ``target`` (a CheckSpec or LocalSpec). Raises ConfigError
    naming the flag."""
    from txvmbot.jobs.suite.spec import SuiteSpec

    if getattr(args, "commands", None) is not None:
        raise ConfigError("--command", "not used by a suite: --run is its test command")
    if getattr(args, "parallel", None) is not None:
        raise ConfigError("--parallel", "not used by a suite: use --machines")
    runner = getattr(args, "runner", None)
    if not args.run and not runner:
        raise ConfigError("--run", "required: the command that runs {test} or {tests} (or --runner)")
    if not args.list and not args.tests and not runner:
        raise ConfigError(
            "--list", "give the test ids with --list CMD or --tests FILE (or let a --runner list them)"
        )
    return SuiteSpec(
        target=target,
        name=check_str("--name", args.name or "suite"),
        run=check_str("--run", args.run) if args.run else "",
        runner=check_str("--runner", runner) if runner else "",
        machines=1 if args.machines is None else check_int("--machines", args.machines),
        format=args.format or "exit",
        tests=_read_tests(args.tests) if args.tests else (),
        list_command=check_str("--list", args.list) if args.list else "",
        uploads=tuple(_upload(u) for u in args.upload or ()),
        setup=tuple(check_str("--setup", c) for c in args.setup or ()),
        test_timeout=300.0 if args.test_timeout is None else check_float("--test-timeout", args.test_timeout),
        bound=3600.0 if args.bound is None else check_float("--bound", args.bound),
        group_regex=None if args.group_regex is None else check_str("--group-regex", args.group_regex),
        group=not getattr(args, "no_group", None),
    )


class _LiveLine:
    """One line on a terminal, rewritten as the run goes: done/total,
    passed, failed, each machine's state, ETA."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._width = 0

    def __call__(self, p: Any) -> None:
        if not self.tty:
            return
        eta = f", ETA {p.eta:.0f}s" if p.eta is not None else ""
        states = " ".join(f"{s.worker.split('-')[-1]}:{s.state[:24]}" for s in p.slots)
        line = f"{p.done}/{p.total} done, {p.passed} passed, {p.failed} failed{eta} | {states}"
        line = line[:200]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def end(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


def write_outputs(result: Any, args: argparse.Namespace, streams: _Streams) -> None:
    """--subunit, --junit and --json, each written whole then renamed in."""
    from txvmbot.jobs.suite import results as R
    from txvmbot.jobs.suite.report import summary_dict

    def atomically(path: str, write: Any) -> None:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)

    if args.subunit:
        atomically(args.subunit, lambda f: R.write_subunit(result.tests, f))
    if args.junit:
        atomically(args.junit, lambda f: R.write_junit(result.tests, f, result.name))
    streams.write_json(R.to_json(result.tests, summary_dict(result)))


def _cmd_suite(
    args: argparse.Namespace,
    streams: _Streams,
    environ: Mapping[str, str],
    reactor: Any,
) -> int:
    target, state_dir, evidence = target_from_args(args, environ)
    spec = suite_spec_from_args(args, target)
    from txvmbot.jobs.suite import durations as D

    known = D.load(state_dir, spec.name)
    exit = _Exit()
    journal = _open_journal(state_dir)
    human = streams.human
    live = _LiveLine(streams.stderr)

    try:

        def go(r: Any) -> Any:
            from twisted.internet.defer import Deferred, ensureDeferred

            from txvmbot.engine import new_check_id
            from txvmbot.jobs.backends import machines_for
            from txvmbot.jobs.suite.report import format_summary
            from txvmbot.jobs.suite.run import SuiteRun

            machines = machines_for(r, spec.target, journal=journal, check_id=new_check_id())
            run = SuiteRun(r, machines, spec, durations=known, progress=live, evidence_root=evidence)
            human.write(f"suite {spec.name}: {spec.machines} machine(s), check id {run.check_id}\n")
            human.flush()
            done: Deferred[None] = Deferred()
            finished = False

            async def main() -> None:
                nonlocal finished
                result = await run.run()
                finished = True
                live.end()
                try:
                    write_outputs(result, args, streams)
                    D.save(state_dir, spec.name, _durations(result))
                except (OSError, ConfigError) as e:
                    streams.stderr.write(f"txvmbot suite: {e}\n")
                human.write(format_summary(result))
                human.flush()
                exit.code = 0 if result.passed else 1

            def before_shutdown() -> Deferred[None] | None:
                if finished:
                    return None
                streams.stderr.write(f"\n{CANCEL_REASON}: cancelling, cleaning up\n")
                streams.stderr.flush()
                run.cancel(CANCEL_REASON)
                waiting: Deferred[None] = Deferred()
                done.addBoth(lambda _: waiting.callback(None))
                return waiting

            r.addSystemEventTrigger("before", "shutdown", before_shutdown)
            r.callWhenRunning(lambda: ensureDeferred(main()).chainDeferred(done))
            return done

        _react(go, reactor)
    finally:
        _close(journal)
    if exit.code is None:
        streams.stderr.write("txvmbot suite: stopped before the suite finished\n")
        return 1
    return exit.code


def _durations(result: Any) -> dict[str, float]:
    """What a run teaches of each test's duration: tests that ended on their
    own (a timeout or a lost machine says nothing of how long a test takes)."""
    return {t.test_id: t.duration for t in result.tests if t.outcome in ("passed", "failed", "skipped")}
