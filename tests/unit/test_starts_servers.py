"""tests/support/starts_servers.py tells the tests that start real servers
from the unit tests; conftest.py refuses a test under tests/unit/ that
starts one."""

from __future__ import annotations

import ast

from tests.support import starts_servers
from tests.support.starts_servers import CLI_SCRIPT, ServerUse


def starts(source: str) -> bool:
    return starts_servers._starts_process(ast.parse(source))


def test_an_argv_or_a_script_that_runs_the_cli_or_qemu_starts_a_process() -> None:
    assert starts('run([sys.executable, "-X", "importtime", "-m", "txvmbot", "--help"])')
    assert starts('spawnProcess(pp, sys.executable, ["-m", "txvmbot", "status"])')
    assert starts('Popen([os.path.join(ROOT, "bin", "txvmbot"), "--version"])')
    assert starts('Popen(["qemu-system-x86_64", "-nodefaults"])')
    assert starts(f'SCRIPT = """\n{CLI_SCRIPT}\nmain(["check"])\n"""')
    assert not starts('run([sys.executable, "-c", "import txvmbot"])')
    assert not starts('run(["qemu-img", "create", "-f", "qcow2", base, "16M"])')


def test_helpers_are_followed_through_the_test_modules() -> None:
    import tests.support.ssh_doubles
    import tests.support.sshd_case

    use = ServerUse()
    # SSHDTestCase starts sshd in setUp; FakeConnection is a double.
    assert use._object(tests.support.sshd_case.SSHDTestCase)
    assert not use._object(tests.support.ssh_doubles.FakeConnection)
