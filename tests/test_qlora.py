"""QLoRA (model.quantization nf4) is CUDA-only: elsewhere it is refused before any work."""

import pytest
import torch

from tests.test_cli import assert_clean_failure, evolve


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_nf4_without_a_gpu_is_refused_before_anything_is_written(tiny_model, toy_inputs, tmp_path):
    fragments, eval_file = toy_inputs
    result = evolve(tmp_path, "--model.quantization", "nf4", fragments=fragments, eval_file=eval_file, model=tiny_model)
    assert_clean_failure(result, tmp_path, "model.quantization nf4 needs a CUDA GPU")
