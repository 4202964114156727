"""The Chinese answer prompt, before and after, on the CPU, paired with the reproduction's own answers.

A reproduction's runs (docs/results.md) wrote their answers with an earlier wording: generation 0
by the base model, generation 1 by the model with generation 0's adapter. This script answers the
first COUNT questions of each of those two generations again, open book as the loop does (its
sampling, T 0.5, top-p 0.95, seed 0), with the wording now in selfevo.prompts, by the same model,
and prints beside the run's answers to the same questions (earlier wording): the median length in
characters (the eval set's reference answers' median is printed first), how many answers fill in
"条件：… 结果：…" as a form, and how many the clean-up drops.

    python benchmarks/zh_answer_prompt.py --model qwen2.5-coder-0.5b-instruct.gguf \\
        --runs .carry/runs --count 8
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from selfevo.config import GenerationConfig, LoraConfig, ModelConfig
from selfevo.data import load_eval, read_jsonl
from selfevo.generate import write_answers
from selfevo.models import add_lora, load_adapter_weights, load_model


ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--runs", type=Path, required=True, help="a reproduction's run folders (qwen-hard, and any run holding gen_0/adapter)")
ap.add_argument("--eval", default="../shared/data/AIOps_eval_data.json")
ap.add_argument("--count", type=int, default=8)
ap.add_argument("--max-new-tokens", type=int, default=256)
a = ap.parse_args()
torch.set_num_threads(2)
references = [len(r["reference"]) for r in load_eval(a.eval)]
print(f"eval set's reference answers: median {statistics.median(references):.0f} characters", flush=True)
base, tok = load_model(ModelConfig(name=a.model, dtype="float32"))
model = add_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), 0)  # fresh: B = 0
cfg = GenerationConfig(language="zh", answer_max_new_tokens=a.max_new_tokens, batch_size=a.count)
# generation 0 is shared by every replay mode; a run keeps only its latest adapter, so take any mode's
# copy (not a learning-rate probe's, which was trained at another rate)
gen0_adapter = next((d / "gen_0" / "adapter" for d in sorted(a.runs.glob("qwen-*")) if not d.name.startswith("qwen-lr-")
                     and (d / "gen_0" / "adapter").is_dir()), None)
if gen0_adapter is None:
    raise SystemExit(f"zh_answer_prompt: no run in {a.runs} holds gen_0/adapter")
cases = (
    ("base model", a.runs / "qwen-hard" / "gen_0", None),
    ("generation-0 adapter", a.runs / "qwen-hard" / "gen_1", gen0_adapter),
)
for who, folder, adapter in cases:
    if adapter is not None:
        load_adapter_weights(model, adapter)
    questions = [{k: r[k] for k in ("id", "fragment", "question")} for r in read_jsonl(folder / "questions.jsonl")[: a.count]]
    old = {r["id"]: r["answer"] for r in read_jsonl(folder / "answers.jsonl")}
    before = [len(old[q["id"]]) for q in questions if q["id"] in old]
    t = time.perf_counter()
    answers, drops = write_answers(model, tok, questions, cfg, 1024, 0)
    after = [len(r["answer"]) for r in answers]
    capped = sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) >= a.max_new_tokens - 2 for r in answers)
    forms = lambda texts: sum("条件：" in x and "结果：" in x for x in texts)
    print(f"== {who}, {len(questions)} questions of {folder.parent.name}/{folder.name}: median answer "
          f"{statistics.median(before):.0f} characters with the old wording (the run's answers; {forms(old[q['id']] for q in questions if q['id'] in old)} "
          f"filled in as a form), {statistics.median(after):.0f} with the new one (min {min(after)}, max {max(after)}; "
          f"{capped} at the {a.max_new_tokens}-token cap; {forms(r['answer'] for r in answers)} filled in as a form; "
          f"{drops['dropped']} dropped), {time.perf_counter() - t:.0f} s", flush=True)
    for q, r in zip(questions[:3], answers[:3]):
        print("   Q:", q["question"], "\n   old:", old.get(q["id"], "")[:200].replace("\n", " "),
              "\n   new:", r["answer"][:300].replace("\n", " "), flush=True)
