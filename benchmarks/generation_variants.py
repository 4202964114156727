"""Which way of generating with Hugging Face transformers is fastest here? One run, side by side.

    python benchmarks/generation_variants.py --model smollm2.gguf --prompts 512 --out gen_variants.json

Every way generates for the same AIOps question prompts (Chinese, as the loop writes them) with the
model wrapped in a LoRA adapter, as the loop's model is, sampling as the loop does (T=0.5,
top-p 0.95) up to --new-tokens new tokens. Ways:
  dynamic   selfevo's generate_texts as it is: length-sorted left-padded batches, DynamicCache;
  static    the same batches through generate(cache_implementation="static"), which transformers
            compiles (the first batch pays for compilation; reported apart);
  continuous  transformers' continuous batching (model.generate_batch, paged attention);
and a torch.profiler summary of a few decode steps of `dynamic`, to see what bounds a step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from selfevo.config import LoraConfig, ModelConfig
from selfevo.generate import Sampling, generate_texts
from selfevo.models import add_lora, load_model
from selfevo.prompts import question_prompt
from stage_speed import SHARED, sync, timed  # beside this script

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def new_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def way_dynamic(model, tokenizer, prompts, sampling, batch_size):
    return generate_texts(model, tokenizer, prompts, sampling, batch_size=batch_size, max_length=2048, seed=0)


def way_static(model, tokenizer, prompts, sampling, batch_size):
    """selfevo's generate_texts with the model's generation config asking for a static cache."""
    config = model.get_base_model().generation_config
    config.cache_implementation = "static"
    try:
        return way_dynamic(model, tokenizer, prompts, sampling, batch_size)
    finally:
        config.cache_implementation = None


def way_continuous(model, tokenizer, prompts, sampling, batch_size):
    from transformers import GenerationConfig

    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    gc = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=True, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=None, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    res = model.generate_batch(ids, generation_config=gc)
    outs = list(res.values())
    by_prompt = {tuple(o.prompt_ids): o.generated_tokens for o in outs}
    return [tokenizer.decode(by_prompt.get(tuple(i), []), skip_special_tokens=True) for i in ids]


def profile_decode(model, tokenizer, prompts, batch_size) -> str:
    from torch.profiler import ProfilerActivity, profile

    enc = tokenizer(prompts[:batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=True, pad_token_id=tokenizer.pad_token_id)
        sync()
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=2, do_sample=True, pad_token_id=tokenizer.pad_token_id)
        sync()
        t2 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=18, do_sample=True, pad_token_id=tokenizer.pad_token_id)
        sync()
        t18 = time.perf_counter() - t
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])) as prof:
            model.generate(**enc, max_new_tokens=10, do_sample=True, pad_token_id=tokenizer.pad_token_id)
            sync()
    per_step = (t18 - t2) / 16
    table = prof.key_averages().table(sort_by="cuda_time_total" if DEVICE == "cuda" else "cpu_time_total", row_limit=18, max_name_column_width=60)
    return f"batch {batch_size}: prefill+2 steps {t2:.3f}s, one decode step {per_step * 1000:.1f} ms\n{table}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--ways", nargs="+", default=["dynamic:512", "static:256", "static:512", "continuous:0"])
    p.add_argument("--profile-batch", type=int, default=512)
    p.add_argument("--out", default="")
    args = p.parse_args()

    base, tokenizer = load_model(ModelConfig(name=args.model))
    model = add_lora(base, LoraConfig(), seed=0).to(DEVICE).eval()
    fragments = [r["instruction"] for r in json.loads((SHARED / "data" / "AIOps_data.json").read_text("utf-8"))]
    prompts = [question_prompt(tokenizer, f, "zh") for f in dict.fromkeys(fragments)][: args.prompts]
    prompt_tokens = sum(len(i) for i in tokenizer(prompts, add_special_tokens=False)["input_ids"])
    sampling = Sampling(args.new_tokens, True, 0.5, 0.95)
    ways = {"dynamic": way_dynamic, "static": way_static, "continuous": way_continuous}
    rows = []
    if args.profile_batch:
        try:
            print(profile_decode(model, tokenizer, prompts, args.profile_batch), flush=True)
        except Exception:
            traceback.print_exc()
    for spec in args.ways:
        name, bs = spec.split(":")
        fn = ways[name]
        try:
            # The first call on a quarter of the prompts warms up (and compiles, for static).
            _, warm = timed(lambda: fn(model, tokenizer, prompts[: max(int(bs), 1)], sampling, int(bs)))
            texts, secs = timed(lambda: fn(model, tokenizer, prompts, sampling, int(bs)))
            n = new_tokens(tokenizer, texts)
            row = {"way": name, "batch": int(bs), "prompts": len(prompts), "prompt_tokens": prompt_tokens,
                   "warmup_s": warm, "seconds": secs, "new_tokens": n, "new_tokens_per_s": n / secs,
                   "sample": texts[0][:80]}
        except Exception as e:
            traceback.print_exc()
            row = {"way": name, "batch": int(bs), "error": repr(e)[:300]}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    env = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv)}
    print("\n| way | batch | seconds | new tok/s | warm-up s |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['way']} | {r['batch']} | error | {r['error'][:60]} | |")
        else:
            print(f"| {r['way']} | {r['batch']} | {r['seconds']:.1f} | {r['new_tokens_per_s']:,.0f} | {r['warmup_s']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
