"""Where the checkout is, for tests that run its scripts or read its files."""

from __future__ import annotations

import os

#: The repository's top directory (setup.cfg, bin/, txvmbot/).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
