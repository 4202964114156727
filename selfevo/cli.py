"""The `selfevo` command: the whole loop (`evolve`), each stage on its own over files, and tools."""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

# Quieter start-up: these libraries print banners and hints meant for their own users.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Teach a small LLM a private domain by self-evolution: generate, score, select, train, evaluate, repeat.",
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
    # The in-process vLLM engine starts a one-process torch.distributed group, so Lightning would ask
    # for sync_dist in every logged metric; with one process there is nothing to sync.
    warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: 2 for bad input or an unusable run, 1 for a failing machine."""
    typer.echo(f"selfevo: error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn):
    """Run a command, turning the errors that users cause into one-line messages."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from selfevo.config import ConfigError
        from selfevo.data import DataError, RunError
        from selfevo.models import ModelError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, ModelError, RunError) as e:
            fail(str(e))
        except OSError as e:
            if e.filename is None:
                raise
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                fail(f"{e.filename}: no space left on the device; free some and run the same command to resume", 1)
            fail(f"{e.filename}: {e.strerror}", 1)
        except KeyboardInterrupt:
            typer.echo("selfevo: interrupted; run the same command again to resume", err=True)
            raise typer.Exit(130)

    return wrapper


def evolve_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from selfevo.config import EvolveConfig

    parser = ArgumentParser(
        prog="selfevo evolve",
        description="Run self-evolution generations start..end-1; resumes an interrupted run.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config (see configs/)")
    parser.add_argument("--force", action="store_true", help="set aside a run directory of another config")
    parser.add_class_arguments(EvolveConfig)
    return parser


def check_yaml_keys(path: Path) -> None:
    """Refuse a YAML config that gives a key twice (YAML loaders silently keep the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                fail(f"{path}: line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        yaml.load(path.read_text(encoding="utf-8"), StrictLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass  # the config parser reports these with its own messages


def parse_evolve_args(args: list[str]):
    """(EvolveConfig, force) from `--config FILE` and dotted overrides such as `--data.fragments PATH`."""
    from jsonargparse import ArgumentError

    from selfevo.config import EvolveConfig

    parser = evolve_parser()
    for flag, value in zip(args, args[1:]):
        if flag == "--config":
            check_yaml_keys(Path(value))
    try:
        ns = parser.instantiate(parser.parse_args(args))
    except ArgumentError as e:
        fail(" ".join(line.strip() for line in str(e).splitlines()))
    cfg = EvolveConfig(**{f.name: ns[f.name] for f in fields(EvolveConfig)})
    return cfg, bool(ns.force)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def evolve(ctx: typer.Context) -> None:
    """Run the whole loop: selfevo evolve --config configs/demo.yaml [--start N] [--end M] [--key.sub VALUE]"""
    from selfevo.loop import evolve as run_evolve

    cfg, force = parse_evolve_args(ctx.args)
    run_evolve(cfg, force=force)


@app.command(context_settings=PASSTHROUGH, add_help_option=False)
@guarded
def fit(ctx: typer.Context) -> None:
    """Train a LoRA adapter on a QA file with the Lightning CLI: selfevo fit --config configs/lora.yaml"""
    from selfevo.train import LoRACLI, LoRAModule, QADataModule

    LoRACLI(LoRAModule, QADataModule, args=["fit", *ctx.args], save_config_kwargs={"overwrite": True})


def _load(model: str, adapter: Optional[str], dtype: str = "auto"):
    from peft import PeftModel

    from selfevo.config import ModelConfig
    from selfevo.models import accelerator_device, check_adapter_folder, load_model

    m, tokenizer = load_model(ModelConfig(name=model, dtype=dtype))
    if adapter:
        m = PeftModel.from_pretrained(m, str(check_adapter_folder(adapter)))
    return m.to(accelerator_device()), tokenizer


@app.command()
@guarded
def generate(
    fragments: Path = typer.Argument(..., help="knowledge fragments (JSON list or JSONL)"),
    out: Path = typer.Option(..., "--out", help="QA pairs to write (JSONL)"),
    model: str = typer.Option("smollm2-135m-instruct", help="base model"),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter folder to generate with"),
    language: str = typer.Option("en", help="prompt language: en or zh"),
    batch_size: int = typer.Option(16, min=1),
    max_length: int = typer.Option(1024, min=16),
    seed: int = typer.Option(0),
) -> None:
    """Write a question for each fragment and answer it (open book)."""
    from selfevo.config import ConfigError, GenerationConfig
    from selfevo.data import check_can_create, load_fragments, write_jsonl
    from selfevo.generate import HFGenerator, write_answers, write_questions

    if language not in ("en", "zh"):
        raise ConfigError(f"--language: must be en or zh, got {language!r}")
    texts, duplicates = load_fragments(fragments)
    check_can_create(out.parent, "output")
    m, tokenizer = _load(model, adapter)
    generator = HFGenerator(m, tokenizer, max_length)
    cfg = GenerationConfig(language=language, batch_size=batch_size)
    questions, q_dropped = write_questions(generator, texts, cfg, seed)
    qa, a_drops = write_answers(generator, questions, cfg, seed)
    write_jsonl(out, qa)
    typer.echo(f"{len(qa)} QA pairs -> {out} ({duplicates} duplicate fragments, {q_dropped} questions and {a_drops['dropped']} answers dropped)")


@app.command()
@guarded
def score(
    qa: Path = typer.Argument(..., help="QA pairs (JSON/JSONL with question/answer or input/output)"),
    out: Path = typer.Option(..., "--out", help="scored pairs to write (JSONL)"),
    model: str = typer.Option("smollm2-135m-instruct"),
    adapter: Optional[str] = typer.Option(None, help="score with this adapter instead of the base model"),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16"),
    batch_size: int = typer.Option(16, min=1),
    max_length: int = typer.Option(1024, min=16),
    accelerator: str = typer.Option("auto", help="Lightning accelerator: auto, cpu, gpu"),
    devices: int = typer.Option(1, min=1, help="devices per node, one rank each (Lightning's ddp)"),
    num_nodes: int = typer.Option(1, min=1),
    strategy: str = typer.Option("auto", help="Lightning strategy: auto or ddp"),
) -> None:
    """Add IFD and both mean losses to every QA pair."""
    from selfevo.config import ConfigError, IFDConfig, TrainerConfig
    from selfevo.data import check_can_create, load_qa, write_jsonl
    from selfevo.ifd import score_pairs
    from selfevo.train import build_trainer

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype: must be auto, float32, bfloat16 or float16, got {dtype!r}")
    if strategy not in ("auto", "ddp"):
        raise ConfigError(f"--strategy: must be auto or ddp, got {strategy!r}")
    pairs = load_qa(qa)
    check_can_create(out.parent, "output")
    m, tokenizer = _load(model, adapter, dtype)
    # On several devices, Lightning's launcher runs this command again for ranks 1..N-1 at predict.
    trainer = build_trainer(TrainerConfig(accelerator, devices, strategy, num_nodes))
    scored = score_pairs(m, tokenizer, pairs, IFDConfig(batch_size=batch_size), max_length, trainer, adapter is not None)
    if trainer.is_global_zero:  # every rank holds all the scores; one writes them
        write_jsonl(out, scored)
        typer.echo(f"{len(scored)} pairs scored -> {out}")


@app.command("select")
@guarded
def select_cmd(
    history: list[Path] = typer.Argument(..., help="scored QA files of earlier generations"),
    out: Path = typer.Option(..., "--out"),
    mode: str = typer.Option("hard", help="hard, easy, even, random or all"),
    k: int = typer.Option(..., help="pairs to choose"),
    seed: int = typer.Option(0),
) -> None:
    """Choose a replay set by IFD."""
    from selfevo.config import ConfigError
    from selfevo.data import check_can_create, load_qa, write_jsonl
    from selfevo.select import MODES, select_replay

    if mode not in MODES:
        raise ConfigError(f"--mode: must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 0:
        raise ConfigError(f"--k: must be >= 0, got {k}")
    pairs = [p for f in history for p in load_qa(f)]
    check_can_create(out.parent, "output")
    chosen = select_replay(pairs, mode, k, seed)  # type: ignore[arg-type]
    write_jsonl(out, chosen)
    typer.echo(f"{len(chosen)} of {len(pairs)} pairs -> {out}")


@app.command("evaluate")
@guarded
def evaluate_cmd(
    eval_file: Path = typer.Argument(..., help="eval QA (instruction/input/output)"),
    out: Path = typer.Option(..., "--out", help="folder for predictions.jsonl and metrics.json"),
    model: str = typer.Option("smollm2-135m-instruct"),
    adapter: Optional[str] = typer.Option(None),
    open_book: bool = typer.Option(False, "--open-book", help="the ceiling: each question with its fragment in the prompt"),
    backend: str = typer.Option("hf", help="hf (Hugging Face generate) or vllm"),
    language: str = typer.Option("en", help="en or zh: the open-book prompt, and which metrics auto picks"),
    metrics: str = typer.Option("auto", help="seed, seed+word, or auto (seed+word for en, seed for zh)"),
    sample: bool = typer.Option(False, help="the seed's sampled decoding instead of greedy"),
    batch_size: int = typer.Option(16, min=1),
    max_new_tokens: int = typer.Option(256, min=1),
    max_length: int = typer.Option(1024, min=16),
    seed: int = typer.Option(0),
    vllm_kv_cache_gib: float = typer.Option(4.0, min=0.01, help="vllm backend: its KV cache, in GiB"),
) -> None:
    """Answer the eval questions, closed book (or open book); the seed's metrics, fact recall, and the
    word-level metrics for English."""
    from selfevo.config import ConfigError, EvalConfig, GenerationConfig, LoraConfig, ModelConfig, TrainerConfig
    from selfevo.data import check_can_create, load_eval, read_json, write_json, write_jsonl
    from selfevo.evaluate import evaluate_model
    from selfevo.generate import make_generator
    from selfevo.models import check_adapter_folder, load_tokenizer
    from selfevo.train import build_trainer

    for name, value, choices in (("--backend", backend, ("hf", "vllm")), ("--language", language, ("en", "zh")),
                                 ("--metrics", metrics, ("auto", "seed", "seed+word"))):
        if value not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    records = load_eval(eval_file)
    check_can_create(out, "output")
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=sample, metrics=metrics)
    adapter_path = check_adapter_folder(adapter) if adapter else None
    model_cfg = ModelConfig(name=model, max_length=max_length)
    if backend == "hf":
        hf_model, tokenizer = _load(model, adapter)
    else:  # the engine loads the weights itself
        hf_model, tokenizer = None, load_tokenizer(model)
    rank = read_json(adapter_path / "adapter_config.json")["r"] if adapter_path else LoraConfig().r
    generator = make_generator(
        backend, hf_model, tokenizer, model_cfg, GenerationConfig(backend=backend, vllm_kv_cache_gib=vllm_kv_cache_gib),
        rank, seed, max_new_tokens,
    )
    try:
        generator.use_adapter(adapter_path)
        metrics_out, predictions = evaluate_model(
            generator, records, cfg, build_trainer(TrainerConfig()), seed, language=language, open_book=open_book
        )
    finally:
        generator.close()
    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "metrics.json", metrics_out)
    typer.echo(" ".join(f"{k} {v:.2f}" for k, v in metrics_out.items()))


@app.command()
@guarded
def export(
    run: Path = typer.Argument(..., help="run directory"),
    generation: int = typer.Option(..., help="export the adapter trained by this generation"),
    out: Optional[Path] = typer.Option(None, help="default: RUN/export_gen_<N>"),
) -> None:
    """Merge a generation's adapter into the base model and save a full model folder."""
    from selfevo.config import ModelConfig
    from selfevo.data import RunError, read_json
    from selfevo.models import check_adapter_folder, export_merged

    snapshot = run / "config.json"
    adapter = run / f"gen_{generation}" / "adapter"
    if not snapshot.is_file():
        raise RunError(f"{snapshot}: missing; not a selfevo run directory")
    if not adapter.is_dir():
        raise RunError(f"{adapter}: missing; generation {generation} has not finished training")
    check_adapter_folder(adapter)
    model_cfg = ModelConfig(**read_json(snapshot)["config"]["model"])
    path = export_merged(model_cfg, adapter, out or run / f"export_gen_{generation}")
    typer.echo(f"merged model -> {path}")


@app.command()
@guarded
def report(
    run: Path = typer.Argument(..., help="run directory"),
    eval_file: Optional[Path] = typer.Option(
        None, "--eval", help="the eval file, for run files that kept only the answers (default: the run's data.eval)"
    ),
) -> None:
    """Write RUN/summary.json, summary.md, report.md and report.png: each generation's scores, the share
    of the open-book gap it recovered, and its controls with intervals."""
    from rich.console import Console

    from selfevo.report import summary_table, write_report, write_summary

    try:
        rows = write_summary(run, eval_file)
        png = write_report(run, rows)
    except FileNotFoundError as e:
        fail(str(e))
    Console().print(summary_table(rows, f"{run.name}: what each generation knows, closed book"))
    typer.echo(f"report -> {png}")


def main() -> None:
    app(prog_name="selfevo")


if __name__ == "__main__":
    sys.exit(main())
