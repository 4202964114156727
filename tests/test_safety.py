"""Nothing runs or unpickles what a model folder, an adapter or a checkpoint brings, unless asked.

(Run names and folders that would lead writes out of the run are refused in test_bad_input.py and
test_damaged_run.py; the crash test checks that a whole run writes nothing outside runs/ and logs/.)
"""

import json
import shutil
from pathlib import Path

import torch
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import ModelConfig
from selfevo.models import load_model
from tests.helpers import evolve_args, run_files


def test_remote_code_runs_only_when_asked(tiny_model, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    marker = tmp_path / "remote-code-ran"
    (folder / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomForCausalLM",
    }
    (folder / "config.json").write_text(json.dumps(config))

    model, _ = load_model(ModelConfig(name=str(folder), dtype="float32"))  # the default
    assert type(model).__name__ == "LlamaForCausalLM" and not marker.exists()

    monkeypatch.setattr(
        transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules")
    )
    model, _ = load_model(ModelConfig(name=str(folder), dtype="float32", trust_remote_code=True))
    assert (
        type(model).__name__ == "CustomForCausalLM" and marker.exists()
    )  # the switch is what gates it


def test_adapter_with_pickled_weights_is_refused(tmp_path):
    adapter = tmp_path / "run" / "gen_0" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"a pickle is never loaded")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": {"model": {"name": "x"}}}))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--generation", "0"])
    assert result.exit_code == 2
    expected = f"{adapter}: no adapter_model.safetensors (selfevo never unpickles .bin files)"
    assert result.stderr.strip() == f"selfevo: error: {expected}"


class Payload:
    """Unpickling this writes a file: what a malicious checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled")


def test_checkpoint_is_loaded_without_unpickling(finished_run, tiny_model, tmp_path):
    root, inputs = finished_run
    for folder in ("runs", "logs"):
        shutil.copytree(root / folder, tmp_path / folder)
    run_dir = tmp_path / "runs" / "t"
    shutil.rmtree(
        run_dir / "gen_1" / "adapter"
    )  # generation 1 trains again, resuming from its checkpoint
    checkpoint = run_dir / "gen_1" / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    marker = tmp_path / "unpickled"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, checkpoint)

    result = CliRunner().invoke(app, evolve_args(tiny_model, inputs, tmp_path))
    assert result.exit_code == 2 and not marker.exists()
    assert result.stderr.strip().splitlines()[-1] == (
        f"selfevo: error: {checkpoint}: damaged checkpoint (UnpicklingError); delete it and run "
        "the same command "
        "to redo this generation's training from its start"
    )
    checkpoint.unlink()
    assert CliRunner().invoke(app, evolve_args(tiny_model, inputs, tmp_path)).exit_code == 0
    assert run_files(run_dir) == run_files(root / "runs" / "t")
