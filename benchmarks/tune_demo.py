"""Measures generation 0's closed-book scores (BLEU-4, ROUGE) at each learning rate, to choose a
config's learning rate; it chose the demo's (docs/tuning.md, benchmarks/results/tune_demo_cpu.md).

Run from the repository root (any config; the demo's by default):

    python benchmarks/tune_demo.py [--config configs/demo.yaml] [--lrs 1e-6 2e-4 1e-3 3e-3] [--work
    runs/tune_demo]

Generation 0's QA pairs depend only on the base model and the seed, so they are written once;
then, for each learning rate, a fresh adapter is trained on them exactly as `selfevo evolve`
trains generation 0, and evaluated closed book. Prints a markdown table (and the base model's row).
"""

import argparse
import json
import time
from pathlib import Path

from peft import get_peft_model_state_dict, set_peft_model_state_dict

from selfevo.cli import parse_evolve_args
from selfevo.data import load_eval, load_fragments
from selfevo.evaluate import evaluate_model
from selfevo.generate import HFGenerator, write_answers, write_questions
from selfevo.hardware import build_trainer
from selfevo.loop import train_adapter
from selfevo.models import add_lora, load_model
from selfevo.ranks import launch_ranks
from selfevo.sampling import generation_seed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 2e-4, 1e-3, 3e-3])
    p.add_argument("--work", default="runs/tune_demo")
    args = p.parse_args()
    cfg, _ = parse_evolve_args(["--config", args.config])
    work = Path(args.work)

    fragments, _ = load_fragments(cfg.data.fragments)
    eval_set = load_eval(cfg.data.eval)
    base, tokenizer = load_model(cfg.model)
    model = add_lora(base, cfg.lora, cfg.seed)
    fresh = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    seed = generation_seed(cfg.seed, 0)
    strategy = launch_ranks(cfg.trainer)
    generator = HFGenerator(model, tokenizer, cfg.model.max_length)
    generator.use_adapter(None)  # generation 0: the base model
    t = time.perf_counter()
    questions, _ = write_questions(generator, fragments, cfg.generation, seed)
    qa, _ = write_answers(generator, questions, cfg.generation, seed)
    print(f"{len(qa)} QA pairs in {time.perf_counter() - t:.0f}s")

    def evaluate(use_adapter: bool) -> dict:
        generator.adapter_on = use_adapter  # the adapter trained in memory, or none
        metrics, _ = evaluate_model(
            generator,
            eval_set,
            cfg.evaluation,
            build_trainer(cfg.trainer, enable_progress_bar=False),
            cfg.seed,
        )
        return metrics

    rows = [("base", evaluate(use_adapter=False), 0.0)]
    for lr in args.lrs:
        set_peft_model_state_dict(model, fresh)
        cfg.train.learning_rate = lr
        folder = work / f"lr_{lr:g}"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        train_adapter(cfg, model, qa, folder, work / "logs", seed, strategy)
        rows.append((f"lr {lr:g}", evaluate(use_adapter=True), time.perf_counter() - t))
    print(
        "| model | BLEU-4 | ROUGE-1 | ROUGE-2 | ROUGE-L | train+eval s |\n|---|---|---|---|---|---|"
    )
    for name, m, secs in rows:
        print(
            f"| {name} | {m['bleu-4']:.2f} | {m['rouge-1']:.2f} | {m['rouge-2']:.2f} | "
            f"{m['rouge-l']:.2f} | {secs:.0f} |"
        )
    (work / "results.json").write_text(
        json.dumps([{"model": n, **m, "seconds": s} for n, m, s in rows], indent=1)
    )


if __name__ == "__main__":
    main()
