"""The self-evolution loop (arXiv 2408.12247), generation by generation.

For generation i, with M_i = base + adapter A_i (A_0: a fresh adapter, i.e. the base model):
    questions  <- M_i writes a question for every fragment (open book)
    qa         <- M_0 answers each question (open book; M_i does with generation.answer_model current)
    replay     <- k pairs of QA_0..QA_{i-1}, chosen by IFD
    A_{i+1}    <- continue A_i on qa + replay (closed book)
    qa.ifd     <- IFD of every pair of QA_i (base model by default)
    metrics    <- M_{i+1} answers the eval questions (closed book)

Every stage writes its result atomically into runs/NAME/gen_<i>/ and records its files' checksums in
stages.json; it is skipped when they are there and match, so an interrupted run resumes at the first
unfinished stage (training at its last checkpoint) and a damaged one is refused (docs/reliability.md).

On several devices every rank runs this loop, each stage working on its share of the batches; global
rank 0 alone holds the run lock, checks and writes the run files, and hands what it read or decided
to the other ranks (selfevo.ranks, docs/scaling.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable, Iterator

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from selfevo import generate
from selfevo.config import VALUES_BEFORE_THE_KEY, EvolveConfig, identity, identity_of, validate
from selfevo.data import (
    DataError, RunError, check_can_create, load_eval, load_fragments, read_json, read_jsonl, remove_temporary_files,
    select_fragments, write_json, write_jsonl,
)
from selfevo.evaluate import evaluate_model
from selfevo.faults import kill_point
from selfevo.generate import write_answers, write_questions
from selfevo.ifd import score_pairs
from selfevo.models import (
    accelerator_device, adapter_switched, add_lora, load_adapter_weights, load_model, nf4_quantization,
    resolve_model, save_adapter,
)
from selfevo.ranks import Strategy, launch_ranks, on_rank_zero
from selfevo.prompts import prompts_digest
from selfevo.report import generation_line, log_knowledge, summary_table, write_report, write_summary
from selfevo.select import select_replay
from selfevo.train import AtomicCheckpointIO, LoRAModule, QADataModule, StepCheckpoint, build_trainer
from selfevo.vllm_engine import VLLMEngine, engine_lora_rank, require_vllm

console = Console(stderr=True)
LIBRARIES = ("selfevo", "torch", "transformers", "peft", "lightning", "torchmetrics", "nltk", "jieba", "rouge-chinese")


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _first_difference(a: dict, b: dict) -> str:
    """The first key where two run identities differ, as "key: old -> new", and for a plain old value the
    option that goes on with the run. A key that identity_of left out stands for the value it implies."""
    path: tuple[str, ...] = ()
    while isinstance(a, dict) and isinstance(b, dict):
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        path += (key,)
        a, b = (VALUES_BEFORE_THE_KEY.get(path) if key not in x else x[key] for x in (a, b))
    name = ".".join(path)
    hint = f"; it was begun with {a}: add --{name} {a} to go on with it" if isinstance(a, (str, int, float)) else ""
    return f"{name}: {a!r} -> {b!r}{hint}"


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def inside(run_dir: Path, folder: Path) -> Path:
    """`folder`, after checking that writing into it stays inside run_dir (no symbolic link leads out)."""
    if folder.is_symlink() or not folder.resolve().is_relative_to(run_dir.resolve()):
        raise RunError(f"{folder}: is a symbolic link; selfevo writes only inside {run_dir}")
    return folder


def prepare_run_dir(cfg: EvolveConfig, force: bool) -> Path:
    """Create runs/NAME with a config snapshot, or check that an existing one holds this config."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    log_dir = Path(cfg.logs_dir) / cfg.name
    for folder, what in ((run_dir, "run"), (log_dir, "log")):
        check_can_create(folder, what)
        if folder.is_symlink():
            raise RunError(f"{folder}: is a symbolic link; selfevo writes a run only into a real folder of its own")
    snapshot = run_dir / "config.json"
    prompts = prompts_digest(cfg.generation.language)
    if snapshot.exists():
        try:
            old = read_json(snapshot)
        except DataError:
            old = {}  # reported below as a changed snapshot
        problem = None
        if old and "sha256" not in old:
            problem = (
                f"{snapshot}: made by an older selfevo, whose run folders this version cannot check; "
                "pass --force to set this run aside and start over, or choose another --name"
            )
        elif old.get("sha256") != config_digest(old.get("config")):
            problem = (
                f"{snapshot}: changed since the run began (its checksum does not match); put the original back, "
                "or pass --force to set this run aside and start over"
            )
        elif old.get("prompts", prompts) != prompts:  # snapshots made before 2026-11-25 record none
            problem = (
                f"{run_dir} was begun with other question and answer prompts (this version of selfevo changed "
                f"them; its earlier one is named in {snapshot}); pass --force to set it aside and start over, "
                "or finish it with that version"
            )
        elif identity_of(old["config"]) != identity(cfg):
            problem = (
                f"{run_dir} holds a run of a different config "
                f"({_first_difference(identity_of(old['config']), identity(cfg))}); "
                "pass --force to set it aside and start over, or choose another --name"
            )
        if problem:
            if not force:
                raise RunError(problem)
            stamp = f"replaced-{datetime.now():%Y%m%d-%H%M%S}"
            for folder in (run_dir, log_dir):
                if folder.exists():
                    shutil.move(folder, folder.with_name(f"{folder.name}.{stamp}"))
            console.print(f"[yellow]moved the old run and its logs aside (*.{stamp})[/]")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"{e.filename}: cannot create the run or log directory ({e.strerror})") from None
    if not snapshot.exists():
        write_json(
            snapshot,
            {
                "config": identity(cfg),
                "sha256": config_digest(identity(cfg)),
                "seed": cfg.seed,
                "prompts": prompts,
                "versions": library_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    return run_dir


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold runs/NAME/.lock while working, so that two processes never write one run; the kernel
    releases it when the process dies, however it dies."""
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(f"{run_dir}: another selfevo process is working on this run; wait for it to end") from None
        swept = remove_temporary_files(run_dir)
        if swept:
            console.print(f"removed {swept} temporary file(s) left by an interrupted write")
        yield


_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read once per process while the file stays the same: run files are
    replaced by rename, never edited in place, so (inode, size, mtime) names one content."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


class Stages:
    """Skip-if-done bookkeeping of one generation folder, kept in its stages.json: per stage, the
    files it wrote with their SHA-256, its seconds and its counts.

    A stage is done when its record lists its files and each is there with that checksum. A stage
    without a record (killed before it was recorded), or with none of its files left (deleted to
    redo it), runs again. A recorded stage with a file missing or changed is a damaged run: that is
    an error that says what to delete, never a result silently trusted.

    With a strategy of several ranks, rank 0 checks and writes, and the others get its answers;
    without one (the checks before the work, on rank 0) it works alone.
    """

    def __init__(self, folder: Path, writer: SummaryWriter | None, step: int, strategy: Strategy | None = None):
        self.folder = folder
        self.writer = writer
        self.step = step
        self.strategy = strategy
        self.log_file = folder / "stages.json"
        self.log = on_rank_zero(strategy, self._read_log)

    def _read_log(self) -> dict:
        try:
            return read_json(self.log_file) if self.log_file.exists() else {}
        except DataError:
            raise RunError(
                f"{self.log_file}: damaged; delete it and run the same command to redo this folder's stages"
            ) from None

    def done(self, stage: str, files: tuple[str, ...]) -> bool:
        return on_rank_zero(self.strategy, lambda: self._done_here(stage, files))

    def _done_here(self, stage: str, files: tuple[str, ...]) -> bool:
        recorded = self.log.get(stage, {}).get("files")
        if recorded is None or not any((self.folder / f).exists() for f in files):
            return False
        for f in files:
            path = self.folder / f
            problem = "missing" if not path.exists() else None
            if problem is None and (f not in recorded or file_digest(path) != recorded[f]):
                problem = "changed or damaged since it was written (checksum differs)"
            if problem:
                redo = " and ".join(sorted({str(self.folder / f.split("/")[0]) for f in files}))
                raise RunError(f"{path}: {problem}; delete {redo} and run the same command to redo the {stage} stage")
        return True

    def begin(self, stage: str) -> None:
        """Forget a stage's record before its files are rewritten, so that a crash in between leaves no stale checksums."""
        if self.log.pop(stage, None) is not None:
            on_rank_zero(self.strategy, lambda: write_json(self.log_file, self.log))

    def record(self, stage: str, seconds: float, files: tuple[str, ...], **counts) -> None:
        """Record a stage whose files are written (on rank 0: call it after on_rank_zero wrote them)."""
        # The stage's cached GPU blocks go back to the device, for what shares it between stages: the
        # vLLM engine, or another run's process.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        digests = on_rank_zero(self.strategy, lambda: {f: file_digest(self.folder / f) for f in files})
        self.log[stage] = {"seconds": round(seconds, 2), **counts, "files": digests}
        on_rank_zero(self.strategy, lambda: write_json(self.log_file, self.log))
        if self.writer is not None:
            self.writer.add_scalar(f"seconds/{stage}", seconds, self.step)
        extra = ", ".join(f"{k} {v}" for k, v in counts.items())
        console.print(f"  {stage}: {seconds:.1f}s" + (f" ({extra})" if extra else ""))
        kill_point("stage")

    def jsonl(self, stage: str, file: str, make: Callable[[], tuple[list[dict], dict]]) -> list[dict]:
        """Load `file` if a previous attempt finished it; otherwise make and write it."""
        path = self.folder / file
        if self.done(stage, (file,)):
            return on_rank_zero(self.strategy, lambda: read_jsonl(path))
        self.begin(stage)
        t = time.perf_counter()
        records, counts = make()
        on_rank_zero(self.strategy, lambda: write_jsonl(path, records))
        self.record(stage, time.perf_counter() - t, (file,), **counts)
        return records


EVAL_FILES = ("predictions.jsonl", "metrics.json")
OPEN_BOOK_FILES = ("open_book/predictions.jsonl", "open_book/metrics.json")
ADAPTER_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def evolve(cfg: EvolveConfig, force: bool = False) -> Path:
    """Run generations cfg.start .. cfg.end-1; returns the run directory."""
    validate(cfg)
    if cfg.generation.backend == "vllm":  # fail now, not after the base model's evaluation
        engine_lora_rank(cfg.lora.r)
        require_vllm()
    fragments, duplicates = load_fragments(cfg.data.fragments)
    eval_set = load_eval(cfg.data.eval)
    fragments, from_eval = select_fragments(fragments, eval_set, cfg.data, cfg.seed)
    resolve_model(cfg.model.name, cfg.model.trust_remote_code)  # a bad model path fails before anything is written
    if cfg.model.quantization == "nf4":
        nf4_quantization()  # likewise a missing GPU or bitsandbytes
    # Ranks 1..N-1 start here (Lightning's launcher runs this command again) or were started with it
    # (torchrun, SLURM); each checks the input above for itself, so bad input stops every rank alike.
    strategy = launch_ranks(cfg.trainer)
    console.quiet = generate.console.quiet = strategy.global_rank != 0  # one rank tells the progress
    with ExitStack() as held:

        def take_run() -> Path:
            """Rank 0's: the run folder, its lock (held to the end), and its checks."""
            run_dir = prepare_run_dir(cfg, force)
            held.enter_context(run_lock(run_dir))
            verify_run(run_dir)
            check_earlier_generations(run_dir, cfg.start)
            return run_dir

        run_dir = on_rank_zero(strategy, take_run)
        console.print(
            f"[bold]{len(fragments)}[/] fragments ({duplicates} duplicates dropped"
            + (f"; {from_eval} of them the eval set's" if cfg.data.include_eval else "")
            + f"), [bold]{len(eval_set)}[/] eval pairs"
        )
        return run_generations(cfg, run_dir, fragments, eval_set, strategy)


def verify_run(run_dir: Path) -> None:
    """Check every recorded stage of the run before any work, so that damage stops it at once."""
    for folder in [run_dir / "base", *sorted(run_dir.glob("gen_*"))]:
        if (folder / "stages.json").exists() or folder.is_symlink():
            stages = Stages(inside(run_dir, folder), None, 0)
            for stage, record in stages.log.items():
                stages.done(stage, tuple(record.get("files", {})))


def check_earlier_generations(run_dir: Path, start: int) -> None:
    """What generation `start` builds on must be there, intact."""
    for j in range(start):
        earlier = Stages(inside(run_dir, run_dir / f"gen_{j}"), None, j + 1)
        # It needs the previous generation's adapter and every earlier generation's scored pairs; the
        # older adapters may have been left out (docs/reproduce.md: runs that travel between machines).
        needed = (("train", ADAPTER_FILES),) if j == start - 1 else ()
        for stage, files in needed + (("score", ("qa.jsonl",)), ("evaluate", EVAL_FILES)):
            if not earlier.done(stage, files):
                raise RunError(f"{earlier.folder} is unfinished ({stage}); resume from it with --start {j}")


def run_generations(
    cfg: EvolveConfig, run_dir: Path, fragments: list[str], eval_set: list[dict], strategy: Strategy
) -> Path:
    console.print(f"loading {cfg.model.name} ...")
    base, tokenizer = load_model(cfg.model)
    model = add_lora(base, cfg.lora, cfg.seed)
    fresh_adapter = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}  # A_0
    max_length = cfg.model.max_length
    log_dir = Path(cfg.logs_dir) / cfg.name
    writer = SummaryWriter(log_dir / "evolve") if strategy.global_rank == 0 else None

    def trainer(**kwargs):
        return build_trainer(cfg.trainer, **kwargs)

    def summarize() -> list[dict]:
        return write_summary(run_dir)  # summary.json and summary.md

    def stages_of(folder_name: str, step: int) -> Stages:
        return Stages(on_rank_zero(strategy, lambda: inside(run_dir, run_dir / folder_name)), writer, step, strategy)

    def evaluate_into(stages: Stages, adapter: Path | None, open_book: bool = False) -> dict:
        """Evaluate M_0 (adapter None) or the model with `adapter`, already loaded into `model`; open
        book (M_0 only: the ceiling) into the folder's open_book/."""
        stage, files = ("evaluate_open_book", OPEN_BOOK_FILES) if open_book else ("evaluate", EVAL_FILES)
        folder, step = stages.folder, stages.step
        if stages.done(stage, files):
            return on_rank_zero(strategy, lambda: read_json(folder / files[1]))
        stages.begin(stage)
        t = time.perf_counter()
        metrics, predictions = evaluate_model(
            generator(adapter), tokenizer, eval_set, cfg.evaluation, max_length, trainer(), cfg.seed,
            use_adapter=adapter is not None, language=cfg.generation.language, open_book=open_book,
        )

        def write():
            write_jsonl(folder / files[0], predictions)
            # No timings here: the metrics are those of the predictions alone, summed in eval-set order on
            # every rank, so the same predictions give the same file on any number of ranks.
            write_json(folder / files[1], metrics)

        on_rank_zero(strategy, write)
        stages.record(stage, time.perf_counter() - t, files, pairs=len(predictions))
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"{'eval_open_book' if open_book else 'eval'}/{key}", value, step)
        return metrics

    engine: VLLMEngine | None = None  # the vllm backend's engine: made when first needed, kept for the run

    def generator(adapter: Path | None):
        """What writes questions and answers and answers the eval questions: the Hugging Face model,
        or the vLLM engine serving `adapter`."""
        nonlocal engine
        if cfg.generation.backend == "hf":
            return model  # M_i: its adapter weights are already loaded
        if engine is None:
            folder = resolve_model(cfg.model.name, cfg.model.trust_remote_code)
            engine = VLLMEngine(
                folder, cfg.model, cfg.generation, cfg.lora.r, cfg.seed, cfg.evaluation.max_new_tokens
            )
        engine.use_adapter(adapter)
        return engine

    console.rule("base model: closed book, and open book (the ceiling)")
    base_stages = stages_of("base", 0)
    evaluate_into(base_stages, adapter=None)
    evaluate_into(base_stages, adapter=None, open_book=True)

    for i in range(cfg.start, cfg.end):
        console.rule(f"generation {i}")
        stages = stages_of(f"gen_{i}", i + 1)
        folder = stages.folder
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
            records, dropped = write_questions(
                generator(adapter), tokenizer, fragments, cfg.generation, max_length, seed, strategy
            )
            return records, {"kept": len(records), "dropped": dropped}

        def make_answers():
            # generation.answer_model base: the base model answers (no adapter on either backend)
            current = cfg.generation.answer_model == "current"
            with adapter_switched(model, current):
                records, drops = write_answers(
                    generator(adapter if current else None), tokenizer, questions, cfg.generation, max_length, seed, strategy
                )
            return [{**r, "generation": i} for r in records], {"kept": len(records), **drops}

        def make_replay():
            history = on_rank_zero(
                strategy, lambda: [p for j in range(i) for p in read_jsonl(run_dir / f"gen_{j}" / "qa.jsonl")]
            )
            chosen = select_replay(history, cfg.replay.mode, cfg.replay.k, seed)
            return chosen, {"history": len(history), "chosen": len(chosen)}

        questions = stages.jsonl("questions", "questions.jsonl", make_questions)
        qa = stages.jsonl("answers", "answers.jsonl", make_answers)
        replay = stages.jsonl("replay", "replay.jsonl", make_replay)
        if stages.done("train", ADAPTER_FILES):
            # a kill can come before their removal
            on_rank_zero(strategy, lambda: shutil.rmtree(inside(run_dir, folder / "checkpoints"), ignore_errors=True))
            load_adapter_weights(model, folder / "adapter")
        else:

            def check_pairs() -> None:
                inside(run_dir, folder / "checkpoints")
                if not qa and not replay:
                    raise RunError(
                        f"{folder}: generation {i} kept no QA pairs and has nothing to replay; see the dropped counts "
                        f"in {folder}/stages.json, then delete {folder} and run again with other generation settings"
                    )

            on_rank_zero(strategy, check_pairs)
            stages.begin("train")
            t = time.perf_counter()
            train_adapter(cfg, model, qa + replay, folder, log_dir, seed, strategy)
            stages.record("train", time.perf_counter() - t, ADAPTER_FILES, pairs=len(qa) + len(replay))

        def make_scores():
            scored = score_pairs(
                model, tokenizer, qa, cfg.ifd, max_length, trainer(), use_adapter=cfg.ifd.scorer == "trained"
            )
            if scored and writer is not None:
                writer.add_histogram("ifd", torch.tensor([p["ifd"] for p in scored]), i + 1)
                samples = "\n\n".join(f"**Q:** {p['question']}\n\n**A:** {p['answer']}" for p in scored[:3])
                writer.add_text("samples", samples, i + 1)
            return scored, {"pairs": len(scored)}

        stages.jsonl("score", "qa.jsonl", make_scores)
        evaluate_into(stages, adapter=folder / "adapter")
        rows = on_rank_zero(strategy, summarize)
        console.print(generation_line(rows, f"gen_{i}"))
        if writer is not None:
            log_knowledge(writer, rows, f"gen_{i}", i + 1)
            writer.flush()

    if writer is not None:
        writer.close()
    if engine is not None:
        engine.close()
    png = on_rank_zero(strategy, lambda: write_report(run_dir, rows))
    console.rule("summary")
    console.print(summary_table(rows, f"{run_dir.name}: what each generation knows, closed book"))
    console.print(f"{run_dir / 'summary.md'} has the intervals; report: {png}\nTensorBoard: tensorboard --logdir {log_dir}")
    return run_dir


def train_adapter(
    cfg: EvolveConfig, model, pairs: list[dict], folder: Path, log_dir: Path, seed: int, strategy: Strategy
) -> None:
    """Continue the in-memory adapter on `pairs` (written to folder/train.jsonl) and save it to folder/adapter.

    Every train.checkpoint_every optimizer steps the adapter's weights and the optimizer, scheduler
    and loop state go to checkpoints/last.ckpt (see train.StepCheckpoint); a killed training
    resumes from there, and the folder is deleted once the adapter is saved.

    On several ranks, rank 0 writes the files, and every rank reads train.jsonl and the checkpoint
    (a folder all nodes share, as Lightning's checkpoints need); train.grad_accum stays the whole
    step's micro-batches, dealt out to the ranks (train.PlannedBatches).
    """
    checkpoints = folder / "checkpoints"
    train_file = folder / "train.jsonl"
    on_rank_zero(
        strategy, lambda: write_jsonl(train_file, [{"question": p["question"], "answer": p["answer"]} for p in pairs])
    )
    data = QADataModule(
        str(train_file), cfg.model.name, cfg.train.micro_batch_size, cfg.model.max_length, seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    logger = TensorBoardLogger(save_dir=str(log_dir), name="", version=f"train_gen_{folder.name.split('_')[-1]}")
    last = checkpoints / "last.ckpt"
    trainer = build_trainer(
        cfg.trainer,
        max_epochs=cfg.train.epochs,
        accumulate_grad_batches=cfg.train.grad_accum // strategy.world_size,
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[LearningRateMonitor(logging_interval="step"), StepCheckpoint(last, cfg.train.checkpoint_every)],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(folder),
    )
    torch.manual_seed(seed)
    resume = on_rank_zero(strategy, last.exists)
    if resume:
        console.print(f"  resuming training from {last}", soft_wrap=True)
    try:
        trainer.fit(
            LoRAModule.around(model, cfg.train), datamodule=data,
            ckpt_path=str(last) if resume else None, weights_only=True,
        )
    except torch.OutOfMemoryError:
        raise RunError(
            f"out of GPU memory in training: lower train.micro_batch_size (now {cfg.train.micro_batch_size}) "
            f"and raise train.grad_accum to keep the effective batch (a multiple of trainer.devices x "
            f"trainer.num_nodes, now {strategy.world_size}), or lower model.max_length "
            f"(now {cfg.model.max_length}); then run the same command to resume"
        ) from None

    def save() -> None:
        save_adapter(model, folder / "adapter")
        shutil.rmtree(checkpoints, ignore_errors=True)

    on_rank_zero(strategy, save)
