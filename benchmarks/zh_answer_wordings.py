"""Chinese answer-prompt wordings side by side on the CPU: the base model answers the same 8 questions
(numbers 16-23 of qwen-hard's generation 0) open book with each wording, with the loop's sampling
(T 0.5, top-p 0.95, at most 256 new tokens), and this prints the median answer length in characters,
how many answers fill in "条件：… 结果：…" as a form, and how many restate the instructions.

    python benchmarks/zh_answer_wordings.py run2 A B [--model GGUF] [--run .carry/runs/qwen-hard]

run2 is the second attempt's wording, B the one now in selfevo.prompts. Output of 2026-11-25:
benchmarks/results/zh_answer_wordings_cpu_2026-11-25.txt.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import selfevo.prompts as prompts
from selfevo.config import LoraConfig, ModelConfig
from selfevo.data import read_jsonl
from selfevo.generate import Sampling, generate_texts
from selfevo.models import add_lora, load_model

WORDINGS = {
    # the second attempt's (docs/results.md)
    "run2": "请根据下面的内部文档回答问题。\n\n文档：\n{fragment}\n\n问题：{question}\n\n请依据文档中的事实，用完整的句子回答：写出文档中与问题相关的操作步骤、条件和结果，不要添加文档中没有的内容。",
    # "answer in detail"
    "A": "请根据下面的内部文档回答问题。\n\n文档：\n{fragment}\n\n问题：{question}\n\n请只依据文档中的事实，用完整的句子详细回答这个问题，写清文档中与问题有关的操作步骤、参数、条件或结果。",
    # now selfevo.prompts.ANSWER_PROMPT["zh"]
    "B": "请根据下面的内部文档回答问题。\n\n文档：\n{fragment}\n\n问题：{question}\n\n请依据文档中的事实，用完整的句子回答，把文档中与问题相关的操作步骤、条件和结果都写出来，不要添加文档中没有的内容。",
}

ap = argparse.ArgumentParser()
ap.add_argument("wordings", nargs="+", choices=sorted(WORDINGS))
ap.add_argument("--model", default="/work/qwen/qwen2.5-coder-0.5b-instruct.gguf", help="the GGUF of ../shared/device/README.md")
ap.add_argument("--run", type=Path, default=Path(".carry/runs/qwen-hard"))
a = ap.parse_args()
torch.set_num_threads(2)
base, tok = load_model(ModelConfig(name=a.model, dtype="float32"))
model = add_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), 0)  # fresh: B = 0
questions = read_jsonl(a.run / "gen_0" / "questions.jsonl")[16:24]
for name in a.wordings:
    # answer_prompt and restates_instructions both read the wording from here
    prompts.ANSWER_PROMPT["zh"] = WORDINGS[name]
    texts = [prompts.answer_prompt(tok, q["fragment"], q["question"], "zh") for q in questions]
    t = time.perf_counter()
    raw = generate_texts(model, tok, texts, Sampling(256, True, 0.5, 0.95), batch_size=8, max_length=1024, seed=1)
    lengths = [len(x) for x in raw]
    forms = sum("条件：" in x and "结果：" in x for x in raw)
    echoes = sum(prompts.restates_instructions(x, "zh") for x in raw)
    print(f"{name}: median {statistics.median(lengths):.0f} chars (min {min(lengths)}, max {max(lengths)}), "
          f"forms {forms}, echoes {echoes}, {time.perf_counter() - t:.0f} s", flush=True)
    for x in raw[:3]:
        print("   ", x[:160].replace("\n", " "), flush=True)
