"""Checks whether vLLM generates with this model on this GPU, and measures how fast: one engine per
process, in the loop's settings (LoRA enabled, in-process engine core, KV cache in bytes), with one
setting changed at a time. Prints one line: the settings, and the new tokens per second or the
error. Figures and the fault it isolated: docs/vllm.md,
benchmarks/results/vllm_check_h100_2026-11-25.txt.

Run from the repository root on a GPU machine with vLLM installed:
  python benchmarks/vllm_check.py MODEL_FOLDER [--no-lora] [--eager] [--sync]
  python -c 'from benchmarks.vllm_check import loop_engine_check as c; c()' MODEL_FOLDER EVAL_JSON
  python -c 'from benchmarks.vllm_check import lightning_eval_check as c; c()' MODEL_FOLDER
  EVAL_JSON"""

import argparse
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--no-lora", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs, no torch.compile")
    ap.add_argument("--sync", action="store_true", help="no asynchronous scheduling")
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument(
        "--seeded", action="store_true", help="selfevo's worker extension, seeded before the call"
    )
    ap.add_argument(
        "--context",
        choices=("none", "autocast", "inference"),
        default="none",
        help="generate inside torch.autocast(bf16) or torch.inference_mode, as inside a Lightning "
        "test_step",
    )
    ap.add_argument(
        "--hf-first",
        action="store_true",
        help="the model loaded by transformers onto the GPU first",
    )
    a = ap.parse_args()
    from vllm import LLM, SamplingParams

    extra = {"async_scheduling": False} if a.sync else {}
    if a.seeded:
        extra["worker_extension_cls"] = "selfevo.vllm_engine.SeedingWorker"
    label = (
        f"lora={not a.no_lora} eager={a.eager} sync={a.sync} rep={a.repetition_penalty} "
        f"seeded={a.seeded} "
        f"context={a.context} hf_first={a.hf_first}"
    )
    import contextlib

    import torch

    if a.hf_first:
        from transformers import AutoModelForCausalLM

        _hf = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda()
    context = {
        "none": contextlib.nullcontext,
        "inference": torch.inference_mode,
        "autocast": lambda: torch.autocast("cuda", dtype=torch.bfloat16),
    }[a.context]
    t = time.perf_counter()
    try:
        llm = LLM(
            model=a.model,
            dtype="bfloat16",
            max_model_len=1024,
            seed=0,
            enable_lora=not a.no_lora,
            max_loras=1,
            max_lora_rank=8,
            kv_cache_memory_bytes=2 * 2**30,
            gpu_memory_utilization=0.05,
            generation_config="vllm",
            enforce_eager=a.eager,
            enable_prefix_caching=False,
            **extra,
        )
        start = time.perf_counter() - t
        prompts = [f"请解释运维中的第{i}个概念。" for i in range(a.prompts)]
        t = time.perf_counter()
        if a.seeded:
            llm.collective_rpc("seed_generators", args=(0,))
        params = SamplingParams(
            max_tokens=256, temperature=0, repetition_penalty=a.repetition_penalty
        )
        with context():
            outs = llm.generate(prompts, params, use_tqdm=False)
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        print(
            f"CHECK {label}: ok, start {start:.0f}s, {n / (time.perf_counter() - t):.0f} new tok/s",
            flush=True,
        )
    except Exception as e:  # noqa: BLE001 - the point is to report it
        print(f"CHECK {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()


def loop_engine_check() -> None:
    """selfevo's own engine (VLLMEngine) on the eval questions, as the loop's base evaluation calls
    it: python -c 'from benchmarks.vllm_check import loop_engine_check as c; c()' MODEL_FOLDER
    EVAL_JSON [simple] [tokens]"""
    from pathlib import Path

    from transformers import AutoTokenizer

    from selfevo.config import GenerationConfig, ModelConfig
    from selfevo.data import load_eval
    from selfevo.prompts import closed_book_prompt
    from selfevo.sampling import Sampling
    from selfevo.vllm_engine import VLLMEngine

    folder, eval_path = Path(sys.argv[1]), Path(sys.argv[2])
    simple = "simple" in sys.argv[3:]
    tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    tok = AutoTokenizer.from_pretrained(folder)
    model_cfg = ModelConfig(name=str(folder), dtype="bfloat16", max_length=1024)
    engine = VLLMEngine(
        folder, tok, model_cfg, GenerationConfig(backend="vllm", vllm_kv_cache_gib=4), 8, 0, 512
    )
    questions = [r["question"] for r in load_eval(eval_path)]
    prompts = (
        [f"请解释运维中的第{i}个概念。" for i in range(100)]
        if simple
        else [closed_book_prompt(tok, q) for q in questions]
    )
    label = f"VLLMEngine simple={simple} tokens={tokens}"
    try:
        texts = engine.generate(prompts, Sampling(max_new_tokens=tokens, do_sample=False), seed=0)
        print(f"CHECK {label}: ok, {len(texts)} answers; first: {texts[0][:60]!r}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"CHECK {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


def lightning_eval_check() -> None:
    """selfevo's evaluation (a Lightning test loop) with its engine, as the loop's base evaluation:
      python -c 'from benchmarks.vllm_check import lightning_eval_check as c; c()' MODEL_FOLDER
      EVAL_JSON [hf] [fp32] [grad]
    Before the engine kept cuBLAS's workspaces (selfevo.vllm_engine.keep_cublas_workspaces), this
    failed with an illegal memory access (benchmarks/results/vllm_check_h100_2026-11-25.txt)."""
    from pathlib import Path

    from selfevo.config import EvalConfig, GenerationConfig, ModelConfig, TrainerConfig
    from selfevo.data import load_eval
    from selfevo.evaluate import evaluate_model
    from selfevo.hardware import build_trainer
    from selfevo.models import load_model
    from selfevo.prompts import prompts_for
    from selfevo.vllm_engine import VLLMEngine

    folder, eval_path = Path(sys.argv[1]), Path(sys.argv[2])
    hf = "hf" in sys.argv[3:]
    precision = "32-true" if "fp32" in sys.argv[3:] else None
    inference = "grad" not in sys.argv[3:]
    model_cfg = ModelConfig(name=str(folder), dtype="bfloat16", max_length=1024)
    if hf:
        base, tok = load_model(model_cfg)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
    engine = VLLMEngine(
        folder, tok, model_cfg, GenerationConfig(backend="vllm", vllm_kv_cache_gib=4), 8, 0, 512
    )
    label = f"Lightning evaluation hf_model={hf} precision={precision} inference_mode={inference}"
    try:
        engine.use_adapter(None)
        metrics, _ = evaluate_model(
            engine,
            load_eval(eval_path),
            EvalConfig(batch_size=100, max_new_tokens=512),
            build_trainer(TrainerConfig(precision=precision), inference_mode=inference),
            0,
            prompts=prompts_for("en"),
        )
        print(f"CHECK {label}: ok, {metrics}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"CHECK {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
