"""Stage 6: the model answers the eval questions closed book (or, for the ceiling, open book),
scored.

The seed's metrics (LLaMA-Factory's ComputeMetrics) score each pair, round to 4 decimals, and
average:
  BLEU-4  = nltk sentence_bleu over characters, SmoothingFunction().method3, x100;
  ROUGE-n = rouge_chinese F1 over jieba-segmented words, x100, 0 when either side is blank.
For English, the standard word-level metrics come beside them (evaluation.metrics): SacreBLEU (13a
tokens, over the corpus) and ROUGE-L F1 with Porter stemming (per pair), x100. Fact recall
(selfevo.facts) is scored in every language. docs/metrics.md says what each measures.
"""

from __future__ import annotations

import logging

import jieba
import lightning as L
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import ROUGEScore, SacreBLEUScore
from transformers import PreTrainedTokenizerBase

from selfevo.config import EvalConfig
from selfevo.facts import FactRecall, fact_recall
from selfevo.faults import kill_point
from selfevo.generate import Generator
from selfevo.hardware import halving_batch_on_oom
from selfevo.prompts import Language, Prompts, answer_prompt, closed_book_prompt
from selfevo.ranks import gather_in_order, share
from selfevo.sampling import Sampling, batch_seed

jieba.setLogLevel(logging.WARNING)
ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
_SMOOTHING = SmoothingFunction().method3


def bleu4(prediction: str, reference: str) -> float:
    """Character-level sentence BLEU-4, NIST geometric smoothing, x100, rounded as the seed did."""
    return round(
        sentence_bleu([list(reference)], list(prediction), smoothing_function=_SMOOTHING) * 100, 4
    )


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 over jieba words, x100, rounded as the seed did; 0 when either side is
    blank."""
    hypothesis = " ".join(jieba.cut(prediction))
    ref = " ".join(jieba.cut(reference))
    if not hypothesis.split() or not ref.split():
        return {k: 0.0 for k in ROUGE_KEYS}
    scores = Rouge().get_scores(hypothesis, ref)[0]
    return {k: round(scores[k]["f"] * 100, 4) for k in ROUGE_KEYS}


class SeedBLEU4(Metric):
    """Mean of per-pair seed-style BLEU-4."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        self.add_scores([bleu4(p, r) for p, r in zip(predictions, references, strict=True)])

    def add_scores(self, scores: list[float]) -> None:
        """Pairs already scored by `bleu4` (score_answers keeps them per pair too)."""
        for score in scores:
            self.total += score
            self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


class SeedROUGE(Metric):
    """Means of per-pair seed-style ROUGE-1, ROUGE-2 and ROUGE-L F1."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        self.add_scores([rouge(p, r) for p, r in zip(predictions, references, strict=True)])

    def add_scores(self, scores: list[dict[str, float]]) -> None:
        """Pairs already scored by `rouge` (score_answers keeps them per pair too)."""
        for pair in scores:
            self.total += torch.tensor(
                [pair[k] for k in ROUGE_KEYS], dtype=torch.float64, device=self.total.device
            )
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.total / self.count.clamp(min=1)
        return dict(zip(ROUGE_KEYS, mean))


class Evaluator(L.LightningModule):
    """`trainer.test`: answer this rank's share of the eval questions with the generator's model.

    The scores come after, from every rank's answers (evaluate_model): a rank whose share is empty
    (fewer batches than ranks) skips Lightning's test loop, so nothing in the loop may wait on the
    other ranks.
    """

    def __init__(self, generator: Generator, cfg: EvalConfig, seed: int = 0):
        super().__init__()
        self.generator = generator
        if generator.module is not None:
            self.model = generator.module  # a submodule: Lightning places it on the stage's device
        self.sampling = Sampling(
            cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k
        )
        self.seed = seed
        self.predictions: dict[int, str] = {}
        # Lightning refuses a rank with no batch unless told that this is intended.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def test_step(self, batch: dict, batch_idx: int) -> None:
        # seeded by the batch's number in the whole plan, the same on any number of ranks
        answers = self.generator.generate_batch(
            batch["prompt"], self.sampling, batch_seed(self.seed, batch["number"])
        )
        self.predictions.update(zip(batch["index"], (a.strip() for a in answers)))
        kill_point("evaluate")


def metric_set(cfg: EvalConfig, language: Language) -> str:
    """The metrics evaluation.metrics chooses: auto = the seed's, and for English the word-level
    too."""
    if cfg.metrics != "auto":
        return cfg.metrics
    return "seed+word" if language == "en" else "seed"


def rouge_l_stemmed(prediction: str, reference: str) -> float:
    """Word-level ROUGE-L F1 with Porter stemming (torchmetrics, as rouge-score computes it),
    x100."""
    scores = rouge_score(prediction, reference, use_stemmer=True, rouge_keys="rougeL")
    return round(float(scores["rougeL_fmeasure"]) * 100, 4)


def score_answers(
    answers: list[str], records: list[dict], language: Language, metrics: str = "seed"
) -> tuple[dict[str, float], list[dict]]:
    """(means, per-pair scores) of answers to `records` ({"question", "reference", ...}), in order.

    The means are the torchmetrics metrics updated with every answer in eval-set order, rounded to 4
    decimals: every rank holds all the answers and computes the same sums in the same order, so no
    rank waits on another (sync_on_compute off) and the means are the same bits on any number of
    ranks. `fact-recall-scored` counts the references that hold a fact (fact-recall's pairs); a pair
    whose reference holds none has fact-recall None.
    """
    references = [r["reference"] for r in records]
    questions = [r["question"] for r in records]
    # Each pair is scored once (character BLEU and jieba ROUGE are the costly part); the metrics
    # sum the same per-pair scores.
    pairs = [
        {
            "bleu-4": bleu4(a, r),
            **rouge(a, r),
            "fact-recall": _percent(fact_recall(a, r, q, language)),
        }
        for a, r, q in zip(answers, references, questions, strict=True)
    ]
    bleu, seed_rouge = SeedBLEU4(sync_on_compute=False), SeedROUGE(sync_on_compute=False)
    facts = FactRecall(language, sync_on_compute=False)
    bleu.add_scores([p["bleu-4"] for p in pairs])
    seed_rouge.add_scores(pairs)
    facts.update(answers, references, questions)
    means = {"bleu-4": bleu.compute(), **seed_rouge.compute(), "fact-recall": facts.compute()}
    if metrics == "seed+word":
        sacrebleu = SacreBLEUScore(tokenize="13a", sync_on_compute=False)
        word_rouge = ROUGEScore(use_stemmer=True, rouge_keys="rougeL", sync_on_compute=False)
        sacrebleu.update(answers, [[r] for r in references])
        word_rouge.update(answers, references)
        means["sacrebleu"] = sacrebleu.compute() * 100  # a corpus score: no per-pair value
        means["rouge-l-stem"] = word_rouge.compute()["rougeL_fmeasure"] * 100
        for pair, a, r in zip(pairs, answers, references):
            pair["rouge-l-stem"] = rouge_l_stemmed(a, r)
    out = {k: round(float(v), 4) for k, v in means.items()}
    out["fact-recall-scored"] = facts.scored
    return out, pairs


def _percent(share: float | None) -> float | None:
    return None if share is None else round(share * 100, 4)


def eval_prompt(
    tokenizer: PreTrainedTokenizerBase, record: dict, prompts: Prompts, open_book: bool
) -> str:
    """Closed book: the question in the closed-book prompt, as in training. Open book (the
    ceiling): the fragment and the question in the answer prompt that wrote the training answers,
    so the ceiling is what the loop's own teacher answers with the document in view."""
    if open_book:
        return answer_prompt(tokenizer, record["fragment"], record["question"], prompts)
    return closed_book_prompt(tokenizer, record["question"], prompts.closed_book)


def evaluate_model(
    generator: Generator,
    eval_set: list[dict],
    cfg: EvalConfig,
    trainer: L.Trainer,
    seed: int = 0,
    *,
    prompts: Prompts,
    open_book: bool = False,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, predictions) of the generator's model (set with `use_adapter` before) on the eval
    set, closed book or open book, with the same decoding and cap either way; asked in `prompts`
    (the run's, prompts_for), scored in prompts.language."""
    records = eval_set[: cfg.limit] if cfg.limit else eval_set
    items = [
        {
            "index": i,
            "prompt": eval_prompt(generator.tokenizer, r, prompts, open_book),
            "reference": r["reference"],
        }
        for i, r in enumerate(records)
    ]
    items.sort(key=lambda it: -len(it["prompt"]))  # similar lengths share a batch

    def run(size: int) -> Evaluator:
        batches = [
            {
                "number": b,
                **{
                    k: [it[k] for it in items[s : s + size]]
                    for k in ("index", "prompt", "reference")
                },
            }
            for b, s in enumerate(range(0, len(items), size))
        ]
        # This rank's share of the batches (all of them on one device; none where there are fewer
        # batches than ranks).
        loader = DataLoader(
            share(batches, trainer.strategy), batch_size=None, collate_fn=lambda b: b
        )
        evaluator = Evaluator(generator, cfg, seed)
        trainer.test(evaluator, dataloaders=loader, verbose=False)
        return evaluator

    evaluator = halving_batch_on_oom(run, cfg.batch_size, "evaluation")
    answers = gather_in_order(evaluator.predictions, len(records), trainer.strategy, "evaluation")
    metrics, scores = score_answers(
        answers, records, prompts.language, metric_set(cfg, prompts.language)
    )
    predictions = [{**r, "prediction": a, **pair} for r, a, pair in zip(records, answers, scores)]
    return metrics, predictions
