"""The self-evolution loop (arXiv 2408.12247), generation by generation.

For generation i, with M_i = base + adapter A_i (A_0: a fresh adapter, i.e. the base model):
    questions  <- M_i (M_0 with generation.question_model base) writes questions about every
                  fragment, one per sentence, those it got wrong
                  at the last check first (open book), none about the dev split's sentences;
                  copies of the prompt's examples, unspecific and repeated ones are dropped
    qa         <- M_0 answers each question (open book; M_i does with generation.answer_model
                  current); answers the fragment does not make likelier under M_0 are dropped
                  (grounding); generation 0 holds a share back as the dev split
    replay     <- k pairs of QA_0..QA_{i-1}, chosen by IFD
    A_{i+1}    <- continue A_i on qa + replay (closed book); train.fresh_adapter: A_0 anew
    qa.ifd     <- IFD of every pair of QA_i (base model by default)
    check      <- M_{i+1} answers the dev split and some of qa closed book: what it knows, what it
                  missed (asked again in generation i+1), and the best generation
    metrics    <- M_{i+1} answers the eval questions (closed book)
Before generation `start`, the base model is evaluated once, closed book and open book (the
ceiling). The paper's loop is this one with one question per fragment, asked about the whole
fragment, and no filters, dev split or check (configs/aiops.yaml).

Each stage is one `Stages.stage` call (selfevo.rundir): skipped when its files are there and intact,
written atomically by rank 0 otherwise. On several devices every rank runs this loop, each stage
working on its share of the batches (docs/scaling.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import shutil
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.tensorboard import SummaryWriter
from transformers import PreTrainedTokenizerBase

from selfevo import rundir
from selfevo.config import EvolveConfig, import_class, validate, world_size
from selfevo.data import (
    load_eval,
    load_fragments,
    load_qa,
    load_questions,
    select_fragments,
    with_origins,
)
from selfevo.evaluate import evaluate_model
from selfevo.generate import make_generator, resolve_backend, write_answers, write_questions
from selfevo.hardware import accelerator_device, build_trainer, training_precision
from selfevo.ifd import ground_pairs, score_pairs
from selfevo.log import console, run_log, setup_logging
from selfevo.models import (
    add_lora,
    load_adapter_weights,
    load_model,
    nf4_quantization,
    resolve_model,
    save_adapter,
)
from selfevo.prompts import clean_answer, closed_book_prompt, normalised_question, prompts_for
from selfevo.ranks import Strategy, launch_ranks, on_rank_zero
from selfevo.report import (
    best_generation,
    generation_line,
    log_knowledge,
    summary_table,
    write_report,
    write_summary,
)
from selfevo.rundir import (
    ADAPTER_FILES,
    EVAL_FILES,
    OPEN_BOOK_FILES,
    RunError,
    Stages,
    read_jsonl,
    write_jsonl,
)
from selfevo.sampling import Sampling, generation_seed
from selfevo.select import (
    draw_anchors,
    fragment_texts,
    held_out_unit,
    select_replay,
    split_dev,
    split_eval,
)
from selfevo.train import (
    AtomicCheckpointIO,
    LoRAModule,
    QADataModule,
    RetentionProbe,
    StepCheckpoint,
    probe_sample,
)
from selfevo.vllm_engine import engine_lora_rank, require_vllm

log = logging.getLogger(__name__)


CHECK_FIELDS = ("id", "unit", "split", "question", "reference", "prediction", "fact-recall")
# What train.jsonl keeps of a pair beside its question and answer: where it comes from (for the
# exports, selfevo.export_qa) and whether it is an anchor, not the domain's.
TRAIN_FIELDS = ("question", "answer", "id", "generation", "source", "position", "ifd", "anchor")


def evolve(cfg: EvolveConfig, force: bool = False) -> Path:
    """Run generations cfg.start .. cfg.end-1; returns the run directory. Bad input stops it before
    anything is written."""
    validate(cfg)
    backend = resolve_backend(
        cfg.generation.backend, cfg.model.quantization, world_size(cfg.trainer)
    )
    cfg = dataclasses.replace(cfg, generation=dataclasses.replace(cfg.generation, backend=backend))
    if cfg.generation.backend == "vllm":  # fail now, not after the base model's evaluation
        engine_lora_rank(cfg.lora.r)
        require_vllm()
    fragments, origins, duplicates = load_fragments(cfg.data.fragments)
    eval_set = load_eval(cfg.data.eval) if cfg.data.eval else []  # none: held out of generation 0
    general = load_qa(cfg.data.general) if cfg.data.general else []
    anchors = load_questions(cfg.train.anchors) if cfg.train.anchors else []
    origin_of = dict(zip(fragments, origins))
    fragments, from_eval = select_fragments(fragments, eval_set, cfg.data, cfg.seed)
    origins = [origin_of[f] for f in fragments]
    resolve_model(
        cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision
    )  # a bad model path fails before anything is written
    if cfg.model.quantization == "nf4":
        nf4_quantization()  # likewise a missing GPU or bitsandbytes
    # Ranks 1..N-1 start here (Lightning's launcher runs this command again) or were started with it
    # (torchrun, SLURM); each checks the input above for itself, so bad input stops every rank
    # alike.
    strategy = launch_ranks(cfg.trainer)
    setup_logging(quiet=strategy.global_rank != 0)  # one rank tells the progress
    with ExitStack() as held:

        def take_run() -> Path:
            """Rank 0's: the run folder, its lock (held to the end), its log file, and its
            checks."""
            run_dir = rundir.prepare(cfg, force)
            held.enter_context(rundir.run_lock(run_dir))
            held.enter_context(run_log(run_dir / "run.log"))
            rundir.verify(run_dir)
            rundir.check_earlier_generations(run_dir, cfg.start)
            return run_dir

        run_dir = on_rank_zero(strategy, take_run)
        log.info(
            "%d fragments (%d duplicates dropped%s), %s",
            len(fragments),
            duplicates,
            f"; {from_eval} of them the eval set's" if cfg.data.include_eval else "",
            f"{len(eval_set)} eval pairs"
            if cfg.data.eval
            else f"no eval set: {cfg.data.eval_share:.0%} of generation 0's sentences are held "
            "out as one",
        )
        log.info("generation: %s", "vLLM" if backend == "vllm" else "Hugging Face generate")
        if cfg.trainer.fit_precision == "auto":
            log.info("training precision: %s", training_precision(cfg.trainer))
        loop = Loop(cfg, run_dir, fragments, eval_set, strategy, general, anchors, origins)
        try:
            loop.evaluate_base()
            for i in range(cfg.start, cfg.end):
                loop.generation(i)
        finally:
            loop.close()
        loop.report()
    return run_dir


class Loop:
    """The models, the generator and the run folder a run's generations share: one base model, one
    LoRA wrapper whose weights are swapped between generations (never merged), one generator."""

    def __init__(
        self,
        cfg: EvolveConfig,
        run_dir: Path,
        fragments: list[str],
        eval_set: list[dict],
        strategy: Strategy,
        general: list[dict] = (),
        anchors: list[str] = (),
        origins: Optional[list[dict]] = None,
    ):
        self.cfg, self.run_dir, self.fragments, self.strategy = cfg, run_dir, fragments, strategy
        # Without data.eval, generation 0 holds the eval out of its QA pairs (gen_0/eval.jsonl).
        self.eval_set = eval_set if cfg.data.eval else self.earlier(1, "eval.jsonl")
        self.general = list(general)  # data.general's questions
        self.anchors = list(anchors)  # train.anchors' instructions
        self.origins = origins or [{} for _ in fragments]  # each fragment's source and position
        # The run's prompts, the same for every stage (training's and evaluation's closed book too)
        self.prompts = prompts_for(cfg.generation.language, cfg.prompts)
        log.info("loading %s ...", cfg.model.name)
        base, self.tokenizer = load_model(cfg.model)
        self.model = add_lora(base, cfg.lora, cfg.seed)
        self.initial_adapter = {
            k: v.clone() for k, v in get_peft_model_state_dict(self.model).items()
        }  # A_0
        self.generator = make_generator(
            cfg.generation.backend,
            self.model,
            self.tokenizer,
            cfg.model,
            cfg.generation,
            cfg.lora.r,
            cfg.seed,
            cfg.evaluation.max_new_tokens,
        )
        self.log_dir = Path(cfg.logs_dir) / cfg.name
        self.writer = SummaryWriter(self.log_dir / "evolve") if strategy.global_rank == 0 else None
        self.rows: list[dict] = []

    def generation(self, i: int) -> None:
        """One generation: questions, answers, (generation 0: the dev split), replay, train, score,
        check (with a dev split or check_pairs), evaluate."""
        console.rule(f"generation {i}")
        gen = Stages(self.run_dir, f"gen_{i}", self.writer, i + 1, self.strategy)
        seed = generation_seed(self.cfg.seed, i)
        current = self.hold_adapter(i)  # M_i
        questions = gen.stage(
            "questions", ("questions.jsonl",), lambda: self.questions(current, i, seed)
        )
        answers = gen.stage(
            "answers",
            ("answers.jsonl",),
            lambda: self.answers(questions["questions.jsonl"], current, i, seed),
        )
        qa = answers["answers.jsonl"]
        if self.cfg.generation.min_grounding is not None:
            grounded = gen.stage("ground", ("grounded.jsonl",), lambda: self.ground(qa, i))
            qa = grounded["grounded.jsonl"]
        if i == 0 and self.cfg.targeting.dev_share > 0:
            dev = gen.stage("dev", ("dev.jsonl",), lambda: self.hold_back_dev(qa, seed))
            qa = without(qa, dev["dev.jsonl"])
        if i == 0 and not self.cfg.data.eval:
            held = gen.stage("eval_split", ("eval.jsonl",), lambda: self.hold_out_eval(qa, seed))
            qa = without(qa, held["eval.jsonl"])
            self.eval_set = held["eval.jsonl"]
            self.evaluate_base()
        replay = gen.stage("replay", ("replay.jsonl",), lambda: self.replay(i, seed))
        pairs = qa + replay["replay.jsonl"]
        pairs += fragment_texts(self.fragments, self.cfg.train.fragment_weight, seed)
        pairs += self.anchor_sample(seed, len(pairs))
        gen.stage("train", ADAPTER_FILES, lambda: self.train(pairs, gen.folder, seed))
        gen.remove("checkpoints")  # a kill can come between the adapter's save and their removal
        load_adapter_weights(self.model, gen.folder / "adapter")  # M_{i+1}
        gen.stage("score", ("qa.jsonl",), lambda: self.score(qa, i))
        if self.dev or self.cfg.targeting.check_pairs:
            adapter = gen.folder / "adapter"
            gen.stage("check", ("check.jsonl",), lambda: self.check(qa, adapter, seed))
        gen.stage("evaluate", EVAL_FILES, lambda: self.evaluate(gen.folder / "adapter", step=i + 1))
        if self.general:
            adapter = gen.folder / "adapter"
            gen.stage("general", ("general.jsonl",), lambda: self.answer_general(adapter, i + 1))
        self.summarize(f"gen_{i}", i + 1)

    def evaluate_base(self) -> None:
        """M_0 on the eval set, closed book and open book (the ceiling), once per run. Without
        data.eval, once generation 0 has held its eval out."""
        if not self.eval_set:
            return
        console.rule("base model: closed book, and open book (the ceiling)")
        base = Stages(self.run_dir, "base", self.writer, 0, self.strategy)
        base.stage("evaluate", EVAL_FILES, lambda: self.evaluate(None, step=0))
        base.stage(
            "evaluate_open_book",
            OPEN_BOOK_FILES,
            lambda: self.evaluate(None, step=0, open_book=True),
        )
        if self.general:
            base.stage("general", ("general.jsonl",), lambda: self.answer_general(None, 0))
        if self.anchors:
            base.stage("anchors", ("anchors.jsonl",), self.answer_anchors)

    # --- the stages ------------------------------------------------------------------------------

    def hold_adapter(self, i: int) -> Optional[Path]:
        """Put A_i into the model (training continues it); returns its folder (None: the fresh
        A_0)."""
        # Lightning hands the model back on the CPU after each stage; generation runs outside it.
        self.model.to(accelerator_device(self.cfg.trainer.accelerator))
        if i == 0:
            set_peft_model_state_dict(self.model, self.initial_adapter)
            return None
        adapter = self.run_dir / f"gen_{i - 1}" / "adapter"
        load_adapter_weights(self.model, adapter)
        return adapter

    def earlier(self, i: int, name: str) -> list[dict]:
        """The records of file `name` of generations 0..i-1 (those there are), read by rank 0."""
        return on_rank_zero(
            self.strategy,
            lambda: [
                r
                for j in range(i)
                if (self.run_dir / f"gen_{j}" / name).is_file()
                for r in read_jsonl(self.run_dir / f"gen_{j}" / name)
            ],
        )

    @property
    def dev(self) -> list[dict]:
        """The dev split (held back in generation 0), or [] where there is none (yet)."""
        return self.earlier(1, "dev.jsonl")

    def questions(self, current: Optional[Path], i: int, seed: int) -> tuple[dict, dict]:
        history = self.earlier(i, "questions.jsonl")
        missed = set()
        if self.cfg.targeting.retarget and i > 0:  # what M_i answered without all of its facts
            check = self.run_dir / f"gen_{i - 1}" / "check.jsonl"
            missed = {
                (c["id"], c["unit"])
                for c in on_rank_zero(
                    self.strategy, lambda: read_jsonl(check) if check.is_file() else []
                )
                if "unit" in c and c["fact-recall"] not in (None, 100)
            }
        self.generator.use_adapter(
            current if self.cfg.generation.question_model == "current" else None
        )
        records, counts = write_questions(
            self.generator,
            self.fragments,
            self.cfg.generation,
            seed,
            self.strategy,
            asked=Counter((q["id"], q["unit"]) for q in history if "unit" in q),
            missed=missed,
            asked_before={normalised_question(q["question"]) for q in history},
            held_out={held_out_unit(p) for p in self.dev},
            prompts=self.prompts,
        )
        if not self.cfg.data.eval:  # the held-out eval's questions, word for word, whatever filters
            held = {normalised_question(r["question"]) for r in self.eval_set}
            kept = [r for r in records if normalised_question(r["question"]) not in held]
            counts |= {"kept": len(kept), "eval_question": len(records) - len(kept)}
            records = kept
        return {"questions.jsonl": with_origins(records, self.origins)}, counts

    def answers(
        self, questions: list[dict], current: Optional[Path], i: int, seed: int
    ) -> tuple[dict, dict]:
        # generation.answer_model base: the base model answers (the adapter off, on either backend)
        self.generator.use_adapter(
            current if self.cfg.generation.answer_model == "current" else None
        )
        records, drops = write_answers(
            self.generator,
            questions,
            self.cfg.generation,
            seed,
            self.strategy,
            prompts=self.prompts,
        )
        return {"answers.jsonl": [{**r, "generation": i} for r in records]}, {
            "kept": len(records),
            **drops,
        }

    def ground(self, qa: list[dict], i: int) -> tuple[dict, dict]:
        """Every pair's grounding under the base model; those below generation.min_grounding are
        dropped: the fragment does not make their answer likelier."""
        scored = ground_pairs(
            self.model,
            self.tokenizer,
            qa,
            self.cfg.ifd,
            self.cfg.model.max_length,
            build_trainer(self.cfg.trainer),
        )
        # A pair whose fragment and question leave no room for its answer within model.max_length
        # is kept unmeasured: nothing says its answer is unsupported.
        floor = self.cfg.generation.min_grounding
        kept = [p for p in scored if p["grounding"] is None or p["grounding"] >= floor]
        gains = [p["grounding"] for p in scored if p["grounding"] is not None]
        if gains and self.writer is not None:
            self.writer.add_histogram("grounding", torch.tensor(gains), i + 1)
        return {"grounded.jsonl": kept}, {
            "pairs": len(scored),
            "kept": len(kept),
            "ungrounded": len(scored) - len(kept),
            "unmeasured": len(scored) - len(gains),
            "mean_grounding": round(sum(gains) / len(gains), 4) if gains else None,
        }

    def hold_back_dev(self, qa: list[dict], seed: int) -> tuple[dict, dict]:
        train, dev = split_dev(qa, self.cfg.targeting.dev_share, seed)
        return {"dev.jsonl": dev}, {"dev": len(dev), "train": len(train)}

    def hold_out_eval(self, qa: list[dict], seed: int) -> tuple[dict, dict]:
        """Without a labelled eval set: one pair of a seeded share of the sentences, its question
        never trained on, its open-book answer the reference (select.split_eval)."""
        train, held = split_eval(qa, self.cfg.data.eval_share, seed)
        if not held:
            raise RunError(
                f"{self.run_dir / 'gen_0'}: generation 0 kept {len(qa)} QA pairs, too few to hold "
                "an eval out of; give a labelled eval set (data.eval) or more fragments"
            )
        keep = ("id", "unit", "source", "position", "fragment", "question")
        records = [{k: p[k] for k in keep if k in p} | {"reference": p["answer"]} for p in held]
        return {"eval.jsonl": records}, {"eval": len(records), "train": len(train)}

    def answer_closed_book(self, pairs: list[dict], adapter: Optional[Path]) -> list[dict]:
        """The model with `adapter` (None: the base model) answers each pair's question closed
        book, scored against the pair's answer as the reference (every pair, whatever
        evaluation.limit says)."""
        self.generator.use_adapter(adapter)
        _, predictions = evaluate_model(
            self.generator,
            [{**p, "reference": p["answer"]} for p in pairs],
            dataclasses.replace(self.cfg.evaluation, limit=None),
            build_trainer(self.cfg.trainer),
            self.cfg.seed,
            prompts=self.prompts,
        )
        return predictions

    def check(self, qa: list[dict], adapter: Path, seed: int) -> tuple[dict, dict]:
        """M_{i+1} answers closed book the dev split and targeting.check_pairs of the pairs it was
        trained on, each scored against the open-book answer it stands for: fact recall on the dev
        split says what it knows (and picks the best generation); on the trained pairs, what it
        retained; the sentences of both whose facts it missed are asked again next generation."""
        draw = random.Random(seed).sample(
            range(len(qa)), min(self.cfg.targeting.check_pairs, len(qa))
        )
        trained = [qa[j] for j in sorted(draw)]
        checked = [{**p, "split": "dev"} for p in self.dev] + [
            {**p, "split": "trained"} for p in trained
        ]
        predictions = self.answer_closed_book(checked, adapter)
        generation = int(adapter.parent.name.split("_")[-1])
        out = [
            {"generation": generation} | {k: p[k] for k in CHECK_FIELDS if k in p}
            for p in predictions
        ]
        counts = {}
        for split in ("dev", "trained"):
            scores = [p["fact-recall"] for p in out if p["split"] == split]
            counts[f"{split}_pairs"] = len(scores)
            counts[f"{split}_fact_recall"] = mean_fact_recall(scores)
            counts[f"{split}_scored"] = sum(s is not None for s in scores)
            if self.writer is not None and counts[f"{split}_fact_recall"] is not None:
                self.writer.add_scalar(
                    f"check/{split}_fact_recall", counts[f"{split}_fact_recall"], generation + 1
                )
        return {"check.jsonl": out}, counts

    def answer_general(self, adapter: Optional[Path], step: int) -> tuple[dict, dict]:
        """The model answers the general questions (data.general) closed book: their fact recall,
        against the base model's, says what training cost it outside the domain."""
        keep = ("question", "reference", "prediction", "fact-recall")
        out = [{k: p[k] for k in keep} for p in self.answer_closed_book(self.general, adapter)]
        recall = mean_fact_recall([p["fact-recall"] for p in out])
        if self.writer is not None and recall is not None:
            self.writer.add_scalar("general/fact_recall", recall, step)
        return {"general.jsonl": out}, {"pairs": len(out), "fact_recall": recall}

    def answer_anchors(self) -> tuple[dict, dict]:
        """The base model's own closed-book answers to the anchor instructions (greedy): what each
        generation trains on beside its QA, to keep answering outside the domain as it did."""
        self.generator.use_adapter(None)
        prompts = [
            closed_book_prompt(self.tokenizer, q, self.prompts.closed_book) for q in self.anchors
        ]
        answers = self.generator.generate(
            prompts,
            Sampling(self.cfg.generation.answer_max_new_tokens),
            seed=self.cfg.seed,
            batch_size=self.cfg.generation.batch_size,
            description="answering the anchors",
            strategy=self.strategy,
        )
        answers = [clean_answer(a) for a in answers]
        kept = [{"question": q, "answer": a} for q, a in zip(self.anchors, answers) if a]
        return {"anchors.jsonl": kept}, {"pairs": len(kept), "empty": len(answers) - len(kept)}

    def anchor_sample(self, seed: int, trained: int) -> list[dict]:
        """The base model's anchor answers to train on beside `trained` other records, seeded per
        generation (select.draw_anchors: train.anchor_pairs, or train.anchor_share of the whole)."""
        if not self.anchors:
            return []
        answers = on_rank_zero(
            self.strategy, lambda: read_jsonl(self.run_dir / "base" / "anchors.jsonl")
        )
        drawn = draw_anchors(
            answers,
            seed,
            pairs=self.cfg.train.anchor_pairs,
            share=self.cfg.train.anchor_share,
            trained=trained,
        )
        return [{**p, "anchor": True} for p in drawn]

    def replay(self, i: int, seed: int) -> tuple[dict, dict]:
        history = on_rank_zero(
            self.strategy,
            lambda: [
                p for j in range(i) for p in read_jsonl(self.run_dir / f"gen_{j}" / "qa.jsonl")
            ],
        )
        chosen = select_replay(history, self.cfg.replay.mode, self.cfg.replay.k, seed)
        return {"replay.jsonl": chosen}, {"history": len(history), "chosen": len(chosen)}

    def train(self, pairs: list[dict], folder: Path, seed: int) -> tuple[dict, dict]:
        def check() -> None:
            rundir.inside(self.run_dir, folder / "checkpoints")
            if not pairs:
                raise RunError(
                    f"{folder}: this generation kept no QA pairs and has nothing to replay; see "
                    "the dropped counts "
                    f"in {folder}/stages.json, then delete {folder} and run again with other "
                    "generation settings"
                )

        on_rank_zero(self.strategy, check)
        if self.cfg.train.fresh_adapter:  # A_{i+1} from A_0 (a mid-training checkpoint still wins)
            set_peft_model_state_dict(self.model, self.initial_adapter)
        trained = train_adapter(
            self.cfg, self.model, self.tokenizer, pairs, folder, self.log_dir, seed, self.strategy
        )
        texts = sum("text" in p for p in pairs)
        anchors = sum("anchor" in p for p in pairs)
        return {}, {
            "pairs": len(pairs) - texts - anchors,
            "texts": texts,
            "anchors": anchors,
            **trained,
        }

    def score(self, qa: list[dict], i: int) -> tuple[dict, dict]:
        scored = score_pairs(
            self.model,
            self.tokenizer,
            qa,
            self.cfg.ifd,
            self.cfg.model.max_length,
            build_trainer(self.cfg.trainer),
            use_adapter=self.cfg.ifd.scorer == "trained",
        )
        ifds = [p["ifd"] for p in scored]
        mean_ifd = round(sum(ifds) / len(ifds), 4) if ifds else None
        if scored and self.writer is not None:
            self.writer.add_histogram("ifd", torch.tensor(ifds), i + 1)
            samples = "\n\n".join(
                f"**Q:** {p['question']}\n\n**A:** {p['answer']}" for p in scored[:3]
            )
            self.writer.add_text("samples", samples, i + 1)
        return {"qa.jsonl": scored}, {"pairs": len(scored), "mean_ifd": mean_ifd}

    def evaluate(
        self, adapter: Optional[Path], step: int, open_book: bool = False
    ) -> tuple[dict, dict]:
        self.generator.use_adapter(adapter)
        metrics, predictions = evaluate_model(
            self.generator,
            self.eval_set,
            self.cfg.evaluation,
            build_trainer(self.cfg.trainer),
            self.cfg.seed,
            open_book=open_book,
            prompts=self.prompts,
        )
        if self.writer is not None:
            tag = "eval_open_book" if open_book else "eval"
            for key, value in metrics.items():
                self.writer.add_scalar(f"{tag}/{key}", value, step)
            self.writer.add_text(f"{tag}/predictions", predictions_markdown(predictions), step)
        files = OPEN_BOOK_FILES if open_book else EVAL_FILES
        # No timings in metrics.json: the metrics are those of the predictions alone, summed in
        # eval-set order on every rank, so the same predictions give the same file on any number of
        # ranks.
        return {files[0]: predictions, files[1]: metrics}, {"pairs": len(predictions)}

    # --- what the user sees -----------------------------------------------------------------------

    def summarize(self, model: str, step: int) -> None:
        self.rows = on_rank_zero(
            self.strategy, lambda: write_summary(self.run_dir)
        )  # summary.json, summary.md
        log.info(generation_line(self.rows, model))
        if self.writer is not None:
            log_knowledge(self.writer, self.rows, model, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.generator.close()

    def report(self) -> None:
        png = on_rank_zero(self.strategy, lambda: write_report(self.run_dir, self.rows))
        console.rule("summary")
        console.print(
            summary_table(
                self.rows, f"{self.run_dir.name}: what each generation knows, closed book"
            )
        )
        log.info("%s has the intervals; report: %s", self.run_dir / "summary.md", png)
        best = best_generation(self.rows)
        if best is not None:
            log.info("best generation, by fact recall on the dev split: %s", best)
        log.info("TensorBoard: tensorboard --logdir %s", self.log_dir)


def predictions_markdown(predictions: list[dict], n: int = 20) -> str:
    """The first `n` eval answers as a markdown table, for TensorBoard's text tab."""

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    rows = [
        f"| {cell(p['question'])} | {cell(p['reference'])} | {cell(p['prediction'])} |"
        for p in predictions[:n]
    ]
    return "\n".join(["| question | reference | answer |", "|---|---|---|", *rows])


def without(pairs: list[dict], held: list[dict]) -> list[dict]:
    """`pairs` less those held out (the dev split, the eval), matched by fragment and question."""
    out = {(p["id"], p["question"]) for p in held}
    return [p for p in pairs if (p["id"], p["question"]) not in out]


def mean_fact_recall(scores: list[Optional[float]]) -> Optional[float]:
    """The mean of the per-pair fact recalls that are scored (a reference without facts has None),
    rounded to 2 places; None when none is."""
    scored = [x for x in scores if x is not None]
    return round(sum(scored) / len(scored), 2) if scored else None


def train_adapter(
    cfg: EvolveConfig,
    model,
    tokenizer,
    pairs: list[dict],
    folder: Path,
    log_dir: Path,
    seed: int,
    strategy: Strategy,
) -> dict:
    """Continue the in-memory adapter on `pairs` (written to folder/train.jsonl) and save it to
    folder/adapter; returns the epochs trained and, with train.max_epochs, the retention after each
    (train.RetentionProbe).

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
        strategy,
        lambda: write_jsonl(
            train_file,
            [
                {"text": p["text"]} if "text" in p else {k: p[k] for k in TRAIN_FIELDS if k in p}
                for p in pairs
            ],
        ),
    )
    data = QADataModule(
        str(train_file),
        cfg.model.name,
        cfg.train.micro_batch_size,
        cfg.model.max_length,
        seed,
        trust_remote_code=cfg.model.trust_remote_code,
        revision=cfg.model.revision,
        closed_book=prompts_for(cfg.generation.language, cfg.prompts).closed_book,
    )
    name = f"train_gen_{folder.name.split('_')[-1]}"
    last = checkpoints / "last.ckpt"
    probe = retention_probe(cfg, tokenizer, pairs, seed)
    loggers = training_loggers(cfg.trainer.logger, log_dir, name)
    trainer = build_trainer(
        dataclasses.replace(cfg.trainer, precision=training_precision(cfg.trainer)),
        min_epochs=cfg.train.epochs,
        max_epochs=cfg.train.max_epochs if probe else cfg.train.epochs,
        accumulate_grad_batches=cfg.train.grad_accum // strategy.world_size,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=loggers,
        log_every_n_steps=1,
        callbacks=[
            *([LearningRateMonitor(logging_interval="step")] if loggers else []),  # needs a logger
            StepCheckpoint(last, cfg.train.checkpoint_every),
            *([probe] if probe else []),
            *(built(spec) for spec in cfg.trainer.callbacks),
        ],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(folder),
    )
    torch.manual_seed(seed)
    resume = on_rank_zero(strategy, last.exists)
    if resume:
        log.info("  resuming training from %s", last)
    try:
        module = LoRAModule(
            cfg.model.name,
            cfg.model.dtype,
            cfg.model.quantization,
            cfg.lora,
            cfg.train,
            seed=cfg.seed,
            revision=cfg.model.revision,
            _peft_model=model,
        )
        trainer.fit(
            module, datamodule=data, ckpt_path=str(last) if resume else None, weights_only=True
        )
    except torch.OutOfMemoryError:
        raise RunError(
            "out of GPU memory in training: lower train.micro_batch_size (now "
            f"{cfg.train.micro_batch_size}) "
            "and raise train.grad_accum to keep the effective batch (a multiple of "
            "trainer.devices x "
            f"trainer.num_nodes, now {strategy.world_size}), or lower model.max_length "
            f"(now {cfg.model.max_length}); then run the same command to resume"
        ) from None

    def save() -> None:
        save_adapter(model, folder / "adapter")
        shutil.rmtree(checkpoints, ignore_errors=True)

    on_rank_zero(strategy, save)
    trained = {"epochs": trainer.current_epoch, "precision": str(trainer.precision)}
    if probe:
        trained.update(retention=probe.history, probe_pairs=len(probe.pairs))
    return trained


def training_loggers(specs: Optional[list[dict]], log_dir: Path, name: str) -> list:
    """trainer.logger's loggers for one generation's training, each named `name` where it takes a
    name; None: TensorBoard, at log_dir/name."""
    if specs is None:
        return [TensorBoardLogger(save_dir=str(log_dir), name="", version=name)]
    return [built(spec, name=name) for spec in specs]


def built(spec: dict, **defaults) -> object:
    """The object a {class_path, init_args} of LightningCLI's names (checked by
    config.check_class_spec), with `defaults` for the arguments its class takes and init_args does
    not give."""
    cls = import_class(spec["class_path"])
    taken = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in defaults.items() if k in taken}, **spec.get("init_args", {}))


def probe_new_tokens(tokenizer: PreTrainedTokenizerBase, sample: list[dict], cap: int) -> int:
    """New tokens the retention probe lets an answer run to: twice the longest answer it checks
    (at most `cap`, the evaluation's). Greedy decoding writes the same first tokens whatever the
    limit, and an answer that states a pair's facts does so within about its length; without this,
    one answer that never stops keeps every probe of a generation decoding to the evaluation's cap
    (512 tokens on the GPU configs) after every epoch."""
    longest = max(
        len(tokenizer(p["answer"], add_special_tokens=False)["input_ids"]) for p in sample
    )
    return min(cap, 2 * longest)


def retention_probe(
    cfg: EvolveConfig, tokenizer, pairs: list[dict], seed: int
) -> Optional[RetentionProbe]:
    """With train.max_epochs, the check that ends training once retention stops rising; None
    without it, or when no training pair states a fact to check."""
    if cfg.train.max_epochs is None:
        return None
    language = cfg.generation.language
    qa = [p for p in pairs if "anchor" not in p]  # the domain's pairs, not the anchors
    sample = probe_sample(qa, cfg.train.probe_pairs, language, seed)
    if not sample:
        log.warning("  no training pair states a fact: training %d epochs", cfg.train.epochs)
        return None
    return RetentionProbe(
        sample,
        tokenizer,
        language,
        Sampling(probe_new_tokens(tokenizer, sample, cfg.evaluation.max_new_tokens)),
        cfg.evaluation.batch_size,
        cfg.model.max_length,
        cfg.train.patience,
        prompts_for(cfg.generation.language, cfg.prompts).closed_book,
    )
