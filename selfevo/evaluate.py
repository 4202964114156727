"""Stage 6: the model answers the eval questions closed book; BLEU-4 and ROUGE as the seed computed them.

The seed (LLaMA-Factory's ComputeMetrics) scores each pair, rounds to 4 decimals, and averages:
  BLEU-4  = nltk sentence_bleu over characters, SmoothingFunction().method3, x100;
  ROUGE-n = rouge_chinese F1 over jieba-segmented words, x100, 0 when either side is blank.
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
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import EvalConfig
from selfevo.faults import kill_point
from selfevo.generate import Sampling, generate_batch
from selfevo.models import adapter_switched, halving_batch_on_oom
from selfevo.prompts import closed_book_prompt
from selfevo.ranks import gather_in_order, share
from selfevo.vllm_engine import VLLMEngine

jieba.setLogLevel(logging.WARNING)
ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
_SMOOTHING = SmoothingFunction().method3


def bleu4(prediction: str, reference: str) -> float:
    """Character-level sentence BLEU-4, NIST geometric smoothing, x100, rounded as the seed did."""
    return round(sentence_bleu([list(reference)], list(prediction), smoothing_function=_SMOOTHING) * 100, 4)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 over jieba words, x100, rounded as the seed did; 0 when either side is blank."""
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
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        for p, r in zip(predictions, references, strict=True):
            self.total += bleu4(p, r)
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
        for p, r in zip(predictions, references, strict=True):
            scores = rouge(p, r)
            self.total += torch.tensor([scores[k] for k in ROUGE_KEYS], dtype=torch.float64, device=self.total.device)
            self.count += 1

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.total / self.count.clamp(min=1)
        return dict(zip(ROUGE_KEYS, mean))


class Evaluator(L.LightningModule):
    """`trainer.test`: answer this rank's share of the eval questions closed book.

    The scores come after, from every rank's answers (evaluate_model): a rank whose share is empty
    (fewer batches than ranks) skips Lightning's test loop, so nothing in the loop may wait on the
    other ranks.
    """

    def __init__(
        self,
        model: PreTrainedModel | VLLMEngine,
        tokenizer: PreTrainedTokenizerBase,
        cfg: EvalConfig,
        max_length: int,
        seed: int = 0,
        use_adapter: bool = True,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.max_length = max_length
        self.seed = seed
        self.use_adapter = use_adapter
        self.predictions: dict[int, str] = {}
        # Lightning refuses a rank with no batch unless told that this is intended.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def _answer(self, prompts: list[str], number: int) -> list[str]:
        cfg = self.cfg
        sampling = Sampling(cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.top_k)
        seed = self.seed * 100_003 + number  # the batch's number in the whole plan, on any number of ranks
        if isinstance(self.model, VLLMEngine):  # the vllm backend answers with the adapter it serves
            return self.model.generate(self.tokenizer, prompts, sampling, max_length=self.max_length, seed=seed)
        torch.manual_seed(seed)
        return generate_batch(self.model, self.tokenizer, prompts, sampling, self.max_length)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        with adapter_switched(self.model, self.use_adapter):
            answers = self._answer(batch["prompt"], batch["number"])
        self.predictions.update(zip(batch["index"], (a.strip() for a in answers)))
        kill_point("evaluate")


def score_answers(answers: list[str], references: list[str]) -> dict[str, float]:
    """The means of the whole eval set, rounded to 4 decimals: SeedBLEU4 and SeedROUGE updated with
    every answer in eval-set order. Every rank holds all the answers and computes the same sums in the
    same order, so no rank waits on another (sync_on_compute off) and the means are the same bits on
    any number of ranks."""
    bleu, rouge_metric = SeedBLEU4(sync_on_compute=False), SeedROUGE(sync_on_compute=False)
    bleu.update(answers, references)
    rouge_metric.update(answers, references)
    means = {"bleu-4": bleu.compute(), **rouge_metric.compute()}
    return {k: round(float(v), 4) for k, v in means.items()}


def evaluate_model(
    model: PreTrainedModel | VLLMEngine,
    tokenizer: PreTrainedTokenizerBase,
    eval_set: list[dict],
    cfg: EvalConfig,
    max_length: int,
    trainer: L.Trainer,
    seed: int = 0,
    use_adapter: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, predictions) of the model on the eval set. `model` is the Hugging Face model (its
    adapter on or off by use_adapter) or the vllm backend's engine, set to the adapter to evaluate."""
    records = eval_set[: cfg.limit] if cfg.limit else eval_set
    items = [
        {"index": i, "prompt": closed_book_prompt(tokenizer, r["question"]), "reference": r["reference"]}
        for i, r in enumerate(records)
    ]
    items.sort(key=lambda it: -len(it["prompt"]))  # similar lengths share a batch

    def run(size: int) -> Evaluator:
        batches = [
            {"number": b, **{k: [it[k] for it in items[s : s + size]] for k in ("index", "prompt", "reference")}}
            for b, s in enumerate(range(0, len(items), size))
        ]
        # This rank's share of the batches (all of them on one device; none where there are fewer batches than ranks).
        loader = DataLoader(share(batches, trainer.strategy), batch_size=None, collate_fn=lambda b: b)
        evaluator = Evaluator(model, tokenizer, cfg, max_length, seed, use_adapter)
        trainer.test(evaluator, dataloaders=loader, verbose=False)
        return evaluator

    evaluator = halving_batch_on_oom(run, cfg.batch_size, "evaluation")
    answers = gather_in_order(evaluator.predictions, len(records), trainer.strategy, "evaluation")
    references = [r["reference"] for r in records]
    predictions = [
        {**r, "prediction": a, "bleu-4": bleu4(a, r["reference"]), **rouge(a, r["reference"])}
        for r, a in zip(records, answers)
    ]
    return score_answers(answers, references), predictions
