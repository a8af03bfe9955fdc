"""Unit tests for ``txvmbot image build --distro debian`` with no build: its
options and errors (bad package names, a missing mmdebstrap, not root), how
an mmdebstrap failure is reported (a fake mmdebstrap), the argv it runs,
and the guest modules it picks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_runs import cli_env
from txvmbot.qemu import _image_debian as D
from txvmbot.qemu import image as image_module
from txvmbot.qemu.image import (
    ImageError,
    build_debian_image,
)

# --- options and errors, no build --------------------------------------------------


@pytest.mark.parametrize("bad", ["Bad", "a", "foo;rm", "py thon", "-x", "ok=ver sion"])
def test_bad_package_name_fails_before_anything_runs(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ImageError, match=f"--package {bad!r} is not a Debian package name"):
        build_debian_image(
            str(tmp_path / "img"), cache_dir=str(tmp_path / "cache"), packages=["python3", bad]
        )
    assert os.listdir(tmp_path) == []


def test_good_package_names_and_release() -> None:
    assert D.check_packages(["python3-twisted", "g++", "libc6=2.36-9", "lib.x"]) == (
        "python3-twisted", "g++", "libc6=2.36-9", "lib.x")
    with pytest.raises(ImageError, match="not a Debian release name"):
        D.check_release("Bookworm/../x")


def test_missing_mmdebstrap_names_its_apt_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = D.find_tool
    monkeypatch.setattr(D, "find_tool", lambda t: None if t == "mmdebstrap" else real(t))
    with pytest.raises(ImageError) as e:
        D.check_debian_tools()
    assert str(e.value) == (
        "cannot build the Debian image: not installed: mmdebstrap; "
        "install them: apt-get install mmdebstrap"
    )
    code, _out, err = cli_env(
        "image", "build", "--distro", "debian", "--output", str(tmp_path / "img"),
        "--cache-dir", str(tmp_path / "cache"),
    )
    assert code == 1
    assert "apt-get install mmdebstrap" in err and not (tmp_path / "img").exists()


def test_not_root_is_refused_with_the_fix() -> None:
    with pytest.raises(ImageError, match="built as root .* sudo txvmbot image build --distro"):
        D._check_root(lambda: 1000)


def _fake_mmdebstrap(bin_dir: Path, *lines: str, code: int = 1) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "mmdebstrap"
    body = "".join(f"echo {json.dumps(line)}\n" for line in lines)
    script.write_text(f"#!/bin/sh\n{body}exit {code}\n")
    script.chmod(0o755)


def test_unknown_package_is_named_and_nothing_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """apt's "Unable to locate package" becomes an error naming the package
    and the release (mmdebstrap replaced by a script that says what apt
    says, so the test needs no network)."""
    _fake_mmdebstrap(
        tmp_path / "bin",
        "I: running apt-get update...",
        "I: downloading packages with apt...",
        "E: Unable to locate package nosuchpkg",
        "E: apt-get --yes install failed",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    code, _o, err = cli_env(
        "image", "build", "--distro", "debian", "--package", "nosuchpkg",
        "--output", str(out / "img"), "--cache-dir", str(tmp_path / "cache"),
    )
    assert code == 1, err
    assert (
        "Debian bookworm (deb.debian.org (bookworm, bookworm-updates, bookworm-security)) "
        "has no package nosuchpkg; check the --package names" in err
    ), err
    assert os.listdir(out) == []  # no image, no half-built .tmp dir


def test_other_mmdebstrap_failure_shows_its_errors() -> None:
    e = D.mmdebstrap_error(
        1, ["I: running apt-get update...", "E: Failed to fetch http://x/InRelease", "E: bad"],
        "trixie", "http://x",
    )
    assert str(e).startswith("build the Debian root file system: mmdebstrap exited 1: ")
    assert "E: Failed to fetch http://x/InRelease / E: bad; check access to http://x" in str(e)
    assert D._update_failed(["E: Failed to fetch http://x/InRelease"])
    assert D._update_failed(["E: apt-get update --error-on=any failed"])
    assert not D._update_failed(["I: running apt-get update...", "E: Unable to locate package x"])


def test_mmdebstrap_argv_syncs_the_cache_and_skips_update_with_cached_lists() -> None:
    argv = D.mmdebstrap_argv(
        "/r", "bookworm", None, ["a", "b"], "/c d/archives", "/c d/lists", "/c d/new"
    )
    assert argv[:5] == [
        "mmdebstrap", "--mode=root", "--format=directory", "--variant=apt", "--include=a,b"]
    assert "--setup-hook=sync-in '/c d/archives' /var/cache/apt/archives/" in argv
    assert "--setup-hook=sync-in '/c d/lists' /var/lib/apt/lists/" in argv
    assert "--skip=update" in argv
    assert "--customize-hook=sync-out /var/cache/apt/archives '/c d/archives'" in argv
    assert argv[-2:] == ["bookworm", "/r"]
    fetched = D.mmdebstrap_argv("/r", "trixie", "http://m/debian", ["a"], "/a", None, "/n")
    assert "--skip=update" not in fetched and fetched[-3:] == ["trixie", "/r", "http://m/debian"]


def test_guest_modules_are_the_ones_a_vm_can_use() -> None:
    wanted = D._wanted_module
    for rel in ("modules.order", "kernel/fs/ext4/ext4.ko", "kernel/drivers/net/veth.ko",
                "kernel/net/bridge/bridge.ko", "kernel/drivers/scsi/virtio_scsi.ko",
                "kernel/drivers/block/loop.ko"):
        assert wanted(rel), rel
    for rel in ("kernel/drivers/gpu/drm/i915/i915.ko", "kernel/sound/core/snd.ko",
                "kernel/drivers/net/ethernet/intel/e1000/e1000.ko",
                "kernel/drivers/net/wireless/ath/ath.ko", "kernel/drivers/scsi/sg.ko",
                "modules.dep"):
        assert not wanted(rel), rel


def test_cli_build_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake(output: str, **kw: Any) -> str:
        calls.append((output, kw))
        raise ImageError("stop here")

    monkeypatch.setattr(image_module, "build_debian_image", fake)
    state = str(tmp_path / "state")
    code, _o, err = cli_env(
        "image", "build", "--distro", "debian", "--state-dir", state, "--release", "trixie",
        "--package", "python3-twisted", "--package", "git", "--mirror", "http://m/debian",
    )
    assert code == 1 and "stop here" in err
    output, kw = calls.pop()
    assert output == os.path.join(state, "images", "debian-trixie")
    assert kw["release"] == "trixie" and kw["packages"] == ("python3-twisted", "git")
    assert kw["mirror"] == "http://m/debian" and kw["cache_dir"] == os.path.join(
        state, "cache", "debs")
    cli_env("image", "build", "--distro", "debian", "--state-dir", state, "--name", "mine")
    output, kw = calls.pop()
    assert output == os.path.join(state, "images", "mine")
    assert kw["release"] == "bookworm" and kw["packages"] == () and kw["mirror"] is None
    cli_env("image", "build", "--distro", "debian", "--output", str(tmp_path / "d"))
    assert calls.pop()[0] == str(tmp_path / "d")
    for argv, message in (
        (["--package", "git"], "--package: only with --distro debian"),
        (["--release", "trixie"], "--release: only with --distro debian"),
        (["--distro", "debian", "--name", "a", "--output", "b"], "give --name or --output"),
        (["--distro", "debian", "--name", "a b"], "--name: image name 'a b'"),
    ):
        code, _o, err = cli_env("image", "build", "--state-dir", state, *argv)
        assert code == 2 and message in err, (argv, err)
    assert calls == []
