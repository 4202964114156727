"""Measures generation 0's closed-book scores (BLEU-4, ROUGE, fact recall) and its retention at each
learning rate and number of epochs, to choose a config's; it chose the demo's (docs/tuning.md,
benchmarks/results/tune_demo_cpu.md).

Run from the repository root (any config; the demo's by default):

    python benchmarks/tune_demo.py [--config configs/demo.yaml] [--lrs 1e-6 2e-4 1e-3 3e-3]
        [--epochs 2 6 12] [--work runs/tune_demo]

Generation 0's QA pairs depend only on the base model and the seed, so they are written once;
then, for each learning rate and number of epochs, a fresh adapter is trained on them exactly as
`selfevo evolve` trains generation 0, and evaluated closed book, on the eval set and on the pairs it
was trained on ("retained": the fact recall of its answers to them against their open-book
answers). Prints a markdown table (and the base model's row).
"""

import argparse
import dataclasses
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
from selfevo.prompts import prompts_for
from selfevo.ranks import launch_ranks
from selfevo.sampling import generation_seed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 2e-4, 1e-3, 3e-3])
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="default: the config's")
    p.add_argument("--work", default="runs/tune_demo")
    args = p.parse_args()
    cfg, _ = parse_evolve_args(["--config", args.config])
    work = Path(args.work)

    fragments, _, _ = load_fragments(cfg.data.fragments)
    eval_set = load_eval(cfg.data.eval)
    base, tokenizer = load_model(cfg.model)
    model = add_lora(base, cfg.lora, cfg.seed)
    fresh = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    seed = generation_seed(cfg.seed, 0)
    strategy = launch_ranks(cfg.trainer)
    generator = HFGenerator(model, tokenizer, cfg.model.max_length)
    generator.use_adapter(None)  # generation 0: the base model
    t = time.perf_counter()
    prompts = prompts_for(cfg.generation.language, cfg.prompts)  # the config's, as the loop's
    questions, _ = write_questions(generator, fragments, cfg.generation, seed, prompts=prompts)
    qa, _ = write_answers(generator, questions, cfg.generation, seed, prompts=prompts)
    print(f"{len(qa)} QA pairs in {time.perf_counter() - t:.0f}s")

    trained = [{**p, "reference": p["answer"]} for p in qa]

    def evaluate(use_adapter: bool) -> dict:
        generator.adapter_on = use_adapter  # the adapter trained in memory, or none
        scores = {}
        for name, records in (("eval", eval_set), ("retained", trained)):
            metrics, _ = evaluate_model(
                generator,
                records,
                dataclasses.replace(cfg.evaluation, limit=None),
                build_trainer(cfg.trainer, enable_progress_bar=False),
                cfg.seed,
                prompts=prompts,
            )
            scores.update(metrics if name == "eval" else {"retained": metrics["fact-recall"]})
        return scores

    rows = [("base", evaluate(use_adapter=False), 0.0)]
    for lr in args.lrs:
        for epochs in args.epochs or [cfg.train.epochs]:
            set_peft_model_state_dict(model, fresh)
            cfg.train.learning_rate, cfg.train.epochs = lr, epochs
            folder = work / f"lr_{lr:g}_epochs_{epochs}"
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            train_adapter(cfg, model, tokenizer, qa, folder, work / "logs", seed, strategy)
            name = f"lr {lr:g}, {epochs} epochs"
            rows.append((name, evaluate(use_adapter=True), time.perf_counter() - t))
    print(
        "| model | BLEU-4 | ROUGE-L | fact recall | retained facts | train+eval s |\n"
        "|---|---|---|---|---|---|"
    )
    for name, m, secs in rows:
        print(
            f"| {name} | {m['bleu-4']:.2f} | {m['rouge-l']:.2f} | {m['fact-recall']:.2f} | "
            f"{m['retained']:.2f} | {secs:.0f} |"
        )
    (work / "results.json").write_text(
        json.dumps([{"model": n, **m, "seconds": s} for n, m, s in rows], indent=1)
    )


if __name__ == "__main__":
    main()
