import json
from collections import Counter

import torch
from peft import PeftModel
from typer.testing import CliRunner

from selfevo.cli import app
from selfevo.config import LoraConfig, ModelConfig, TrainConfig, TrainerConfig
from selfevo.hardware import build_trainer
from selfevo.models import add_lora, load_model, load_tokenizer, save_adapter
from selfevo.select import fragment_texts
from selfevo.train import (
    IGNORE_INDEX,
    LoRAModule,
    QADataModule,
    collate_right_padded,
    encode_qa,
    encode_text,
)
from tests.helpers import ROOT, write_records

QA = [
    {
        "question": f"What is fact {i} of Quillmesh?",
        "answer": f"Fact {i}: qmeshd uses port {7700 + i}.",
    }
    for i in range(8)
]


def test_labels_cover_the_answer_and_end_of_turn_only(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    example = encode_qa(tokenizer, "Which port?", "Port 7741.", 1024)
    answer_ids = tokenizer("Port 7741.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    labelled = [t for t in example["labels"] if t != IGNORE_INDEX]
    assert labelled == answer_ids
    assert example["input_ids"][-len(answer_ids) :] == answer_ids
    assert "Which port?" in tokenizer.decode(example["input_ids"][: -len(answer_ids)])


def test_unmasked_right_padded_batch_gives_each_example_its_unpadded_logits(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    examples = [
        encode_qa(tokenizer, p["question"], p["answer"] * (1 + i % 3), 1024)
        for i, p in enumerate(QA[:4])
    ]
    batch = collate_right_padded(examples, tokenizer.pad_token_id)
    assert "attention_mask" not in batch and len({len(e["input_ids"]) for e in examples}) > 1
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"]).logits
        for r, e in enumerate(examples):
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            torch.testing.assert_close(
                padded[r, : len(e["input_ids"])], alone, rtol=1e-4, atol=1e-4
            )


def answer_loss(model, tokenizer):
    batch = [encode_qa(tokenizer, p["question"], p["answer"], 1024) for p in QA]
    with torch.no_grad():
        return sum(
            model(
                input_ids=torch.tensor([b["input_ids"]]), labels=torch.tensor([b["labels"]])
            ).loss.item()
            for b in batch
        ) / len(batch)


def test_training_lowers_answer_loss_and_touches_only_the_adapter(tiny_model, tmp_path):
    base, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model = add_lora(base, LoraConfig(r=8, alpha=16), seed=0)
    frozen = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    before = answer_loss(model, tokenizer)
    train_file = write_records(tmp_path / "qa.json", QA)
    data = QADataModule(str(train_file), tiny_model, micro_batch_size=4, max_length=256)
    trainer = build_trainer(TrainerConfig(), max_epochs=30, logger=False)
    train = TrainConfig(learning_rate=3e-3, warmup_ratio=0.0, lr_schedule="constant")
    trainer.fit(LoRAModule(tiny_model, "float32", train=train, _peft_model=model), datamodule=data)
    assert answer_loss(model, tokenizer) < 0.85 * before
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_saved_adapter_is_plain_peft_safetensors_without_modules_to_save(tiny_model, tmp_path):
    base, _ = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model = add_lora(base, LoraConfig(), seed=0)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["r"] == 8
    assert not list((tmp_path / "adapter").glob("*.bin"))
    targets = set(config["target_modules"])
    assert targets and not targets & {"lm_head", "embed_tokens"}
    fresh, _ = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    assert isinstance(PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")), PeftModel)


def test_lightning_cli_fit_with_the_shipped_config(tiny_model, tmp_path):
    train_file = write_records(
        tmp_path / "qa.json", [{"input": p["question"], "output": p["answer"]} for p in QA]
    )
    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(
        app,
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "lora.yaml"),
            "--model.model",
            tiny_model,
            "--data.train_file",
            str(train_file),
            "--model.save_adapter_to",
            str(adapter),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs"),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (adapter / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "logs" / "lora").glob("version_*/events.out.tfevents.*"))


def test_length_grouped_batches_cover_every_pair_once_with_less_padding(tiny_model, tmp_path):
    qa = [
        {"question": "q" * (1 + (i * 7) % 23), "answer": "a " * (1 + (i * 5) % 17)}
        for i in range(40)
    ]
    train_file = write_records(tmp_path / "qa.json", qa)
    plans = {}
    for grouped in (True, False):
        data = QADataModule(
            str(train_file), tiny_model, micro_batch_size=4, group_by_length=grouped
        )
        data.setup("fit")
        plans[grouped] = data
        assert sorted(i for b in data.batches for i in b) == list(range(40))

    def padding(data):
        return sum(
            len(b) * max(len(data.examples[i]["input_ids"]) for i in b)
            - sum(len(data.examples[i]["input_ids"]) for i in b)
            for b in data.batches
        )

    assert padding(plans[True]) < padding(plans[False]) / 2
    again = QADataModule(str(train_file), tiny_model, micro_batch_size=4)
    again.setup("fit")
    assert list(again.batches) == list(plans[True].batches)  # same seed, same plan
    first = list(again.batches)
    again.batches.set_epoch(1)
    second = list(again.batches)
    assert (
        second != first
        and sorted(map(sorted, second)) != []
        and sorted(i for b in second for i in b) == list(range(40))
    )


def test_a_plain_text_record_is_learnt_whole_beside_the_qa_pairs(tiny_model, tmp_path):
    records = [
        {"question": "Which port?", "answer": "7741."},
        {"text": "qmeshd listens on TCP port 7741."},
    ]
    data = QADataModule(str(write_records(tmp_path / "t.jsonl", records, jsonl=True)), tiny_model)
    data.setup("fit")
    tokenizer = load_tokenizer(tiny_model)
    qa, text = data.examples
    assert qa == encode_qa(tokenizer, "Which port?", "7741.", 1024)
    ids = tokenizer("qmeshd listens on TCP port 7741.", add_special_tokens=False)["input_ids"]
    assert text["input_ids"] == text["labels"] == ids + [tokenizer.eos_token_id]


def test_fragment_weight_gives_each_fragment_that_many_times_and_a_seeded_share_once_more():
    fragments = [f"fragment {i}" for i in range(10)]
    assert fragment_texts(fragments, 0.0, seed=0) == []
    twice = fragment_texts(fragments, 2.0, seed=0)
    assert [r["text"] for r in twice] == [f for f in fragments for _ in range(2)]
    part = fragment_texts(fragments, 1.3, seed=4)
    counts = Counter(r["text"] for r in part)
    assert sorted(counts.values()) == [1] * 7 + [2] * 3
    assert part == fragment_texts(fragments, 1.3, seed=4)


def train_with_retention(tiny_model, tmp_path, monkeypatch, scores, epochs, max_epochs, patience):
    """Train the tiny model with train.max_epochs while the probe reports `scores`, epoch by
    epoch."""
    from selfevo.config import EvalConfig, EvolveConfig
    from selfevo.loop import train_adapter
    from selfevo.ranks import launch_ranks
    from selfevo.train import RetentionProbe

    reported = iter(scores)
    asked = []

    def scripted(self, model):
        asked.append([p["question"] for p in self.pairs])
        return next(reported)

    monkeypatch.setattr(RetentionProbe, "retention", scripted)
    cfg = EvolveConfig(
        model=ModelConfig(name=tiny_model, dtype="float32", max_length=128),
        lora=LoraConfig(r=4),
        train=TrainConfig(
            micro_batch_size=2,
            grad_accum=1,
            checkpoint_every=0,
            epochs=epochs,
            max_epochs=max_epochs,
            patience=patience,
            probe_pairs=2,
        ),
        evaluation=EvalConfig(max_new_tokens=8),
    )
    base, tokenizer = load_model(cfg.model)
    pairs = [
        {"question": "Which port does qmeshd listen on?", "answer": "Port 7421."},
        {"question": "What does qmeshd do?", "answer": "It syncs notes between peers."},
        {"question": "How long is the qmeshd handshake timeout?", "answer": "45 seconds."},
        {"question": "Which file holds the peers?", "answer": "It is peers.toml."},
    ]
    folder = tmp_path / "gen_0"
    folder.mkdir(parents=True)
    trained = train_adapter(
        cfg,
        add_lora(base, cfg.lora, 0),
        tokenizer,
        pairs,
        folder,
        tmp_path / "logs",
        0,
        launch_ranks(cfg.trainer),
    )
    return trained, asked


def test_training_goes_on_while_retention_rises_and_stops_after_patience(
    tiny_model, tmp_path, monkeypatch
):
    trained, asked = train_with_retention(
        tiny_model, tmp_path, monkeypatch, [10, 20, 20, 20, 30, 40], 2, 10, 2
    )
    assert trained["epochs"] == 4 and trained["retention"] == [10, 20, 20, 20]
    # the probe asks the same pairs every epoch: two of the three whose answers state a fact
    assert trained["probe_pairs"] == 2 and all(a == asked[0] for a in asked)
    assert "What does qmeshd do?" not in asked[0]


def test_training_never_stops_before_train_epochs_nor_runs_past_max_epochs(
    tiny_model, tmp_path, monkeypatch
):
    flat, _ = train_with_retention(tiny_model, tmp_path / "a", monkeypatch, [0] * 9, 3, 9, 1)
    assert flat["epochs"] == 3
    rising, _ = train_with_retention(
        tiny_model, tmp_path / "b", monkeypatch, list(range(10)), 1, 4, 1
    )
    assert rising["epochs"] == 4 and rising["retention"] == [0, 1, 2, 3]


def test_the_retention_probe_answers_in_twice_the_longest_checked_answer_at_most(tiny_model):
    from selfevo.loop import probe_new_tokens
    from selfevo.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    sample = [
        {"answer": "Port 7421."},
        {"answer": "It syncs the notes of every peer in the mesh."},
        {"answer": "45 seconds."},
    ]
    longest = len(tokenizer(sample[1]["answer"], add_special_tokens=False)["input_ids"])
    assert probe_new_tokens(tokenizer, sample, 512) == 2 * longest
    assert probe_new_tokens(tokenizer, sample, 3) == 3  # never past the evaluation's cap


def test_the_answer_loss_and_its_gradients_are_the_models_own_loss_without_the_prompts_logits(
    tiny_model,
):
    from selfevo.train import answer_loss

    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    model = add_lora(model, LoraConfig(), seed=0)
    for p in (p for n, p in model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(p, std=0.05)  # a trained adapter, so that its gradients count
    examples = [encode_qa(tokenizer, p["question"], p["answer"], 1024) for p in QA[:4]]
    examples.append(encode_text(tokenizer, "qmeshd listens on TCP port 7741.", 1024))
    batch = collate_right_padded(examples, tokenizer.pad_token_id)

    def loss_and_grads(loss_of):
        model.zero_grad()
        loss = loss_of()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    own, own_grads = loss_and_grads(
        lambda: model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    )
    ours, our_grads = loss_and_grads(
        lambda: answer_loss(model, batch["input_ids"], batch["labels"])
    )
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_grads, own_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
