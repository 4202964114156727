"""The small-scale reproduction's tools: run folders that travel slim between machines and resume
there (tools/gpu/reproduce_runs.py, the loop's --start)."""

import importlib.util
import json
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.rundir import write_json
from tests.helpers import ROOT, evolve_args, run_files

pytestmark = pytest.mark.ranks  # GPU-visit scripts run as subprocesses: left out of make test-fast


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rr = _load("reproduce_runs")


def run(args):
    return CliRunner().invoke(app, args)


def travel(run_dir: Path, dest: Path, tmp: Path, **kwargs) -> Path:
    """Pack run_dir as the GPU machine would, in small pieces over two 'calls', and collect it into
    dest."""
    out = tmp / "pack"
    rr.pack(
        run_dir.parent,
        out,
        [run_dir.name],
        kwargs.get("adapters", "latest"),
        0.02,
        "t",
        kwargs.get("end"),
    )
    pieces = sorted(out.glob("*.part*"))
    assert len(pieces) >= 2  # 20 KiB pieces
    call1, call2 = tmp / "call1", tmp / "call2"
    for folder, chosen in ((call1, pieces[:1]), (call2, pieces[1:])):
        folder.mkdir()
        shutil.copy(out / "runs-t.manifest.json", folder)
        for p in chosen:
            shutil.copy(p, folder)
    incoming = tmp / "incoming"
    assert rr.collect([call1], incoming, dest) == 0  # pieces missing: nothing unpacked yet
    assert not (dest / run_dir.name).exists()
    assert rr.collect([call2], incoming, dest) == 1
    assert not [
        p for p in incoming.iterdir() if not p.name.startswith(".")
    ]  # .unpacked remembers the pack
    return dest / run_dir.name


def test_slim_run_travels_and_resumes_with_start(finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    full = root / "runs" / "t"
    assert rr.next_start(full) == 2 and rr.resume_adapters(full) == {1}
    slim = travel(full, tmp_path / "back" / "runs", tmp_path)
    assert (
        not (slim / "gen_0" / "adapter").exists()
        and (slim / "gen_1" / "adapter" / "adapter_model.safetensors").exists()
    )
    assert not list(slim.rglob(".lock")) and not list(slim.rglob("checkpoints"))
    files = lambda d: {p.relative_to(d) for p in d.rglob("*") if p.is_file()}  # noqa: E731
    left = {f for f in files(full) - files(slim)}
    assert left == {f for f in files(full) if f.parts[0] == "gen_0" and f.parts[1] == "adapter"} | {
        Path(".lock")
    }
    assert (slim / "gen_1" / "qa.jsonl").read_bytes() == (full / "gen_1" / "qa.jsonl").read_bytes()

    # One more generation from the slim copy equals one from the full run (CPU: byte for byte).
    base = tmp_path / "back"
    resumed = run(evolve_args(tiny_model, inputs, base, "t", "--start", "2", "--end", "3"))
    assert resumed.exit_code == 0, resumed.output
    shutil.copytree(full, tmp_path / "full" / "runs" / "t", ignore=shutil.ignore_patterns(".lock"))
    reference = run(
        evolve_args(tiny_model, inputs, tmp_path / "full", "t", "--start", "2", "--end", "3")
    )
    assert reference.exit_code == 0, reference.output
    same = {
        k: v
        for k, v in run_files(tmp_path / "full" / "runs" / "t").items()
        if k.startswith("gen_2")
    }
    assert same and same == {k: v for k, v in run_files(slim).items() if k.startswith("gen_2")}

    # Generation 1 needs generation 0's adapter, which stayed behind: refused, with the way out.
    again = run(evolve_args(tiny_model, inputs, base, "t", "--start", "1", "--end", "3"))
    assert again.exit_code == 2 and "gen_0 is unfinished (train)" in again.output


def test_a_run_cut_off_after_training_travels_with_the_adapter_it_resumes_from(
    finished_run, tiny_model, tmp_path
):
    root, inputs = finished_run
    cut = tmp_path / "cut" / "runs" / "t"
    shutil.copytree(root / "runs" / "t", cut, ignore=shutil.ignore_patterns(".lock"))
    # Generation 1 trained, then the visit ended before its evaluation was recorded.
    stages = json.loads((cut / "gen_1" / "stages.json").read_text())
    for f in stages.pop("evaluate")["files"]:
        (cut / "gen_1" / f).unlink()
    write_json(cut / "gen_1" / "stages.json", stages)
    assert rr.next_start(cut) == 1 and rr.resume_adapters(cut) == {0, 1}
    slim = travel(cut, tmp_path / "back" / "runs", tmp_path)
    assert (slim / "gen_0" / "adapter").is_dir() and (slim / "gen_1" / "adapter").is_dir()
    resumed = run(
        evolve_args(tiny_model, inputs, tmp_path / "back", "t", "--start", "1", "--end", "2")
    )
    assert resumed.exit_code == 0, resumed.output
    assert (slim / "gen_1" / "metrics.json").is_file()


def test_damaged_piece_is_refused(finished_run, tmp_path):
    root, _ = finished_run
    out = tmp_path / "pack"
    rr.pack(root / "runs", out, ["t"], "none", 0.02, "t")
    piece = sorted(out.glob("*.part*"))[1]
    piece.write_bytes(b"x" + piece.read_bytes()[1:])
    with pytest.raises(SystemExit, match="damaged"):
        rr.collect([out], tmp_path / "incoming", tmp_path / "dest")


def test_resume_mode_leaves_the_adapters_of_finished_runs(finished_run, tmp_path):
    root, _ = finished_run
    slim = travel(root / "runs" / "t", tmp_path / "back", tmp_path, adapters="resume", end=2)
    assert not list(slim.rglob("adapter_model.safetensors"))  # 2 of 2 generations: finished


def test_forked_run_shares_generation_0_and_continues_as_its_own(
    finished_run, tiny_model, tmp_path
):
    root, inputs = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "t", runs / "t", ignore=shutil.ignore_patterns(".lock"))
    assert rr.fork(runs / "t", runs / "r") and not rr.fork(runs / "t", runs / "r")  # once only
    assert rr.next_start(runs / "r") == 1 and not (runs / "r" / "gen_1").exists()
    # packed together, the fork's copy of generation 0 travels as links to the original's bytes
    rr.pack(runs, tmp_path / "pack", ["t", "r"], "all", 0, "f")
    with tarfile.open(tmp_path / "pack" / "runs-f.tar.gz") as tar:
        links = [m.name for m in tar.getmembers() if m.islnk()]
    assert "r/gen_0/adapter/adapter_model.safetensors" in links and "r/gen_0/qa.jsonl" in links
    rr.collect([tmp_path / "pack"], tmp_path / "incoming", tmp_path / "back")
    for f in (
        "gen_0/qa.jsonl",
        "gen_0/adapter/adapter_model.safetensors",
        "base/metrics.json",
        "FORKED_FROM",
    ):
        assert (tmp_path / "back" / "r" / f).read_bytes() == (runs / "r" / f).read_bytes()
    result = run(
        evolve_args(tiny_model, inputs, tmp_path, "r", "--start", "1", "--replay.mode", "random")
    )
    assert result.exit_code == 0, result.output
    assert (
        json.loads((runs / "r" / "config.json").read_text())["config"]["replay"]["mode"] == "random"
    )
    assert (runs / "r" / "gen_0" / "qa.jsonl").read_bytes() == (
        runs / "t" / "gen_0" / "qa.jsonl"
    ).read_bytes()
    assert (runs / "r" / "gen_1" / "metrics.json").exists() and rr.next_start(runs / "r") == 2


def test_a_pack_is_unpacked_once_and_an_older_one_never_over_a_newer(
    finished_run, tmp_path, capsys
):
    root, _ = finished_run
    for tag in ("1125-0900", "1125-1000"):
        rr.pack(root / "runs", tmp_path / tag, ["t"], "none", 0, tag)
    incoming, dest = tmp_path / "incoming", tmp_path / "dest"
    assert rr.collect([tmp_path / "1125-1000"], incoming, dest) == 1
    assert (
        rr.collect([tmp_path / "1125-1000"], incoming, dest) == 0
    )  # the same files again (a fetch re-sends the manifest)
    assert not list(incoming.glob("runs-*"))
    assert rr.collect([tmp_path / "1125-0900"], incoming, dest) == 0
    assert (
        "runs-1125-0900.tar.gz: skipped, runs-1125-1000.tar.gz (newer) already brought these runs"
        in capsys.readouterr().out
    )


def test_learning_rate_probe_shares_generation_0_up_to_training(finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "t", runs / "t", ignore=shutil.ignore_patterns(".lock"))
    assert rr.fork(runs / "t", runs / "lr", before_train=True)
    assert sorted(rr.stages_of(runs / "lr" / "gen_0")) == ["answers", "questions", "replay"]
    result = run(
        evolve_args(
            tiny_model, inputs, tmp_path, "lr", "--end", "1", "--train.learning_rate", "5e-3"
        )
    )
    assert result.exit_code == 0, result.output
    assert (
        "questions:" not in result.output and "answers:" not in result.output
    )  # not written again
    for f in ("questions.jsonl", "answers.jsonl"):
        assert (runs / "lr" / "gen_0" / f).read_bytes() == (runs / "t" / "gen_0" / f).read_bytes()
    trained = "gen_0/adapter/adapter_model.safetensors"
    assert (runs / "lr" / trained).read_bytes() != (runs / "t" / trained).read_bytes()
    # The probe's rate chosen: a run forked from the probe's finished generation 0 goes on at that
    # rate (reproduce_visit.sh with LR set), with the probe's adapter as its generation 0.
    with pytest.raises(SystemExit) as before:
        rr.main(["stage-done", str(runs / "lr" / "gen_1"), "train"])
    assert before.value.code == 1
    with pytest.raises(SystemExit) as done:
        rr.main(["stage-done", str(runs / "lr" / "gen_0"), "answers", "train", "evaluate"])
    assert done.value.code == 0
    assert rr.fork(runs / "lr", runs / "adopted")
    result = run(
        evolve_args(
            tiny_model,
            inputs,
            tmp_path,
            "adopted",
            "--start",
            "1",
            "--end",
            "2",
            "--train.learning_rate",
            "5e-3",
        )
    )
    assert result.exit_code == 0, result.output
    assert (runs / "adopted" / trained).read_bytes() == (runs / "lr" / trained).read_bytes()
    assert (
        json.loads((runs / "adopted" / "config.json").read_text())["config"]["train"][
            "learning_rate"
        ]
        == 5e-3
    )
    assert rr.next_start(runs / "adopted") == 2


TINY_CONFIG = """\
name: qwen-hard
seed: 0
model: {{name: {model}, dtype: float32, max_length: 256}}
generation: {{backend: hf, batch_size: 2, question_max_new_tokens: 12, answer_max_new_tokens: 16}}
replay: {{mode: hard, k: 3}}
ifd: {{batch_size: 4}}
train: {{learning_rate: 1.0e-3, epochs: 1, micro_batch_size: 2, grad_accum: 1, checkpoint_every: 2}}
evaluation: {{batch_size: 2, max_new_tokens: 12}}
"""


def visit(step: list[str], root: Path, **env: str) -> str:
    """One step of tools/gpu/reproduce_visit.sh as a device call runs it, on the CPU with the tiny
    model, from a folder of its own (no .carry there: set-up has nothing to install)."""
    import os
    import subprocess

    result = subprocess.run(
        ["bash", "tools/gpu/reproduce_visit.sh", *step],
        cwd=root / "checkout",
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "OUT": str(root / "out"),
            "REPRO_DIR": str(root / "repro"),
            "STAGE_DIR": str(root / "stage"),
            "SELFEVO_CACHE": str(root / "cache"),
            "CONFIG": str(root / "tiny.yaml"),
            "MODEL": env.pop("MODEL"),
            "DATA_DIR": str(root / "data"),
            "END": "2",
            "RESERVE": "5",
            "MIN_RUN": "5",
            "STAGGER": "0",
            **env,
        },
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_visit_probes_the_rate_takes_the_best_and_a_later_rate_sets_the_old_runs_aside(
    tiny_model, tmp_path
):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("tools", "selfevo"):
        (checkout / name).symlink_to(ROOT / name)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG.format(model=tiny_model))
    (tmp_path / "data").mkdir()
    _toy(tmp_path / "data")
    runs = tmp_path / "repro" / "runs"

    out = visit(["first", "600", "5e-3"], tmp_path, MODEL=tiny_model, RUNS_AFTER="qwen-none")
    scores = {
        rate: json.loads((runs / run / "gen_0" / "metrics.json").read_text())["bleu-4"]
        for rate, run in (("0.001", "qwen-hard"), ("5e-3", "qwen-lr-5e-3"))
    }
    taken = max(scores, key=scores.get)
    assert f"learning rate taken: {taken}" in out, out
    assert rr.next_start(runs / "qwen-none") == 2, (
        out
    )  # forked after generation 0, then generation 1, in the same call
    for run in ("qwen-hard", "qwen-none"):
        assert json.loads((runs / run / "config.json").read_text())["config"]["train"][
            "learning_rate"
        ] == float(taken)
    assert (runs / "qwen-none" / "FORKED_FROM").read_text().startswith("qwen-hard:")
    assert list((tmp_path / "out").glob("runs-*.manifest.json")), "the call's pack"

    # A later call at another rate: the runs begun at the old one are set aside, and qwen-hard
    # starts again from the probe run's generation 0 (its adapter, not a new one).
    other = "5e-3" if taken == "0.001" else "0.001"
    if other == "0.001":  # a probe run at the config's rate, to have one to take
        visit(["probe", "600", "0.001"], tmp_path, MODEL=tiny_model)
    old_adapter = (
        runs / "qwen-hard" / "gen_0" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    out = visit(["run", "600", "qwen-hard"], tmp_path, MODEL=tiny_model, LR=other, END="1")
    aside = f"-lr{float(taken)}"  # the old rate as the run's config.json has it
    assert (
        runs / f"qwen-hard{aside}" / "gen_0" / "adapter" / "adapter_model.safetensors"
    ).read_bytes() == old_adapter, out
    old_none = json.loads((runs / f"qwen-none{aside}" / "config.json").read_text())
    assert old_none["config"]["train"]["learning_rate"] == float(taken)
    assert rr.next_start(runs / "qwen-none") == 1  # forked again, from the new qwen-hard
    new = runs / "qwen-hard"
    assert (new / "gen_0" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        runs / f"qwen-lr-{other}" / "gen_0" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert (
        rr.next_start(new) == 1 and "qwen-hard: finished" in out
    )  # generation 0 came with the probe's run

    # SAMPLED: one adapter evaluated greedily and with the seed's sampling beside the runs, packed
    # with them
    out = visit(
        ["run", "600", "qwen-hard"],
        tmp_path,
        MODEL=tiny_model,
        LR=other,
        END="1",
        SAMPLED="qwen-hard 0",
    )
    for way in ("greedy", "sample"):
        metrics = json.loads((new / "sampled" / "gen_0" / way / "metrics.json").read_text())
        assert {"bleu-4", "rouge-l"} <= set(metrics), out
    manifest = json.loads(max((tmp_path / "out").glob("runs-*.manifest.json")).read_text())
    assert "qwen-hard" in manifest["runs"], out


def _toy(folder: Path) -> None:
    """The toy domain under the names reproduce_visit.sh reads."""
    from tests.helpers import toy_domain_inputs

    fragments, eval_file = toy_domain_inputs(folder)
    fragments.rename(folder / "AIOps_data.json")
    eval_file.rename(folder / "AIOps_eval_data.json")
