"""Stage 4: LoRA fine-tuning on QA pairs, closed book (the prompt is the question alone; the
loss covers answer tokens only).

`selfevo fit --config configs/lora.yaml` runs this module through the Lightning CLI on its own;
the evolve loop uses the same classes around the model it keeps in memory.
"""

from __future__ import annotations

import random
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from selfevo.config import LoraConfig, ModelConfig, TrainConfig, TrainerConfig
from selfevo.data import load_qa
from selfevo.models import SMOLLM2_ALIAS, add_lora, load_adapter_weights, load_model, load_tokenizer, save_adapter
from selfevo.prompts import closed_book_prompt

IGNORE_INDEX = -100


def encode_qa(tokenizer, question: str, answer: str, max_length: int) -> dict:
    """Token ids of prompt + answer + end-of-turn, with labels on the answer (and end) only."""
    prompt = tokenizer(closed_book_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate_right_padded(examples: list[dict], pad_id: int) -> dict:
    """Right-padded ids and labels, and no attention mask: in a causal model no real token attends
    to the padding after it, and the padding carries no labels. Without a mask, SDPA can take its
    flash path."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[r, :n] = torch.tensor(e["input_ids"])
        labels[r, :n] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "labels": labels}


class PlannedBatches:
    """Micro-batches of example indices, reshuffled each epoch from (seed, epoch) so reruns match.

    With group_by_length, examples of similar length share a batch (less padding) and the batches
    come in random order; Lightning calls set_epoch before each epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool = True):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            order.sort(key=lambda i: self.lengths[i])  # stable: equal lengths keep the shuffled order
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        return iter(self.plan())

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class QADataModule(L.LightningDataModule):
    """QA pairs from a JSON/JSONL file ({"question", "answer"} or the seed's {"input", "output"})."""

    def __init__(
        self,
        train_file: str,
        model: str = SMOLLM2_ALIAS,
        micro_batch_size: int = 4,
        max_length: int = 1024,
        seed: int = 0,
        group_by_length: bool = True,
        trust_remote_code: bool = False,
    ):
        """
        Args:
            train_file: the QA pairs.
            model: the model whose tokenizer encodes them.
            micro_batch_size: pairs per forward pass.
            max_length: token cutoff per pair.
            seed: fixes the shuffle, so a rerun sees the same batches.
            group_by_length: batch pairs of similar length together (less padding), batches in random order.
            trust_remote_code: let the tokenizer run code from the model folder.
        """
        super().__init__()
        self.train_file = train_file
        self.group_by_length = group_by_length
        self.trust_remote_code = trust_remote_code
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.seed = seed
        self.examples: list[dict] = []

    def setup(self, stage: str) -> None:
        tokenizer = load_tokenizer(self.model, self.trust_remote_code)
        self.pad_id = tokenizer.pad_token_id
        pairs = load_qa(self.train_file)
        self.examples = [encode_qa(tokenizer, p["question"], p["answer"], self.max_length) for p in pairs]
        self.batches = PlannedBatches(
            [len(e["input_ids"]) for e in self.examples], self.micro_batch_size, self.seed, self.group_by_length
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.examples,
            batch_sampler=self.batches,
            collate_fn=lambda b: collate_right_padded(b, self.pad_id),
        )


class LoRAModule(L.LightningModule):
    """A causal LM with a LoRA adapter; only the adapter trains."""

    def __init__(
        self,
        model: str = SMOLLM2_ALIAS,
        dtype: str = "auto",
        quantization: str = "none",
        lora: LoraConfig = LoraConfig(),
        train: TrainConfig = TrainConfig(),
        init_adapter: Optional[str] = None,
        save_adapter_to: Optional[str] = None,
        seed: int = 0,
    ):
        """
        Args:
            model: base model (a Hugging Face folder, a .gguf file or smollm2-135m-instruct).
            dtype: weights' dtype (auto: bfloat16 on a capable GPU, else float32).
            quantization: none, or nf4 for QLoRA (a 4-bit base through bitsandbytes; CUDA only).
            lora: the adapter's shape.
            train: optimiser and schedule.
            init_adapter: continue this adapter folder instead of starting a fresh one.
            save_adapter_to: where the trained adapter is written at the end of fit.
            seed: seeds the fresh adapter's initialisation.
        """
        super().__init__()
        self.save_hyperparameters()
        self.lora_cfg = lora
        self.train_cfg = train
        self.model = None

    @classmethod
    def around(cls, peft_model, train: TrainConfig) -> "LoRAModule":
        """Train an adapter the caller already holds in memory (the evolve loop's way)."""
        module = cls(train=train)
        module.model = peft_model
        return module

    def configure_model(self) -> None:
        # Hugging Face loads models in eval mode; the adapter trains in train mode.
        if self.model is not None:
            self.model.train()
            return
        hp = self.hparams
        base, _ = load_model(ModelConfig(name=hp.model, dtype=hp.dtype, quantization=hp.quantization))
        self.model = add_lora(base, self.lora_cfg, hp.seed)
        if hp.init_adapter:
            load_adapter_weights(self.model, hp.init_adapter)
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.train_cfg
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(cfg.warmup_ratio * total)
        if cfg.lr_schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.hparams.save_adapter_to and self.trainer.is_global_zero:
            save_adapter(self.model, self.hparams.save_adapter_to)


def build_trainer(cfg: TrainerConfig, **kwargs) -> L.Trainer:
    """A Lightning Trainer from the config's hardware settings plus stage-specific arguments."""
    precision = cfg.precision
    if precision is None:
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    kwargs.setdefault("enable_model_summary", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=precision,
        **kwargs,
    )


class LoRACLI(LightningCLI):
    """`selfevo fit`: the Lightning CLI over LoRAModule and QADataModule, one model name for both."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")
