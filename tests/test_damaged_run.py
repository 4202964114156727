"""A damaged run directory is detected, not trusted: the error names the file and what to delete;
doing that and running the same command again gives the run an uninterrupted one would have."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from tests.helpers import evolve_args, run_files


@pytest.fixture()
def copy_of_run(finished_run, tmp_path):
    root, inputs = finished_run
    for folder in ("runs", "logs"):
        shutil.copytree(root / folder, tmp_path / folder, symlinks=True)
    return tmp_path / "runs" / "t", inputs


def results(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run but the lock (a failed attempt may create it; it holds nothing)."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


def refused(tiny_model, inputs, run_dir: Path, *needles: str) -> str:
    before = results(run_dir)
    result = CliRunner().invoke(app, evolve_args(tiny_model, inputs, run_dir.parents[1]))
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    for needle in needles:
        assert needle in message, message
    assert results(run_dir) == before  # nothing changed by the refused attempt
    return message


def resumed(tiny_model, inputs, run_dir: Path, reference: Path, *extra: str) -> None:
    result = CliRunner().invoke(
        app, evolve_args(tiny_model, inputs, run_dir.parents[1], "t", *extra)
    )
    assert result.exit_code == 0, result.output
    assert run_files(run_dir) == run_files(reference)


@pytest.mark.parametrize("cut", ["mid-record", "at a record boundary"])
def test_truncated_jsonl(copy_of_run, finished_run, tiny_model, cut):
    run_dir, inputs = copy_of_run
    answers = run_dir / "gen_0" / "answers.jsonl"
    text = answers.read_text()
    answers.write_text(
        text[: len(text) // 2] if cut == "mid-record" else "".join(text.splitlines(True)[:-1])
    )
    refused(
        tiny_model,
        inputs,
        run_dir,
        str(answers),
        "changed or damaged",
        f"delete {answers} and run the same command",
    )
    answers.unlink()
    resumed(tiny_model, inputs, run_dir, finished_run[0] / "runs" / "t")


def test_edited_record(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    qa = run_dir / "gen_1" / "qa.jsonl"
    qa.write_text(qa.read_text().replace('"ifd": ', '"ifd": 1', 1))
    refused(tiny_model, inputs, run_dir, str(qa), f"delete {qa}")
    qa.unlink()
    resumed(tiny_model, inputs, run_dir, finished_run[0] / "runs" / "t")


def test_missing_adapter_file(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    weights = run_dir / "gen_0" / "adapter" / "adapter_model.safetensors"
    weights.unlink()
    refused(
        tiny_model,
        inputs,
        run_dir,
        f"{weights}: missing",
        f"delete {run_dir / 'gen_0' / 'adapter'} and run",
    )
    shutil.rmtree(weights.parent)
    resumed(tiny_model, inputs, run_dir, finished_run[0] / "runs" / "t")


def test_edited_config_snapshot(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    snapshot = run_dir / "config.json"
    data = json.loads(snapshot.read_text())
    data["config"]["replay"]["k"] = 5
    snapshot.write_text(json.dumps(data))
    refused(tiny_model, inputs, run_dir, f"{snapshot}: changed since the run began", "--force")
    resumed(
        tiny_model, inputs, run_dir, finished_run[0] / "runs" / "t", "--force"
    )  # sets the old run aside


def test_run_of_another_format_is_named_as_such(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    snapshot = run_dir / "config.json"
    data = json.loads(snapshot.read_text())
    data["format"] = 2  # as a later selfevo would write it
    snapshot.write_text(json.dumps(data))
    refused(
        tiny_model,
        inputs,
        run_dir,
        f"{snapshot}: made by another version of selfevo (run folder format 2",
        "--force",
    )


def test_run_begun_with_other_prompts_is_refused(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    snapshot = run_dir / "config.json"
    data = json.loads(snapshot.read_text())
    data["prompts"] = "0" * 64  # as if a later selfevo had changed its prompts
    snapshot.write_text(json.dumps(data))
    refused(
        tiny_model,
        inputs,
        run_dir,
        f"{run_dir} was begun with other question and answer prompts",
        "--force",
    )


def test_damaged_stage_record(copy_of_run, finished_run, tiny_model):
    run_dir, inputs = copy_of_run
    stages = run_dir / "gen_1" / "stages.json"
    stages.write_text(stages.read_text()[:40])
    refused(tiny_model, inputs, run_dir, f"{stages}: damaged; delete it")
    stages.unlink()  # every stage of gen_1 is redone, and gives the same files
    resumed(tiny_model, inputs, run_dir, finished_run[0] / "runs" / "t")


def test_generation_folder_that_is_a_symlink_out(copy_of_run, tiny_model, tmp_path):
    run_dir, inputs = copy_of_run
    outside = tmp_path / "outside"
    shutil.move(run_dir / "gen_1", outside)
    (run_dir / "gen_1").symlink_to(outside)
    refused(tiny_model, inputs, run_dir, f"{run_dir / 'gen_1'}: is a symbolic link")
