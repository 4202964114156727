"""Out of GPU memory in generation, scoring or evaluation: the batch is halved and the work goes on.

The error is injected (these machines have no GPU): a stage function raises torch.OutOfMemoryError
for batches above a size, as CUDA would.
"""

import pytest
import torch

import selfevo.evaluate
import selfevo.generate
import selfevo.ifd
from selfevo.config import EvalConfig, IFDConfig, ModelConfig, TrainerConfig
from selfevo.evaluate import evaluate_model
from selfevo.generate import HFGenerator, Sampling
from selfevo.hardware import build_trainer, halving_batch_on_oom
from selfevo.ifd import score_pairs
from selfevo.models import load_model
from selfevo.prompts import chat_prompt, prompts_for


def failing_above(fn, limit, rows_of):
    def wrapper(*args, **kwargs):
        if rows_of(*args, **kwargs) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return fn(*args, **kwargs)

    return wrapper


@pytest.fixture()
def tiny(tiny_model):
    return load_model(ModelConfig(name=tiny_model, dtype="float32"))


def test_generation_halves_and_says_so(tiny, monkeypatch, caplog):
    model, tokenizer = tiny
    prompts = [chat_prompt(tokenizer, f"prompt number {i}") for i in range(6)]
    greedy = Sampling(max_new_tokens=6)
    generator = HFGenerator(model, tokenizer, max_length=128)
    expected = generator.generate(prompts, greedy, batch_size=2, seed=0)
    monkeypatch.setattr(
        selfevo.generate,
        "generate_batch",
        failing_above(selfevo.generate.generate_batch, 2, lambda m, t, p, *a: len(p)),
    )
    assert generator.generate(prompts, greedy, batch_size=8, seed=0) == expected
    assert (
        "retrying with batch size 4" in caplog.text and "retrying with batch size 2" in caplog.text
    )


def test_scoring_halves_with_equal_scores(tiny, monkeypatch):
    model, tokenizer = tiny
    pairs = [
        {"question": f"Which port is number {i}?", "answer": f"Port {7700 + i}."} for i in range(6)
    ]
    trainer = build_trainer(TrainerConfig(), enable_progress_bar=False)
    expected = score_pairs(model, tokenizer, pairs, IFDConfig(batch_size=1), 128, trainer)
    monkeypatch.setattr(
        selfevo.ifd,
        "mean_answer_nll",
        failing_above(selfevo.ifd.mean_answer_nll, 2, lambda m, ids, *a: ids.shape[0]),
    )
    got = score_pairs(model, tokenizer, pairs, IFDConfig(batch_size=8), 128, trainer)
    assert [p["ifd"] for p in got] == pytest.approx([p["ifd"] for p in expected], rel=1e-5)


def test_evaluation_halves_with_equal_predictions(tiny, toy_inputs, monkeypatch):
    from selfevo.data import load_eval

    model, tokenizer = tiny
    eval_set = load_eval(toy_inputs[1])
    cfg = EvalConfig(batch_size=1, max_new_tokens=6)
    generator = HFGenerator(model, tokenizer, max_length=256)
    en = prompts_for("en")
    expected = evaluate_model(generator, eval_set, cfg, build_trainer(TrainerConfig()), prompts=en)
    monkeypatch.setattr(
        selfevo.generate,
        "generate_batch",
        failing_above(selfevo.generate.generate_batch, 1, lambda m, t, p, *a: len(p)),
    )
    cfg.batch_size = 4
    trainer = build_trainer(TrainerConfig())
    assert evaluate_model(generator, eval_set, cfg, trainer, prompts=en) == expected


def test_batch_of_one_that_does_not_fit_is_an_error():
    def never_fits(size):
        raise torch.OutOfMemoryError("injected")

    with pytest.raises(torch.OutOfMemoryError):
        halving_batch_on_oom(never_fits, 4, "test")


def test_training_out_of_memory_names_the_settings_to_lower(tiny_model, tmp_path, monkeypatch):
    from selfevo.cli import parse_evolve_args
    from selfevo.config import LoraConfig
    from selfevo.loop import RunError, train_adapter
    from selfevo.models import add_lora
    from selfevo.ranks import launch_ranks

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    import lightning

    monkeypatch.setattr(lightning.Trainer, "fit", no_memory)
    cfg, _ = parse_evolve_args(["--model.name", tiny_model, "--train.micro_batch_size", "8"])
    base, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    pairs = [{"question": "Which port?", "answer": "7741."}]
    with pytest.raises(RunError, match=r"train.micro_batch_size \(now 8\)"):
        train_adapter(
            cfg,
            add_lora(base, LoraConfig(), 0),
            tokenizer,
            pairs,
            tmp_path / "gen_0",
            tmp_path / "logs",
            0,
            launch_ranks(cfg.trainer),
        )
    assert not (tmp_path / "gen_0" / "adapter").exists()
