"""The self-evolution loop (arXiv 2408.12247), generation by generation.

For generation i, with M_i = base + adapter A_i (A_0: a fresh adapter, i.e. the base model):
    questions  <- M_i writes a question for every fragment (open book)
    qa         <- M_i answers each question (open book)
    replay     <- k pairs of QA_0..QA_{i-1}, chosen by IFD
    A_{i+1}    <- continue A_i on qa + replay (closed book)
    qa.ifd     <- IFD of every pair of QA_i (base model by default)
    metrics    <- M_{i+1} answers the eval questions (closed book)

Every stage writes its result atomically into runs/NAME/gen_<i>/ and is skipped when that file
already exists, so an interrupted run resumes at the first unfinished stage.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from selfevo.config import EvolveConfig, identity, validate
from selfevo.data import load_eval, load_fragments, read_json, read_jsonl, write_json, write_jsonl
from selfevo.evaluate import evaluate_model
from selfevo.generate import write_answers, write_questions
from selfevo.ifd import score_pairs
from selfevo.models import (
    accelerator_device, add_lora, load_adapter_weights, load_model, nf4_quantization, resolve_model, save_adapter,
)
from selfevo.report import write_report, write_summary
from selfevo.select import select_replay
from selfevo.train import LoRAModule, QADataModule, build_trainer
from selfevo.vllm_engine import VLLMEngine, engine_lora_rank, require_vllm

console = Console(stderr=True)
LIBRARIES = ("selfevo", "torch", "transformers", "peft", "lightning", "torchmetrics", "nltk", "jieba", "rouge-chinese")


class RunError(RuntimeError):
    """A run directory that cannot be used as it is: the message says how to recover."""


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _first_difference(a, b, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


def prepare_run_dir(cfg: EvolveConfig, force: bool) -> Path:
    """Create runs/NAME with a config snapshot, or check that an existing one holds this config."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    snapshot = run_dir / "config.json"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{run_dir}: cannot create the run directory ({e.strerror})") from None
    if snapshot.exists():
        old = read_json(snapshot)
        if old.get("config") != identity(cfg):
            if not force:
                diff = _first_difference(old.get("config"), identity(cfg))
                raise RunError(
                    f"{run_dir} holds a run of a different config ({diff}); "
                    "pass --force to set it aside and start over, or choose another --name"
                )
            stamp = f"replaced-{datetime.now():%Y%m%d-%H%M%S}"
            for folder in (run_dir, Path(cfg.logs_dir) / cfg.name):
                if folder.exists():
                    shutil.move(folder, folder.with_name(f"{folder.name}.{stamp}"))
            console.print(f"[yellow]moved the old run and its logs aside (*.{stamp})[/]")
    if not snapshot.exists():
        write_json(
            snapshot,
            {
                "config": identity(cfg),
                "seed": cfg.seed,
                "versions": library_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    return run_dir


class Stages:
    """Skip-if-done bookkeeping of one generation folder, with each stage's seconds and counts."""

    def __init__(self, folder: Path, writer: SummaryWriter, step: int):
        self.folder = folder
        self.writer = writer
        self.step = step
        self.log_file = folder / "stages.json"
        self.log = read_json(self.log_file) if self.log_file.exists() else {}

    def done(self, name: str) -> bool:
        return (self.folder / name).exists()

    def record(self, stage: str, seconds: float, **counts) -> None:
        self.log[stage] = {"seconds": round(seconds, 2), **counts}
        write_json(self.log_file, self.log)
        self.writer.add_scalar(f"seconds/{stage}", seconds, self.step)
        extra = ", ".join(f"{k} {v}" for k, v in counts.items())
        console.print(f"  {stage}: {seconds:.1f}s" + (f" ({extra})" if extra else ""))

    def jsonl(self, stage: str, file: str, make: Callable[[], tuple[list[dict], dict]]) -> list[dict]:
        """Load `file` if a previous attempt finished it; otherwise make and write it."""
        path = self.folder / file
        if path.exists():
            return read_jsonl(path)
        t = time.perf_counter()
        records, counts = make()
        write_jsonl(path, records)
        self.record(stage, time.perf_counter() - t, **counts)
        return records


def evolve(cfg: EvolveConfig, force: bool = False) -> Path:
    """Run generations cfg.start .. cfg.end-1; returns the run directory."""
    validate(cfg)
    if cfg.generation.backend == "vllm":  # fail now, not after the base model's evaluation
        engine_lora_rank(cfg.lora.r)
        require_vllm()
    fragments, duplicates = load_fragments(cfg.data.fragments)
    if cfg.data.limit:
        fragments = fragments[: cfg.data.limit]
    eval_set = load_eval(cfg.data.eval)
    resolve_model(cfg.model.name, cfg.model.trust_remote_code)  # a bad model path fails before anything is written
    if cfg.model.quantization == "nf4":
        nf4_quantization()  # likewise a missing GPU or bitsandbytes
    console.print(
        f"[bold]{len(fragments)}[/] fragments ({duplicates} duplicates dropped), [bold]{len(eval_set)}[/] eval pairs"
    )
    run_dir = prepare_run_dir(cfg, force)
    for j in range(cfg.start):
        if not (run_dir / f"gen_{j}" / "metrics.json").exists() or not (run_dir / f"gen_{j}" / "adapter").exists():
            raise RunError(f"{run_dir}/gen_{j} is unfinished; resume from it with --start {j}")

    console.print(f"loading {cfg.model.name} ...")
    base, tokenizer = load_model(cfg.model)
    model = add_lora(base, cfg.lora, cfg.seed)
    fresh_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}  # A_0
    max_length = cfg.model.max_length
    log_dir = Path(cfg.logs_dir) / cfg.name
    writer = SummaryWriter(log_dir / "evolve")

    def trainer(**kwargs):
        return build_trainer(cfg.trainer, **kwargs)

    def evaluate_into(stages: Stages, use_adapter: bool) -> dict:
        folder, step = stages.folder, stages.step
        if stages.done("metrics.json"):
            return read_json(folder / "metrics.json")
        t = time.perf_counter()
        metrics, predictions = evaluate_model(
            model, tokenizer, eval_set, cfg.evaluation, max_length, trainer(), cfg.seed, use_adapter
        )
        write_jsonl(folder / "predictions.jsonl", predictions)
        stages.record("evaluate", time.perf_counter() - t, pairs=len(predictions))
        metrics = {**metrics, "seconds": stages.log}
        write_json(folder / "metrics.json", metrics)
        for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
            writer.add_scalar(f"eval/{key}", metrics[key], step)
        return metrics

    engine: VLLMEngine | None = None  # the vllm backend's engine: made when first needed, kept for the run

    def generator(adapter: Path | None):
        """What writes questions and answers: the Hugging Face model, or the vLLM engine serving `adapter`."""
        nonlocal engine
        if cfg.generation.backend == "hf":
            return model  # M_i: its adapter weights are already loaded
        if engine is None:
            folder = resolve_model(cfg.model.name, cfg.model.trust_remote_code)
            engine = VLLMEngine(folder, cfg.model, cfg.generation, cfg.lora.r, cfg.seed)
        engine.use_adapter(adapter)
        return engine

    console.rule("base model")
    evaluate_into(Stages(run_dir / "base", writer, 0), use_adapter=False)

    for i in range(cfg.start, cfg.end):
        console.rule(f"generation {i}")
        folder = run_dir / f"gen_{i}"
        stages = Stages(folder, writer, i + 1)
        seed = cfg.seed * 1000 + i
        # Lightning hands the model back on the CPU after each stage; generation runs outside it.
        model.to(accelerator_device(cfg.trainer.accelerator))
        # M_i: the adapter trained by generation i-1, or the fresh one (= the base model) at i = 0.
        adapter = None if i == 0 else run_dir / f"gen_{i - 1}" / "adapter"
        if adapter is None:
            set_peft_model_state_dict(model, fresh_adapter)
        else:
            load_adapter_weights(model, adapter)

        def make_questions():
            records, dropped = write_questions(generator(adapter), tokenizer, fragments, cfg.generation, max_length, seed)
            return records, {"kept": len(records), "dropped": dropped}

        def make_answers():
            records, dropped = write_answers(generator(adapter), tokenizer, questions, cfg.generation, max_length, seed)
            return [{**r, "generation": i} for r in records], {"kept": len(records), "dropped": dropped}

        def make_replay():
            history = [p for j in range(i) for p in read_jsonl(run_dir / f"gen_{j}" / "qa.jsonl")]
            chosen = select_replay(history, cfg.replay.mode, cfg.replay.k, seed)
            return chosen, {"history": len(history), "chosen": len(chosen)}

        questions = stages.jsonl("questions", "questions.jsonl", make_questions)
        if not stages.done("adapter"):
            qa = stages.jsonl("answers", "answers.jsonl", make_answers)
            replay = stages.jsonl("replay", "replay.jsonl", make_replay)
            if not qa and not replay:
                raise RunError(
                    f"{folder}: generation {i} kept no QA pairs and has nothing to replay; see the dropped counts "
                    f"in {folder}/stages.json, then delete {folder} and run again with other generation settings"
                )
            t = time.perf_counter()
            train_adapter(cfg, model, qa + replay, folder, log_dir, seed)
            stages.record("train", time.perf_counter() - t, pairs=len(qa) + len(replay))
        else:
            load_adapter_weights(model, folder / "adapter")

        def make_scores():
            qa = read_jsonl(folder / "answers.jsonl")
            scored = score_pairs(
                model, tokenizer, qa, cfg.ifd, max_length, trainer(), use_adapter=cfg.ifd.scorer == "trained"
            )
            if scored:
                writer.add_histogram("ifd", torch.tensor([p["ifd"] for p in scored]), i + 1)
                samples = "\n\n".join(f"**Q:** {p['question']}\n\n**A:** {p['answer']}" for p in scored[:3])
                writer.add_text("samples", samples, i + 1)
            return scored, {"pairs": len(scored)}

        stages.jsonl("score", "qa.jsonl", make_scores)
        evaluate_into(stages, use_adapter=True)
        write_summary(run_dir)
        writer.flush()

    writer.close()
    if engine is not None:
        engine.close()
    summary = write_summary(run_dir)
    png = write_report(run_dir)
    console.rule("summary")
    console.print(summary)
    console.print(f"report: {png}\nTensorBoard: tensorboard --logdir {log_dir}")
    return run_dir


def train_adapter(cfg: EvolveConfig, model, pairs: list[dict], folder: Path, log_dir: Path, seed: int) -> None:
    """Continue the in-memory adapter on `pairs` (written to train.jsonl) and save it to folder/adapter."""
    train_file = folder / "train.jsonl"
    write_jsonl(train_file, [{"question": p["question"], "answer": p["answer"]} for p in pairs])
    data = QADataModule(
        str(train_file), cfg.model.name, cfg.train.micro_batch_size, cfg.model.max_length, seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    logger = TensorBoardLogger(save_dir=str(log_dir), name="", version=f"train_gen_{folder.name.split('_')[-1]}")
    trainer = build_trainer(
        cfg.trainer,
        max_epochs=cfg.train.epochs,
        accumulate_grad_batches=cfg.train.grad_accum,
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step")],
    )
    torch.manual_seed(seed)
    try:
        trainer.fit(LoRAModule.around(model, cfg.train), datamodule=data)
    except torch.OutOfMemoryError:
        raise RunError(
            f"out of GPU memory in training: lower train.micro_batch_size (now {cfg.train.micro_batch_size}) "
            f"and raise train.grad_accum to keep the effective batch, or lower model.max_length "
            f"(now {cfg.model.max_length}); then run the same command to resume"
        ) from None
    save_adapter(model, folder / "adapter")
