"""Measures the throughput of each stage on 1 device and on N, from the loop itself
(docs/scaling.md).

Runs the same `selfevo evolve` generation twice, with --trainer.devices 1 and --trainer.devices N
(each its own run folder), and reads the seconds each stage recorded in stages.json (rank 0's wall
clock; model loading and start-up are not in any stage). Prints a table of items per second,
speed-up and scaling efficiency (speed-up / N), and writes it as JSON.

    python benchmarks/scaling.py --devices 8 --out scaling.json -- \\
        --config configs/aiops.yaml --model.name MODEL --data.fragments FRAGMENTS --data.eval EVAL

Arguments after `--` go to every `selfevo evolve` (train.grad_accum must be a multiple of N).
On a CPU, `--devices 2 -- --trainer.accelerator cpu ...` runs the same over gloo (a check of the
script, not a measurement worth reporting).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def generated(record: dict, epochs: int) -> int:
    return record["kept"] + record["dropped"]


# stage of gen_0: (what its items are, how many, from its stages.json record and train.epochs)
STAGES = {
    "questions": ("prompts", generated),
    "answers": ("prompts", generated),
    "train": ("pairs x epochs", lambda record, epochs: record["pairs"] * epochs),
    "score": ("pairs", lambda record, epochs: record["pairs"]),
    "evaluate": ("eval pairs", lambda record, epochs: record["pairs"]),
}


def run(devices: int, root: Path, extra: list[str]) -> Path:
    name = f"scaling_{devices}"
    cmd = [
        sys.executable,
        "-m",
        "selfevo.cli",
        "evolve",
        *extra,
        "--name",
        name,
        "--start",
        "0",
        "--end",
        "1",
        "--runs_dir",
        str(root / "runs"),
        "--logs_dir",
        str(root / "logs"),
        "--trainer.devices",
        str(devices),
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return root / "runs" / name


def throughput(run_dir: Path) -> dict[str, float]:
    epochs = json.loads((run_dir / "config.json").read_text())["config"]["train"]["epochs"]
    records = json.loads((run_dir / "gen_0" / "stages.json").read_text())
    return {
        stage: count(records[stage], epochs) / max(records[stage]["seconds"], 1e-9)
        for stage, (_, count) in STAGES.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices", type=int, required=True, help="N, the devices to compare with one"
    )
    parser.add_argument(
        "--root", type=Path, default=Path("runs/scaling"), help="run and log folders"
    )
    parser.add_argument("--out", type=Path, default=None, help="the table as JSON")
    parser.add_argument(
        "extra", nargs=argparse.REMAINDER, help="-- then arguments for selfevo evolve"
    )
    args = parser.parse_args()
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    one = throughput(run(1, args.root, extra))
    many = throughput(run(args.devices, args.root, extra))
    n = args.devices
    rows = [
        {
            "stage": s,
            "items": STAGES[s][0],
            "per_s_1": one[s],
            f"per_s_{n}": many[s],
            "speedup": many[s] / one[s],
            "efficiency": many[s] / one[s] / n,
        }
        for s in STAGES
    ]
    print(
        f"\n| stage | items | 1 device /s | {n} devices /s | speed-up | efficiency "
        "|\n|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['stage']} | {r['items']} | {r['per_s_1']:.2f} | {r[f'per_s_{n}']:.2f} | "
            f"{r['speedup']:.2f}x | {r['efficiency']:.0%} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"devices": n, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
