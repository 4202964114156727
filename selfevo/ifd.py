"""Stage 5: Instruction-Following Difficulty (IFD) of every QA pair.

IFD(q, a) = mean NLL(a | prompt(q)) / mean NLL(a | answer_prefix). The answer is tokenized once
and the same answer tokens follow both prefixes ("token-exact"). Both passes of a batch of pairs
run as one left-padded forward, so every row ends with its answer; the LM head is applied only at
the positions that predict answer tokens, in chunks, with the log-softmax in fp32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfevo.config import IFDConfig
from selfevo.faults import kill_point
from selfevo.models import halving_batch_on_oom


# Config keys of models whose forward rescales the LM head's output (Gemma 2, Cohere, Granite).
RESCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def pair_token_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str, cfg: IFDConfig, max_length: int
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer-prefix ids, answer ids), the answer cut to fit max_length after the prompt."""
    prompt = tokenizer(cfg.prompt.format(question=question))["input_ids"]
    prefix = tokenizer(cfg.answer_prefix)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return prompt, prefix, answer_ids[: max(0, max_length - len(prompt))]


class PairBatches(Dataset):
    """Length-bucketed batches of pairs, each already collated into one left-padded tensor batch."""

    def __init__(self, tokenizer, pairs: list[dict], cfg: IFDConfig, max_length: int):
        rows = [pair_token_ids(tokenizer, p["question"], p["answer"], cfg, max_length) for p in pairs]
        # Longest first: an out-of-memory error shows at the first batch.
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][2])))
        self.batches = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
        self.rows = rows
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        index = self.batches[b]
        # Conditioned rows first, then answer-only rows: row j and row j + len(index) share an answer.
        seqs = [self.rows[i][0] + self.rows[i][2] for i in index] + [self.rows[i][1] + self.rows[i][2] for i in index]
        answer_len = [len(self.rows[i][2]) for i in index] * 2
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return {
            "index": torch.tensor(index, dtype=torch.long),
            "input_ids": input_ids,
            "attention_mask": mask,
            "answer_len": torch.tensor(answer_len, dtype=torch.long),
        }


def mean_answer_nll(
    model: PreTrainedModel, input_ids, attention_mask, answer_len, chunk: int = 4096
) -> torch.Tensor:
    """Mean NLL of the last answer_len[r] tokens of each left-padded row (NaN where answer_len is 0).

    The LM head runs only on the hidden states that predict answer tokens, `chunk` positions at a
    time, so memory stays at chunk x vocabulary whatever the batch.
    """
    keep = int(answer_len.max()) + 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rescaled = [k for k in RESCALED_LOGITS if getattr(base.config, k, None)]
    if rescaled:
        raise ValueError(f"IFD scoring applies the LM head itself and does not support {rescaled[0]} models")
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    width = input_ids.shape[1]
    # Position j of the last `keep` positions predicts an answer token iff j >= keep - 1 - answer_len.
    j = torch.arange(keep - 1, device=input_ids.device)
    in_answer = j[None, :] >= (keep - 1 - answer_len)[:, None]
    states = hidden[:, width - keep : width - 1][in_answer]
    targets = input_ids[:, width - keep + 1 :][in_answer]
    rows = in_answer.nonzero()[:, 0]
    lm_head = base.get_output_embeddings()
    nll = torch.cat(
        [
            F.cross_entropy(lm_head(states[s : s + chunk]).float(), targets[s : s + chunk], reduction="none")
            for s in range(0, len(targets), chunk)
        ]
        or [hidden.new_zeros(0, dtype=torch.float32)]
    )
    sums = torch.zeros(len(answer_len), device=nll.device, dtype=torch.float32).index_add_(0, rows, nll)
    return sums / answer_len.clamp(min=1) + torch.where(answer_len == 0, math.nan, 0.0)


def ifd_from_losses(loss_cond: float, loss_alone: float) -> float:
    """The ratio, with the seed's convention that an undefined ratio counts as 1."""
    ratio = loss_cond / loss_alone if loss_alone else math.nan
    return 1.0 if math.isnan(ratio) else ratio


class IFDScorer(L.LightningModule):
    """`trainer.predict` over PairBatches gives both mean losses for every pair."""

    def __init__(self, model: PreTrainedModel, use_adapter: bool = False):
        super().__init__()
        self.model = model
        self.use_adapter = use_adapter

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if self.use_adapter or not hasattr(self.model, "disable_adapter"):
            losses = mean_answer_nll(self.model, batch["input_ids"], batch["attention_mask"], batch["answer_len"])
        else:
            with self.model.disable_adapter():
                losses = mean_answer_nll(self.model, batch["input_ids"], batch["attention_mask"], batch["answer_len"])
        n = len(batch["index"])
        kill_point("score")
        return {"index": batch["index"].cpu(), "loss_cond": losses[:n].cpu(), "loss_alone": losses[n:].cpu()}


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

    def run(size: int) -> list[dict]:
        batches = PairBatches(tokenizer, pairs, replace(cfg, batch_size=size), max_length)
        loader = DataLoader(batches, batch_size=None, shuffle=False)
        return trainer.predict(IFDScorer(model, use_adapter), dataloaders=loader)

    outputs = halving_batch_on_oom(run, cfg.batch_size, "IFD scoring")
    scored: list[dict | None] = [None] * len(pairs)
    for out in outputs:
        for i, c, a in zip(out["index"].tolist(), out["loss_cond"].tolist(), out["loss_alone"].tolist()):
            # JSON has no NaN: an undefined loss is stored as null.
            scored[i] = {**pairs[i], "ifd": ifd_from_losses(c, a),
                         "loss_cond": None if math.isnan(c) else c, "loss_alone": None if math.isnan(a) else a}
    missing = [i for i, s in enumerate(scored) if s is None]
    if missing:
        raise RuntimeError(f"IFD scoring returned no score for pair {missing[0]}")
    return scored  # type: ignore[return-value]
