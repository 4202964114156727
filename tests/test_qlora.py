"""QLoRA (model.quantization nf4) is CUDA-only: elsewhere it is refused before any work."""

import pytest
import torch

from tests.test_bad_input import run_bad


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_nf4_without_a_gpu_is_refused_before_anything_is_written(tiny_model, tmp_path):
    run_bad(
        tmp_path,
        "--model.quantization",
        "nf4",
        model=tiny_model,
        needles=["model.quantization nf4 needs a CUDA GPU"],
    )
