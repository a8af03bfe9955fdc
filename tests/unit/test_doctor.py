"""Unit tests for ``txvmbot doctor``, run in process: it finds a missing,
stale or unwritable plugin cache and says how to fix it (seed 001), and a
damaged job store or journal in the daemon's data dir (issue 16)."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from tests.support import damage, paths
from txvmbot import doctor
from txvmbot.cli import run

ROOT = paths.ROOT


@pytest.fixture
def plugin_dir(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> str:
    d = os.path.join(str(tmp_path), "twisted", "plugins")
    os.makedirs(d)
    shutil.copy(os.path.join(ROOT, "twisted", "plugins", "txvmbot_plugin.py"), d)
    monkeypatch.setattr(doctor, "plugin_dirs", lambda: [d])
    return d


def test_missing_cache_is_reported_with_the_fix(plugin_dir: str) -> None:
    (finding,) = doctor.check_plugin_cache()
    assert not finding.ok and "no plugin cache" in finding.what and "--fix" in finding.fix


def test_stale_cache_names_the_newer_module(plugin_dir: str) -> None:
    cache = os.path.join(plugin_dir, "dropin.cache")
    with open(cache, "wb") as f:
        f.write(b"")
    os.utime(cache, (1_000_000, 1_000_000))
    (finding,) = doctor.check_plugin_cache()
    assert not finding.ok and "txvmbot_plugin.py" in finding.what


def test_fresh_cache_is_ok(plugin_dir: str) -> None:
    with open(os.path.join(plugin_dir, "dropin.cache"), "wb") as f:
        f.write(b"")
    (finding,) = doctor.check_plugin_cache()
    assert finding.ok


def test_unwritable_stale_cache_says_who_must_fix_it(plugin_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.os, "access", lambda path, mode: False)
    (finding,) = doctor.check_plugin_cache()
    assert not finding.ok and "not writable" in finding.what and "owner" in finding.fix


def test_no_plugin_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "plugin_dirs", lambda: [])
    (finding,) = doctor.check_plugin_cache()
    assert not finding.ok and "cannot find the txvmbot plugin" in finding.what


def test_doctor_command_exit_status_and_fix(plugin_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    regenerated = []

    def regenerate() -> None:
        regenerated.append(True)
        with open(os.path.join(plugin_dir, "dropin.cache"), "wb") as f:
            f.write(b"")

    monkeypatch.setattr(doctor, "regenerate", regenerate)
    out = io.StringIO()
    assert run(["doctor"], stdout=out, stderr=io.StringIO()) == 1
    assert "FAIL" in out.getvalue() and "fix:" in out.getvalue()
    out = io.StringIO()
    assert run(["doctor", "--fix"], stdout=out, stderr=io.StringIO()) == 0
    assert regenerated and "FAIL" not in out.getvalue()


def test_data_files_sound_missing_or_shared_are_ok(tmp_path: object) -> None:
    d = str(tmp_path)
    missing = list(doctor.check_data_files(d))
    assert [f.ok for f in missing] == [True, True]
    assert "no job store at" in missing[0].what and "no journal at" in missing[1].what
    damage.make_store(os.path.join(d, "jobs.sqlite"))
    damage.make_journal(os.path.join(d, "journal.sqlite"))
    sound = list(doctor.check_data_files(d))
    assert all(f.ok and "passes SQLite's quick_check" in f.what for f in sound), sound
    (shared,) = doctor.check_data_files(d, shared=True)
    assert shared.ok and "shared store" in shared.what


def test_damaged_journal_is_reported_with_the_command_that_moves_it(tmp_path: object) -> None:
    d = str(tmp_path)
    path = os.path.join(d, "journal.sqlite")
    damage.make_store(os.path.join(d, "jobs.sqlite"))
    damage.make_journal(path)
    damage.scribble(path)
    store, journal = doctor.check_data_files(d)
    assert store.ok
    assert not journal.ok and journal.what.startswith(f"journal {path} is damaged (SQLite: ")
    assert journal.fix.startswith(f"stop the daemon, then: mv {path} {path}.damaged-")
    assert "txvmbot reap" in journal.fix
