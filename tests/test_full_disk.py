"""A full disk: one line (no traceback), exit code 1, no half-written file; once there is space
again, the same command finishes the run as if nothing had happened.

Two ways to fill the disk: a real 200 kB tmpfs under the run directory (needs root and a machine
that allows the mount; skipped otherwise), and fault injection (always): fsync reports ENOSPC, as it
does when a delayed write finds the disk full."""

import errno
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from tests.helpers import assert_every_visible_file_complete, evolve_args, run_files


def assert_clean_disk_full_error(result, runs: Path) -> None:
    assert result.exit_code == 1, result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("selfevo: error: ") and "no space left on the device" in message
    assert "Traceback" not in result.output
    assert not list(runs.rglob("*.tmp"))
    assert_every_visible_file_complete(runs)


def test_full_disk_by_injection(finished_run, tiny_model, tmp_path, monkeypatch):
    root, inputs = finished_run
    real_fsync = os.fsync
    calls = {"n": 0}

    def full_from_the_40th_call(fd):
        calls["n"] += 1
        if calls["n"] >= 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_from_the_40th_call)
    args = evolve_args(tiny_model, inputs, tmp_path)
    assert_clean_disk_full_error(CliRunner().invoke(app, args), tmp_path / "runs")
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert run_files(tmp_path / "runs" / "t") == run_files(root / "runs" / "t")


@pytest.fixture()
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mount.stderr.decode().strip()}); "
            "test_full_disk_by_injection covers it"
        )
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_on_a_small_tmpfs(small_disk, finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    args = evolve_args(tiny_model, inputs, tmp_path, "t", "--runs_dir", str(small_disk / "runs"))
    assert_clean_disk_full_error(CliRunner().invoke(app, args), small_disk / "runs")
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert run_files(small_disk / "runs" / "t") == run_files(root / "runs" / "t")
