"""Each stage as its own command over files, chained as a user would run them by hand."""

import json

from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import LoraConfig, ModelConfig
from selfevo.models import add_lora, load_model, save_adapter


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_score_select_evaluate_chain(tiny_model, toy_inputs, tmp_path):
    fragments, eval_file = toy_inputs
    qa = tmp_path / "qa.jsonl"
    invoke(
        "generate",
        fragments,
        "--out",
        qa,
        "--model.name",
        tiny_model,
        "--generation.batch_size",
        4,
        "--model.max_length",
        256,
    )
    pairs = read(qa)
    assert pairs and all(p["question"] and p["answer"] and p["fragment"] for p in pairs)

    scored = tmp_path / "scored.jsonl"
    invoke("score", qa, "--out", scored, "--model.name", tiny_model, "--model.dtype", "float32")
    assert [p["question"] for p in read(scored)] == [p["question"] for p in pairs]
    assert all(p["ifd"] > 0 and p["loss_cond"] > 0 for p in read(scored))

    replay = tmp_path / "replay.jsonl"
    invoke("select", scored, "--replay.mode", "easy", "--replay.k", 2, "--out", replay)
    assert sorted(p["ifd"] for p in read(scored))[:2] == [p["ifd"] for p in read(replay)]

    out = tmp_path / "eval"
    invoke(
        "evaluate",
        eval_file,
        "--out",
        out,
        "--model.name",
        tiny_model,
        "--evaluation.max_new_tokens",
        8,
        "--model.max_length",
        256,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # the seed's metrics, fact recall, and for English the word-level metrics
    assert set(metrics) == {
        "bleu-4",
        "rouge-1",
        "rouge-2",
        "rouge-l",
        "fact-recall",
        "fact-recall-scored",
        "sacrebleu",
        "rouge-l-stem",
    }
    predictions = read(out / "predictions.jsonl")
    assert len(predictions) == 4 and all("prediction" in p for p in predictions)
    for key in ("bleu-4", "rouge-l-stem"):
        assert abs(sum(p[key] for p in predictions) / len(predictions) - metrics[key]) < 1e-3

    # the open-book ceiling: the same questions with their fragments in the prompt, the same cap
    ceiling = tmp_path / "open"
    invoke(
        "evaluate",
        eval_file,
        "--out",
        ceiling,
        "--model.name",
        tiny_model,
        "--evaluation.max_new_tokens",
        8,
        "--model.max_length",
        256,
        "--open-book",
        "--evaluation.metrics",
        "seed",
    )
    assert set(json.loads((ceiling / "metrics.json").read_text())) == {
        "bleu-4",
        "rouge-1",
        "rouge-2",
        "rouge-l",
        "fact-recall",
        "fact-recall-scored",
    }
    assert [p["question"] for p in read(ceiling / "predictions.jsonl")] == [
        p["question"] for p in predictions
    ]
    bad = CliRunner().invoke(
        app, ["evaluate", str(eval_file), "--out", str(ceiling), "--generation.backend", "tgi"]
    )
    assert bad.exit_code == 2 and "generation.backend" in bad.stderr


def test_export_merges_the_adapter_into_a_full_model(tiny_model, tmp_path):
    import torch

    run = tmp_path / "run"
    base, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model = add_lora(base, LoraConfig(), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(model, run / "gen_0" / "adapter")
    (run / "config.json").write_text(
        json.dumps({"config": {"model": {"name": tiny_model, "dtype": "float32"}}})
    )
    invoke("export", run, "--generation", 0)

    merged, _ = load_model(ModelConfig(name=str(run / "export_gen_0"), dtype="float32"))
    ids = torch.tensor([tokenizer("qmeshd listens on port")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    missing = CliRunner().invoke(app, ["export", str(run), "--generation", "3"])
    assert missing.exit_code == 2 and "gen_3" in missing.stderr
    # without --generation: the best by the dev split, as summary.json marks it
    unmarked = CliRunner().invoke(app, ["export", str(run)])
    assert unmarked.exit_code == 2 and "pass --generation" in unmarked.stderr
    (run / "summary.json").write_text(
        json.dumps([{"model": "base"}, {"model": "gen_0", "best": True}, {"model": "gen_1"}])
    )
    best = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "best")])
    assert best.exit_code == 0 and "gen_0" in best.stdout
    assert (tmp_path / "best" / "config.json").is_file()


def test_evolve_training_records_the_real_model_in_hparams_yaml(tiny_model, tmp_path):
    """The loop's training of a generation writes hparams.yaml with the run's model and settings,
    not LoRAModule's defaults."""
    import yaml

    from selfevo.config import EvolveConfig, TrainConfig
    from selfevo.loop import train_adapter
    from selfevo.ranks import launch_ranks

    cfg = EvolveConfig(
        model=ModelConfig(name=tiny_model, dtype="float32", max_length=128),
        lora=LoraConfig(r=4),
        train=TrainConfig(micro_batch_size=2, grad_accum=1, checkpoint_every=0),
    )
    base, tokenizer = load_model(cfg.model)
    model = add_lora(base, cfg.lora, cfg.seed)
    pairs = [{"question": "Which port does qmeshd listen on?", "answer": "Port 7421."}] * 2
    folder = tmp_path / "gen_0"
    folder.mkdir()
    train_adapter(
        cfg, model, tokenizer, pairs, folder, tmp_path / "logs", 0, launch_ranks(cfg.trainer)
    )
    hparams = yaml.unsafe_load((tmp_path / "logs" / "train_gen_0" / "hparams.yaml").read_text())
    assert hparams["model"] == tiny_model != ModelConfig().name
    assert hparams["dtype"] == "float32" and hparams["seed"] == cfg.seed
    assert hparams["lora"] == cfg.lora and hparams["train"] == cfg.train
    assert (folder / "adapter" / "adapter_config.json").exists()
