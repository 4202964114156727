"""The benchmarks' own logic that their figures rest on (benchmarks/stage_speed.py)."""

import importlib.util

import torch
from torch.profiler import record_function

from tests.helpers import ROOT


def load_stage_speed():
    spec = importlib.util.spec_from_file_location(
        "stage_speed", ROOT / "benchmarks" / "stage_speed.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_profile_counts_each_op_once_not_the_annotated_range_around_it():
    stage_speed = load_stage_speed()
    a = torch.randn(256, 256)
    with stage_speed.Profiled() as profiled:
        with record_function("Optimizer.step#AdamW.step"):
            for _ in range(4):
                a = torch.tanh(a @ a)
    summary = profiled.summary
    names = [name for name, _, _ in summary["top"]]
    assert not any(name.startswith("Optimizer.step") for name in names)
    assert any("mm" in name for name in names)
    # the ops' own times add up to the busy time, which the span's wall time bounds
    assert 0 < summary["busy_s"] <= summary["wall_s"]
    assert abs(sum(summary["by_class_s"].values()) - summary["busy_s"]) < 1e-3
