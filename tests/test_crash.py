"""Crash anywhere, resume exactly: real `selfevo evolve` processes SIGKILLed at random points.

Each kill comes from the fault-injection hook (selfevo/faults.py): SELFEVO_KILL_AT=POINT:N makes the
process SIGKILL itself at the N-th pass of POINT. A chain kills a run again and again, resuming
each time, until a drawn point is not reached and the run finishes; its files must then equal,
byte for byte, those of an uninterrupted run of the same config.
"""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from selfevo.faults import POINTS
from tests.helpers import ROOT, assert_every_visible_file_complete, evolve_args, run_files

pytestmark = pytest.mark.ranks  # runs killed in subprocesses: left out of make test-fast

KILLS = 24
# Passes of each point in one whole run of the test config (counted); N is drawn from the first
# half, so that a chain mostly goes on (a drawn N beyond what is left of the run ends the chain).
PASSES = {"stage": 13, "write": 44, "generate": 12, "train": 16, "score": 4, "evaluate": 6}


class ForkedCLI:
    """`selfevo` commands run by tests/forked_cli.py, one forked child each."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "forked_cli.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
            },  # as in this process (conftest): same numbers
        )

    def run(self, args: list[str], cwd: Path, log: Path, **env: str) -> dict:
        request = {"args": args, "env": env, "cwd": str(cwd), "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cli():
    server = ForkedCLI()
    yield server
    server.close()


def records(files: dict[str, bytes]) -> Counter:
    """Every record of every JSONL file, counted, so that lost and duplicated records can be told
    apart."""
    out = Counter()
    for name, data in files.items():
        if name.endswith(".jsonl"):
            out.update(f"{name}:{line}" for line in data.decode().splitlines())
    return out


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_to_the_same_files(cli, finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    reference = run_files(root / "runs" / "t")
    rng = random.Random(20260)  # fixed: the test always tries the same kill points
    kills: list[tuple[str, int]] = []
    lost = duplicated = attempts = chains = 0
    while len(kills) < KILLS:
        chain = tmp_path / f"chain{chains}"
        chain.mkdir()
        args = evolve_args(tiny_model, inputs, chain)
        run_dir = chain / "runs" / "t"
        while True:  # kill, resume, kill again ... until a drawn point is not reached
            attempts += 1
            assert attempts < 3 * KILLS, f"runs are not progressing: {kills}"
            point = rng.choice(POINTS)
            n = rng.randint(1, max(1, PASSES[point] // 2))
            reply = cli.run(args, chain, chain / "log.txt", SELFEVO_KILL_AT=f"{point}:{n}")
            if reply == {"signal": 9}:
                kills.append((point, n))
                if run_dir.exists():
                    assert_every_visible_file_complete(run_dir)
                continue
            assert reply == {"exit": 0}, (chain / "log.txt").read_text()[-3000:]
            break
        chains += 1
        got = run_files(run_dir)
        lost += sum((records(reference) - records(got)).values())
        duplicated += sum((records(got) - records(reference)).values())
        assert sorted(got) == sorted(reference)
        assert got == reference, [name for name in reference if got.get(name) != reference[name]]
        assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("checkpoints"))
        assert sorted(p.name for p in chain.iterdir()) == [
            "log.txt",
            "logs",
            "runs",
        ]  # no write outside
    by_point = Counter(point for point, _ in kills)
    print(
        f"\n{len(kills)} kills in {chains} chains {dict(by_point)}; records lost {lost}, "
        f"duplicated {duplicated}"
    )
    assert set(by_point) == set(POINTS)
    assert lost == 0 and duplicated == 0
    assert any(
        "resuming training from" in (tmp_path / f"chain{c}" / "log.txt").read_text()
        for c in range(chains)
    )


def test_training_resumes_from_its_last_checkpoint(cli, finished_run, tiny_model, tmp_path):
    import torch

    root, inputs = finished_run
    args = evolve_args(tiny_model, inputs, tmp_path)
    # Generation 0 trains 3 micro-batches per epoch for 2 epochs, with a checkpoint every 2
    # optimizer
    # steps: after step 2 (mid-epoch 1) and step 4 (the first batch of epoch 2). Killed after the
    # 5th batch, it must resume from step 4, inside epoch 2.
    assert cli.run(args, tmp_path, tmp_path / "log.txt", SELFEVO_KILL_AT="train:5") == {"signal": 9}
    last = tmp_path / "runs" / "t" / "gen_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(
        last, weights_only=True
    )  # plain tensors and containers: nothing unpickled
    assert checkpoint["global_step"] == 4 and checkpoint["epoch"] == 1
    weights = checkpoint["state_dict"]
    assert weights and all("lora_" in k for k in weights)  # the frozen base is not in it
    assert "hyper_parameters" not in checkpoint and checkpoint["optimizer_states"]
    assert cli.run(args, tmp_path, tmp_path / "log.txt") == {"exit": 0}
    assert f"resuming training from {last}" in (tmp_path / "runs" / "t" / "run.log").read_text()
    assert run_files(tmp_path / "runs" / "t") == run_files(root / "runs" / "t")
    assert not last.parent.exists()


def test_two_runs_give_byte_identical_files(cli, finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    assert cli.run(evolve_args(tiny_model, inputs, tmp_path), tmp_path, tmp_path / "log.txt") == {
        "exit": 0
    }
    assert run_files(tmp_path / "runs" / "t") == run_files(root / "runs" / "t")
