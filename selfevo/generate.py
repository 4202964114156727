"""Stage 1-2: the current model writes a question for every fragment, then answers it open book.

Hugging Face backend: batched, length-sorted, left-padded `generate` with the adapter active
(never merged). Each batch is seeded from (seed, batch index), so a run reproduces. The vLLM
backend (`selfevo.vllm_engine.VLLMEngine`, passed where the model goes) is dispatched to in
`generate_texts`; the prompts and the clean-up here serve both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import Progress
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import GenerationConfig
from selfevo.faults import kill_point
from selfevo.models import halving_batch_on_oom
from selfevo.prompts import Language, answer_fault, answer_prompt, clean_answer, clean_question, question_prompt
from selfevo.ranks import Strategy, gather_in_order, share

if TYPE_CHECKING:
    from selfevo.vllm_engine import VLLMEngine


console = Console(stderr=True)

# An answer may be given word for word to this many questions (two questions on one topic can share it).
MAX_SAME_ANSWER = 2


@dataclass
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut


def prompt_limit(sampling: Sampling, max_length: int) -> int:
    """Prompt tokens that fit before the new tokens within max_length."""
    return max(8, max_length - sampling.max_new_tokens)


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: Sampling,
    max_length: int,
) -> list[str]:
    """Continue each prompt; return only the new text, special tokens removed."""
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=prompt_limit(sampling, max_length),
        add_special_tokens=False,
    ).to(model.device)
    kwargs = {"do_sample": sampling.do_sample}
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_texts(
    model: PreTrainedModel | VLLMEngine,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: Sampling,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    description: str = "generating",
    strategy: Strategy | None = None,
) -> list[str]:
    """Generate for many prompts in length-sorted batches; outputs come back in input order.

    With a strategy of several ranks, each rank generates its share of the batches (batch b still
    seeded from (seed, b), so the texts are one device's) and every rank gets all the outputs.
    """
    from selfevo.vllm_engine import VLLMEngine  # here, not above: that module imports this one

    if isinstance(model, VLLMEngine):  # the vLLM backend batches and schedules by itself
        return model.generate(tokenizer, prompts, sampling, max_length=max_length, seed=seed)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    too_long = sum(n > prompt_limit(sampling, max_length) for n in lengths)
    if too_long:
        console.print(
            f"[yellow]warning: {too_long} of {len(prompts)} prompts exceed {prompt_limit(sampling, max_length)} "
            f"tokens (model.max_length {max_length} minus new tokens) and were cut from the left[/]"
        )
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: OOM shows early
    was_training = model.training
    model.eval()

    def run(size: int) -> dict[int, str]:
        batches = share(list(enumerate(order[s : s + size] for s in range(0, len(order), size))), strategy)
        outputs: dict[int, str] = {}
        with Progress(transient=True, console=console) as progress:
            task = progress.add_task(description, total=sum(len(idx) for _, idx in batches))
            for b, idx in batches:
                torch.manual_seed(seed * 100_003 + b)
                texts = generate_batch(model, tokenizer, [prompts[i] for i in idx], sampling, max_length)
                outputs.update(zip(idx, texts))
                progress.advance(task, len(idx))
                kill_point("generate")
        return outputs

    try:
        mine = halving_batch_on_oom(run, batch_size, description)
    finally:
        model.train(was_training)
    return gather_in_order(mine, len(prompts), strategy, description)


def write_questions(
    model: PreTrainedModel | VLLMEngine,
    tokenizer: PreTrainedTokenizerBase,
    fragments: list[str],
    cfg: GenerationConfig,
    max_length: int,
    seed: int,
    strategy: Strategy | None = None,
) -> tuple[list[dict], int]:
    """One question per fragment; returns the kept records and the number dropped."""
    prompts = [question_prompt(tokenizer, f, cfg.language) for f in fragments]
    sampling = Sampling(cfg.question_max_new_tokens, True, cfg.temperature, cfg.top_p)
    raw = generate_texts(
        model, tokenizer, prompts, sampling, batch_size=cfg.batch_size, max_length=max_length, seed=seed,
        description="writing questions", strategy=strategy,
    )
    records = []
    for i, (fragment, text) in enumerate(zip(fragments, raw)):
        question = clean_question(text)
        if question is not None:
            records.append({"id": i, "fragment": fragment, "question": question})
    return records, len(fragments) - len(records)


def write_answers(
    model: PreTrainedModel | VLLMEngine,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[dict],
    cfg: GenerationConfig,
    max_length: int,
    seed: int,
    strategy: Strategy | None = None,
) -> tuple[list[dict], dict]:
    """Answer each question open book (fragment in the prompt); returns the kept QA pairs and what
    `pair_answers` counts of the dropped ones."""
    prompts = [answer_prompt(tokenizer, r["fragment"], r["question"], cfg.language) for r in questions]
    sampling = Sampling(cfg.answer_max_new_tokens, True, cfg.temperature, cfg.top_p)
    raw = generate_texts(
        model, tokenizer, prompts, sampling, batch_size=cfg.batch_size, max_length=max_length, seed=seed + 1,
        description="writing answers", strategy=strategy,
    )
    return pair_answers(questions, raw, cfg.language)


def pair_answers(questions: list[dict], replies: list[str], language: Language) -> tuple[list[dict], dict]:
    """The QA pairs worth keeping, each question with its cleaned reply; and how many were dropped and
    why ("looping", "restating", "repeated"), with how often the commonest reply was given, dropped or not."""
    answers = [clean_answer(text) for text in replies]
    faults = [answer_fault(a, language) for a in answers]
    # One reply given word for word to several different questions answers none of them: it is what a
    # collapsing model writes (a stock sentence, 7 answers of generation 1 and 288 of generation 2 in
    # docs/results.md's second attempt), and training on it spreads it.
    given = Counter(a for a, f in zip(answers, faults) if f != "looping")  # not the empty replies
    records = [
        {**r, "answer": a} for r, a, f in zip(questions, answers, faults) if f is None and given[a] <= MAX_SAME_ANSWER
    ]
    stats = {
        "dropped": len(questions) - len(records),
        "looping": faults.count("looping"),
        "restating": faults.count("restating"),
        "repeated": faults.count(None) - len(records),
        "commonest_given": max(given.values(), default=0),
    }
    return records, stats
