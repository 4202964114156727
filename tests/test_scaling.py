"""Several ranks: 2 processes on the CPU (Lightning's ddp over gloo) give one process's results.

The 2-rank commands are real `selfevo` processes: Lightning's launcher starts rank 1 by running the
command again, as it does on GPUs. An audit hook (Python's sys.addaudithook, put in every process
through a sitecustomize on PYTHONPATH) lists what each rank opens for writing, renames, creates
or removes, so the tests can check that only rank 0 touches the run and log folders.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import EvalConfig, IFDConfig, ModelConfig, TrainerConfig
from selfevo.data import load_eval
from selfevo.evaluate import evaluate_model
from selfevo.generate import HFGenerator
from selfevo.hardware import build_trainer
from selfevo.ifd import score_pairs
from selfevo.models import load_model
from selfevo.prompts import prompts_for
from selfevo.rundir import RunError
from selfevo.train import PlannedBatches
from tests.helpers import ROOT, evolve_args, run_files, toy_domain_inputs, write_records

pytestmark = (
    pytest.mark.ranks
)  # several ranks, each a process of its own: left out of make test-fast

AUDIT_HOOK = """
import os, sys

_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# this process's report: a line per path, written as it happens (a killed process keeps its lines)
_report = None


def _paths(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            writes = any(c in mode for c in "wax+")
        else:
            writes = bool((flags or 0) & _WRITING)
        return [path] if writes else []
    if event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        return list(args[:2])
    return []


def _hook(event, args):
    global _report
    paths = [p if p == "<started>" else os.path.abspath(os.fsdecode(p))
             for p in _paths(event, args) if isinstance(p, (str, bytes, os.PathLike))]
    if not paths or _report == "opening":
        return
    if _report is None:
        _report = "opening"  # its own open passes through this hook
        _report = os.open(os.path.join(os.environ["SELFEVO_AUDIT"], f"{os.getpid()}.txt"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # rank 0 sets it for itself when it launches the others
    rank = os.environ.get("LOCAL_RANK", "0")
    os.write(_report, "".join(f"rank{rank}\\t{p}\\n" for p in paths).encode())


sys.addaudithook(_hook)
_hook("open", ("<started>", "w", 0))  # a first line: the hook runs in this process
"""

QA = [
    {
        "question": f"What is fact {i} of Quillmesh{'?' * (i % 4)}",
        "answer": f"Fact {i}: qmeshd uses port {7700 + i}. " * (1 + i % 3),
    }
    for i in range(13)
]


FEWER_BATCHES_THAN_RANKS = '''
"""IFD scoring and evaluation on 2 ranks, each stage one batch: rank 1 gets none."""
import json, sys

import torch

from selfevo.config import EvalConfig, IFDConfig, ModelConfig, TrainerConfig
from selfevo.data import load_eval
from selfevo.prompts import prompts_for
from selfevo.evaluate import evaluate_model
from selfevo.generate import HFGenerator
from selfevo.ifd import score_pairs
from selfevo.models import load_model
from selfevo.ranks import launch_ranks
from selfevo.hardware import build_trainer

torch.set_num_threads(1)
model_name, qa_file, eval_file, out = sys.argv[1:]
hardware = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp")
strategy = launch_ranks(hardware)  # Lightning's launcher runs this script again for rank 1
model, tokenizer = load_model(ModelConfig(name=model_name, dtype="float32"))
pairs, eval_set = json.load(open(qa_file)), load_eval(eval_file)
scored = score_pairs(
    model, tokenizer, pairs, IFDConfig(batch_size=len(pairs)), 1024, build_trainer(hardware)
)
metrics, predictions = evaluate_model(HFGenerator(model, tokenizer, 256), eval_set,
                                      EvalConfig(batch_size=len(eval_set), max_new_tokens=8),
                                      build_trainer(hardware), seed=1, prompts=prompts_for("en"))
if strategy.global_rank == 0:
    json.dump({"scored": scored, "metrics": metrics, "predictions": predictions}, open(out, "w"))
'''


def run_ranks(
    args: list[str], tmp_path: Path, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """`selfevo ARGS` (or `python SCRIPT.py ARGS`) as a real process (which starts its other ranks
    itself), one thread per rank, with the audit hook; returns the process and, per rank that ran,
    the paths it wrote under tmp_path."""
    audit = tmp_path / "audit"
    hook = tmp_path / "hook"
    audit.mkdir(exist_ok=True)
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    for old in audit.iterdir():
        old.unlink()
    proc = subprocess.run(
        [sys.executable, *(args if args[0].endswith(".py") else ["-m", "selfevo.cli", *args])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{hook}:{ROOT}",
            "SELFEVO_AUDIT": str(audit),
            **(env or {}),
        },
    )
    touched: dict[str, list[str]] = {}
    for report in audit.iterdir():
        for line in report.read_text().splitlines():
            rank, path = line.split("\t")
            touched.setdefault(rank, [])
            if path.startswith(str(tmp_path)):
                touched[rank].append(path)
    return proc, touched


def outside(paths: list[str], *folders: Path) -> list[str]:
    return [p for p in paths if not any(p.startswith(str(f)) for f in folders)]


def test_ranks_share_each_step_as_one_device_takes_it():
    lengths = [
        1 + (i * 7) % 23 for i in range(29)
    ]  # 8 micro-batches of 4: steps of 6 leave a last step of 2
    one = PlannedBatches(lengths, 4, seed=3, window=6).plan()
    assert one == PlannedBatches(lengths, 4, seed=3).plan()  # one device: the plan as it always was
    for ranks in (2, 3):
        shares = [
            PlannedBatches(lengths, 4, seed=3, rank=r, ranks=ranks, window=6) for r in range(ranks)
        ]
        plans = [s.plan() for s in shares]
        assert (
            {len(p) for p in plans} == {len(s) for s in shares} == {len(plans[0])}
        )  # the same passes on every rank
        per_rank = 6 // ranks
        for step, start in enumerate(range(0, len(one), 6)):
            dealt = [b for p in plans for b in p[step * per_rank : (step + 1) * per_rank] if b]
            assert sorted(dealt) == sorted(one[start : start + 6])
        assert all(plans[0])  # the empty fillers never go to rank 0, whose loss is logged
    assert (
        PlannedBatches(lengths, 4, seed=3, rank=2, ranks=3, window=6).plan()[-1] == []
    )  # 2 left for 3 ranks


def trained(batches: PlannedBatches, steps: int | None = None) -> list[list[int]]:
    """The micro-batches a rank trains, all of them or those of its first `steps` optimizer
    steps."""
    it = iter(batches)
    if steps is None:
        return list(it)
    return [next(it) for _ in range(steps * batches.window // batches.ranks)]


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 4), (1, 1)])
def test_checkpoint_resumes_on_another_number_of_ranks(before, after):
    """Stopped after 2 optimizer steps of an epoch on `before` ranks, resumed on `after` ranks: the
    rest of the epoch is exactly the micro-batches not yet trained."""
    lengths = [1 + (i * 7) % 23 for i in range(45)]  # 12 micro-batches of 4: 3 steps of 4
    one = PlannedBatches(lengths, 4, seed=3, window=4)
    one.set_epoch(1)
    whole = [b for b in one.plan() if b]

    def share(rank: int, ranks: int) -> PlannedBatches:
        batches = PlannedBatches(lengths, 4, seed=3, rank=rank, ranks=ranks, window=4)
        batches.set_epoch(1)
        return batches

    first = [share(r, before) for r in range(before)]
    done = [b for s in first for b in trained(s, steps=2)]
    states = [s.state_dict() for s in first]
    rest = []
    for r in range(after):
        resumed = share(r, after)
        resumed.load_state_dict(
            states[min(r, before - 1)]
        )  # each rank reads the checkpoint (rank 0's, as Lightning saves it)
        assert resumed.epoch == 1
        rest += [b for b in trained(resumed) if b]
    assert sorted(done) == sorted(whole[:8]) and sorted(rest) == sorted(whole[8:])


def test_two_ranks_score_as_one(tiny_model, tmp_path):
    qa = write_records(tmp_path / "qa.jsonl", QA, jsonl=True)
    proc, touched = run_ranks(
        [
            "score",
            str(qa),
            "--out",
            str(tmp_path / "scored.jsonl"),
            "--model.name",
            tiny_model,
            "--model.dtype",
            "float32",
            "--ifd.batch_size",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(touched) == {"rank0", "rank1"} and not outside(touched["rank1"], tmp_path / "audit")
    two = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    one = score_pairs(
        model,
        tokenizer,
        QA,
        IFDConfig(batch_size=2),
        1024,
        build_trainer(TrainerConfig(), logger=False),
    )
    assert [p["question"] for p in two] == [p["question"] for p in QA]  # input order, no pair twice
    for key in ("ifd", "loss_cond", "loss_alone"):
        assert [p[key] for p in two] == pytest.approx([p[key] for p in one], rel=1e-6)


def test_two_ranks_score_and_evaluate_fewer_batches_than_ranks(tiny_model, tmp_path):
    """One batch for 2 ranks in IFD scoring and in evaluation: rank 1 has nothing to do, and still
    the results (the metrics too, to the bit) are one process's."""
    qa = write_records(tmp_path / "qa.json", QA[:5])
    eval_file = write_records(
        tmp_path / "eval.json", json.loads((ROOT / "data" / "quillmesh_eval.json").read_text())[:3]
    )
    (tmp_path / "stages.py").write_text(FEWER_BATCHES_THAN_RANKS)
    out = tmp_path / "out.json"
    proc, touched = run_ranks(
        [str(tmp_path / "stages.py"), tiny_model, str(qa), str(eval_file), str(out)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(touched) == {"rank0", "rank1"} and not outside(touched["rank1"], tmp_path / "audit")
    two = json.loads(out.read_text())

    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    one = score_pairs(
        model,
        tokenizer,
        QA[:5],
        IFDConfig(batch_size=5),
        1024,
        build_trainer(TrainerConfig(), logger=False),
    )
    for key in ("ifd", "loss_cond", "loss_alone"):
        assert [p[key] for p in two["scored"]] == pytest.approx([p[key] for p in one], rel=1e-6)
    metrics, predictions = evaluate_model(
        HFGenerator(model, tokenizer, 256),
        load_eval(eval_file),
        EvalConfig(batch_size=3, max_new_tokens=8),
        build_trainer(TrainerConfig()),
        seed=1,
        prompts=prompts_for("en"),
    )
    assert two["predictions"] == predictions
    assert two["metrics"] == metrics


def test_two_ranks_train_as_one(tiny_model, tmp_path):
    """7 micro-batches in steps of 4: the last step leaves rank 1 an empty filler."""
    train_file = write_records(tmp_path / "qa.json", QA)

    def fit_args(devices: int, accumulate: int) -> list[str]:
        out = tmp_path / f"devices{devices}"
        return [
            "fit",
            "--config",
            str(ROOT / "configs" / "lora.yaml"),
            "--model.model",
            tiny_model,
            "--model.dtype",
            "float32",
            "--data.train_file",
            str(train_file),
            "--data.micro_batch_size",
            "2",
            "--model.train.learning_rate",
            "1e-3",
            "--trainer.max_epochs",
            "2",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            str(devices),
            "--trainer.accumulate_grad_batches",
            str(accumulate),
            "--model.save_adapter_to",
            str(out / "adapter"),
            "--trainer.logger.init_args.save_dir",
            str(out / "logs"),
            "--trainer.default_root_dir",
            str(out),
        ]

    one = CliRunner().invoke(app, fit_args(1, 4))
    assert one.exit_code == 0, one.output
    proc, touched = run_ranks([*fit_args(2, 2), "--trainer.strategy", "ddp"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(touched) == {"rank0", "rank1"} and not outside(touched["rank1"], tmp_path / "audit")
    a = load_file(tmp_path / "devices1" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "devices2" / "adapter" / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3  # it trained
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_two_ranks_evolve_write_on_rank_zero_only_resume_and_match_one(tiny_model, tmp_path):
    """A generation on 2 ranks, killed in training (both ranks, after a checkpoint), then resumed on
    one device (the checkpoint's position converted from 2 ranks to 1): its files are one process's,
    and rank 1 never wrote into the run or log folders."""
    two_root, one_root = tmp_path / "two", tmp_path / "one"
    two_root.mkdir()
    one_root.mkdir()
    # 6 micro-batches an epoch, 3 steps: killed after the first step, the resumed steps group its
    # micro-batches right.
    extra = [
        "--end",
        "1",
        "--train.micro_batch_size",
        "1",
        "--train.grad_accum",
        "2",
        "--train.checkpoint_every",
        "1",
        "--trainer.accelerator",
        "cpu",
    ]
    inputs = toy_domain_inputs(two_root)
    args = [*evolve_args(tiny_model, inputs, two_root)[1:], *extra, "--trainer.devices", "2"]
    killed, touched = run_ranks(["evolve", *args], two_root, env={"SELFEVO_KILL_AT": "train:1"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    gen = two_root / "runs" / "t" / "gen_0"
    assert (gen / "checkpoints" / "last.ckpt").is_file() and not (gen / "adapter").exists()
    resumed, touched_again = run_ranks(["evolve", *args, "--trainer.devices", "1"], two_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming training from" in resumed.stderr
    assert set(touched_again) == {"rank0"}
    assert any(p.startswith(str(gen)) for p in touched["rank0"])  # the hook sees rank 0's writes
    assert not outside(touched["rank1"], two_root / "audit")  # and rank 1's: none

    one = CliRunner().invoke(
        app, [*evolve_args(tiny_model, toy_domain_inputs(one_root), one_root), *extra]
    )
    assert one.exit_code == 0, one.output
    two_files, one_files = run_files(two_root / "runs" / "t"), run_files(one_root / "runs" / "t")
    assert two_files.keys() == one_files.keys()
    for name in (
        "questions",
        "answers",
        "replay",
        "train",
        "qa",
    ):  # generated and IFD-scored as one process does
        assert two_files[f"gen_0/{name}.jsonl"] == one_files[f"gen_0/{name}.jsonl"], name
    assert two_files["base/predictions.jsonl"] == one_files["base/predictions.jsonl"]
    a = load_file(one_root / "runs" / "t" / "gen_0" / "adapter" / "adapter_model.safetensors")
    b = load_file(gen / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_one_device_checkpoint_resumes_on_more_ranks_at_a_step_boundary_only():
    lengths = [1 + (i * 7) % 23 for i in range(45)]
    whole = PlannedBatches(lengths, 4, seed=3, window=4).plan()
    rest = []
    for r in range(2):
        resumed = PlannedBatches(lengths, 4, seed=3, rank=r, ranks=2, window=4)
        resumed.load_state_dict(
            {"epoch": 0, "done": 4, "ranks": 1, "window": 4}
        )  # one step in, on one device
        rest += list(resumed)
    assert sorted(rest) == sorted(whole[4:])
    odd = PlannedBatches(lengths, 4, seed=3, rank=0, ranks=2, window=4)
    with pytest.raises(RunError, match="resume it on 1 ranks"):
        odd.load_state_dict({"epoch": 0, "done": 3, "ranks": 1, "window": 4})  # mid-step
