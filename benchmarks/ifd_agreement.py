"""Measures how closely selfevo's batched IFD agrees with the seed's per-pair algorithm (Spearman,
relative differences, both timings). Figures: docs/ifd.md.

Run from the repository root, with `../shared` (the seed's data and reference scorer) beside the
checkout:

    python benchmarks/ifd_agreement.py [--model smollm2-135m-instruct] [--limit 100] [--dtype
    float32] python benchmarks/ifd_agreement.py --out
    benchmarks/results/ifd_agreement_cpu_fp32.json   # docs/ifd.md's CPU row

Scores the AIOps eval pairs with both (same model in memory, fp32 on the CPU by default) and prints
one JSON line: Spearman correlation, median / max relative difference, and both timings. The seed's
reference lives in ../shared/bench/seed_ifd_reference.py.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from selfevo.config import IFDConfig, ModelConfig, TrainerConfig
from selfevo.hardware import build_trainer
from selfevo.ifd import score_pairs
from selfevo.models import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(SHARED / "data" / "AIOps_eval_data.json"))
    p.add_argument("--reference", default=str(SHARED / "bench" / "seed_ifd_reference.py"))
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="")
    args = p.parse_args()

    sys.path.insert(0, str(Path(args.reference).parent))
    import seed_ifd_reference as seed

    model, tokenizer = load_model(ModelConfig(name=args.model, dtype=args.dtype))
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))[: args.limit]
    pairs = [{"question": r["input"], "answer": r["output"]} for r in records]

    t = time.perf_counter()
    ours = score_pairs(
        model,
        tokenizer,
        pairs,
        IFDConfig(batch_size=args.batch_size),
        1024,
        build_trainer(TrainerConfig(precision="32-true"), enable_progress_bar=False),
    )
    ours_s = time.perf_counter() - t
    model.to(device)  # Lightning hands the model back on the CPU after predict
    t = time.perf_counter()
    theirs = [seed.ifd(tokenizer, model, p["question"], p["answer"], 1024, device) for p in pairs]
    seed_s = time.perf_counter() - t

    a = [o["ifd"] for o in ours]
    b = [s[0] for s in theirs]
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
    rel_cond = [abs(o["loss_cond"] - s[1]) / s[1] for o, s in zip(ours, theirs)]
    rel_alone = [abs(o["loss_alone"] - s[2]) / s[2] for o, s in zip(ours, theirs)]
    report = {
        "model": args.model,
        "dtype": args.dtype,
        "device": device,
        "pairs": len(pairs),
        "spearman": round(float(spearmanr(a, b).statistic), 6),
        "median_rel_diff": float(f"{statistics.median(rel):.3g}"),
        "max_rel_diff": float(f"{max(rel):.3g}"),
        "median_rel_diff_loss_cond": float(f"{statistics.median(rel_cond):.3g}"),
        "median_rel_diff_loss_alone": float(f"{statistics.median(rel_alone):.3g}"),
        "selfevo_s": round(ours_s, 2),
        "seed_s": round(seed_s, 2),
    }
    print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
