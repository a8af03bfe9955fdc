"""The old name of :mod:`tests.real_daemon`: a helper called ``daemon``
read like the package ``txvmbot.daemon``.

Only tests/test_suite_daemon_e2e.py and bench/soak.py still import this
name: others were editing them when the helper was renamed. Once they
import ``tests.real_daemon``, delete this module.
"""

from tests.real_daemon import *  # noqa: F403
