"""``txvmbot check``: one euca-style smoke check (or several in a row),
without a daemon."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from txvmbot.cli._common import (
    _CONFIG_NOTE,
    CANCEL_REASON,
    _close,
    _Exit,
    _load_cloud_config,
    _log,
    _make_private_dir,
    _open_journal,
    _react,
    _Streams,
    _wrap,
    add_cloud_flags,
    add_files_flags,
    cloud_from_args,
    state_dir_for,
)
from txvmbot.config import (
    TIMEOUT_FIELDS,
    CheckSettings,
    CloudConfig,
    build_check_spec,
    check_address_domain,
    check_cidr,
    check_float,
    check_int,
    check_str,
    check_template,
    timeout_flag,
)
from txvmbot.errors import ConfigError
from txvmbot.model import DEFAULT_SSH_ENDPOINT, CheckSpec, Timeouts

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


def _default(name: str) -> Any:
    return attrs.fields_dict(CheckSpec)[name].default


def add_check_settings(p: argparse.ArgumentParser) -> None:
    """The flags that make a check's settings (image, instance, ssh,
    timeouts): shared by ``check`` and ``submit``."""
    t = Timeouts()
    img = p.add_argument_group("image and instance")
    which = img.add_mutually_exclusive_group()
    which.add_argument(
        "--image",
        metavar="ID",
        help="image id such as ami-0123 (or --image-name); with --local, the name of a "
        "local image (txvmbot image list) in the state dir",
    )
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
        "--address-domain",
        metavar="{vpc,standard}",
        help="where the floating IP is allocated: vpc (an allocation id), or standard "
        "for clouds that have only EC2-Classic addresses, such as Eucalyptus or "
        f"OpenStack's ec2-api (default: {_default('address_domain')})",
    )
    img.add_argument(
        "--user-data",
        metavar="FILE",
        help="user data for the machines, at most 16 KB: a cloud's RunInstances UserData "
        "(sent base64-encoded); on a local cloud image (txvmbot image import) merged "
        "with txvmbot's own cloud-init NoCloud data (default: none)",
    )
    img.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        help="fetch and keep the console log even when the check passes (default: on failure only)",
    )
    ssh = p.add_argument_group("ssh")
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
    local = p.add_argument_group("local VMs (QEMU)")
    local.add_argument(
        "--image-dir",
        metavar="DIR",
        help="the test image `txvmbot image build` made (default: <state dir>/image)",
    )
    local.add_argument(
        "--accel",
        choices=("auto", "kvm", "tcg"),
        help="QEMU acceleration; auto uses KVM only with kvm_intel or kvm_amd loaded "
        "(default: auto)",
    )
    local.add_argument("--memory", metavar="MB", type=int, help="guest memory (default: 256)")
    local.add_argument(
        "--fast-start",
        action="store_true",
        default=None,
        help="resume the VM from the pool's template (booted once, saved, kept in "
        "<state dir>/vms/template) instead of booting it; the first run builds it (default: cold boot)",
    )
    local.add_argument(
        "--keep-on-failure",
        action=argparse.BooleanOptionalAction,
        help="keep a failed VM's overlay, console log and saved state until "
        "`txvmbot release` (default: yes)",
    )
    local.add_argument(
        "--timeout-boot",
        metavar="S",
        type=float,
        help="QEMU start to the guest's ready marker (default: 60)",
    )
    local.add_argument(
        "--timeout-shutdown",
        metavar="S",
        type=float,
        help="ACPI powerdown to QEMU's exit, before quit and kill (default: 10)",
    )
    waits = p.add_argument_group("timeouts (seconds)")
    for name in TIMEOUT_FIELDS:
        waits.add_argument(
            timeout_flag(name),
            metavar="S",
            type=float,
            dest=f"timeout_{name}",
            help=f"{name.replace('_', ' ')} (default: {getattr(t, name):g})",
        )


def add_parser(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
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
    add_cloud_flags(check)
    add_files_flags(check)
    check.add_argument(
        "--local",
        action="store_true",
        help="run the smoke job on a fresh local QEMU VM instead of a cloud "
        "(boot, ready, ssh, commands, console, teardown) (default: a cloud)",
    )
    add_check_settings(check)
    runs = check.add_argument_group("runs")
    runs.add_argument(
        "--repeat",
        metavar="K",
        type=int,
        default=1,
        help="run K checks in a row, then show the pass rate and per-step p50/p95 (default: 1)",
    )
    check.set_defaults(func=_cmd_check)


# --- from arguments to values ----------------------------------------------


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
        address_domain=_opt(args.address_domain, check_address_domain, "--address-domain"),
        parallel=_opt(args.parallel, check_int, "--parallel"),
        console=args.console,
        ssh=args.ssh,
        timeouts=tuple(sorted(timeouts.items())),
    )
    spec = build_check_spec(cloud, chosen.check if chosen else CheckSettings(), flags)
    if spec.ssh_key is not None and spec.ssh_key.startswith("~"):
        spec = attrs.evolve(spec, ssh_key=os.path.expanduser(spec.ssh_key))
    if getattr(args, "user_data", None) is not None:
        spec = attrs.evolve(spec, user_data=user_data_from_args(args, local=False))
    return spec


def user_data_from_args(args: argparse.Namespace, *, local: bool) -> bytes | None:
    """The bytes of ``--user-data FILE`` (None without it). For a local VM
    it must be text: it is merged with txvmbot's own cloud-config."""
    from txvmbot.userdata import read_user_data, user_data_text

    path = getattr(args, "user_data", None)
    if path is None:
        return None
    path = os.path.expanduser(check_str("--user-data", path))
    data = read_user_data(path)
    if local:
        user_data_text(data, "--user-data", path)
    return data


_CLOUD_ONLY = (
    "endpoint",
    "region",
    "image_name",
    "image_owner",
    "instance_type",
    "parallel",
    "floating_ip",
    "address_domain",
    "ssh_key",
    "ssh_endpoint",
    "ssh_cidr",
    "ssh",
)
_CLOUD_ONLY_TIMEOUTS = ("api_step", "running", "terminate", "poll_interval", "poll_max_interval")


def local_image_dir(name: str, image_dir: str | None, state_dir: str) -> str:
    """The directory of ``--image NAME`` with ``--local``: the image of that
    name in the state dir (:func:`txvmbot.qemu.images.image_dir_for`). A
    ConfigError names --image if it is not a name, clashes with
    --image-dir or names no image there."""
    from txvmbot.qemu.image import ImageError
    from txvmbot.qemu.images import image_dir_for, image_names

    if image_dir:
        raise ConfigError("--image", "give --image NAME or --image-dir DIR, not both")
    name = check_str("--image", name)
    try:
        path = image_dir_for(name, state_dir)
    except ImageError as e:
        raise ConfigError("--image", str(e)) from None
    if not os.path.isdir(path):
        known = ", ".join(image_names(state_dir)) or "none"
        raise ConfigError(
            "--image",
            f"no local image {name!r} in {state_dir} (images there: {known}); build one "
            f"with txvmbot image build --distro debian --name {name}, or import one with "
            f"txvmbot image import FILE.qcow2 --name {name} --user USER",
        )
    return path


def local_spec_from_args(
    args: argparse.Namespace, environ: Mapping[str, str], state_dir: str
) -> Any:
    """The :class:`LocalSpec` of ``check --local``: a job on the state
    dir's local pool. Cloud-only flags are refused, naming the flag."""
    from txvmbot.qemu.image import default_image_dir
    from txvmbot.qemu.model import LocalPool, LocalSpec, LocalTimeouts

    for name in _CLOUD_ONLY:
        if getattr(args, name, None) not in (None, False):
            flag = "--" + name.replace("_", "-")
            raise ConfigError(flag, "not used with --local (it is a cloud setting)")
    for name in _CLOUD_ONLY_TIMEOUTS:
        if getattr(args, f"timeout_{name}", None) is not None:
            raise ConfigError(timeout_flag(name), "not used with --local")
    timeouts: dict[str, float] = {}
    for name, flag in (
        ("boot", "--timeout-boot"),
        ("shutdown", "--timeout-shutdown"),
        ("ssh", "--timeout-ssh"),
        ("ssh_connect", "--timeout-ssh-connect"),
        ("command", "--timeout-command"),
    ):
        value = getattr(args, f"timeout_{name}", None)
        if value is not None:
            timeouts[name] = check_float(flag, value)
    memory = 256 if args.memory is None else check_int("--memory", args.memory, minimum=64)
    if getattr(args, "image", None) is not None:
        image_dir = local_image_dir(args.image, args.image_dir, state_dir)
    elif args.image_dir:
        image_dir = os.path.abspath(os.path.expanduser(args.image_dir))
    else:
        image_dir = default_image_dir(environ)
    pool = LocalPool(
        name="local",
        image_dir=image_dir,
        run_dir=os.path.join(state_dir, "vms"),
        accel=args.accel or "auto",
        memory_mb=memory,
        fast_start=bool(args.fast_start),
        keep_on_failure=True if args.keep_on_failure is None else args.keep_on_failure,
    )
    commands: tuple[str, ...] = ("uname -a",)
    if args.commands is not None:
        commands = tuple(check_str("--command", c) for c in args.commands)
    return LocalSpec(
        pool=pool,
        commands=commands,
        ssh_user=args.ssh_user or "root",
        console=bool(args.console),
        timeouts=LocalTimeouts(**timeouts),
        user_data=user_data_from_args(args, local=True),
    )


def _local_flags_given(args: argparse.Namespace) -> str | None:
    for name in (
        "image_dir",
        "accel",
        "memory",
        "fast_start",
        "keep_on_failure",
        "timeout_boot",
        "timeout_shutdown",
    ):
        if getattr(args, name, None) is not None:
            return "--" + name.replace("_", "-")
    return None


class _CheckRun:
    """Runs the checks of one ``txvmbot check`` in a row and makes shutdown
    (SIGINT/SIGTERM) cancel the running one and wait for its cleanup."""

    def __init__(
        self,
        reactor: Any,
        spec: Any,
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

        from txvmbot.jobs.smoke import Check, LocalCheck
        from txvmbot.model import CheckResult, Facts
        from txvmbot.qemu.model import LocalSpec
        from txvmbot.report import (
            format_result,
            format_summary,
            renderer_for,
            summarize,
            to_json,
        )

        make = LocalCheck if isinstance(self._spec, LocalSpec) else Check
        human = self._streams.human
        results: list[CheckResult] = []
        try:
            for i in range(self._repeat):
                if self._stopping:
                    break
                renderer = renderer_for(human, self._reactor)
                check = make(
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


def _describe_spec(spec: Any) -> str:
    from txvmbot.qemu.model import LocalSpec

    if isinstance(spec, LocalSpec):
        p = spec.pool
        start = ", from its template" if p.fast_start else ""
        return f"local VM on {p.image_dir}, {p.memory_mb} MiB, accel {p.accel}{start}"
    image = spec.image or f"name {spec.image_name!r}"
    extra = f" x{spec.parallel}" if spec.parallel > 1 else ""
    return f"{spec.cloud.name} {spec.cloud.endpoint} ({spec.cloud.region}), {image}, {spec.instance_type}{extra}"


def target_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Any, str, str]:
    """What ``check`` and ``suite`` run on: a local VM's spec (``--local``)
    or a cloud check's, and the state dir and its evidence dir (made)."""
    chosen, config_state = _load_cloud_config(args)
    state_dir = state_dir_for(args.state_dir, config_state, environ)
    spec: Any
    if args.local:
        spec = local_spec_from_args(args, environ, state_dir)
    else:
        flag = _local_flags_given(args)
        if flag is not None:
            raise ConfigError(flag, "only used with --local")
        spec = spec_from_args(args, environ, chosen)
    evidence = os.path.join(state_dir, "evidence")
    _make_private_dir(state_dir, "--state-dir")
    _make_private_dir(evidence, "--state-dir")
    return spec, state_dir, evidence


def _cmd_check(
    args: argparse.Namespace,
    streams: _Streams,
    environ: Mapping[str, str],
    reactor: Any,
) -> int:
    if args.repeat < 1:
        raise ConfigError("--repeat", f"must be at least 1, got {args.repeat}")
    spec, state_dir, evidence = target_from_args(args, environ)

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
