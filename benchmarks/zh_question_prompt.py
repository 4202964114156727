"""The Chinese question prompt, before and after, on the CPU: Qwen2.5-Coder-0.5B-Instruct writes one
question per AIOps eval fragment with each wording (the loop's sampling, T 0.5, top-p 0.95, seed 0),
and the share that are questions is counted (a line ending in a question mark).

    python benchmarks/zh_question_prompt.py --model qwen2.5-coder-0.5b-instruct.gguf --first 11 --count 8
"""

import argparse
import time

import torch

import selfevo.prompts as prompts
from selfevo.config import GenerationConfig, ModelConfig
from selfevo.data import load_eval
from selfevo.generate import write_questions
from selfevo.models import load_model

BEFORE = (
    "请阅读下面这段文字：\n\n{fragment}\n\n"
    "请根据这段文档提出一个具体的问题，要求这段文档能够回答它。问题在不看文档时也要能看懂，"
    "所以请写明它涉及的产品或主题。只输出这个问题。"
)

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--eval", default="../shared/data/AIOps_eval_data.json")
ap.add_argument("--first", type=int, default=11)
ap.add_argument("--count", type=int, default=8)
a = ap.parse_args()
torch.set_num_threads(2)
model, tok = load_model(ModelConfig(name=a.model, dtype="float32"))
fragments = [r["fragment"] for r in load_eval(a.eval)[a.first : a.first + a.count]]
cfg = GenerationConfig(language="zh", question_max_new_tokens=48, batch_size=len(fragments))
for label, wording in (("before", BEFORE), ("after (selfevo.prompts now)", prompts.QUESTION_PROMPT["zh"])):
    prompts.QUESTION_PROMPT["zh"] = wording
    t = time.perf_counter()
    records, dropped = write_questions(model, tok, fragments, cfg, 1024, 0)
    questions = [r["question"] for r in records]
    n = sum(q.rstrip().endswith(("?", "？")) for q in questions)
    print(f"== {label}: {n} of {len(fragments)} are questions ({dropped} dropped), {time.perf_counter() - t:.0f} s", flush=True)
    for q in questions:
        print("  ", q, flush=True)
