"""The old name of :mod:`txvmbot.daemon.codec`, which moved to the daemon
layer it serves.

Only tests/test_suite_spec.py and bench/soak.py still import this name:
others were editing them when the module moved. Once they import
``txvmbot.daemon.codec``, delete this module and its line in
tests/test_layers.py's ``LAYERS``.
"""

from txvmbot.daemon.codec import *  # noqa: F403
