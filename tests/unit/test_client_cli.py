"""Unit tests for the daemon's client commands, run in process against an
in-process AMP server with a fake scheduler (tests/support/client_cli.py)
on a unix socket in a temp dir, on the real reactor; and their connection
settings and usage errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.client_cli import ClientCommandCase
from txvmbot.cli import build_parser, run, spec_from_args
from txvmbot.cli.client import connection_for
from txvmbot.daemon import codec
from txvmbot.errors import ConfigError

reactor: Any = _reactor
CLOUD = ["--endpoint", "http://127.0.0.1:1/", "--region", "r"]


class ClientCommandTests(ClientCommandCase):
    async def test_submit(self) -> None:
        argv = [*CLOUD, "--image", "ami-1", "--command", "uptime", "--timeout-running", "60"]
        code, out, err = await self.cli("submit", *argv, "--backend", "prod", "--priority", "7")
        self.assertEqual(code, 0, err)
        self.assertIn("submitted job job-1 (queued) on backend 'prod', priority 7", out)
        job = self.sched.jobs["job-1"]
        self.assertEqual((job.spec.backend, job.spec.priority), ("prod", 7))
        # The check is exactly what `txvmbot check` builds from the same flags.
        check = spec_from_args(build_parser().parse_args(["check", *argv]), {})
        self.assertEqual(job.spec.check.commands, check.commands)
        self.assertEqual(job.spec.check.timeouts, check.timeouts)
        self.assertEqual(job.spec.check.image, "ami-1")

    async def test_submit_carries_the_address_domain(self) -> None:
        argv = [*CLOUD, "--image", "ami-1", "--floating-ip", "--address-domain", "standard"]
        code, out, err = await self.cli("submit", *argv, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["spec"]["address_domain"], "standard")
        check = self.sched.jobs["job-1"].spec.check
        self.assertEqual((check.floating_ip, check.address_domain), (True, "standard"))
        with self.assertRaises(ConfigError) as e:
            codec.spec_from_dict(
                {"endpoint": "http://127.0.0.1:1/", "region": "r", "image": "a",
                 "address_domain": "classic"}
            )
        self.assertEqual(e.exception.where, "job.address_domain")

    async def test_submit_sends_no_credentials(self) -> None:
        config = os.path.join(self.dir, "clouds.toml")
        with open(config, "w") as f:
            f.write(
                '[clouds.prod]\nendpoint = "http://127.0.0.1:1/"\nregion = "r"\n'
                'access_key = "AKIA"\nsecret_key_env = "NOT_SET_HERE"\nimage = "ami-9"\n'
            )
        code, out, err = await self.cli("submit", "--config", config, "--json")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["spec"]["image"], "ami-9")
        self.assertNotIn("AKIA", out)
        self.assertIsNone(self.sched.jobs["job-1"].spec.check.cloud.credentials)

    async def test_submit_wait_passes(self) -> None:
        self.sched.drive = True
        code, out, err = await self.cli("submit", *CLOUD, "--image", "ami-1", "--wait")
        self.assertEqual(code, 0, err)
        self.assertIn("job job-1 on http://127.0.0.1:1/ r: queued", out)
        # Off a TTY, one line per change: the bare start is held back, the
        # repeated detail and the end's same detail are not printed again,
        # and the step still running when the job ended is named at the end.
        steps = [line.split("  ", 1)[1] for line in out.splitlines() if line[:1].isdigit()]
        self.assertEqual(len(steps), 3, out)
        self.assertEqual(steps[0], "keypair  running  kp-1")
        self.assertRegex(steps[1], r"^keypair  passed \(\d+\.\ds\)$")
        self.assertEqual(steps[2], "wait-running  running")
        self.assertIn("PASSED check job-1-0", out)
        self.assertIn("job job-1 PASSED", out)

    async def test_submit_wait_fails_with_json(self) -> None:
        self.sched.drive = True
        self.sched.outcome = "failed"
        code, out, err = await self.cli("submit", *CLOUD, "--image", "ami-1", "--wait", "--json")
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out)["state"], "failed")  # stdout is JSON alone
        self.assertIn("FAILED check job-1-0", err)
        self.assertIn("failing step: wait-running", err)

    async def test_watch_show_jobs(self) -> None:
        spec = codec.spec_from_dict(
            {"endpoint": "http://127.0.0.1:1/", "region": "r", "image": "a"}
        )
        self.sched.submit_now(spec)
        self.sched.submit_now(spec)
        self.sched.finish("job-1", passed=False)
        code, out, err = await self.cli("watch", "job-1")
        self.assertEqual((code, err), (1, ""))
        self.assertIn("FAILED check job-1-0", out)

        reactor.callLater(0.05, self.sched.finish, "job-2")
        code, out, _ = await self.cli("watch", "job-2")
        self.assertEqual(code, 0)
        self.assertIn("job job-2 PASSED", out)

        code, out, _ = await self.cli("show", "job-1")
        self.assertEqual(code, 0)
        self.assertIn("job job-1: failed", out)
        self.assertIn("target:    a on http://127.0.0.1:1/ (r)", out)
        self.assertIn("failing step: wait-running", out)
        code, out, _ = await self.cli("show", "job-1", "--json")
        self.assertEqual(json.loads(out)["id"], "job-1")

        code, out, _ = await self.cli("jobs")
        self.assertEqual(code, 0)
        lines = out.splitlines()
        self.assertTrue(lines[0].startswith("ID     STATE"), out)
        self.assertTrue(lines[1].startswith("job-2  passed"), out)
        self.assertTrue(lines[2].startswith("job-1  failed"), out)
        code, out, _ = await self.cli("jobs", "--state", "failed", "--json", "-")
        self.assertEqual([j["id"] for j in json.loads(out)], ["job-1"])
        path = os.path.join(self.dir, "jobs.json")
        code, out, _ = await self.cli("jobs", "--json", path)
        self.assertIn("job-2  passed", out)
        with open(path) as f:
            self.assertEqual(len(json.loads(f.read())), 2)
        code, out, _ = await self.cli("jobs", "--limit", "1")
        self.assertIn("more jobs match: the next page is --before job-2, or use --all", out)

    async def test_jobs_pages(self) -> None:
        """--before JOB is the next page; --all fetches every page. The
        jobs share one submitted time, so only the cursor orders them."""
        spec = codec.spec_from_dict({"endpoint": "http://127.0.0.1:1/", "region": "r", "image": "a"})
        for _ in range(7):
            self.sched.submit_now(spec)
        newest_first = [f"job-{n}" for n in range(7, 0, -1)]
        code, out, _ = await self.cli("jobs", "--limit", "3", "--json", "-")
        self.assertEqual([j["id"] for j in json.loads(out)], newest_first[:3])
        code, out, _ = await self.cli("jobs", "--limit", "3", "--before", "job-5", "--json", "-")
        self.assertEqual([j["id"] for j in json.loads(out)], newest_first[3:6])
        code, out, _ = await self.cli("jobs", "--limit", "3", "--all", "--json", "-")
        self.assertEqual((code, [j["id"] for j in json.loads(out)]), (0, newest_first))
        code, out, _ = await self.cli("jobs", "--limit", "3", "--all")
        self.assertEqual(len(out.splitlines()), 8, out)  # the header and seven jobs
        self.assertNotIn("more jobs match", out)
        code, _, err = await self.cli("jobs", "--before", "job-404")
        self.assertEqual(code, 1)
        self.assertIn("no job with id 'job-404'", err)
        code, _, err = await self.cli("jobs", "--before", "../etc")
        self.assertEqual(code, 2)
        self.assertIn("'before'", err)

    async def test_cancel_drain_resume_status(self) -> None:
        self.sched.submit_now(
            codec.spec_from_dict({"endpoint": "http://127.0.0.1:1/", "region": "r", "image": "a"})
        )
        code, out, _ = await self.cli("cancel", "job-1")
        self.assertEqual(code, 0)
        self.assertIn("job job-1 cancelled: cancelled by a client", out)
        code, out, _ = await self.cli("drain", "prod")
        self.assertEqual(
            (code, out), (0, "backend prod: draining (0 running with 0 instances, 0 queued, capacity 4 instances)\n")
        )
        code, out, _ = await self.cli("resume", "prod", "--json")
        self.assertEqual(json.loads(out)["state"], "active")
        code, out, _ = await self.cli("status")
        self.assertEqual(code, 0)
        self.assertIn("workers: 2 (0 busy)", out)
        self.assertIn("BACKEND", out)
        code, out, _ = await self.cli("status", "--json")
        self.assertEqual(json.loads(out)["workers"], 2)

    async def test_errors(self) -> None:
        code, _, err = await self.cli("show", "job-404")
        self.assertEqual(code, 1)
        self.assertIn("no job with id 'job-404'", err)
        code, _, err = await self.cli("show", "../etc")
        self.assertEqual(code, 2)
        self.assertIn("'job_id'", err)
        code, _, err = await self.cli("drain", "nowhere")
        self.assertEqual(code, 1)
        self.assertIn("no backend named 'nowhere'", err)
        code, _, err = await self.cli("jobs", "--limit", "0")
        self.assertEqual(code, 2)
        self.assertIn("--limit", err)

    async def test_unreachable(self) -> None:
        missing = os.path.join(self.dir, "nothing.sock")
        code, _, err = await self.cli("status", "--connect", f"unix:path={missing}", connect=False)
        self.assertEqual(code, 3)
        self.assertIn(f"unix:path={missing}", err)
        self.assertIn("is the daemon running?", err)

    async def test_default_socket_is_in_the_state_dir(self) -> None:
        code, out, err = await self.cli("status", "--state-dir", self.dir, connect=False)
        self.assertEqual(code, 0, err)


class ConnectionSettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvmbot-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def conn(self, *argv: str, environ: dict[str, str] | None = None) -> tuple[str, Any]:
        args = build_parser().parse_args(["status", *argv])
        return connection_for(args, environ if environ is not None else {"HOME": "/home/u"})

    def test_default_is_the_state_dir_socket(self) -> None:
        self.assertEqual(self.conn()[0], "unix:path=/home/u/.local/state/txvmbot/txvmbot.sock")
        self.assertEqual(
            self.conn(environ={"XDG_STATE_HOME": "/xdg", "HOME": "/h"})[0],
            "unix:path=/xdg/txvmbot/txvmbot.sock",
        )
        self.assertEqual(self.conn("--state-dir", "/d:x")[0], "unix:path=/d\\:x/txvmbot.sock")

    def test_config_connect_and_tls(self) -> None:
        config = os.path.join(self.dir, "c.toml")
        with open(config, "w") as f:
            f.write(
                'connect = "tcp:host=ci.example.com:port=8443"\n'
                '[tls]\nca = "ca.pem"\ncert = "me.pem"\nkey = "me.key"\n'
            )
        endpoint, tls = self.conn("--config", config)
        self.assertEqual(endpoint, "tcp:host=ci.example.com:port=8443")
        self.assertEqual(tls.ca, os.path.join(self.dir, "ca.pem"))
        self.assertIsNone(tls.server_name)
        # --connect wins over the config.
        self.assertEqual(
            self.conn("--config", config, "--connect", "unix:path=/s")[0], "unix:path=/s"
        )

    def test_tls_table_is_checked(self) -> None:
        config = os.path.join(self.dir, "c.toml")
        with open(config, "w") as f:
            f.write('[tls]\nca = "ca.pem"\ncert = "me.pem"\n')
        out, err = io.StringIO(), io.StringIO()
        code = run(
            ["status", "--config", config],
            stdout=out,
            stderr=err,
            environ={},
            _reactor=MemoryReactorClock(),
        )
        self.assertEqual(code, 2)
        self.assertIn("tls.key: required", err.getvalue())

    def test_submit_usage_errors_exit_2(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        code = run(
            ["submit", *CLOUD], stdout=out, stderr=err, environ={}, _reactor=MemoryReactorClock()
        )
        self.assertEqual(code, 2)
        self.assertIn("--image", err.getvalue())
        code = run(
            ["submit", *CLOUD, "--image", "a", "--priority", "5000"],
            stdout=out,
            stderr=err,
            environ={},
            _reactor=MemoryReactorClock(),
        )
        self.assertEqual(code, 2)
        self.assertIn("--priority", err.getvalue())

    def test_help_documents_exit_codes(self) -> None:
        for command in ("submit", "watch", "jobs", "status"):
            out = io.StringIO()
            run([command, "--help"], stdout=out, stderr=io.StringIO())
            self.assertIn("3 the daemon cannot be reached", out.getvalue())
        out = io.StringIO()
        run(["--help"], stdout=out, stderr=io.StringIO())
        self.assertIn("3 the daemon cannot be reached", out.getvalue())
