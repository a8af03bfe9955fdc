"""What the daemon does to a backend on its own behalf: clean up after a job
whose worker died (from the journal, and by tag), and check a quarantined
backend's health before it gets jobs again."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from txvmbot.daemon.interfaces import IJobStore
from txvmbot.interfaces import IJournal
from txvmbot.jobs import Job, check_id_for
from txvmbot.model import Cloud
from txvmbot.qemu.model import LocalSpec

log = Logger()

#: How long the daemon's own cleanup of one resource may take.
CLEANUP_BOUND = 300.0
#: How long a health check may take.
HEALTH_BOUND = 60.0


def make_cleaner(reactor: Any, journal: IJournal) -> Callable[[Job], Deferred[tuple[str, ...]]]:
    """Clean up what the current attempt of a job left, in the daemon
    process: from the journal (reverse order), and by the check's tag."""

    def clean(job: Job) -> Deferred[tuple[str, ...]]:
        async def go() -> tuple[str, ...]:
            from txvmbot.ec2 import make_client
            from txvmbot.ec2.resources import Undoer
            from txvmbot.engine import Cleanup, StepRunner

            check_id = check_id_for(job)
            spec = job.spec.check
            steps = StepRunner(reactor)
            if isinstance(spec, LocalSpec):
                from txvmbot.qemu.scenario import LocalUndoer

                local = LocalUndoer(spec.timeouts.shutdown)
                errors = await Cleanup(journal, local, steps, CLEANUP_BOUND).run(check_id)
            else:
                client = make_client(reactor, spec.cloud)
                try:
                    t = spec.timeouts
                    undo = Undoer(client, reactor, t.poll_interval, t.poll_max_interval)
                    errors = await Cleanup(journal, undo, steps, CLEANUP_BOUND).run(check_id)
                finally:
                    await client.close()
            if errors:
                log.error(
                    "Cleanup after job {job_id} (check {check_id}) left errors: {errors}",
                    job_id=job.id,
                    check_id=check_id,
                    errors="; ".join(errors),
                )
            else:
                log.info("Cleaned up after job {job_id} (check {check_id})", job_id=job.id,
                         check_id=check_id)
            return errors

        return ensureDeferred(go())

    return clean


def make_health_check(reactor: Any, store: IJobStore) -> Callable[[str], Deferred[bool]]:
    """A backend is healthy when its cloud answers a cheap API call. The
    cloud is taken from the backend's newest job."""

    def check(backend: str) -> Deferred[bool]:
        async def go() -> bool:
            from txvmbot.ec2 import make_client

            jobs = store.list(backend=backend, limit=1)
            if not jobs or isinstance(jobs[0].spec.check, LocalSpec):
                return True
            cloud: Cloud = jobs[0].spec.check.cloud
            client = make_client(reactor, cloud)
            try:
                d = client.call("DescribeAvailabilityZones", {})
                d.addTimeout(HEALTH_BOUND, reactor)
                await d
            except Exception as e:
                log.warn("Health check of {backend} failed: {error}", backend=backend, error=e)
                return False
            finally:
                await client.close()
            return True

        return ensureDeferred(go())

    return check
