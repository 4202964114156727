"""Stage 5: Instruction-Following Difficulty (IFD) of every QA pair, and its grounding.

IFD(q, a) = mean NLL(a | prompt(q)) / mean NLL(a | answer_prefix). Grounding (`ground_pairs`,
before training) = mean NLL(a | prompt(q)) - mean NLL(a | prompt(fragment, q)): what the fragment
adds. The answer is tokenized once and the same answer tokens follow every prefix ("token-exact").
The 2N sequences of N pairs are
sorted by length and batched with their neighbours, so a batch is nearly all real tokens. Rows are
right-padded and run without an attention mask: in a causal model no real token attends to the
padding after it, and without a mask PyTorch's SDPA can take its flash path (grouped-query heads
included). The LM head is applied only at the positions that predict answer tokens, in chunks,
with the log-softmax in fp32.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import IFDConfig
from selfevo.faults import kill_point
from selfevo.hardware import halving_batch_on_oom
from selfevo.models import adapter_switched, answer_token_nll, rescaled_logits
from selfevo.ranks import gather_in_order, share


def pair_token_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, cfg: IFDConfig, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer-prefix ids, answer ids), the answer cut to fit max_length after the
    prompt."""
    prompt = tokenizer(cfg.prompt.format(question=question))["input_ids"]
    prefix = tokenizer(cfg.answer_prefix)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt, prefix, answer_ids[: max(0, max_length - len(prompt))]


class SequenceBatches(Dataset):
    """Sequences of (prefix ids, answer ids), sorted by length and cut into right-padded batches of
    `batch_size` sequences of similar length, longest first, so an out-of-memory error shows at the
    first batch."""

    def __init__(self, sequences: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int):
        self.seqs = [prefix + answer for prefix, answer in sequences]
        self.answer_len = [len(answer) for _, answer in sequences]
        order = sorted(range(len(self.seqs)), key=lambda i: -len(self.seqs[i]))
        self.batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        index = self.batches[b]
        lengths = [len(self.seqs[i]) for i in index]
        input_ids = torch.full((len(index), max(lengths)), self.pad_id, dtype=torch.long)
        for r, i in enumerate(index):
            input_ids[r, : lengths[r]] = torch.tensor(self.seqs[i], dtype=torch.long)
        return {
            "index": torch.tensor(index, dtype=torch.long),
            "input_ids": input_ids,
            "length": torch.tensor(lengths, dtype=torch.long),
            "answer_len": torch.tensor([self.answer_len[i] for i in index], dtype=torch.long),
        }


def mean_answer_nll(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    length: torch.Tensor,
    answer_len: torch.Tensor,
    chunk: int = 4096,
) -> torch.Tensor:
    """Mean NLL of the last answer_len[r] of the first length[r] tokens of each right-padded row
    (NaN where answer_len is 0).

    The LM head runs only on the hidden states that predict answer tokens, `chunk` positions at a
    time, so memory stays at chunk x vocabulary whatever the batch.
    """
    rescaled = rescaled_logits(model)
    if rescaled:
        raise ValueError(
            f"IFD scoring applies the LM head itself and does not support {rescaled} models"
        )
    # Position j predicts token j + 1; it predicts an answer token iff length - answer_len - 1 <= j
    # < length - 1.
    j = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    in_answer = (j[None, :] >= (length - answer_len - 1)[:, None]) & (
        j[None, :] < (length - 1)[:, None]
    )
    nll = answer_token_nll(model, input_ids, in_answer, chunk)
    rows = in_answer.nonzero()[:, 0]
    sums = torch.zeros(len(answer_len), device=nll.device, dtype=torch.float32).index_add_(
        0, rows, nll
    )
    return sums / answer_len.clamp(min=1) + torch.where(answer_len == 0, math.nan, 0.0)


def ifd_from_losses(loss_cond: float, loss_alone: float) -> float:
    """The ratio, with the seed's convention that an undefined ratio counts as 1."""
    ratio = loss_cond / loss_alone if loss_alone else math.nan
    return 1.0 if math.isnan(ratio) else ratio


class IFDScorer(L.LightningModule):
    """`trainer.predict` over SequenceBatches gives the mean answer loss of every sequence."""

    def __init__(self, model: PreTrainedModel, use_adapter: bool = False):
        super().__init__()
        self.model = model
        self.use_adapter = use_adapter
        # Lightning refuses a rank with no batch (fewer batches than ranks) unless told it is
        # intended; such a rank skips the predict loop, and trainer.predict returns None there.
        self.allow_zero_length_dataloader_with_multiple_devices = True

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        args = (self.model, batch["input_ids"], batch["length"], batch["answer_len"])
        with adapter_switched(self.model, self.use_adapter):
            losses = mean_answer_nll(*args)
        kill_point("score")
        return {"index": batch["index"].cpu(), "loss": losses.cpu()}


def answer_losses(
    model: PreTrainedModel,
    sequences: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    trainer: L.Trainer,
    use_adapter: bool = False,
    description: str = "IFD scoring",
) -> list[float]:
    """The mean answer NLL of every (prefix ids, answer ids) sequence, in input order (NaN for an
    empty answer); `batch_size` sequences a batch, halved on running out of memory.

    On several ranks (the trainer's strategy), each rank scores its share of the batches and every
    rank gets all the losses; a batch is the same on any number of ranks, so are its losses.
    """

    def run(size: int) -> list[dict]:
        batches = SequenceBatches(sequences, size, pad_id)
        mine = Subset(batches, share(list(range(len(batches))), trainer.strategy))
        return trainer.predict(
            IFDScorer(model, use_adapter), dataloaders=DataLoader(mine, batch_size=None)
        )

    outputs = halving_batch_on_oom(run, batch_size, description) or []  # None: no batch here
    mine = {
        i: loss for out in outputs for i, loss in zip(out["index"].tolist(), out["loss"].tolist())
    }
    return gather_in_order(mine, len(sequences), trainer.strategy, description)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _loss_or_none(loss: float) -> float | None:
    return None if math.isnan(loss) else loss  # JSON has no NaN: an undefined loss is null


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict],
    cfg: IFDConfig,
    max_length: int,
    trainer: L.Trainer,
    use_adapter: bool = False,
) -> list[dict]:
    """The pairs with "ifd", "loss_cond" and "loss_alone" added, in input order."""
    if not pairs:
        return []
    sequences = []
    for p in pairs:
        prompt, prefix, answer = pair_token_ids(
            tokenizer, p["question"], p["answer"], cfg, max_length
        )
        sequences += [(prompt, answer), (prefix, answer)]
    losses = answer_losses(
        model, sequences, 2 * cfg.batch_size, _pad_id(tokenizer), trainer, use_adapter
    )
    return [
        {
            **pair,
            "ifd": ifd_from_losses(losses[2 * i], losses[2 * i + 1]),
            "loss_cond": _loss_or_none(losses[2 * i]),
            "loss_alone": _loss_or_none(losses[2 * i + 1]),
        }
        for i, pair in enumerate(pairs)
    ]


def ground_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict],
    cfg: IFDConfig,
    max_length: int,
    trainer: L.Trainer,
) -> list[dict]:
    """The pairs with "grounding" added: mean NLL(answer | question) - mean NLL(answer | fragment,
    question) under the base model, in nats per answer token; what the fragment makes the answer
    likelier. An answer the fragment supports gains from it; one it does not (a guess, or what
    contradicts it) gains little or loses. None where the answer has no token within max_length.

    Both passes share the answer's tokens, cut to fit after the longer (the fragment's) prompt.
    """
    if not pairs:
        return []
    sequences = []
    for p in pairs:
        alone = tokenizer(cfg.prompt.format(question=p["question"]))["input_ids"]
        grounded = tokenizer(
            cfg.grounded_prompt.format(fragment=p["fragment"], question=p["question"])
        )["input_ids"]
        answer = tokenizer(p["answer"], add_special_tokens=False)["input_ids"]
        answer = answer[: max(0, max_length - len(grounded))]
        sequences += [(alone, answer), (grounded, answer)]
    losses = answer_losses(
        model, sequences, 2 * cfg.batch_size, _pad_id(tokenizer), trainer, False, "grounding"
    )
    out = []
    for i, pair in enumerate(pairs):
        gain = losses[2 * i] - losses[2 * i + 1]
        out.append({**pair, "grounding": _loss_or_none(gain)})
    return out
