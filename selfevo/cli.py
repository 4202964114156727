"""The `selfevo` command: the whole loop (`evolve`), each stage on its own over files, and tools."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Optional

# Quieter start-up: these libraries print banners and hints meant for their own users.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import typer

from selfevo.config import EvolveConfig

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Teach a small LLM a private domain by self-evolution: generate, score, select, train, "
    "evaluate, repeat.",
)
PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.callback()
def quiet_libraries() -> None:
    """Keep the terminal for selfevo's own progress: drop the libraries' banners and tips."""
    import logging
    import warnings

    from selfevo.log import setup_logging

    setup_logging()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    # The in-process vLLM engine starts a one-process torch.distributed group, so Lightning would
    # ask for sync_dist in every logged metric; with one process there is nothing to sync.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: 2 for bad input or an unusable run, 1 for a failing
    machine."""
    typer.echo(f"selfevo: error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn):
    """Run a command, turning the errors that users cause into one-line messages."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from selfevo.config import ConfigError
        from selfevo.data import DataError
        from selfevo.models import ModelError
        from selfevo.rundir import RunError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, ModelError, RunError) as e:
            fail(str(e))
        except OSError as e:
            if e.filename is None:
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                fail(
                    f"{e.filename}: no space left on the device; free some and run the same "
                    "command to resume",
                    1,
                )
            fail(f"{e.filename}: {e.strerror}", 1)
        except KeyboardInterrupt:
            typer.echo("selfevo: interrupted; run the same command again to resume", err=True)
            raise typer.Exit(130)

    return wrapper


def config_parser(prog: str, description: Optional[str]):
    """A jsonargparse parser whose --help gives each config field with its docstring."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    return ArgumentParser(prog=prog, description=description, exit_on_error=False)


def config_sections() -> dict:
    """The sections of an evolve config, each name with its dataclass (model: ModelConfig, ...)."""
    return {
        f.name: f.default_factory for f in fields(EvolveConfig) if is_dataclass(f.default_factory)
    }


def name_groups(parser) -> None:
    """Head each group of options in --help with its section's name, not with the signature that
    a dataclass without a docstring has for one."""
    import re

    for key, group in parser.groups.items():
        signature = re.match(r"(\w+)\(", group.title or "")
        if not signature:
            group.title = f"{key}: {group.title}"
        else:
            group.title = key if key == signature[1] else f"{key} ({signature[1]})"


def evolve_parser():
    from jsonargparse import ActionConfigFile

    parser = config_parser(
        "selfevo evolve", "Run self-evolution generations start..end-1; resumes an interrupted run."
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (see configs/)")
    parser.add_argument(
        "--force", action="store_true", help="set aside a run directory of another config"
    )
    parser.add_class_arguments(EvolveConfig)
    name_groups(parser)
    return parser


def check_yaml_keys(path: Path) -> None:
    """Refuse a YAML config that gives a key twice (YAML loaders silently keep the last), or that is
    not text YAML can read, or that gives the key `config`."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if isinstance(key, (list, dict)):  # `? [a]`: a key YAML allows and no config has
                line = key_node.start_mark.line + 1
                fail(f"{path}: line {line}: a key must be a name, not a list or a mapping")
            if key in seen:
                fail(f"{path}: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError:
        return  # the config parser reports a missing file with its own message
    except UnicodeDecodeError as e:
        fail(f"{path}: not UTF-8 (byte {e.start})")
    try:
        document = yaml.load(text, StrictLoader)
    except RecursionError:
        fail(f"{path}: nested too deeply")
    except (ValueError, OverflowError) as e:  # PyYAML's scanner on an escape beyond Unicode
        fail(f"{path}: not valid YAML text ({e})")
    except yaml.YAMLError:
        return  # the config parser reports these with its own messages
    # jsonargparse reads a file's own `config` key as the --config option and fails on it
    if isinstance(document, dict) and "config" in document:
        fail(f"{path}: key 'config': a config file cannot name other configs; give each --config")


def parse_config_args(parser, args: list[str], sections: dict):
    """The namespace of `args`, its config `sections` (name: dataclass) built into their
    dataclasses; bad input stops the command with one line on stderr, before any work."""
    from jsonargparse import ArgumentError, Namespace

    for flag, value in zip(args, args[1:]):
        if flag == "--config":
            check_yaml_keys(Path(value))
    try:
        ns = parser.parse_args(args)
    except ValueError as e:  # jsonargparse takes a section's text for a path: os.access() on a NUL
        where = next(
            (value for flag, value in zip(args, args[1:]) if flag == "--config"), "arguments"
        )
        fail(f"{where}: not a valid config ({e})")
    except ArgumentError as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        for name in sections:  # `--model NAME`, say: the option takes a file of the section's keys
            if message.startswith(f'Parser key "{name}": Unable to load config'):
                field = fields(sections[name])[0].name
                message = (
                    f"--{name}: takes a YAML file of the {name} section; set one key with "
                    f"--{name}.KEY VALUE, such as --{name}.{field}"
                )
        fail(message)
    for name in sections:  # a section given as a plain value ("data: 5") has no keys to build from
        if not isinstance(ns.get(name), Namespace):
            fail(f"{name}: must be a section of keys, got {ns.get(name)!r}")
    return parser.instantiate(ns)


def parse_evolve_args(args: list[str]):
    """(EvolveConfig, force) from `--config FILE` and dotted overrides such as
    `--data.fragments PATH`."""
    ns = parse_config_args(evolve_parser(), args, config_sections())
    cfg = EvolveConfig(**{f.name: ns[f.name] for f in fields(EvolveConfig)})
    return cfg, bool(ns.force)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def evolve(ctx: typer.Context) -> None:
    """Run the whole loop: selfevo evolve --config FILE [--start N] [--end M] [--KEY.SUB VALUE]"""
    from selfevo.loop import evolve as run_evolve

    cfg, force = parse_evolve_args(ctx.args)
    run_evolve(cfg, force=force)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def fit(ctx: typer.Context) -> None:
    """Train a LoRA adapter on a QA file, Lightning CLI: selfevo fit --config configs/lora.yaml"""
    from selfevo.train import LoRACLI, LoRAModule, QADataModule

    LoRACLI(
        LoRAModule, QADataModule, args=["fit", *ctx.args], save_config_kwargs={"overwrite": True}
    )


# --- each stage on its own, over files ------------------------------------------------------------
# A stage command takes the evolve config's sections that it uses, under the same names
# (--model.name, --generation.language, ...), and --config FILE for a YAML like configs/demo.yaml.


def own_part(parser, value: str):
    """The part of an evolve config file that a stage command takes: the sections and keys of an
    evolve config that it does not take are passed over (a key no config has is left, to be
    refused). `value` as it is where it is not a YAML mapping in a readable file."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return value
    if not isinstance(loaded, dict):
        return value
    evolve = {f.name for f in fields(EvolveConfig)}
    evolve |= {f"{name}.{f.name}" for name, cls in config_sections().items() for f in fields(cls)}
    taken = {action.dest for action in parser._actions}
    kept = {}
    for key, part in loaded.items():
        if key in evolve and key not in taken:
            continue
        if key in config_sections() and isinstance(part, dict):
            part = {
                k: v for k, v in part.items() if f"{key}.{k}" in taken or f"{key}.{k}" not in evolve
            }
        kept[key] = part
    return yaml.safe_dump(kept)


def stage_config_action():
    from jsonargparse import ActionConfigFile

    class StageConfigFile(ActionConfigFile):
        """--config FILE of a stage command: the part of an evolve config that the command takes."""

        def __call__(self, parser, cfg, values, option_string=None):
            self.apply_config(parser, cfg, self.dest, own_part(parser, values))

    return StageConfigFile


def parse_stage(
    ctx: typer.Context, options: dict, sections: tuple = (), skip: Optional[dict] = None
):
    """A stage command's arguments: `options` (a flag or positional's name: add_argument's
    keywords) and, with --config FILE, the evolve config's `sections` less the fields in `skip`
    (section: names), each section checked as `selfevo evolve` checks it."""
    from selfevo.config import validate, world_size

    parser = config_parser(f"selfevo {ctx.info_name}", ctx.command.help)
    for flag, keywords in options.items():
        parser.add_argument(flag, **keywords)
    if sections:
        parser.add_argument(
            "--config",
            action=stage_config_action(),
            help="a YAML config such as configs/demo.yaml: the sections that this command takes",
        )
    taken = {name: config_sections()[name] for name in sections}
    for name, cls in taken.items():
        parser.add_class_arguments(cls, name, skip=set((skip or {}).get(name, ())))
    name_groups(parser)
    ns = parse_config_args(parser, ctx.args, taken)
    cfg = EvolveConfig(**{name: ns[name] for name in taken})  # the other sections at their defaults
    if "trainer" in taken:  # no training here, whose micro-batches the ranks would share
        cfg.train.grad_accum = world_size(cfg.trainer)
    validate(cfg)
    return ns


ADAPTER = {"type": Optional[str], "help": "a LoRA adapter folder (selfevo's or PEFT's)"}
SEED = {"type": int, "default": EvolveConfig.seed, "help": "seeds the sampling (the config's seed)"}


def _load(model_cfg, adapter: Optional[str], accelerator: str = "auto"):
    """The model (with the adapter, if any) on the accelerator, and its tokenizer."""
    from peft import PeftModel

    from selfevo.hardware import accelerator_device
    from selfevo.models import check_adapter_folder, load_model

    m, tokenizer = load_model(model_cfg)
    if adapter:
        m = PeftModel.from_pretrained(m, str(check_adapter_folder(adapter)))
    return m.to(accelerator_device(accelerator)), tokenizer


def _generator(model_cfg, generation, adapter: Optional[str], seed: int, eval_max_new_tokens: int):
    """The loop's generator (generate.make_generator) over the base model; the adapter's folder."""
    from selfevo.config import LoraConfig
    from selfevo.generate import make_generator, resolve_backend
    from selfevo.models import check_adapter_folder, load_tokenizer
    from selfevo.rundir import read_json

    adapter_path = check_adapter_folder(adapter) if adapter else None
    backend = resolve_backend(generation.backend, model_cfg.quantization)
    if backend == "hf":
        model, tokenizer = _load(model_cfg, adapter)
    else:  # the engine loads the weights itself
        model, tokenizer = (
            None,
            load_tokenizer(model_cfg.name, model_cfg.trust_remote_code, model_cfg.revision),
        )
    rank = read_json(adapter_path / "adapter_config.json")["r"] if adapter_path else LoraConfig().r
    generator = make_generator(
        backend, model, tokenizer, model_cfg, generation, rank, seed, eval_max_new_tokens
    )
    return generator, adapter_path


@app.command("ingest", context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def ingest_cmd(ctx: typer.Context) -> None:
    """Cut documents into knowledge fragments (JSONL), for data.fragments.

    Reads .txt, .md, .html, .pdf and .docx files (a folder: every one under it) by heading and
    paragraph into fragments of at most --max-tokens tokens of the model's tokenizer, each
    overlapping the one before; drops duplicates. Needs pip install "selfevo[ingest]"."""
    from selfevo.ingest import check_arguments, ingest
    from selfevo.models import load_tokenizer

    a = parse_stage(
        ctx,
        {
            "docs": {"type": str, "nargs": "+", "help": "documents: files and folders"},
            "--out": {"type": str, "required": True, "help": "fragments to write (JSONL)"},
            "--max-tokens": {
                "type": int,
                "default": 256,
                "help": "the most tokens of a fragment, its headings included",
            },
            "--overlap-tokens": {
                "type": int,
                "default": 32,
                "help": "the most tokens a fragment repeats of the one before (whole sentences "
                "where they fit)",
            },
        },
        ("model",),  # whose tokenizer counts the tokens: --model.name, or a config's model section
        skip={"model": ("dtype", "quantization", "max_length")},
    )
    out = Path(a.out)
    check_arguments(out, a.max_tokens, a.overlap_tokens)  # before the tokenizer loads
    tokenizer = load_tokenizer(a.model.name, a.model.trust_remote_code, a.model.revision)
    r = ingest([Path(d) for d in a.docs], out, a.max_tokens, a.overlap_tokens, tokenizer)
    typer.echo(
        f"{r.fragments} fragments from {r.files_read} files -> {out} ({r.duplicates} duplicates "
        f"dropped, {len(r.files_skipped)} files skipped, {sum(r.unsupported.values())} of other "
        "types passed over)"
    )


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def generate(ctx: typer.Context) -> None:
    """Write questions about each fragment and answer them (open book).

    As a generation of the loop does: the questions and the answers by the model with --adapter or
    the base model, as generation.question_model and answer_model say (base: the adapter off)."""
    from selfevo.data import load_fragments, with_origins
    from selfevo.generate import write_answers, write_questions
    from selfevo.prompts import prompts_for
    from selfevo.rundir import check_can_create, write_jsonl

    a = parse_stage(
        ctx,
        {
            "fragments": {"type": str, "help": "knowledge fragments (JSON list or JSONL)"},
            "--out": {"type": str, "required": True, "help": "QA pairs to write (JSONL)"},
            "--adapter": ADAPTER,
            "--seed": SEED,
        },
        ("model", "generation", "prompts"),
        skip={"prompts": ("closed_book",)},  # what trains and evaluates
    )
    prompts = prompts_for(a.generation.language, a.prompts)
    out = Path(a.out)
    texts, origins, duplicates = load_fragments(a.fragments)
    check_can_create(out.parent, "output")
    generator, adapter = _generator(a.model, a.generation, a.adapter, a.seed, 0)
    try:
        generator.use_adapter(adapter if a.generation.question_model == "current" else None)
        questions, q_counts = write_questions(
            generator, texts, a.generation, a.seed, prompts=prompts
        )
        questions = with_origins(questions, origins)
        generator.use_adapter(adapter if a.generation.answer_model == "current" else None)
        qa, a_drops = write_answers(generator, questions, a.generation, a.seed, prompts=prompts)
    finally:
        generator.close()
    write_jsonl(out, qa)
    typer.echo(
        f"{len(qa)} QA pairs -> {out} ({duplicates} duplicate fragments, "
        f"{q_counts['planned'] - q_counts['kept']} questions "
        f"and {a_drops['dropped']} answers dropped)"
    )


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def score(ctx: typer.Context) -> None:
    """Add IFD and both mean losses to every QA pair.

    With the base model, or with --adapter the trained one; on several devices with
    --trainer.devices N --trainer.strategy ddp."""
    from selfevo.data import load_qa
    from selfevo.hardware import build_trainer
    from selfevo.ifd import score_pairs
    from selfevo.rundir import check_can_create, write_jsonl

    a = parse_stage(
        ctx,
        {
            "qa": {
                "type": str,
                "help": "QA pairs (JSON/JSONL with question/answer or input/output)",
            },
            "--out": {"type": str, "required": True, "help": "scored pairs to write (JSONL)"},
            "--adapter": {**ADAPTER, "help": "score with this adapter on the base model"},
        },
        ("model", "ifd", "trainer"),
        skip={"ifd": ("scorer",)},
    )  # --adapter says which model scores
    out = Path(a.out)
    pairs = load_qa(a.qa)
    check_can_create(out.parent, "output")
    model, tokenizer = _load(a.model, a.adapter, a.trainer.accelerator)
    # On several devices, Lightning's launcher runs this command again for ranks 1..N-1 at predict.
    trainer = build_trainer(a.trainer)
    use_adapter = a.adapter is not None
    scored = score_pairs(model, tokenizer, pairs, a.ifd, a.model.max_length, trainer, use_adapter)
    if trainer.is_global_zero:  # every rank holds all the scores; one writes them
        write_jsonl(out, scored)
        typer.echo(f"{len(scored)} pairs scored -> {out}")


@app.command("select", context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def select_cmd(ctx: typer.Context) -> None:
    """Choose a replay set by IFD.

    From scored QA files, as the loop does from those of the earlier generations."""
    from selfevo.data import load_qa
    from selfevo.rundir import check_can_create, write_jsonl
    from selfevo.select import select_replay

    a = parse_stage(
        ctx,
        {
            "history": {
                "type": str,
                "nargs": "+",
                "help": "scored QA files of earlier generations",
            },
            "--out": {"type": str, "required": True, "help": "the replay set to write (JSONL)"},
            "--seed": SEED,
        },
        ("replay",),
    )
    out = Path(a.out)
    pairs = [p for f in a.history for p in load_qa(f)]
    check_can_create(out.parent, "output")
    chosen = select_replay(pairs, a.replay.mode, a.replay.k, a.seed)
    write_jsonl(out, chosen)
    typer.echo(f"{len(chosen)} of {len(pairs)} pairs -> {out}")


@app.command("evaluate", context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def evaluate_cmd(ctx: typer.Context) -> None:
    """Answer the eval questions, closed book (or open book).

    Writes predictions.jsonl and metrics.json: the seed's metrics, fact recall, and the word-level
    metrics for English."""
    from selfevo.config import TrainerConfig
    from selfevo.data import load_eval
    from selfevo.evaluate import evaluate_model
    from selfevo.hardware import build_trainer
    from selfevo.prompts import prompts_for
    from selfevo.rundir import check_can_create, write_json, write_jsonl

    a = parse_stage(
        ctx,
        {
            "eval": {"type": str, "help": "eval QA (instruction/input/output)"},
            "--out": {
                "type": str,
                "required": True,
                "help": "folder for predictions.jsonl and metrics.json",
            },
            "--adapter": ADAPTER,
            "--open-book": {
                "action": "store_true",
                "help": "the ceiling: each question with its fragment in the prompt",
            },
            "--seed": SEED,
        },
        ("model", "generation", "evaluation", "prompts"),
        skip={
            "prompts": ("question", "fact_question", "example_terms"),  # what writes questions
            "generation": (  # what writes QA pairs
                "batch_size",
                "question_max_new_tokens",
                "answer_max_new_tokens",
                "temperature",
                "top_p",
                "question_focus",
                "questions_per_fragment",
                "phrasings",
                "question_model",
                "question_filters",
                "standalone_answers",
                "min_grounding",
                "answer_model",
            ),
        },
    )
    out = Path(a.out)
    records = load_eval(a.eval)
    check_can_create(out, "output")
    generator, adapter = _generator(
        a.model, a.generation, a.adapter, a.seed, a.evaluation.max_new_tokens
    )
    try:
        generator.use_adapter(adapter)
        metrics, predictions = evaluate_model(
            generator,
            records,
            a.evaluation,
            build_trainer(TrainerConfig()),
            a.seed,
            open_book=a.open_book,
            prompts=prompts_for(a.generation.language, a.prompts),
        )
    finally:
        generator.close()
    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "metrics.json", metrics)
    typer.echo(" ".join(f"{k} {v:.2f}" for k, v in metrics.items()))


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def export(ctx: typer.Context) -> None:
    """Merge a generation's adapter into the base model and save a full model folder.

    By default the best generation: the highest fact recall on the dev split (summary.json)."""
    from selfevo.config import ModelConfig
    from selfevo.models import check_adapter_folder, export_merged
    from selfevo.report import best_generation_number
    from selfevo.rundir import RunError, read_json

    a = parse_stage(
        ctx,
        {
            "run": {"type": str, "help": "run directory"},
            "--generation": {
                "type": Optional[int],
                "help": "export the adapter trained by this generation (default: the best)",
            },
            "--out": {"type": Optional[str], "help": "default: RUN/export_gen_<N>"},
        },
    )
    run = Path(a.run)
    snapshot = run / "config.json"
    if not snapshot.is_file():
        raise RunError(f"{snapshot}: missing; not a selfevo run directory")
    generation = a.generation
    if generation is None:
        generation = best_generation_number(run)
        typer.echo(f"the best generation by the dev split: gen_{generation}")
    adapter = run / f"gen_{generation}" / "adapter"
    if not adapter.is_dir():
        raise RunError(f"{adapter}: missing; generation {generation} has not finished training")
    check_adapter_folder(adapter)
    model_cfg = ModelConfig(**read_json(snapshot)["config"]["model"])
    path = export_merged(model_cfg, adapter, Path(a.out or run / f"export_gen_{generation}"))
    typer.echo(f"merged model -> {path}")


@app.command("export-qa", context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def export_qa_cmd(ctx: typer.Context) -> None:
    """Write the QA pairs a generation trained on as a dataset: Alpaca, ShareGPT or OpenAI messages.

    By default the best generation's (the dev split's, summary.json): its pairs about the domain's
    fragments, each once, the question alone as the prompt; not the fragments as plain text
    (train.fragment_weight) nor the anchors (train.anchors). Writes OUT/<run>_gen<N>_<format>.json
    and its entry in LLaMA-Factory's OUT/dataset_info.json (merged into one already there)."""
    from selfevo.export_qa import FORMATS, export_qa

    a = parse_stage(
        ctx,
        {
            "run": {"type": str, "help": "run directory"},
            "--format": {
                "required": True,
                "choices": FORMATS,
                "help": "alpaca (instruction, input, output), sharegpt (conversations of "
                "from/value) or messages (OpenAI's role/content)",
            },
            "--generation": {
                "type": Optional[int],
                "help": "export the pairs this generation trained on (default: the best)",
            },
            "--min-ifd": {
                "type": Optional[float],
                "help": "keep the pairs whose IFD is at least this (those without one are dropped)",
            },
            "--with-fragment": {
                "action": "store_true",
                "help": "each pair's fragment in the prompt: Alpaca's input, the others' system "
                "prompt (default: closed book, as the loop trains)",
            },
            "--out": {"type": Optional[str], "help": "default: RUN/export_qa"},
        },
    )
    result = export_qa(
        Path(a.run),
        a.out and Path(a.out),
        a.format,
        a.generation,
        a.min_ifd,
        a.with_fragment,
    )
    if a.generation is None:
        typer.echo(f"the best generation by the dev split: gen_{result.generation}")
    left_out = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in result.dropped.items())
    typer.echo(
        f"{result.written} QA pairs of gen_{result.generation} -> {result.path}"
        f"{f' (left out: {left_out})' if left_out else ''}; dataset_info: {result.dataset_info}"
    )


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def report(ctx: typer.Context) -> None:
    """Write RUN/summary.json, summary.md, report.md and report.png.

    Each generation's scores, the share of the open-book gap it recovered, and its controls with
    intervals."""
    from rich.console import Console

    from selfevo.report import summary_table, write_report, write_summary

    a = parse_stage(
        ctx,
        {
            "run": {"type": str, "help": "run directory"},
            "--eval": {
                "type": Optional[str],
                "help": "the eval file, for run files that kept only the answers "
                "(default: the run's data.eval)",
            },
        },
    )
    run = Path(a.run)
    try:
        rows = write_summary(run, a.eval and Path(a.eval))
        png = write_report(run, rows)
    except FileNotFoundError as e:
        fail(str(e))
    Console().print(summary_table(rows, f"{run.name}: what each generation knows, closed book"))
    typer.echo(f"report -> {png}")


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def compare(ctx: typer.Context) -> None:
    """Compare two recipes over their seeds: per metric, the difference of their per-pair means,
    with its paired 95% interval over the eval pairs.

    selfevo compare --runs A A-s1 --against B B-s1 --generation 0 prints a markdown table;
    --against-generation compares with another generation (of the same runs, say)."""
    from selfevo.report import compare_recipes, comparison_markdown

    a = parse_stage(
        ctx,
        {
            "--runs": {"type": str, "nargs": "+", "required": True, "help": "a recipe's runs"},
            "--against": {"type": str, "nargs": "+", "required": True, "help": "the other's"},
            "--generation": {"type": str, "required": True, "help": "N (gen_N) or base"},
            "--against-generation": {"type": Optional[str], "help": "(default: --generation)"},
            "--eval": {
                "type": Optional[str],
                "help": "the eval file, for run files that kept only the answers",
            },
        },
    )

    def folder(generation: str) -> str:
        if generation != "base" and not generation.isdigit():
            fail(f"--generation: a generation number or base, got {generation!r}")
        return generation if generation == "base" else f"gen_{generation}"

    mine, theirs = folder(a.generation), folder(a.against_generation or a.generation)
    try:
        rows = compare_recipes(
            [(Path(r), mine) for r in a.runs],
            [(Path(r), theirs) for r in a.against],
            a.eval and Path(a.eval),
        )
    except FileNotFoundError as e:
        fail(str(e))
    typer.echo(comparison_markdown(rows), nl=False)


def main() -> None:
    app(prog_name="selfevo")


if __name__ == "__main__":
    sys.exit(main())
