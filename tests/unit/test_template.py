"""Unit tests for fast start with no VM: whether a pool's template record
still fits (config, files, missing parts) and the fast-start flag.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from txvmbot.qemu import template as T


class TemplateRecordTests(SynchronousTestCase):
    """Which templates are reused, without QEMU."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txvt-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        for name in (T.STATE, T.OVERLAY):
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(b"x" * 10)
        self.wanted = {"format": T.FORMAT, "image_key": "k1", "memory_mb": 256, "cpus": 1}
        record = {
            **self.wanted,
            "files": {
                n: T._file_record(os.path.join(self.dir, n)) for n in (T.STATE, T.OVERLAY)
            },
        }
        with open(os.path.join(self.dir, T.RECORD), "w") as f:
            json.dump(record, f)

    def test_fits(self) -> None:
        record, why = T._valid(self.dir, self.wanted)
        self.assertIsNotNone(record)
        self.assertEqual(why, "")

    def test_config_changed(self) -> None:
        record, why = T._valid(self.dir, {**self.wanted, "memory_mb": 512})
        self.assertIsNone(record)
        self.assertIn("memory_mb changed (256 -> 512)", why)

    def test_file_touched(self) -> None:
        time.sleep(0.01)
        with open(os.path.join(self.dir, T.OVERLAY), "ab") as f:
            f.write(b"y")
        record, why = T._valid(self.dir, self.wanted)
        self.assertIsNone(record)
        self.assertIn("overlay.qcow2 changed", why)

    def test_missing(self) -> None:
        os.unlink(os.path.join(self.dir, T.STATE))
        self.assertEqual(T._valid(self.dir, self.wanted), (None, "state.bin is missing"))
        os.unlink(os.path.join(self.dir, T.RECORD))
        self.assertEqual(T._valid(self.dir, self.wanted), (None, "no template yet"))


class FastStartFlagTests(SynchronousTestCase):
    def spec(self, *flags: str) -> Any:
        from txvmbot.cli import build_parser
        from txvmbot.cli.check import local_spec_from_args

        args: argparse.Namespace = build_parser().parse_args(["check", "--local", *flags])
        data_dir = tempfile.mkdtemp(prefix="txvmbot-test-")
        self.addCleanup(shutil.rmtree, data_dir)
        return local_spec_from_args(args, {}, data_dir)

    def test_fast_start_flag(self) -> None:
        self.assertTrue(self.spec("--fast-start").pool.fast_start)
        self.assertFalse(self.spec().pool.fast_start)
