"""The small-scale reproduction's tools: run folders that travel slim between machines and resume
there (benchmarks/reproduce_runs.py, the loop's --start), and the results document
(benchmarks/results_doc.py) on run folders written by selfevo's own writers."""

import importlib.util
import json
import random
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import EvolveConfig, identity
from selfevo.data import write_json, write_jsonl
from selfevo.loop import config_digest
from tests.conftest import ROOT, evolve_args, run_files


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rr = _load("reproduce_runs")
results_doc = _load("results_doc")


def run(args):
    return CliRunner().invoke(app, args)


def travel(run_dir: Path, dest: Path, tmp: Path, **kwargs) -> Path:
    """Pack run_dir as the GPU machine would, in small pieces over two 'calls', and collect it into dest."""
    out = tmp / "pack"
    rr.pack(run_dir.parent, out, [run_dir.name], kwargs.get("adapters", "latest"), 0.02, "t", kwargs.get("end"))
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
    assert not [p for p in incoming.iterdir() if not p.name.startswith(".")]  # .unpacked remembers the pack
    return dest / run_dir.name


def test_slim_run_travels_and_resumes_with_start(finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    full = root / "runs" / "t"
    assert rr.next_start(full) == 2 and rr.resume_adapters(full) == {1}
    slim = travel(full, tmp_path / "back" / "runs", tmp_path)
    assert not (slim / "gen_0" / "adapter").exists() and (slim / "gen_1" / "adapter" / "adapter_model.safetensors").exists()
    assert not list(slim.rglob(".lock")) and not list(slim.rglob("checkpoints"))
    files = lambda d: {p.relative_to(d) for p in d.rglob("*") if p.is_file()}  # noqa: E731
    left = {f for f in files(full) - files(slim)}
    assert left == {f for f in files(full) if f.parts[0] == "gen_0" and f.parts[1] == "adapter"} | {Path(".lock")}
    assert (slim / "gen_1" / "qa.jsonl").read_bytes() == (full / "gen_1" / "qa.jsonl").read_bytes()

    # One more generation from the slim copy equals one from the full run (CPU: byte for byte).
    base = tmp_path / "back"
    resumed = run(evolve_args(tiny_model, inputs, base, "t", "--start", "2", "--end", "3"))
    assert resumed.exit_code == 0, resumed.output
    shutil.copytree(full, tmp_path / "full" / "runs" / "t", ignore=shutil.ignore_patterns(".lock"))
    reference = run(evolve_args(tiny_model, inputs, tmp_path / "full", "t", "--start", "2", "--end", "3"))
    assert reference.exit_code == 0, reference.output
    same = {k: v for k, v in run_files(tmp_path / "full" / "runs" / "t").items() if k.startswith("gen_2")}
    assert same and same == {k: v for k, v in run_files(slim).items() if k.startswith("gen_2")}

    # Generation 1 needs generation 0's adapter, which stayed behind: refused, with the way out.
    again = run(evolve_args(tiny_model, inputs, base, "t", "--start", "1", "--end", "3"))
    assert again.exit_code == 2 and "gen_0 is unfinished (train)" in again.output


def test_a_run_cut_off_after_training_travels_with_the_adapter_it_resumes_from(finished_run, tiny_model, tmp_path):
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
    resumed = run(evolve_args(tiny_model, inputs, tmp_path / "back", "t", "--start", "1", "--end", "2"))
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


def test_forked_run_shares_generation_0_and_continues_as_its_own(finished_run, tiny_model, tmp_path):
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
    for f in ("gen_0/qa.jsonl", "gen_0/adapter/adapter_model.safetensors", "base/metrics.json", "FORKED_FROM"):
        assert (tmp_path / "back" / "r" / f).read_bytes() == (runs / "r" / f).read_bytes()
    result = run(evolve_args(tiny_model, inputs, tmp_path, "r", "--start", "1", "--replay.mode", "random"))
    assert result.exit_code == 0, result.output
    assert json.loads((runs / "r" / "config.json").read_text())["config"]["replay"]["mode"] == "random"
    assert (runs / "r" / "gen_0" / "qa.jsonl").read_bytes() == (runs / "t" / "gen_0" / "qa.jsonl").read_bytes()
    assert (runs / "r" / "gen_1" / "metrics.json").exists() and rr.next_start(runs / "r") == 2


# --- results_doc on synthetic run folders, written by selfevo's writers ---------------------------


def fake_run(runs: Path, name: str, mode: str, k: int, bleu: list[float], forked: bool = False) -> Path:
    cfg = EvolveConfig(name=name)
    cfg.replay.mode, cfg.replay.k = mode, k
    d = runs / name
    write_json(d / "config.json", {"config": identity(cfg), "sha256": config_digest(identity(cfg)), "seed": 0})
    for i, b in enumerate(bleu):
        folder = d / ("base" if i == 0 else f"gen_{i - 1}")
        metrics = {"bleu-4": b, "rouge-1": b + 10, "rouge-2": b / 2, "rouge-l": b + 5}
        write_json(folder / "metrics.json", metrics)
        write_jsonl(folder / "predictions.jsonl",
                    [{"question": "q?", "prediction": "p" * (40 - 10 * i), "reference": "r" * 30, "bleu-4": b}])
        if i:
            write_jsonl(folder / "qa.jsonl", [{"question": "q?", "answer": "a" * (20 - 5 * i), "ifd": 0.5 / i}]
                        + [{"question": "what is a?", "answer": "a", "ifd": 0.1}] * 2)
        stages = {"evaluate": {"seconds": 9.5, "pairs": 100, "files": {}}}
        if i:
            stages.update({s: {"seconds": 10.0 * (j + 1), "files": {}} for j, s in enumerate(("questions", "answers", "train", "score"))})
            stages["answers"].update(kept=990, dropped=10 * i)
            if i == 2:  # the clean-up's reasons, as selfevo writes them now
                stages["answers"].update(looping=5, restating=3, repeated=12, commonest_given=6)
            stages["replay"] = {"seconds": 0.1, "history": 990 * (i - 1), "chosen": min(k, 990 * (i - 1)), "files": {}}
        write_json(folder / "stages.json", stages)
    if forked:
        (d / "FORKED_FROM").write_text("qwen-hard: base/ and gen_0/ copied from it\n")
    return d


def test_results_doc_tables_and_charts(tmp_path):
    runs = tmp_path / "runs"
    dirs = [
        fake_run(runs, "qwen-none", "hard", 0, [7.0, 9.0, 8.5], forked=True),
        fake_run(runs, "qwen-hard", "hard", 500, [7.0, 9.0, 12.0, 11.0]),
        fake_run(runs, "qwen-all", "all", 500, [7.0, 9.0, 10.0], forked=True),
    ]
    write_json(dirs[1] / "sampled" / "gen_1" / "greedy" / "metrics.json", {"bleu-4": 12.1, "rouge-1": 1, "rouge-2": 2, "rouge-l": 3})
    write_json(dirs[1] / "sampled" / "gen_1" / "sample" / "metrics.json", {"bleu-4": 10.4, "rouge-1": 1, "rouge-2": 2, "rouge-l": 3})
    docs = tmp_path / "docs"
    results_doc.main([*map(str, dirs), "--out", str(docs), "--prefix", "r", "--fragment", str(docs / "tables.md")])
    md = (docs / "tables.md").read_text()
    assert (docs / "r_bleu_by_mode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (docs / "r_generations.png").stat().st_size > 10_000
    assert "![BLEU-4, best generation per mode](r_bleu_by_mode.png)" in md
    # modes come from config.json, ordered hard, none, ..., all; the best generation and its gain
    assert "| model | hard (k=500) | no replay | all |" in md
    assert "| gen_1 | 12.00 | 8.50 | 10.00 |" in md and "| gen_2 | 11.00 |  |  |" in md
    assert "**12.00** (gen_1, +71% over base)" in md
    assert "| gen_0 (shared) | 9.00 | 19.00 | 4.50 | 14.00 | 990 | 0 | 110 |" in md
    assert "| qwen-hard | gen_2 | 10 | 20 | 0 | 30 | 40 | 10 | 110 |" in md
    assert "| qwen-none | gen_0 |" not in md  # a forked run's gen_0 is timed once, in the run it came from
    assert "| qwen-hard | gen_1 | sampled (T 0.95, top-p 0.7, top-k 50) | 10.40 |" in md
    # the answers' lengths: eval answers beside the references', and what each generation trained on,
    # with the clean-up's drops and how often the commonest answer was given
    assert ("| run | model | eval answers (references: 30) | answers written and trained on | answers dropped "
            "(looping / restating / repeated) | commonest answer, times given | median IFD | answers echoing their "
            "question (eval / written) |") in md
    assert "| qwen-hard | base | 40 |  |  |  |  | 0 of 1 |" in md
    assert "| qwen-hard | gen_0 | 30 | 1 | 10 | 2 | 0.100 | 0 of 1 / 2 of 3 |" in md  # counted in what was kept (older stages.json)
    assert "| qwen-hard | gen_1 | 20 | 1 | 20 (5 / 3 / 12) | 6 | 0.100 | 0 of 1 / 2 of 3 |" in md
    assert "| qwen-none | gen_0 | 30 |" not in md  # shared with the run it was forked from
    # best and last generation against the base model and gen_0 (one eval pair here: no spread)
    assert "| qwen-hard | gen_1 | +5.00 [+5.00, +5.00] | +3.00 [+3.00, +3.00] |" in md
    assert "| qwen-hard | gen_2 | +4.00 [+4.00, +4.00] | +2.00 [+2.00, +2.00] |" in md
    assert "| qwen-none | gen_1 | +1.50 [+1.50, +1.50] | -0.50 [-0.50, -0.50] |" in md
    # and the runs against each other at their last generation
    assert "| qwen-hard gen_2 | qwen-none gen_1 | +2.50 [+2.50, +2.50] |" in md
    assert "| qwen-none gen_1 | qwen-all gen_1 | -1.50 [-1.50, -1.50] |" in md


def test_an_answer_that_echoes_its_question_is_told_from_one_that_answers_it():
    assert results_doc.echoes_question("如何填写申请单？", "填写申请单。")
    assert results_doc.echoes_question("如何在权限分配中为选定的资源分配操作集？", "在权限分配中为选定的资源分配操作集。")
    assert not results_doc.echoes_question("如何填写申请单？", "在系统中选择合同号，再选择产品线和版本，填写申请原因后提交。")
    assert results_doc.echoes_question("What is a?", "a") and not results_doc.echoes_question("What is a?", "b")
    assert not results_doc.echoes_question("如何填写申请单？", "") and not results_doc.echoes_question("如何填写申请单？", "。")


def test_paired_interval_is_the_mean_gap_with_a_bootstrap_interval_that_widens_with_spread():
    same = [3.0, 5.0, 9.0, 1.0]
    assert results_doc.paired_interval(same, same) == (0.0, 0.0, 0.0)
    assert results_doc.paired_interval([x + 2 for x in same], same) == (2.0, 2.0, 2.0)
    rng = random.Random(1)
    base = [rng.uniform(0, 50) for _ in range(100)]
    # a mean gain of exactly 1, its pairs spread by +-0.5 or by +-20
    tight = results_doc.paired_interval([x + 1 + (0.5 if i % 2 else -0.5) for i, x in enumerate(base)], base)
    loose = results_doc.paired_interval([x + 1 + (20 if i % 2 else -20) for i, x in enumerate(base)], base)
    assert tight[0] == pytest.approx(1) == loose[0]
    assert 0 < tight[1] < 1 < tight[2] < 2  # a steady gain is told apart from none
    assert loose[1] < 0 < 1 < loose[2]  # the same gain, 40 times as spread, is not
    assert results_doc.paired_interval(base, base[::-1]) == results_doc.paired_interval(base, base[::-1])  # seeded
    with pytest.raises(ValueError, match="same, non-zero number"):
        results_doc.paired_interval([1.0], [1.0, 2.0])


def test_a_pack_is_unpacked_once_and_an_older_one_never_over_a_newer(finished_run, tmp_path, capsys):
    root, _ = finished_run
    for tag in ("1125-0900", "1125-1000"):
        rr.pack(root / "runs", tmp_path / tag, ["t"], "none", 0, tag)
    incoming, dest = tmp_path / "incoming", tmp_path / "dest"
    assert rr.collect([tmp_path / "1125-1000"], incoming, dest) == 1
    assert rr.collect([tmp_path / "1125-1000"], incoming, dest) == 0  # the same files again (a fetch re-sends the manifest)
    assert not list(incoming.glob("runs-*"))
    assert rr.collect([tmp_path / "1125-0900"], incoming, dest) == 0
    assert "runs-1125-0900.tar.gz: skipped, runs-1125-1000.tar.gz (newer) already brought these runs" in capsys.readouterr().out


def test_learning_rate_probe_shares_generation_0_up_to_training(finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs" / "t", runs / "t", ignore=shutil.ignore_patterns(".lock"))
    assert rr.fork(runs / "t", runs / "lr", before_train=True)
    assert sorted(rr.stages_of(runs / "lr" / "gen_0")) == ["answers", "questions", "replay"]
    result = run(evolve_args(tiny_model, inputs, tmp_path, "lr", "--end", "1", "--train.learning_rate", "5e-3"))
    assert result.exit_code == 0, result.output
    assert "questions:" not in result.output and "answers:" not in result.output  # not written again
    for f in ("questions.jsonl", "answers.jsonl"):
        assert (runs / "lr" / "gen_0" / f).read_bytes() == (runs / "t" / "gen_0" / f).read_bytes()
    trained = "gen_0/adapter/adapter_model.safetensors"
    assert (runs / "lr" / trained).read_bytes() != (runs / "t" / trained).read_bytes()
    # The probe's rate chosen: a run forked from the probe's finished generation 0 goes on at that rate
    # (reproduce_visit.sh with LR set), with the probe's adapter as its generation 0.
    with pytest.raises(SystemExit) as before:
        rr.main(["stage-done", str(runs / "lr" / "gen_1"), "train"])
    assert before.value.code == 1
    with pytest.raises(SystemExit) as done:
        rr.main(["stage-done", str(runs / "lr" / "gen_0"), "answers", "train", "evaluate"])
    assert done.value.code == 0
    assert rr.fork(runs / "lr", runs / "adopted")
    result = run(evolve_args(tiny_model, inputs, tmp_path, "adopted", "--start", "1", "--end", "2", "--train.learning_rate", "5e-3"))
    assert result.exit_code == 0, result.output
    assert (runs / "adopted" / trained).read_bytes() == (runs / "lr" / trained).read_bytes()
    assert json.loads((runs / "adopted" / "config.json").read_text())["config"]["train"]["learning_rate"] == 5e-3
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
    """One step of benchmarks/reproduce_visit.sh as a device call runs it, on the CPU with the tiny model,
    from a folder of its own (no .carry there: set-up has nothing to install)."""
    import os
    import subprocess

    result = subprocess.run(
        ["bash", "benchmarks/reproduce_visit.sh", *step], cwd=root / "checkout", capture_output=True, text=True,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(root / "out"),
             "REPRO_DIR": str(root / "repro"), "STAGE_DIR": str(root / "stage"), "SELFEVO_CACHE": str(root / "cache"),
             "CONFIG": str(root / "tiny.yaml"), "MODEL": env.pop("MODEL"), "DATA_DIR": str(root / "data"),
             "END": "2", "RESERVE": "5", "MIN_RUN": "5", "STAGGER": "0", **env},
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_visit_probes_the_rate_takes_the_best_and_a_later_rate_sets_the_old_runs_aside(tiny_model, tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("benchmarks", "selfevo"):
        (checkout / name).symlink_to(ROOT / name)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG.format(model=tiny_model))
    (tmp_path / "data").mkdir()
    _toy(tmp_path / "data")
    runs = tmp_path / "repro" / "runs"

    out = visit(["first", "600", "5e-3"], tmp_path, MODEL=tiny_model, RUNS_AFTER="qwen-none")
    scores = {rate: json.loads((runs / run / "gen_0" / "metrics.json").read_text())["bleu-4"]
              for rate, run in (("0.001", "qwen-hard"), ("5e-3", "qwen-lr-5e-3"))}
    taken = max(scores, key=scores.get)
    assert f"learning rate taken: {taken}" in out, out
    assert rr.next_start(runs / "qwen-none") == 2, out  # forked after generation 0, then generation 1, in the same call
    for run in ("qwen-hard", "qwen-none"):
        assert json.loads((runs / run / "config.json").read_text())["config"]["train"]["learning_rate"] == float(taken)
    assert (runs / "qwen-none" / "FORKED_FROM").read_text().startswith("qwen-hard:")
    assert list((tmp_path / "out").glob("runs-*.manifest.json")), "the call's pack"

    # A later call at another rate: the runs begun at the old one are set aside, and qwen-hard starts
    # again from the probe run's generation 0 (its adapter, not a new one).
    other = "5e-3" if taken == "0.001" else "0.001"
    if other == "0.001":  # a probe run at the config's rate, to have one to take
        visit(["probe", "600", "0.001"], tmp_path, MODEL=tiny_model)
    old_adapter = (runs / "qwen-hard" / "gen_0" / "adapter" / "adapter_model.safetensors").read_bytes()
    out = visit(["run", "600", "qwen-hard"], tmp_path, MODEL=tiny_model, LR=other, END="1")
    aside = f"-lr{float(taken)}"  # the old rate as the run's config.json has it
    assert (runs / f"qwen-hard{aside}" / "gen_0" / "adapter" / "adapter_model.safetensors").read_bytes() == old_adapter, out
    old_none = json.loads((runs / f"qwen-none{aside}" / "config.json").read_text())
    assert old_none["config"]["train"]["learning_rate"] == float(taken)
    assert rr.next_start(runs / "qwen-none") == 1  # forked again, from the new qwen-hard
    new = runs / "qwen-hard"
    assert (new / "gen_0" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        runs / f"qwen-lr-{other}" / "gen_0" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert rr.next_start(new) == 1 and "qwen-hard: finished" in out  # generation 0 came with the probe's run

    # SAMPLED: one adapter evaluated greedily and with the seed's sampling beside the runs, packed with them
    out = visit(["run", "600", "qwen-hard"], tmp_path, MODEL=tiny_model, LR=other, END="1", SAMPLED="qwen-hard 0")
    for way in ("greedy", "sample"):
        metrics = json.loads((new / "sampled" / "gen_0" / way / "metrics.json").read_text())
        assert {"bleu-4", "rouge-l"} <= set(metrics), out
    manifest = json.loads(max((tmp_path / "out").glob("runs-*.manifest.json")).read_text())
    assert "qwen-hard" in manifest["runs"], out


def _toy(folder: Path) -> None:
    """The toy domain under the names reproduce_visit.sh reads."""
    from tests.conftest import toy_domain_inputs

    fragments, eval_file = toy_domain_inputs(folder)
    fragments.rename(folder / "AIOps_data.json")
    eval_file.rename(folder / "AIOps_eval_data.json")
