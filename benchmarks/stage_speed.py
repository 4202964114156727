"""Measures the speed of each stage (IFD scoring pairs/s, generation new tokens/s, LoRA training
tokens/s), selfevo's way beside the seed's way, in one run on one device. Figures:
docs/benchmarks.md.

Run from the repository root (with `../shared` beside the checkout, or SELFEVO_SHARED pointing at
it):

    python benchmarks/stage_speed.py --model smollm2-135m-instruct --out results.json          # GPU
    python benchmarks/stage_speed.py --cpu-sizes --out results.json                            #
    CPU variant python benchmarks/stage_speed.py --model smollm2-135m-instruct --stages ifd
    --seed-pairs 20 \
        --ifd-batch-sizes 64 128 256 --out ifd.json                                             #
        one stage

The H100 figures of docs/benchmarks.md ran through `bash tools/gpu/h100_visit.sh
ifd|generation|train`, which holds their exact arguments.

Data: the seed's AIOps set (../shared/data). Pairs are the 100 eval QA, repeated to --pairs;
generation prompts are the AIOps fragments' question prompts. Prints a markdown table and writes
the JSON of every figure. Seed-style baselines:
  IFD        ../shared/bench/seed_ifd_reference.py, one pair at a time (on --seed-pairs pairs);
  generation plain model.generate, batch 128, unsorted, 256 sampled new tokens (on --seed-prompts);
  training   micro-batch 4 x accumulation 4, padded, fp16 autocast (the seed's LLaMA-Factory setup).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import lightning as L
import torch

from selfevo.config import IFDConfig, LoraConfig, ModelConfig, TrainConfig, TrainerConfig
from selfevo.generate import HFGenerator, Sampling
from selfevo.hardware import build_trainer
from selfevo.ifd import score_pairs
from selfevo.models import add_lora, load_model
from selfevo.prompts import prompts_for, question_prompt
from selfevo.train import IGNORE_INDEX, LoRAModule, QADataModule

SHARED = Path(os.environ.get("SELFEVO_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


# Where a kernel's time goes (on the CPU, an aten op's), by its name: the first class that matches.
# Attention first: flash and memory-efficient attention kernels carry "cutlass" in their names.
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "cublas", "xmma", "::mm", "::addmm", "::bmm")),
    ("softmax and loss", ("softmax", "cross_entropy", "nll")),
    ("copies", ("memcpy", "memset", "aten::copy_")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next(
        (c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "element-wise and other"
    )


class Profiled:
    """torch.profiler over a span of a stage: `with Profiled() as p: ...` (or p.start() and
    p.stop()), then p.summary."""

    def start(self) -> Profiled:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.prof = profile(activities=activities)
        sync()
        self.prof.start()
        self.began = time.perf_counter()
        return self

    def stop(self) -> dict:
        sync()
        wall = time.perf_counter() - self.began
        self.prof.stop()
        self.summary = profile_summary(self.prof.key_averages(), wall)
        return self.summary

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()


def profile_summary(events, wall: float, top: int = 12) -> dict:
    """What binds a profiled span. On a GPU: the share of the wall time the device was busy (far
    below 1: the CPU, launching kernels, binds) and the busy time by class of kernel; on the CPU:
    the ops' own time by class. With the top kernels or ops."""
    from torch.autograd import DeviceType

    on_gpu = torch.cuda.is_available()

    def own(e) -> float:  # seconds
        if on_gpu:
            return getattr(e, "self_device_time_total", 0) / 1e6
        return e.self_cpu_time_total / 1e6

    # A user annotation (Lightning's "Optimizer.step#AdamW.step", record_function ranges) spans the
    # kernels inside it: counted as one, it would count their time twice, idle gaps included.
    kernels = [
        e
        for e in events
        if (getattr(e, "device_type", None) == DeviceType.CUDA) == on_gpu
        and not getattr(e, "is_user_annotation", False)
    ]
    busy = sum(own(e) for e in kernels)
    classes: Counter[str] = Counter()
    for e in kernels:
        classes[kernel_class(e.key)] += own(e)
    ranked = sorted(kernels, key=own, reverse=True)[:top]
    return {
        "wall_s": round(wall, 4),
        "busy_s": round(busy, 4),
        "busy_share": round(busy / wall, 4) if on_gpu and wall else None,
        "by_class_s": {c: round(t, 4) for c, t in sorted(classes.items(), key=lambda x: -x[1])},
        "top": [[e.key[:90], round(own(e), 4), e.count] for e in ranked],
    }


def bench_ifd(
    model,
    tokenizer,
    pairs,
    seed_pairs,
    batch_sizes,
    device,
    compile_batch: int = 0,
    profile: bool = False,
) -> list[dict]:
    """The seed's per-pair way, selfevo's at each batch size, and (compile_batch > 0) selfevo's with
    the decoder compiled by torch.compile at that batch size, its values checked against eager's."""
    sys.path.insert(0, str(SHARED / "bench"))
    import seed_ifd_reference as seed

    rows = []
    seed.ifd(tokenizer, model, pairs[0]["question"], pairs[0]["answer"], 1024, device)  # warm-up
    _, secs = timed(
        lambda: [
            seed.ifd(tokenizer, model, p["question"], p["answer"], 1024, device)
            for p in pairs[:seed_pairs]
        ]
    )
    rows.append(
        {
            "stage": "ifd",
            "way": "seed (per pair)",
            "items": seed_pairs,
            "seconds": secs,
            "pairs_per_s": seed_pairs / secs,
        }
    )
    trainer = build_trainer(TrainerConfig(), enable_progress_bar=False)
    eager = {}
    ways = [(bs, False) for bs in batch_sizes] + ([(compile_batch, True)] if compile_batch else [])
    for bs, compiled in ways:
        if compiled:  # in place: from here on every forward of the decoder runs compiled
            model.get_decoder().compile(dynamic=True)
        _, w = timed(
            lambda: score_pairs(
                model, tokenizer, pairs[: 2 * bs], IFDConfig(batch_size=bs), 1024, trainer
            )
        )
        scored, secs = timed(
            lambda: score_pairs(model, tokenizer, pairs, IFDConfig(batch_size=bs), 1024, trainer)
        )
        row = {
            "stage": "ifd",
            "way": f"selfevo batch {bs}" + (", compiled decoder" if compiled else ""),
            "items": len(pairs),
            "seconds": secs,
            "pairs_per_s": len(pairs) / secs,
            "warmup_s": w,
        }
        if compiled and bs in eager:
            row["max_abs_ifd_diff_vs_eager"] = max(
                abs(a["ifd"] - b["ifd"]) for a, b in zip(scored, eager[bs])
            )
        if not compiled:
            eager[bs] = scored
        if profile:  # four batches, warm
            with Profiled() as p:
                score_pairs(
                    model, tokenizer, pairs[: 4 * bs], IFDConfig(batch_size=bs), 1024, trainer
                )
            row["profile"] = p.summary
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def count_new_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def bench_vllm_generation(
    model_name, model, tokenizer, prompts, new_tokens, kv_cache_gib
) -> list[dict]:
    """selfevo's vLLM backend on the same prompts, serving a LoRA adapter as generations >= 1 do,
    then the same engine without the adapter, sampled and greedy."""
    import tempfile

    from selfevo.config import GenerationConfig
    from selfevo.models import resolve_model, save_adapter
    from selfevo.vllm_engine import VLLMEngine

    adapter = Path(tempfile.mkdtemp()) / "adapter"
    save_adapter(model, adapter)
    gen_cfg = GenerationConfig(
        backend="vllm",
        question_max_new_tokens=new_tokens,
        answer_max_new_tokens=new_tokens,
        vllm_kv_cache_gib=kv_cache_gib,
    )
    model_cfg = ModelConfig(name=model_name, max_length=2048)
    (engine, up) = timed(
        lambda: VLLMEngine(resolve_model(model_name), tokenizer, model_cfg, gen_cfg, 8, 0)
    )
    config = engine.llm.llm_engine.vllm_config
    engine_info = {
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "cudagraph_capture_max": max(config.compilation_config.cudagraph_capture_sizes or [0]),
    }
    print(json.dumps(engine_info), flush=True)
    sampled, greedy = Sampling(new_tokens, True, 0.5, 0.95), Sampling(new_tokens, False, 0.0, 1.0)
    ways = [
        ("LoRA adapter (generations >= 1)", adapter, sampled),
        ("no adapter (generation 0)", None, sampled),
        ("no adapter, greedy", None, greedy),
    ]
    rows = []
    for name, lora, sampling in ways:
        engine.use_adapter(lora)
        engine.generate(prompts[:64], sampling, seed=1)  # warm-up (loads the adapter)
        texts, secs = timed(lambda: engine.generate(prompts, sampling, seed=0))
        n = count_new_tokens(tokenizer, texts)
        rows.append(
            {
                "stage": "generation",
                "way": f"vLLM, {name}, KV cache {kv_cache_gib:g} GiB",
                "items": len(prompts),
                "seconds": secs,
                "engine_start_s": up,
                "new_tokens": n,
                "new_tokens_per_s": n / secs,
                **engine_info,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    engine.close()
    return rows


def bench_generation(
    model, tokenizer, prompts, seed_prompts, batch_sizes, new_tokens
) -> list[dict]:
    rows = []
    sampling = Sampling(new_tokens, True, 0.5, 0.95)
    # The seed's way: fixed batches of 128 in file order (no length sorting), 256 new tokens.
    seed_sampling = Sampling(256, True, 0.5, 0.95)
    subset = prompts[:seed_prompts]

    def seed_way():
        from selfevo.generate import generate_batch

        out = []
        for s in range(0, len(subset), 128):
            out += generate_batch(model, tokenizer, subset[s : s + 128], seed_sampling, 2048)
        return out

    texts, secs = timed(seed_way)
    n = count_new_tokens(tokenizer, texts)
    rows.append(
        {
            "stage": "generation",
            "way": "seed (batch 128, unsorted)",
            "items": len(subset),
            "seconds": secs,
            "new_tokens": n,
            "new_tokens_per_s": n / secs,
        }
    )
    print(json.dumps(rows[-1]), flush=True)
    for bs in batch_sizes:
        generator = HFGenerator(model, tokenizer, max_length=2048)
        texts, secs = timed(lambda: generator.generate(prompts, sampling, batch_size=bs, seed=0))
        n = count_new_tokens(tokenizer, texts)
        rows.append(
            {
                "stage": "generation",
                "way": f"selfevo batch {bs}, sorted",
                "items": len(prompts),
                "seconds": secs,
                "new_tokens": n,
                "new_tokens_per_s": n / secs,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def real_tokens(batch: dict) -> int:
    """Tokens up to each row's last labelled one (the end of its answer): padding not counted."""
    labelled = batch["labels"] != IGNORE_INDEX
    width = labelled.shape[1]
    return int((width - labelled.flip(1).int().argmax(1)).sum())


class StepProfiler(L.Callback):
    """torch.profiler over optimizer steps `skip` to `skip + steps` (set-up and warm-up left
    out)."""

    def __init__(self, skip: int = 3, steps: int = 3):
        self.skip, self.steps, self.span, self.summary = skip, steps, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.span is None and trainer.global_step == self.skip:
            self.span = Profiled().start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.skip + self.steps:
            self.finish()

    def on_train_end(self, trainer, module) -> None:  # a fit shorter than the span: what it had
        self.finish()

    def finish(self) -> None:
        if self.span is not None and self.summary is None:
            self.summary = self.span.stop()


class StepClock(L.Callback):
    """Steady-state training speed: label tokens and seconds from optimizer step `skip` on, and the
    loss of every optimizer step (set-up and the first steps' warm-up are left out)."""

    def __init__(self, skip: int = 3):
        self.skip, self.tokens, self.start, self.seconds, self.losses = skip, 0, None, 0.0, []
        self.pad_tokens = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            if self.start is not None:
                self.tokens += real_tokens(batch)
            return
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))
        sync()
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()
        elif self.start is not None:
            self.tokens += real_tokens(batch)
            self.seconds = time.perf_counter() - self.start


def bench_training(model_name, qa_file, steps, ways, profile: bool = False) -> list[dict]:
    """Each way: (name, micro-batch, accumulation, precision, dtype, length-grouped, quantization,
    compiled). With profile, a second, short fit of each way under torch.profiler."""
    rows = []
    for name, micro, accum, precision, dtype, grouped, quantization, compiled in ways:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            base, tokenizer = load_model(
                ModelConfig(name=model_name, dtype=dtype, quantization=quantization)
            )
        except Exception as e:  # e.g. no bitsandbytes on this machine
            rows.append({"stage": "train", "way": name, "error": repr(e)[:200]})
            continue
        model = add_lora(base, LoraConfig(), seed=0)
        if (
            compiled
        ):  # the decoder stack (LoRA layers included) compiled in place; the loss stays eager
            model.get_base_model().get_decoder().compile(dynamic=True)
        data = QADataModule(
            str(qa_file),
            model_name,
            micro_batch_size=micro,
            max_length=1024,
            group_by_length=grouped,
        )
        clock = StepClock()
        trainer = build_trainer(
            TrainerConfig(precision=precision),
            max_steps=steps,
            accumulate_grad_batches=accum,
            enable_progress_bar=False,
            logger=False,
            callbacks=[clock],
        )
        module = LoRAModule(
            model_name,
            dtype,
            quantization,
            LoraConfig(),
            TrainConfig(learning_rate=2e-4),
            _peft_model=model,
        )
        _, secs = timed(functools.partial(trainer.fit, module, datamodule=data))
        # Real (unpadded) tokens per second over the steady-state steps.
        rows.append(
            {
                "stage": "train",
                "way": name,
                "items": steps * accum * micro,
                "seconds": secs,
                "steady_steps": steps - clock.skip,
                "steady_seconds": clock.seconds,
                "tokens_per_s": clock.tokens / clock.seconds if clock.seconds else float("nan"),
                "loss_first": clock.losses[0] if clock.losses else None,
                "loss_last10": sum(clock.losses[-10:]) / max(1, len(clock.losses[-10:])),
                "losses": clock.losses,
                "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available()
                else None,
            }
        )
        if compiled:  # the same steps eager: the loss curve must not change
            eager = next(r for r in rows if r["way"] == name.removesuffix(", compiled decoder"))
            rows[-1]["max_abs_loss_diff_vs_eager"] = max(
                abs(a - b) for a, b in zip(eager["losses"], clock.losses)
            )
        if profile:
            profiler = StepProfiler()
            build_trainer(
                TrainerConfig(precision=precision),
                max_steps=profiler.skip + profiler.steps + 1,
                accumulate_grad_batches=accum,
                enable_progress_bar=False,
                logger=False,
                callbacks=[profiler],
            ).fit(module, datamodule=data)
            rows[-1]["profile"] = profiler.summary
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
        del model, base, module, trainer
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--seed-pairs", type=int, default=100)
    p.add_argument("--ifd-batch-sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument(
        "--ifd-compile-batch",
        type=int,
        default=0,
        help="> 0: also time IFD with a compiled decoder",
    )
    p.add_argument("--prompts", type=int, default=4000)
    p.add_argument("--seed-prompts", type=int, default=256)
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument(
        "--train-compile", action="store_true", help="also time training with a compiled decoder"
    )
    p.add_argument(
        "--train-qlora", action="store_true", help="also time QLoRA (nf4 base; needs bitsandbytes)"
    )
    p.add_argument(
        "--vllm-kv-cache-gib", type=float, default=0, help="> 0: also time the vLLM backend"
    )
    p.add_argument("--cpu-sizes", action="store_true", help="small sizes for a 2-core CPU")
    p.add_argument("--stages", nargs="+", default=["ifd", "generation", "train"])
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile IFD and training (torch.profiler): what binds each, in the JSON",
    )
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.cpu_sizes:
        args.pairs, args.seed_pairs, args.ifd_batch_sizes = 48, 16, [4, 16]
        args.prompts, args.seed_prompts, args.gen_batch_sizes, args.new_tokens = (
            32,
            16,
            [16, 32],
            64,
        )
        args.train_steps = 6

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(ModelConfig(name=args.model, dtype=args.dtype))
    model.to(device).eval()
    eval_set = json.loads((SHARED / "data" / "AIOps_eval_data.json").read_text(encoding="utf-8"))
    pairs = [{"question": r["input"], "answer": r["output"]} for r in eval_set]
    pairs = (pairs * (args.pairs // len(pairs) + 1))[: args.pairs]
    fragments = [
        r["instruction"]
        for r in json.loads((SHARED / "data" / "AIOps_data.json").read_text("utf-8"))
    ]
    prompts = [question_prompt(tokenizer, f, prompts_for("zh")) for f in fragments[: args.prompts]]

    rows = []
    if "ifd" in args.stages:
        rows += bench_ifd(
            model,
            tokenizer,
            pairs,
            args.seed_pairs,
            args.ifd_batch_sizes,
            device,
            args.ifd_compile_batch,
            args.profile,
        )
    if "generation" in args.stages:
        rows += bench_generation(
            model, tokenizer, prompts, args.seed_prompts, args.gen_batch_sizes, args.new_tokens
        )
        if args.vllm_kv_cache_gib > 0:
            lora_model = add_lora(model, LoraConfig(), seed=0)
            rows += bench_vllm_generation(
                args.model, lora_model, tokenizer, prompts, args.new_tokens, args.vllm_kv_cache_gib
            )
            model = lora_model.unload()
    if "train" in args.stages:
        qa_file = Path(tempfile.mkdtemp()) / "qa.json"
        qa_file.write_text(
            json.dumps(
                [{"question": p["question"], "answer": p["answer"]} for p in pairs],
                ensure_ascii=False,
            )
        )
        fp16 = "16-mixed" if device == "cuda" else "32-true"
        bf16 = "bf16-mixed" if device == "cuda" else "32-true"
        del model
        ways = [
            (
                "seed (4 x 4, unsorted, fp32 weights, fp16 autocast)",
                4,
                4,
                fp16,
                "float32",
                False,
                "none",
                False,
            ),
            (
                "selfevo (16 x 1, length-grouped, bf16)",
                16,
                1,
                bf16,
                args.dtype,
                True,
                "none",
                False,
            ),
            (
                "selfevo (32 x 1, length-grouped, bf16)",
                32,
                1,
                bf16,
                args.dtype,
                True,
                "none",
                False,
            ),
        ]
        if device == "cuda" and args.train_qlora:
            ways.append(
                (
                    "selfevo QLoRA (nf4 base, 16 x 1, length-grouped)",
                    16,
                    1,
                    bf16,
                    args.dtype,
                    True,
                    "nf4",
                    False,
                )
            )
        if args.train_compile:
            ways += [
                (
                    "selfevo (16 x 1, length-grouped, bf16), compiled decoder",
                    16,
                    1,
                    bf16,
                    args.dtype,
                    True,
                    "none",
                    True,
                ),
                (
                    "selfevo (32 x 1, length-grouped, bf16), compiled decoder",
                    32,
                    1,
                    bf16,
                    args.dtype,
                    True,
                    "none",
                    True,
                ),
            ]

        rows += bench_training(args.model, qa_file, args.train_steps, ways, args.profile)

    env = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": " ".join(sys.argv),
    }
    print("\n| stage | way | items | seconds | rate |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['stage']} | {r['way']} | error | {r['error'][:80]} | |")
            continue
        rate = next(
            f"{r[k]:,.0f} {k.replace('_per_s', '/s')}"
            for k in ("pairs_per_s", "new_tokens_per_s", "tokens_per_s")
            if k in r
        )
        print(f"| {r['stage']} | {r['way']} | {r['items']} | {r['seconds']:.1f} | {rate} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    profiled = [r for r in rows if r.get("profile") and r["profile"]["busy_s"] > 0]
    if profiled:
        print("\n| stage | way | busy share | own time by class |\n|---|---|---|---|")
        for r in profiled:
            prof = r["profile"]
            share = "" if prof["busy_share"] is None else f"{100 * prof['busy_share']:.0f}%"
            parts = ", ".join(
                f"{c} {100 * t / prof['busy_s']:.0f}%" for c, t in prof["by_class_s"].items()
            )
            print(f"| {r['stage']} | {r['way']} | {share} | {parts} |")
    print(json.dumps(env))


if __name__ == "__main__":
    main()
