"""The web status page end to end: the real daemon (``twistd -n txvmbot``)
with local QEMU jobs, its page on 127.0.0.1 (``web_insecure_loopback``) read
by Debian's headless Chromium through chromedriver (Selenium): the overview
shows a job appear and run without a reload, the job page shows its steps
appear without a reload, the failures page groups two failed jobs by a
fact. Screenshots go to the test's temporary directory. A TLS web listener
refuses a client without a certificate, and so does a plain TCP one."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support import real_daemon as D
from tests.support.pki import make_pki
from tests.support.qemu_runs import qemu_pids, vm_dirs
from tests.support.servers import free_port, wait_for_port
from txvmbot.qemu.image import ImageInfo

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def web_daemon(
    qemu_image: ImageInfo, short_dir: Callable[[], str]
) -> Iterator[tuple[D.Daemon, str, str, str]]:
    root = short_dir()
    run_dir = os.path.join(root, "run")
    data = os.path.join(root, "data")
    os.makedirs(data)
    port = free_port()
    config = os.path.join(root, "txvmbot.toml")
    with open(config, "w") as f:
        f.write(
            "[daemon]\nworkers = 1\n"
            f'web = ["tcp:{port}:interface=127.0.0.1"]\nweb_insecure_loopback = true\n\n'
            f"[pools.local]\nimage_dir = {json.dumps(qemu_image.dir)}\n"
            f"run_dir = {json.dumps(run_dir)}\nmax_vms = 1\n"
        )
    proc, d = D.start(data, ["--config", config])
    try:
        wait_for_port(port, proc)  # the page listens after the API
        yield d, f"http://127.0.0.1:{port}", run_dir, root
    finally:
        D.stop(proc)
        print(d.log()[-3000:])


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        raise RuntimeError("the web page test needs Debian's chromium and chromium-driver (bin/setup)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1000,900", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def submit(d: D.Daemon, *commands: str) -> str:
    args = ["submit", "--pool", "local", "--max-attempts", "1", "--json", "-"]
    for c in commands:
        args += ["--command", c]
    p = d.client(*args)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(json.loads(p.stdout)["id"])


def wait_final(d: D.Daemon, job_id: str) -> None:
    d.client("watch", job_id, timeout=120)


def until(driver: Any, what: str, test: Callable[[Any], Any], timeout: float = 90) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(test, what)


def text_of(driver: Any, css: str) -> str:
    """The text of what ``css`` selects, read in one script: the live parts
    replace their HTML at any moment, so element handles would go stale."""
    return str(
        driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(function (e) { return e.innerText; }).join('\\n');",
            css,
        )
    )


def test_the_page_follows_jobs_live_in_chromium(
    web_daemon: tuple[D.Daemon, str, str, str], browser: Any, tmp_path: Any
) -> None:
    d, url, run_dir, _ = web_daemon
    shots = str(tmp_path)  # kept by pytest for a look

    # The overview, loaded before the job exists, shows it running.
    browser.get(url + "/")
    browser.execute_script("window.txvmbotMarker = 42")
    until(browser, "the live badge", lambda b: "live" in text_of(b, "#live"))
    job = submit(d, "sleep 4", "uname -r")
    until(browser, f"job {job} running on the overview", lambda b: job in text_of(b, "main")
          and "running" in text_of(b, "main"))
    assert browser.execute_script("return window.txvmbotMarker") == 42  # no reload
    assert "local" in text_of(browser, "main")
    browser.save_screenshot(os.path.join(shots, "overview.png"))

    # The job page shows its steps as they come, without a reload.
    browser.get(f"{url}/jobs/{job}")
    browser.execute_script("window.txvmbotMarker = 43")
    first = text_of(browser, "#steps")
    assert "commands" not in first or "running" in first
    until(browser, "the commands step passed", lambda b: "commands" in text_of(b, "#steps")
          and "passed" in text_of(b, "main h1"), timeout=120)
    assert browser.execute_script("return window.txvmbotMarker") == 43
    steps = text_of(browser, "#steps")
    for name in ("disk-space", "image", "overlay", "boot", "ready", "wait-ssh", "commands"):
        assert name in steps, steps
    browser.save_screenshot(os.path.join(shots, "job.png"))
    wait_final(d, job)

    # Two failed jobs, grouped by the host kernel they ran on.
    failed = [submit(d, "exit 7") for _ in range(2)]
    for j in failed:
        wait_final(d, j)
    browser.get(url + "/failures?by=host_kernel&since=1d")
    groups = text_of(browser, "#groups")
    assert os.uname().release in groups, groups
    assert "2/3" in groups, groups  # two failed of three finished
    for j in failed:
        assert j in groups
    browser.save_screenshot(os.path.join(shots, "failures.png"))
    for name in ("overview.png", "job.png", "failures.png"):
        assert os.path.getsize(os.path.join(shots, name)) > 1000
    # /metrics, read back with prometheus_client's own parser.
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    finished = {
        s.labels["state"]: s.value
        for s in families["txvmbot_jobs_finished"].samples
        if s.name == "txvmbot_jobs_finished_total" and s.labels["backend"] == "local"
    }
    assert finished.get("passed") == 1 and finished.get("failed") == 2, finished
    steps = {s.labels["step"] for s in families["txvmbot_step_duration_seconds"].samples}
    assert {"boot", "ready", "commands"} <= steps, steps
    assert families["txvmbot_workers"].samples[0].value == 1

    # The failed jobs' VMs are kept as evidence (keep_on_failure), stopped.
    assert len(vm_dirs(run_dir)) == 2 and qemu_pids(run_dir) == []


def test_a_request_without_a_client_certificate_is_refused(tmp_path: Any) -> None:
    pki = make_pki(str(tmp_path))
    data = os.path.join(str(tmp_path), "data")
    os.makedirs(data)
    port = free_port()
    config = os.path.join(str(tmp_path), "txvmbot.toml")
    with open(config, "w") as f:
        f.write(
            f'[daemon]\nworkers = 1\nweb = ["ssl:{port}:interface=127.0.0.1"]\n'
            f'[daemon.tls]\nca = "{pki["ca"]}"\ncert = "{pki["server"]}"\nkey = "{pki["server.key"]}"\n'
        )
    proc, d = D.start(data, ["--config", config])
    try:
        wait_for_port(port, proc)
        # TLS without a client certificate: the handshake is refused.
        context = ssl.create_default_context(cafile=pki["ca"])
        context.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=context, timeout=10).read()
        # In the clear: no page either.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            s.settimeout(10)
            try:
                answer = s.recv(4096)
            except (ConnectionError, TimeoutError):
                answer = b""
        assert b"txvmbot" not in answer and b"200 OK" not in answer
        # With a client certificate signed by the daemon's CA: the page.
        context.load_cert_chain(pki["client"], pki["client.key"])
        page = urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=context, timeout=10)
        assert page.status == 200 and b"txvmbot" in page.read()
    finally:
        D.stop(proc)
