"""How a txvmbot worker process starts: our replacement for ampoule's BOOTSTRAP.

ampoule starts each child with ``python -c BOOTSTRAP``, and its default
bootstrap begins with ``twisted.application.reactors.installReactor(name)``.
That function looks the reactor up with ``twisted.plugin.getPlugins``, which
imports every ``twisted/plugins`` module on the path whose ``dropin.cache``
is missing or stale. One plugin that does ``from twisted.internet import
reactor`` at import time installs the default reactor as a side effect, and
``installReactor`` then dies with ``ReactorAlreadyInstalledError``: every
worker exits at once, and ampoule logs why only at info level (seed 001).
Whether it happens depends on a cache file, so it comes and goes between
machines and builds.

This bootstrap never asks the plugin system anything. It

0. asks the kernel to SIGKILL this worker when the daemon dies
   (PR_SET_PDEATHSIG; the daemon passes its pid in ``$TXVMBOT_WORKER_PARENT``),
   so that a worker whose reactor cannot run (blocked, stopped) does not
   outlive a SIGKILLed daemon, nor does the QEMU it started, which dies
   with the worker (``txvmbot.qemu.argv.parent_death_launcher``). A worker
   that runs ends anyway when the daemon's end of its pipe closes;
1. installs the platform's default reactor explicitly
   (``twisted.internet.default.install()``: epoll on Linux), before anything
   else can import ``twisted.internet.reactor``;
2. sends stdout to stderr (fd 1 is a pipe the daemon treats as noise; the
   worker talks only AMP, on fds 3 and 4) and starts logging to stderr as
   text, which the daemon keeps the tail of;
3. ignores SIGINT, so a Ctrl-C on the daemon's terminal does not kill jobs
   mid-step: the daemon stops its workers itself (and a worker exits when
   the daemon's end of the pipe closes);
4. runs the ampoule child (the class named last on the command line, as
   ampoule's ProcessStarter passes it) on fds 3 and 4, as ampoule's own
   bootstrap does.

Importing this module does nothing; :data:`BOOTSTRAP` is the code the pool
hands to ampoule's ProcessStarter.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["BOOTSTRAP", "main"]

#: The ``python -c`` program of a worker process.
BOOTSTRAP = "import sys\nfrom txvmbot.daemon.workers.bootstrap import main\nmain(sys.argv)\n"

#: The environment variable that sets the worker's log level (default info).
LOG_LEVEL_ENV = "TXVMBOT_WORKER_LOG_LEVEL"

#: The environment variable in which the pool passes its own pid: the worker
#: dies with that process.
PARENT_ENV = "TXVMBOT_WORKER_PARENT"

_PR_SET_PDEATHSIG = 1

# ampoule's child fds (ampoule.main.TO_CHILD/FROM_CHILD on POSIX). Not
# imported from ampoule: importing ampoule imports the reactor.
TO_CHILD = 3
FROM_CHILD = 4


def die_with_parent(parent: str | None) -> None:
    """Have the kernel SIGKILL this process when its parent, pid ``parent``,
    dies; exit at once if it is already dead (then the kernel would never
    tell). Nothing without ``parent`` (a worker started by hand) or off
    Linux. If prctl fails, says so on stderr and goes on: the worker then
    ends with its daemon only when its pipe closes."""
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        sys.stderr.write(
            "txvmbot worker: prctl(PR_SET_PDEATHSIG) failed: "
            f"{os.strerror(ctypes.get_errno())}; this worker ends with its daemon only "
            "when its pipe closes\n"
        )
        return
    if str(os.getppid()) != parent:
        sys.stderr.write(f"txvmbot worker: the daemon (pid {parent}) is gone; exiting\n")
        os._exit(1)


def install_reactor() -> None:
    """Install the default reactor for this platform, by module, without
    plugin discovery. Raises ReactorAlreadyInstalledError if something
    already installed one (which would be a bug worth dying loudly for)."""
    from twisted.internet import default

    default.install()


def start_logging() -> None:
    """Log text to stderr at ``$TXVMBOT_WORKER_LOG_LEVEL`` (default info).

    Lines carry no timestamp (the daemon, which relogs them with the
    worker's name, adds its own) and the HTTP client's per-connection
    chatter is left out below warn.
    """
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        eventAsText,
        globalLogBeginner,
    )

    name = os.environ.get(LOG_LEVEL_ENV, "info")
    try:
        level = LogLevel.levelWithName(name)
    except Exception:
        level = LogLevel.info
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    for quiet in ("twisted.web.client._HTTP11ClientFactory", "twisted.protocols.amp"):
        predicate.setLogLevelForNamespace(quiet, max(level, LogLevel.warn))
    observer = FilteringLogObserver(
        FileLogObserver(
            sys.stderr, lambda event: eventAsText(event, includeTimestamp=False) + "\n"
        ),
        [predicate],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _stdout_to_stderr() -> None:
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def main(argv: Sequence[str]) -> None:
    """Run a worker. ``argv[-1]`` is the fully qualified name of the AMP
    child class; arguments between ``argv[0]`` and the last two are passed
    to its constructor (ampoule's convention; ``argv[-2]``, ampoule's
    reactor name, is ignored: see the module docstring)."""
    die_with_parent(os.environ.get(PARENT_ENV))
    install_reactor()
    _stdout_to_stderr()
    start_logging()

    import signal

    from twisted.internet import reactor, stdio
    from twisted.python import reflect

    child_class = reflect.namedAny(argv[-1])
    child = child_class(*argv[1:-2])
    # POSIX StandardIO takes the fds; mypy sees the Windows signature.
    stdio.StandardIO(child, TO_CHILD, FROM_CHILD)  # type: ignore[call-arg]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()
