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
    invoke("generate", fragments, "--out", qa, "--model", tiny_model, "--batch-size", 4, "--max-length", 256)
    pairs = read(qa)
    assert pairs and all(p["question"] and p["answer"] and p["fragment"] for p in pairs)

    scored = tmp_path / "scored.jsonl"
    invoke("score", qa, "--out", scored, "--model", tiny_model, "--dtype", "float32")
    assert [p["question"] for p in read(scored)] == [p["question"] for p in pairs]
    assert all(p["ifd"] > 0 and p["loss_cond"] > 0 for p in read(scored))

    replay = tmp_path / "replay.jsonl"
    invoke("select", scored, "--mode", "easy", "--k", 2, "--out", replay)
    assert sorted(p["ifd"] for p in read(scored))[:2] == [p["ifd"] for p in read(replay)]

    out = tmp_path / "eval"
    invoke("evaluate", eval_file, "--out", out, "--model", tiny_model, "--max-new-tokens", 8, "--max-length", 256)
    metrics = json.loads((out / "metrics.json").read_text())
    # the seed's metrics, fact recall, and for English the word-level metrics
    assert set(metrics) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "fact-recall", "fact-recall-scored",
                            "sacrebleu", "rouge-l-stem"}
    predictions = read(out / "predictions.jsonl")
    assert len(predictions) == 4 and all("prediction" in p for p in predictions)
    for key in ("bleu-4", "rouge-l-stem"):
        assert abs(sum(p[key] for p in predictions) / len(predictions) - metrics[key]) < 1e-3

    # the open-book ceiling: the same questions with their fragments in the prompt, the same cap
    ceiling = tmp_path / "open"
    invoke("evaluate", eval_file, "--out", ceiling, "--model", tiny_model, "--max-new-tokens", 8, "--max-length", 256,
           "--open-book", "--metrics", "seed")
    assert set(json.loads((ceiling / "metrics.json").read_text())) == {
        "bleu-4", "rouge-1", "rouge-2", "rouge-l", "fact-recall", "fact-recall-scored"}
    assert [p["question"] for p in read(ceiling / "predictions.jsonl")] == [p["question"] for p in predictions]
    bad = CliRunner().invoke(app, ["evaluate", str(eval_file), "--out", str(ceiling), "--backend", "tgi"])
    assert bad.exit_code == 2 and "--backend" in bad.stderr


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
    (run / "config.json").write_text(json.dumps({"config": {"model": {"name": tiny_model, "dtype": "float32"}}}))
    invoke("export", run, "--generation", 0)

    merged, _ = load_model(ModelConfig(name=str(run / "export_gen_0"), dtype="float32"))
    ids = torch.tensor([tokenizer("qmeshd listens on port")["input_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    missing = CliRunner().invoke(app, ["export", str(run), "--generation", "3"])
    assert missing.exit_code == 2 and "gen_3" in missing.stderr
