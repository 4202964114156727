"""Stage 5: Instruction-Following Difficulty (IFD) of every QA pair.

IFD(q, a) = mean NLL(a | prompt(q)) / mean NLL(a | answer_prefix). The answer is tokenized once
and the same answer tokens follow both prefixes ("token-exact"). The 2N sequences of N pairs are
sorted by length and batched with their neighbours, so a batch is nearly all real tokens. Rows are
right-padded and run without an attention mask: in a causal model no real token attends to the
padding after it, and without a mask PyTorch's SDPA can take its flash path (grouped-query heads
included). The LM head is applied only at the positions that predict answer tokens, in chunks,
with the log-softmax in fp32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import IFDConfig
from selfevo.faults import kill_point
from selfevo.hardware import halving_batch_on_oom
from selfevo.models import adapter_switched
from selfevo.ranks import gather_in_order, share

# Config keys of models whose forward rescales the LM head's output (Gemma 2, Cohere, Granite).
RESCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


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
    """Both sequences of every pair, sorted by length and cut into right-padded batches.

    Sequence 2i is pair i's prompt + answer, sequence 2i + 1 its answer prefix + answer; each batch
    holds 2 x batch_size sequences of similar length, longest first, so an out-of-memory error
    shows at the first batch.
    """

    def __init__(self, tokenizer, pairs: list[dict], cfg: IFDConfig, max_length: int):
        self.seqs: list[list[int]] = []
        self.answer_len: list[int] = []
        for p in pairs:
            prompt, prefix, answer = pair_token_ids(
                tokenizer, p["question"], p["answer"], cfg, max_length
            )
            self.seqs += [prompt + answer, prefix + answer]
            self.answer_len += [len(answer)] * 2
        order = sorted(range(len(self.seqs)), key=lambda i: -len(self.seqs[i]))
        size = 2 * cfg.batch_size
        self.batches = [order[s : s + size] for s in range(0, len(order), size)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rescaled = [k for k in RESCALED_LOGITS if getattr(base.config, k, None)]
    if rescaled:
        raise ValueError(
            f"IFD scoring applies the LM head itself and does not support {rescaled[0]} models"
        )
    # No attention mask: the padding of each row comes after its last real token (see the module
    # doc).
    hidden = base.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    # Position j predicts token j + 1; it predicts an answer token iff length - answer_len - 1 <= j
    # < length - 1.
    j = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
    in_answer = (j[None, :] >= (length - answer_len - 1)[:, None]) & (
        j[None, :] < (length - 1)[:, None]
    )
    states = hidden[:, :-1][in_answer]
    targets = input_ids[:, 1:][in_answer]
    rows = in_answer.nonzero()[:, 0]
    lm_head = base.get_output_embeddings()
    nll = torch.cat(
        [
            F.cross_entropy(
                lm_head(states[s : s + chunk]).float(), targets[s : s + chunk], reduction="none"
            )
            for s in range(0, len(targets), chunk)
        ]
        or [hidden.new_zeros(0, dtype=torch.float32)]
    )
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


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict],
    cfg: IFDConfig,
    max_length: int,
    trainer: L.Trainer,
    use_adapter: bool = False,
) -> list[dict]:
    """The pairs with "ifd", "loss_cond" and "loss_alone" added, in input order.

    On several ranks (the trainer's strategy), each rank scores its share of the batches and every
    rank gets all the scores; a batch is the same on any number of ranks, so are its losses.
    """
    if not pairs:
        return []

    def run(size: int) -> list[dict]:
        batches = SequenceBatches(tokenizer, pairs, replace(cfg, batch_size=size), max_length)
        mine = Subset(batches, share(list(range(len(batches))), trainer.strategy))
        return trainer.predict(
            IFDScorer(model, use_adapter), dataloaders=DataLoader(mine, batch_size=None)
        )

    outputs = (
        halving_batch_on_oom(run, cfg.batch_size, "IFD scoring") or []
    )  # None: this rank had no batch
    mine = {
        i: loss for out in outputs for i, loss in zip(out["index"].tolist(), out["loss"].tolist())
    }
    losses = gather_in_order(mine, 2 * len(pairs), trainer.strategy, "IFD scoring")
    scored = []
    for i, pair in enumerate(pairs):
        cond, alone = losses[2 * i], losses[2 * i + 1]
        # JSON has no NaN: an undefined loss is stored as null.
        scored.append(
            {
                **pair,
                "ifd": ifd_from_losses(cond, alone),
                "loss_cond": None if math.isnan(cond) else cond,
                "loss_alone": None if math.isnan(alone) else alone,
            }
        )
    return scored
