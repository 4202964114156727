"""Stage 1-2: the current model writes questions about every fragment, then a model answers them
open book.

What writes is a `Generator`, chosen once per run by `make_generator`: `HFGenerator` (Hugging Face
`generate`: batched, length-sorted, left-padded, the adapter active and never merged) or
`selfevo.vllm_engine.VLLMEngine` (vLLM's offline engine). Both are seeded per batch from
selfevo.sampling, so a run reproduces; the prompts and the clean-up here serve both.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Optional, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import GenerationConfig, ModelConfig
from selfevo.faults import kill_point
from selfevo.hardware import halving_batch_on_oom
from selfevo.log import progress
from selfevo.models import adapter_switched, load_adapter_weights, resolve_model
from selfevo.prompts import (
    Prompts,
    answer_fault,
    answer_prompt,
    clean_answer,
    clean_question,
    fact_question_prompt,
    fact_sentences,
    filter_questions,
    question_prompt,
)
from selfevo.ranks import Strategy, gather_in_order, share
from selfevo.sampling import Sampling, answers_seed, batch_seed, prompt_limit, warn_if_cut

log = logging.getLogger(__name__)

# An answer may be given word for word to this many questions (two questions on one topic can share
# it).
MAX_SAME_ANSWER = 2


class Generator(Protocol):
    """What turns prompts into texts: the model of one adapter (or of none: the base model)."""

    tokenizer: PreTrainedTokenizerBase
    max_length: int
    module: Optional[torch.nn.Module]
    """The model a Lightning stage should place on its device (None: the backend places its own)."""

    def use_adapter(self, adapter: Optional[Path]) -> None:
        """Generate with this saved PEFT adapter from now on; None: with the base model alone."""

    def generate_batch(self, prompts: list[str], sampling: Sampling, seed: int) -> list[str]:
        """One batch, its draws seeded by `seed`; only the new text, special tokens removed."""

    def generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        *,
        seed: int,
        batch_size: int,
        description: str,
        strategy: Strategy | None = None,
    ) -> list[str]:
        """A whole stage's prompts, outputs in input order; with a strategy of several ranks, each
        rank generates its share and every rank gets all the outputs."""

    def close(self) -> None:
        """Free what the generator holds beyond the model (the vLLM engine's memory)."""


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    sampling: Sampling,
    max_length: int,
) -> list[str]:
    """Continue each prompt with Hugging Face `generate`; return only the new text, special tokens
    removed."""
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


class HFGenerator:
    """Hugging Face `generate` over the model in memory (a PEFT model, or a plain one).

    `use_adapter(path)` loads that saved adapter's weights into the model's LoRA layers (once per
    path); `use_adapter(None)` generates with the adapter switched off, as the base model.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int):
        self.model = self.module = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.adapter_on = True
        self.loaded: Optional[Path] = None

    def use_adapter(self, adapter: Optional[Path]) -> None:
        self.adapter_on = adapter is not None
        if adapter is not None and adapter != self.loaded:
            load_adapter_weights(self.model, adapter)
            self.loaded = adapter

    def generate_batch(self, prompts: list[str], sampling: Sampling, seed: int) -> list[str]:
        torch.manual_seed(seed)
        with adapter_switched(self.model, self.adapter_on):
            return generate_batch(self.model, self.tokenizer, prompts, sampling, self.max_length)

    def generate(
        self,
        prompts: list[str],
        sampling: Sampling,
        *,
        seed: int,
        batch_size: int,
        description: str = "generating",
        strategy: Strategy | None = None,
    ) -> list[str]:
        if not prompts:  # every question of a stage dropped: nothing to answer (on every rank)
            return []
        lengths = [
            len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        ]
        warn_if_cut(lengths, prompt_limit(sampling, self.max_length))
        order = sorted(
            range(len(prompts)), key=lambda i: -lengths[i]
        )  # longest first: OOM shows early
        was_training = self.model.training
        self.model.eval()

        def run(size: int) -> dict[int, str]:
            batches = share(
                list(enumerate(order[s : s + size] for s in range(0, len(order), size))), strategy
            )
            outputs: dict[int, str] = {}
            with progress(description, sum(len(idx) for _, idx in batches)) as advance:
                for b, idx in batches:
                    texts = self.generate_batch(
                        [prompts[i] for i in idx], sampling, batch_seed(seed, b)
                    )
                    outputs.update(zip(idx, texts))
                    advance(len(idx))
                    kill_point("generate")
            return outputs

        try:
            mine = halving_batch_on_oom(run, batch_size, description)
        finally:
            self.model.train(was_training)
        return gather_in_order(mine, len(prompts), strategy, description)

    def close(self) -> None:
        pass  # the model is the run's, not the generator's


def resolve_backend(backend: str, quantization: str = "none", ranks: int = 1) -> str:
    """generation.backend auto: vllm where vLLM imports and a GPU is there, for one rank and an
    unquantized base (vLLM would serve a 4-bit model's adapter on the unquantized weights); else
    hf. An explicit hf or vllm is kept as it is."""
    if backend != "auto":
        return backend
    if quantization != "none" or ranks > 1 or not torch.cuda.is_available():
        return "hf"
    try:
        import vllm  # noqa: F401  (a broken install falls back too, and says so)
    except Exception as err:  # vLLM raises more than ImportError when its build does not fit
        log.info("generation.backend auto: Hugging Face generate (vLLM does not import: %s)", err)
        return "hf"
    return "vllm"


def make_generator(
    backend: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_cfg: ModelConfig,
    generation: GenerationConfig,
    lora_r: int,
    seed: int,
    eval_max_new_tokens: int,
) -> Generator:
    """The run's generator, chosen once: the Hugging Face model in memory (hf), or a vLLM engine
    over the same base model that serves each generation's saved adapter (vllm)."""
    if backend == "hf":
        return HFGenerator(model, tokenizer, model_cfg.max_length)
    from selfevo.vllm_engine import VLLMEngine  # vLLM is an optional extra

    folder = resolve_model(model_cfg.name, model_cfg.trust_remote_code, model_cfg.revision)
    return VLLMEngine(folder, tokenizer, model_cfg, generation, lora_r, seed, eval_max_new_tokens)


Unit = tuple[int, int]  # (fragment id, sentence number): what a question is asked about


def plan_questions(
    fragments: list[str],
    cfg: GenerationConfig,
    asked: Counter[Unit],
    missed: set[Unit],
    seed: int,
    held_out: set[tuple[int, int | None]] = frozenset(),
) -> list[dict]:
    """What this generation asks, one record per question to write: {"id": fragment id, "fragment"}
    and, with question_focus sentence, {"unit": sentence number, "focus": sentence}.

    Nothing is asked about what `held_out` names, (fragment id, sentence number) or (fragment id,
    None) for a whole fragment: the dev split's, which no generation may train on.

    A fragment gets questions about questions_per_fragment of its sentences: first the sentences
    the last check found unknown (`missed`), then those asked least often so far (`asked`), ties
    broken by a shuffle seeded by `seed`. Each chosen sentence is asked `phrasings` times, a missed
    one once more, so that its fact comes back in new wordings. With question_focus fragment, the
    whole fragment questions_per_fragment x phrasings times.
    """
    rng = random.Random(seed)
    plan: list[dict] = []
    for fid, fragment in enumerate(fragments):
        if cfg.question_focus == "fragment":
            if (fid, None) not in held_out:
                plan += [{"id": fid, "fragment": fragment}] * (
                    cfg.questions_per_fragment * cfg.phrasings
                )
            continue
        sentences = fact_sentences(fragment, cfg.language)
        # drawn for every sentence, held out or not: a seed's plan stays the same
        draws = [rng.random() for _ in sentences]
        order = sorted(
            (k for k in range(len(sentences)) if (fid, k) not in held_out),
            key=lambda k: (
                (fid, k) not in missed,
                asked[(fid, k)],
                draws[k],
            ),
        )
        for k in sorted(order[: cfg.questions_per_fragment]):
            record = {"id": fid, "fragment": fragment, "unit": k, "focus": sentences[k]}
            plan += [record] * (cfg.phrasings + ((fid, k) in missed))
    return plan


def write_questions(
    generator: Generator,
    fragments: list[str],
    cfg: GenerationConfig,
    seed: int,
    strategy: Strategy | None = None,
    *,
    asked: Counter[Unit] | None = None,
    missed: set[Unit] | None = None,
    asked_before: set[str] | None = None,
    held_out: set[tuple[int, int | None]] = frozenset(),
    prompts: Prompts,
) -> tuple[list[dict], dict]:
    """The questions of a generation, as `plan_questions` plans them from what earlier generations
    asked (`asked`, and word for word `asked_before`) and missed, none about `held_out` (the dev
    split's sentences or fragments); returns the kept records
    ({"id", "fragment", "question"}, with "unit" and "focus" per sentence) and the counts: planned,
    targeted (about a missed sentence), unreadable (no question in the reply) and, with
    cfg.question_filters, what `filter_questions` dropped. `prompts`: the run's (prompts_for)."""
    missed = missed or set()
    plan = plan_questions(fragments, cfg, asked or Counter(), missed, seed, held_out)
    texts = [
        fact_question_prompt(r["focus"], prompts)
        if "focus" in r
        else question_prompt(generator.tokenizer, r["fragment"], prompts)
        for r in plan
    ]
    sampling = Sampling(cfg.question_max_new_tokens, True, cfg.temperature, cfg.top_p)
    raw = generator.generate(
        texts,
        sampling,
        seed=seed,
        batch_size=cfg.batch_size,
        description="writing questions",
        strategy=strategy,
    )
    records = []
    for r, text in zip(plan, raw):
        # After the examples' pattern the model goes on with a "Sentence:" of its own: the question
        # is its first line.
        question = clean_question(text.strip().split("\n", 1)[0] if "focus" in r else text)
        if question is not None:
            records.append({**r, "question": question})
    counts = {
        "planned": len(plan),
        "targeted": sum((r["id"], r.get("unit")) in missed for r in plan),
        "unreadable": len(plan) - len(records),
    }
    if cfg.question_filters:
        records, drops = filter_questions(records, fragments, asked_before or set(), prompts)
        counts.update(drops)
    return records, {"kept": len(records), **counts}


def write_answers(
    generator: Generator,
    questions: list[dict],
    cfg: GenerationConfig,
    seed: int,
    strategy: Strategy | None = None,
    *,
    prompts: Prompts,
) -> tuple[list[dict], dict]:
    """Answer each question open book (fragment in the prompt, `prompts.answer`); returns the kept
    QA pairs and what `pair_answers` counts of the dropped ones. `seed` is the questions' (the
    answers draw their own)."""
    texts = [
        answer_prompt(generator.tokenizer, r["fragment"], r["question"], prompts) for r in questions
    ]
    sampling = Sampling(cfg.answer_max_new_tokens, True, cfg.temperature, cfg.top_p)
    raw = generator.generate(
        texts,
        sampling,
        seed=answers_seed(seed),
        batch_size=cfg.batch_size,
        description="writing answers",
        strategy=strategy,
    )
    return pair_answers(questions, raw, prompts, cfg.standalone_answers)


def pair_answers(
    questions: list[dict],
    replies: list[str],
    prompts: Prompts,
    standalone: bool = False,
) -> tuple[list[dict], dict]:
    """The QA pairs worth keeping, each question with its cleaned reply; and how many were dropped
    and why ("looping", "restating" the answer prompt of `prompts`, "echoing", "refers_to_source"
    where answers must stand alone, "repeated"), with how often the commonest reply was given,
    dropped or not."""
    answers = [clean_answer(text) for text in replies]
    faults = [
        answer_fault(a, prompts, standalone, r["question"]) for r, a in zip(questions, answers)
    ]
    # One reply given word for word to several different questions answers none of them: it is what
    # a collapsing model writes (a stock sentence, 7 answers of generation 1 and 288 of generation
    # 2 in docs/results.md's second attempt), and training on it spreads it.
    given = Counter(a for a, f in zip(answers, faults) if f != "looping")  # not the empty replies
    records = [
        {**r, "answer": a}
        for r, a, f in zip(questions, answers, faults)
        if f is None and given[a] <= MAX_SAME_ANSWER
    ]
    stats = {
        "dropped": len(questions) - len(records),
        "looping": faults.count("looping"),
        "restating": faults.count("restating"),
        "echoing": faults.count("echoing"),
        "refers_to_source": faults.count("refers_to_source"),
        "repeated": faults.count(None) - len(records),
        "commonest_given": max(given.values(), default=0),
    }
    return records, stats
