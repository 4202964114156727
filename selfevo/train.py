"""Stage 4: LoRA fine-tuning on QA pairs, closed book (the prompt is the question alone; the
loss covers answer tokens only).

`selfevo fit --config configs/lora.yaml` runs this module through the Lightning CLI on its own;
the evolve loop uses the same classes around the model it keeps in memory.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from selfevo.config import PROMPT_FIELDS, LoraConfig, ModelConfig, TrainConfig, check_template
from selfevo.data import load_qa
from selfevo.facts import fact_recall, reference_facts
from selfevo.faults import kill_point
from selfevo.models import (
    SMOLLM2_ALIAS,
    add_lora,
    answer_token_nll,
    load_adapter_weights,
    load_model,
    load_tokenizer,
    rescaled_logits,
    save_adapter,
)
from selfevo.prompts import CLOSED_BOOK_PROMPT, Language, closed_book_prompt
from selfevo.rundir import RunError, write_bytes

IGNORE_INDEX = -100


def encode_qa(
    tokenizer, question: str, answer: str, max_length: int, closed_book: str = CLOSED_BOOK_PROMPT
) -> dict:
    """Token ids of prompt (the question in the `closed_book` template, as evaluation asks it) +
    answer + end-of-turn, with labels on the answer (and end) only."""
    prompt = tokenizer(
        closed_book_prompt(tokenizer, question, closed_book), add_special_tokens=False
    )["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + answer_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer, text: str, max_length: int) -> dict:
    """Token ids of a plain text + end of text, with labels on every token: language modelling."""
    ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[
        :max_length
    ]
    return {"input_ids": ids, "labels": list(ids)}


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of the labelled tokens, as the model's own loss computes it (in fp32,
    labels shifted by one), with the LM head at the labelled positions alone
    (models.answer_token_nll): the prompt's logits are most of a QA row's and are never needed. A
    model that rescales its logits computes its own."""
    if rescaled_logits(model):
        return model(input_ids=input_ids, labels=labels).loss
    return answer_token_nll(model, input_ids, labels[:, 1:] != IGNORE_INDEX).mean()


def collate_right_padded(examples: list[dict], pad_id: int) -> dict:
    """Right-padded ids and labels, and no attention mask: in a causal model no real token attends
    to the padding after it, and the padding carries no labels. Without a mask, SDPA can take its
    flash path. An empty micro-batch (a rank's filler, see PlannedBatches) becomes one two-token
    row with weight 0: it runs forward and backward like any batch, and adds nothing."""
    weight = 1.0 if examples else 0.0
    examples = examples or [{"input_ids": [pad_id, pad_id], "labels": [IGNORE_INDEX, pad_id]}]
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[r, :n] = torch.tensor(e["input_ids"])
        labels[r, :n] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "labels": labels, "weight": weight}


class PlannedBatches:
    """Micro-batches of example indices, reshuffled each epoch from (seed, epoch) so reruns match.

    With group_by_length, examples of similar length share a batch (less padding) and the batches
    come in random order; Lightning calls set_epoch before each epoch.

    On several ranks, the plan is one device's, and each optimizer step's `window` micro-batches
    (its gradient accumulation on one device) are dealt out to the ranks: rank r takes the r-th,
    (r + ranks)-th, ... of them. DDP averages the ranks' gradients, so the step is one device's
    step; and its micro-batches are one device's, padding and all. Where a step's micro-batches do
    not divide evenly (an epoch's last step), the ranks short of one get an empty micro-batch (never
    rank 0), which adds nothing: DDP needs the same number of passes on every rank.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        group_by_length: bool = True,
        rank: int = 0,
        ranks: int = 1,
        window: int = 1,
    ):
        if window % ranks:
            raise ValueError(
                f"a step's {window} micro-batches cannot be dealt out evenly to {ranks} ranks"
            )
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.rank, self.ranks, self.window = rank, ranks, window
        self.epoch = 0
        self.done = 0  # batches of this epoch handed out so far
        self.skip = 0  # batches to pass over at the next iteration (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> "PlannedBatches":
        # Lightning calls set_epoch on dataloader.sampler and dataloader.batch_sampler.sampler,
        # never on the batch sampler itself: this is how the epoch reaches the plan.
        return self

    # Kept in checkpoints (by StepCheckpoint), so a training resumed mid-epoch goes on with the
    # batch after the last one trained instead of starting the epoch again. On the checkpoint's
    # number of ranks, each rank goes on after its own last micro-batch ("done"). On another number,
    # the position is taken in optimizer steps, which mean the same data on any number of ranks (a
    # step is `window` micro-batches of one device's plan; StepCheckpoint saves between steps).
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "done": self.done, "ranks": self.ranks, "window": self.window}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        done, ranks, window = state["done"], state["ranks"], state["window"]
        if (ranks, window) == (self.ranks, self.window):
            self.skip = done
            return
        if window != self.window or done % (window // ranks):
            raise RunError(
                f"this training's checkpoint ({ranks} ranks, {done} micro-batches into a step of "
                f"{window}) cannot "
                f"go on over {self.ranks} ranks in steps of {self.window}: resume it on {ranks} "
                "ranks"
            )
        self.skip = done // (window // ranks) * (self.window // self.ranks)

    def plan(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.group_by_length:
            order.sort(
                key=lambda i: self.lengths[i]
            )  # stable: equal lengths keep the shuffled order
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group_by_length:
            rng.shuffle(batches)
        mine = []
        for s in range(0, len(batches), self.window):
            step = batches[s : s + self.window]
            step += [[]] * (-len(step) % self.ranks)  # empty fillers at the end: never rank 0's
            mine += step[self.rank :: self.ranks]
        return mine

    def __iter__(self):
        skip, self.skip = self.skip, 0
        self.done = skip
        for batch in self.plan()[skip:]:
            self.done += 1
            yield batch

    def __len__(self) -> int:
        batches = -(-len(self.lengths) // self.batch_size)
        steps, rest = divmod(batches, self.window)
        return steps * (self.window // self.ranks) + -(-rest // self.ranks)


class QADataModule(L.LightningDataModule):
    """QA pairs from a JSON/JSONL file ({"question", "answer"} or the seed's {"input",
    "output"}), and plain texts ({"text"}) learnt whole, as language modelling."""

    def __init__(
        self,
        train_file: str,
        model: str = SMOLLM2_ALIAS,
        micro_batch_size: int = 4,
        max_length: int = 1024,
        seed: int = 0,
        group_by_length: bool = True,
        trust_remote_code: bool = False,
        revision: Optional[str] = None,
        closed_book: str = CLOSED_BOOK_PROMPT,
    ):
        """
        Args:
            train_file: the QA pairs.
            model: the model whose tokenizer encodes them.
            micro_batch_size: pairs per forward pass.
            max_length: token cutoff per pair.
            seed: fixes the shuffle, so a rerun sees the same batches.
            group_by_length: batch pairs of similar length together (less padding), batches in
            random order.
            trust_remote_code: let the tokenizer run code from the model folder.
            revision: the hub id's branch, tag or commit (None: main).
            closed_book: the prompt each question is asked in, {question} in a template (the
            evolve config's prompts.closed_book; "{question}": the question alone).
        """
        super().__init__()
        check_template("closed_book", closed_book, PROMPT_FIELDS["closed_book"])  # a ValueError
        self.closed_book = closed_book
        self.train_file = train_file
        self.group_by_length = group_by_length
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_length = max_length
        self.seed = seed
        self.examples: list[dict] = []

    def setup(self, stage: str) -> None:
        tokenizer = load_tokenizer(self.model, self.trust_remote_code, self.revision)
        self.pad_id = tokenizer.pad_token_id
        records = load_qa(self.train_file, texts=True)
        self.examples = [
            encode_text(tokenizer, r["text"], self.max_length)
            if "text" in r
            else encode_qa(tokenizer, r["question"], r["answer"], self.max_length, self.closed_book)
            for r in records
        ]
        # On several ranks, a step is trainer.accumulate_grad_batches micro-batches on each rank
        # (Lightning's meaning), dealt out from one device's plan (see PlannedBatches).
        rank, ranks, accumulate = 0, 1, 1
        if self.trainer is not None:
            rank, ranks, accumulate = (
                self.trainer.global_rank,
                self.trainer.world_size,
                self.trainer.accumulate_grad_batches,
            )
        self.batches = PlannedBatches(
            [len(e["input_ids"]) for e in self.examples],
            self.micro_batch_size,
            self.seed,
            self.group_by_length,
            rank=rank,
            ranks=ranks,
            window=accumulate * ranks,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.examples,
            batch_sampler=self.batches,
            collate_fn=lambda b: collate_right_padded(b, self.pad_id),
        )


class LoRAModule(L.LightningModule):
    """A causal LM with a LoRA adapter; only the adapter trains.

    `selfevo fit` loads `model` and adds a fresh adapter (or `init_adapter`) in configure_model; the
    evolve loop hands in the PEFT model it holds as `_peft_model`, with the run's settings, which
    Lightning records in hparams.yaml either way.
    """

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
        revision: Optional[str] = None,
        _peft_model: Optional[torch.nn.Module] = None,
    ):
        """
        Args:
            model: base model (a Hugging Face folder, a .gguf file, a hub id or
                smollm2-135m-instruct).
            dtype: weights' dtype (auto: bfloat16 on a capable GPU, else float32).
            quantization: none, or nf4 for QLoRA (a 4-bit base through bitsandbytes; CUDA only).
            lora: the adapter's shape.
            train: optimiser and schedule.
            init_adapter: continue this adapter folder instead of starting a fresh one.
            save_adapter_to: where the trained adapter is written at the end of fit.
            seed: seeds the fresh adapter's initialisation.
            revision: the hub id's branch, tag or commit (None: main), when `model` is a hub id.
            _peft_model: `model` with its adapter, already in memory (the evolve loop's), trained
                as it is instead of being loaded; not in hparams.yaml, nor (for the leading _)
                an option of `selfevo fit`.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["_peft_model"])
        # Checkpoints hold the trainable (LoRA) weights only; the frozen base comes from the model
        # folder.
        self.strict_loading = False
        self.lora_cfg = lora
        self.train_cfg = train
        self.model = _peft_model

    def configure_model(self) -> None:
        if self.model is None:
            hp = self.hparams
            model_cfg = ModelConfig(
                name=hp.model, revision=hp.revision, dtype=hp.dtype, quantization=hp.quantization
            )
            base, _ = load_model(model_cfg)
            self.model = add_lora(base, self.lora_cfg, hp.seed)
            if hp.init_adapter:
                load_adapter_weights(self.model, hp.init_adapter)
        # Hugging Face loads models in eval mode; the adapter trains in train mode.
        self.model.train()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = answer_loss(self.model, batch["input_ids"], batch["labels"])
        if batch["weight"]:  # not a rank's empty filler (see PlannedBatches)
            # Rank 0's micro-batch loss, as Lightning logs a step's value (only rank 0 writes logs).
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss * batch["weight"]

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
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep a checkpoint small and loadable with torch.load(weights_only=True): the trainable
        weights (not the frozen base: 14 GB for a 7B model), the RNG state, no pickled objects."""
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }
        for key in (
            "hyper_parameters",
            "hparams_name",
            "datamodule_hyper_parameters",
            "datamodule_hparams_name",
        ):
            checkpoint.pop(key, None)
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def on_fit_end(self) -> None:
        if self.hparams.save_adapter_to and self.trainer.is_global_zero:
            save_adapter(self.model, self.hparams.save_adapter_to)


class StepCheckpoint(Callback):
    """Save a checkpoint to `path` every `every` optimizer steps (0: never), replacing the last one.

    The last batch of an epoch is not checkpointed: a resume from there would have to start the
    next epoch, which Lightning's restart logic handles least well; the checkpoint before it serves.
    """

    def __init__(self, path: Path, every: int):
        self.path = path
        self.every = every
        self.resume_position: Optional[dict] = None

    # The position in the PlannedBatches goes into the checkpoint with this callback's state.
    # (Lightning's own record of a loader's state is not applied on resume here: it builds the
    # loader early, to count the steps for the LR schedule, and then skips the step that would load
    # the state.)
    def state_dict(self) -> dict:
        return {"position": self.batches.state_dict()} if hasattr(self, "batches") else {}

    def load_state_dict(self, state: dict) -> None:
        self.resume_position = state.get("position")

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.batches = trainer.train_dataloader.batch_sampler
        # before the first batch is drawn: the plan is made lazily
        if self.resume_position is not None:
            self.batches.load_state_dict(self.resume_position)
            # Lightning counts a rank's own micro-batches (batch_idx, when to step, the epoch's
            # end): on another number of ranks than the checkpoint's, move its counts to where this
            # rank's share resumes.
            shift = self.batches.skip - self.resume_position["done"]
            if shift:
                progress = trainer.fit_loop.epoch_loop.batch_progress
                for tracker in (progress.current, progress.total):
                    for field in ("ready", "started", "processed", "completed"):
                        setattr(tracker, field, getattr(tracker, field) + shift)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int
    ) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if self.every and stepped and not last_of_epoch and trainer.global_step % self.every == 0:
            trainer.save_checkpoint(self.path, weights_only=False)
        kill_point("train")


def probe_sample(pairs: list[dict], n: int, language: Language, seed: int) -> list[dict]:
    """A seeded sample of n QA pairs whose answers state a fact (fact recall can score them)."""
    with_facts = [
        p
        for p in pairs
        if "question" in p and reference_facts(p["answer"], p["question"], language)
    ]
    return random.Random(seed).sample(with_facts, min(n, len(with_facts)))


class RetentionProbe(EarlyStopping):
    """Train until retention stops rising: after every epoch the model answers `pairs` (some of its
    own training pairs) closed book, greedy, and their mean fact recall x100 is the score that
    Lightning's early stopping watches (stop after `patience` epochs without a rise; never before
    the trainer's min_epochs). `history` holds every epoch's score, also logged as
    retention/fact_recall.

    A generation's own pairs, not the dev split: this asks whether the facts went in at all, and the
    dev split stays for choosing between generations.
    """

    MONITOR = "retention/fact_recall"

    def __init__(
        self,
        pairs: list[dict],
        tokenizer,
        language: Language,
        sampling,
        batch_size: int,
        max_length: int,
        patience: int,
        closed_book: str = CLOSED_BOOK_PROMPT,
    ):
        super().__init__(monitor=self.MONITOR, mode="max", patience=patience, min_delta=0.0)
        self.pairs, self.tokenizer, self.language = pairs, tokenizer, language
        self.closed_book = closed_book  # the prompt the pairs were trained in
        self.sampling, self.batch_size, self.max_length = sampling, batch_size, max_length
        self.history: list[float] = []

    def retention(self, model) -> float:
        from selfevo.generate import HFGenerator  # generate imports the models module too

        prompts = [
            closed_book_prompt(self.tokenizer, p["question"], self.closed_book) for p in self.pairs
        ]
        with torch.random.fork_rng():  # generating seeds torch; training's draws stay its own
            answers = HFGenerator(model, self.tokenizer, self.max_length).generate(
                prompts, self.sampling, seed=0, batch_size=self.batch_size, description="retention"
            )
        scores = [
            fact_recall(a, p["answer"], p["question"], self.language)
            for a, p in zip(answers, self.pairs)
        ]
        return round(100 * sum(scores) / len(scores), 2)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        score = self.retention(pl_module.model)
        self.history.append(score)
        trainer.callback_metrics[self.MONITOR] = torch.tensor(score)
        if trainer.logger is not None:
            trainer.logger.log_metrics({self.MONITOR: score}, step=trainer.global_step)
        super().on_train_epoch_end(trainer, pl_module)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history = list(state["history"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written like every run file (temporary name, fsync, rename) and read back with
    torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as e:
            raise RunError(
                f"{path}: damaged checkpoint ({type(e).__name__}); delete it and run the same "
                "command "
                "to redo this generation's training from its start"
            ) from None


class LoRACLI(LightningCLI):
    """`selfevo fit`: the Lightning CLI over LoRAModule and QADataModule, one model name and
    revision for both."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model", "data.model")
        parser.link_arguments("model.revision", "data.revision")
