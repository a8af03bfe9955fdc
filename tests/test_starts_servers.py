"""tests/starts_servers.py tells the tests that start real servers from the
unit tests; conftest.py marks the first ``integration``."""

from __future__ import annotations

import ast

from tests import starts_servers
from tests.starts_servers import ServerUse


def starts(source: str) -> bool:
    return starts_servers._starts_process(ast.parse(source))


def test_an_argv_or_a_script_that_runs_the_cli_or_qemu_starts_a_process() -> None:
    assert starts('run([sys.executable, "-X", "importtime", "-m", "txvmbot", "--help"])')
    assert starts('spawnProcess(pp, sys.executable, ["-m", "txvmbot", "status"])')
    assert starts('Popen([os.path.join(ROOT, "bin", "txvmbot"), "--version"])')
    assert starts('Popen(["qemu-system-x86_64", "-nodefaults"])')
    assert starts('SCRIPT = """\nfrom txvmbot.cli import main\nmain(["check"])\n"""')
    assert not starts('run([sys.executable, "-c", "import txvmbot"])')
    assert not starts('run(["qemu-img", "create", "-f", "qcow2", base, "16M"])')


def test_helpers_are_followed_through_the_test_modules() -> None:
    import tests.test_ssh
    import tests.test_ssh_unit

    use = ServerUse()
    # SSHDTestCase starts sshd in setUp; FakeConnection is a double.
    assert use._object(tests.test_ssh.SSHDTestCase)
    assert not use._object(tests.test_ssh_unit.FakeConnection)
