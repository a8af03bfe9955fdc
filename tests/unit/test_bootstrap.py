"""The worker bootstrap's tie to its daemon (PR_SET_PDEATHSIG), with real
processes: a parent that stands for the daemon and a child that runs
``die_with_parent`` as a worker's bootstrap does. Every process started here
is killed by its pid at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from twisted.trial.unittest import SynchronousTestCase

from txvmbot.daemon.workers.bootstrap import PARENT_ENV

#: The child: ties itself to the pid in $TXVMBOT_WORKER_PARENT (if set), says
#: so, then waits.
CHILD = (
    "import os, sys, time\n"
    "from txvmbot.daemon.workers.bootstrap import PARENT_ENV, die_with_parent\n"
    "die_with_parent(os.environ.get(PARENT_ENV))\n"
    "print('tied', flush=True)\n"
    "time.sleep(60)\n"
)

#: The parent: starts the child with its own pid in the environment when
#: asked (argv[1] == "tie"), prints the child's pid, waits.
PARENT = (
    "import os, subprocess, sys, time\n"
    "env = dict(os.environ)\n"
    f"env.pop({PARENT_ENV!r}, None)\n"
    f"if sys.argv[1] == 'tie': env[{PARENT_ENV!r}] = str(os.getpid())\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[2]], env=env)\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def gone_within(pid: int, bound: float) -> float | None:
    """Seconds until ``pid`` is gone, polled every 10 ms; None if it still
    runs after ``bound``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if not alive(pid):
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


@contextmanager
def family(tie: bool) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A parent and its child (tied to it or not), the child's ``tied`` line
    read; both killed by pid on exit."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "tie" if tie else "free", CHILD], stdout=subprocess.PIPE
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())  # bounded by the parent's 60 s
        assert parent.stdout.readline() == b"tied\n"
        yield parent, child
    finally:
        kill(parent.pid)
        parent.wait(10)
        if child:
            kill(child)  # SIGKILL ends a stopped process too


class DieWithParentTests(SynchronousTestCase):
    def test_a_stopped_worker_dies_with_its_killed_parent(self) -> None:
        """A worker that cannot run (SIGSTOP here; a blocked reactor alike)
        never reads the EOF of its pipe: the kernel kills it when its parent
        dies, within 5 s (a few ms here)."""
        with family(tie=True) as (parent, child):
            os.kill(child, signal.SIGSTOP)
            os.kill(parent.pid, signal.SIGKILL)
            took = gone_within(child, 5.0)
            self.assertIsNotNone(took, f"child {child} still runs 5 s after its parent died")

    def test_without_the_tie_a_stopped_worker_outlives_its_parent(self) -> None:
        """The control: the same child, not tied, is still there."""
        with family(tie=False) as (parent, child):
            os.kill(child, signal.SIGSTOP)
            os.kill(parent.pid, signal.SIGKILL)
            self.assertIsNone(gone_within(child, 1.0))

    def test_a_parent_gone_before_the_tie_ends_the_worker(self) -> None:
        """If the daemon died before the worker asked, the kernel would never
        tell: the worker exits at once, saying why."""
        # The child's parent is this process; pid 1 is not.
        p = subprocess.run(
            [sys.executable, "-c", CHILD],
            env={**os.environ, PARENT_ENV: "1"},
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stdout, b"")
        self.assertIn(b"the daemon (pid 1) is gone; exiting", p.stderr)

    def test_no_parent_no_tie(self) -> None:
        """A worker started without the variable (by hand, or by ampoule's
        own bootstrap) is not tied."""
        env = dict(os.environ)
        env.pop(PARENT_ENV, None)
        p = subprocess.run(
            [sys.executable, "-c", CHILD.replace("time.sleep(60)", "pass")],
            env=env,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual((p.returncode, p.stdout), (0, b"tied\n"), p.stderr)
