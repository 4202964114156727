"""End to end: `selfevo evolve` over 2 generations on the tiny model; resume; config checks."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import selfevo.loop
from selfevo.cli import app
from tests.helpers import ROOT, RUN_FILES, evolve_args, run_files, toy_domain_inputs


def run(args):
    return CliRunner().invoke(app, args)


def test_two_generations_write_every_artifact(finished_run):
    root, _ = finished_run
    run_dir = root / "runs" / "t"
    snap = json.loads((run_dir / "config.json").read_text())
    assert snap["config"]["replay"]["k"] == 3 and "torch" in snap["versions"] and snap["seed"] == 0
    for i in (0, 1):
        gen = run_dir / f"gen_{i}"
        for name in (*RUN_FILES, "stages.json"):
            assert (gen / name).is_file(), f"{gen}/{name}"
        assert not (gen / "checkpoints").exists()  # deleted once the adapter is saved
        qa = [json.loads(line) for line in (gen / "qa.jsonl").read_text().splitlines()]
        assert qa and all(
            {"ifd", "loss_cond", "loss_alone", "question", "answer", "fragment"} <= set(p)
            for p in qa
        )
        metrics = json.loads((gen / "metrics.json").read_text())
        assert {"bleu-4", "rouge-1", "rouge-2", "rouge-l"} <= set(metrics)
    # gen_1 replays the 3 highest-IFD pairs of gen_0
    replay = [
        json.loads(line) for line in (run_dir / "gen_1" / "replay.jsonl").read_text().splitlines()
    ]
    gen0 = sorted(
        (json.loads(line) for line in (run_dir / "gen_0" / "qa.jsonl").read_text().splitlines()),
        key=lambda p: -p["ifd"],
    )
    assert [p["ifd"] for p in replay] == [p["ifd"] for p in gen0[:3]]
    assert (run_dir / "base" / "metrics.json").is_file()
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["model"] for r in summary] == ["base", "gen_0", "gen_1"]
    # the base model closed and open book (the ceiling), and each generation's share of the gap
    open_book = json.loads((run_dir / "base" / "open_book" / "metrics.json").read_text())
    assert {"bleu-4", "rouge-l", "fact-recall", "fact-recall-scored"} <= set(open_book)
    assert (
        summary[0]["open_book"]["bleu-4"] == open_book["bleu-4"] and "question_echo" in summary[0]
    )
    for row in summary[1:]:
        assert {
            "recovered",
            "length_matched_base",
            "vs_base",
            "vs_length_matched_base",
            "answer_length",
        } <= set(row)
    assert "Knowledge recovered" in (run_dir / "summary.md").read_text()
    events = {p.parent.name for p in (root / "logs" / "t").rglob("events.out.tfevents.*")}
    assert {"evolve", "train_gen_0", "train_gen_1"} <= events


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_dev_split_is_held_back_and_every_generation_is_checked_on_it(finished_run):
    root, _ = finished_run
    run_dir = root / "runs" / "t"
    dev = read(run_dir / "gen_0" / "dev.jsonl")
    answers = read(run_dir / "gen_0" / "answers.jsonl")
    assert dev and all(p in answers for p in dev)
    held = {p["question"] for p in dev}
    for i in (0, 1):
        gen = run_dir / f"gen_{i}"
        assert not held & {p["question"] for p in read(gen / "train.jsonl")}  # never trained on
        assert not held & {p["question"] for p in read(gen / "qa.jsonl")}  # nor replayed
        check = read(gen / "check.jsonl")
        assert [p["question"] for p in check if p["split"] == "dev"] == [p["question"] for p in dev]
        trained = {p["question"] for p in read(gen / "train.jsonl")}
        assert all(p["question"] in trained for p in check if p["split"] == "trained")
        stages = json.loads((gen / "stages.json").read_text())
        assert stages["check"]["dev_pairs"] == len(dev)
    assert not (run_dir / "gen_1" / "dev.jsonl").exists()  # one dev split per run
    summary = json.loads((run_dir / "summary.json").read_text())
    scored = [r for r in summary[1:] if r["dev_fact_recall"] is not None]
    assert [r["model"] for r in summary if r.get("best")] == (
        [max(scored, key=lambda r: r["dev_fact_recall"])["model"]] if scored else []
    )


def test_the_next_generation_asks_twice_about_each_sentence_the_check_found_missed(
    finished_run,
):
    root, _ = finished_run
    run_dir = root / "runs" / "t"
    stages = [json.loads((run_dir / f"gen_{i}" / "stages.json").read_text()) for i in (0, 1)]
    for s in stages:  # every question planned is kept or counted (no filters in the tiny runs)
        assert s["questions"]["planned"] == s["questions"]["kept"] + s["questions"]["unreadable"]
    missed: dict[int, set] = {}
    for c in read(run_dir / "gen_0" / "check.jsonl"):
        if c["fact-recall"] not in (None, 100):
            missed.setdefault(c["id"], set()).add(c["unit"])
    # each missed sentence is asked twice, up to the 1 sentence a fragment is asked about (TINY_RUN)
    assert stages[1]["questions"]["targeted"] == 2 * sum(min(len(u), 1) for u in missed.values())
    assert missed  # the random model misses facts, so targeting has work to do


def test_tensorboard_holds_eval_scalars_histograms_text_and_timings(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = finished_run
    acc = EventAccumulator(
        str(root / "logs" / "t" / "evolve"), size_guidance={"tensors": 0, "histograms": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    assert {
        "eval/bleu-4",
        "eval/rouge-l",
        "eval/fact-recall",
        "eval_open_book/rouge-l",
        "seconds/train",
        "seconds/questions",
        "controls/answer_length",
        "controls/echoing_question",
    } <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("eval/bleu-4")] == [0, 1, 2]
    # each stage's counts: kept, and each drop by its reason; the mean IFD
    assert {"stages/answers/kept", "stages/answers/looping", "stages/score/mean_ifd"} <= set(
        tags["scalars"]
    )
    stages = json.loads((root / "runs" / "t" / "gen_1" / "stages.json").read_text())
    assert acc.Scalars("stages/score/mean_ifd")[-1].value == pytest.approx(
        stages["score"]["mean_ifd"]
    )
    assert "ifd" in tags["histograms"]
    assert any(t.startswith("samples") for t in tags["tensors"])
    # the eval answers as text, for the base model (step 0) and each generation
    predictions = acc.Tensors("eval/predictions/text_summary")
    assert [e.step for e in predictions] == [0, 1, 2]
    first = json.loads((root / "runs" / "t" / "gen_1" / "predictions.jsonl").open().readline())
    shown = predictions[-1].tensor_proto.string_val[0].decode()
    assert " ".join(first["question"].split()) in shown
    train = EventAccumulator(str(root / "logs" / "t" / "train_gen_0"))
    train.Reload()
    assert "train/loss" in train.Tags()["scalars"]
    assert any(t.startswith("lr-") for t in train.Tags()["scalars"])


def test_resume_after_crash_redoes_nothing_and_matches(
    finished_run, tiny_model, tmp_path, monkeypatch
):
    root, inputs = finished_run
    reference = run_files(root / "runs" / "t")
    calls = {"n": 0}
    real_train = selfevo.loop.train_adapter

    def crash_in_second_training(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as Ctrl-C would, in the middle of generation 1
        return real_train(*args, **kwargs)

    monkeypatch.setattr(selfevo.loop, "train_adapter", crash_in_second_training)
    first = run(evolve_args(tiny_model, inputs, tmp_path))
    assert first.exit_code == 130
    run_dir = tmp_path / "runs" / "t"
    assert (
        not (run_dir / "gen_1" / "adapter").exists()
        and (run_dir / "gen_1" / "answers.jsonl").exists()
    )
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    monkeypatch.setattr(selfevo.loop, "train_adapter", real_train)
    second = run(evolve_args(tiny_model, inputs, tmp_path))
    assert second.exit_code == 0, second.output
    unchanged = [p for p, t in before.items() if p.exists() and p.stat().st_mtime_ns == t]
    assert (
        run_dir / "gen_0" / "qa.jsonl" in unchanged
        and run_dir / "gen_1" / "answers.jsonl" in unchanged
    )
    assert run_files(run_dir) == reference


def test_different_config_is_refused_unless_forced(finished_run, tiny_model):
    root, inputs = finished_run
    refused = run(evolve_args(tiny_model, inputs, root, "t", "--replay.k", "5"))
    assert refused.exit_code == 2
    assert "replay.k: 3 -> 5" in refused.output and "--force" in refused.output


def test_more_generations_or_another_backend_go_on_with_the_run(finished_run, tiny_model):
    from selfevo import rundir
    from selfevo.cli import parse_evolve_args

    root, inputs = finished_run
    run_dir = root / "runs" / "t"

    def config(*extra: str):
        return parse_evolve_args(evolve_args(tiny_model, inputs, root, "t", *extra)[1:])[0]

    assert rundir.prepare(config("--end", "3", "--generation.backend", "vllm"), False) == run_dir
    with pytest.raises(rundir.RunError, match="replay.k: 3 -> 5"):
        rundir.prepare(config("--replay.k", "5"), False)
    # A snapshot that still counts the backend in the run's identity (as runs begun before it
    # stopped counting do) goes on too.
    snapshot = run_dir / "config.json"
    kept = snapshot.read_text()
    old = json.loads(kept)
    old["config"]["generation"]["backend"] = "hf"
    old["sha256"] = rundir.config_digest(old["config"])
    snapshot.write_text(json.dumps(old))
    try:
        assert rundir.prepare(config("--generation.backend", "vllm"), False) == run_dir
        # So does one begun before generation.phrasings, question_model and train.fresh_adapter
        # existed, which asked each sentence once, by the current model, and continued the
        # adapter; asking more often is another run.
        del old["config"]["generation"]["phrasings"]
        del old["config"]["generation"]["question_model"]
        del old["config"]["train"]["fresh_adapter"]
        old["sha256"] = rundir.config_digest(old["config"])
        snapshot.write_text(json.dumps(old))
        assert rundir.prepare(config(), False) == run_dir
        with pytest.raises(rundir.RunError, match="generation.phrasings: 1 -> 2"):
            rundir.prepare(config("--generation.phrasings", "2"), False)
    finally:
        snapshot.write_text(kept)


def test_answer_model_base_has_the_base_model_answer_the_current_models_questions(
    tiny_model, tmp_path
):
    from selfevo.config import GenerationConfig, LoraConfig, ModelConfig
    from selfevo.generate import HFGenerator, write_answers
    from selfevo.models import add_lora, load_model
    from selfevo.prompts import prompts_for

    inputs = toy_domain_inputs(tmp_path)
    fast = ("--train.learning_rate", "5e-2")  # an adapter that changes what the tiny model writes
    for name, answer_model in (("c", "current"), ("b", "base")):
        result = run(
            evolve_args(
                tiny_model, inputs, tmp_path, name, *fast, "--generation.answer_model", answer_model
            )
        )
        assert result.exit_code == 0, result.output
    current, base_run = tmp_path / "runs" / "c", tmp_path / "runs" / "b"

    def records(run_dir, i, stage):
        return [
            json.loads(line)
            for line in (run_dir / f"gen_{i}" / f"{stage}.jsonl").read_text().splitlines()
        ]

    # Generation 0's model is the base model either way; generation 1's questions are M_1's either
    # way.
    assert records(base_run, 0, "answers") == records(current, 0, "answers")
    questions = records(base_run, 1, "questions")
    assert questions == records(current, 1, "questions")
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32", max_length=256))
    model = add_lora(model, LoraConfig(), seed=0)
    sampling = GenerationConfig(batch_size=2, question_max_new_tokens=12, answer_max_new_tokens=16)

    generator = HFGenerator(model, tokenizer, max_length=256)

    def answers_by(adapter_of) -> list[str]:
        generator.use_adapter(None if adapter_of is None else adapter_of / "gen_0" / "adapter")
        written, _ = write_answers(
            generator, questions, sampling, seed=1, prompts=prompts_for("en")
        )  # the loop's seed for gen_1
        return [a["answer"] for a in written]

    by_base, by_m1 = answers_by(None), answers_by(current)
    assert by_base != by_m1
    assert [a["answer"] for a in records(base_run, 1, "answers")] == by_base
    assert [a["answer"] for a in records(current, 1, "answers")] == by_m1
    # A run begun with one answer model is not resumed with the other; the message says how to go
    # on.
    refused = run(evolve_args(tiny_model, inputs, tmp_path, "c", *fast))  # the default, base
    assert refused.exit_code == 2
    assert (
        "begun with current" in refused.output
        and "--generation.answer_model current" in refused.output
    )
    refused = run(
        evolve_args(
            tiny_model, inputs, tmp_path, "b", *fast, "--generation.answer_model", "current"
        )
    )
    assert refused.exit_code == 2 and "begun with base" in refused.output


def test_a_run_folder_of_another_format_is_refused_with_one_line(
    finished_run, tiny_model, tmp_path
):
    root, inputs = finished_run
    old = tmp_path / "runs" / "t"
    shutil.copytree(root / "runs" / "t", old)
    snapshot = json.loads((old / "config.json").read_text())
    del snapshot["format"]  # as selfevo wrote it before run folders had a format
    (old / "config.json").write_text(json.dumps(snapshot))
    refused = run(evolve_args(tiny_model, inputs, tmp_path))
    assert refused.exit_code == 2
    assert "run folder format none" in refused.output and "--force" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_grounding_retention_anchors_and_the_general_set(tiny_vllm_model, tmp_path):
    """Ungrounded answers are dropped, training runs on while retention rises, the base model's
    answers to anchor instructions are trained on, and the base model and every generation answer
    the general questions, compared in the summary. (The tiny model whose greedy answers are not
    empty: anchors without an answer are not trained on.)"""
    inputs = toy_domain_inputs(tmp_path)
    general = tmp_path / "general.json"
    general.write_text(json.dumps(json.loads((ROOT / "data" / "general_qa.json").read_text())[:6]))
    levers = (
        "--end", "1", "--model.max_length", "512", "--generation.min_grounding", "0.0",
        "--train.max_epochs", "4", "--train.patience", "1", "--train.probe_pairs", "3",
        "--data.general", str(general),
        "--train.anchors", str(ROOT / "data" / "anchor_prompts.json"), "--train.anchor_pairs", "5",
    )  # fmt: skip
    result = run(evolve_args(tiny_vllm_model, inputs, tmp_path, "g", *levers))
    assert result.exit_code == 0, result.output
    gen = tmp_path / "runs" / "g" / "gen_0"

    def read(name):
        return [json.loads(line) for line in (gen / name).read_text().splitlines()]

    answers, grounded = read("answers.jsonl"), read("grounded.jsonl")
    stages = json.loads((gen / "stages.json").read_text())
    assert stages["ground"]["pairs"] == len(answers)
    assert stages["ground"]["kept"] == len(grounded) > 0
    assert stages["ground"]["ungrounded"] == len(answers) - len(grounded) > 0  # a random model's
    assert all(p["grounding"] is None or p["grounding"] >= 0 for p in grounded)
    assert [{k: v for k, v in p.items() if k != "grounding"} for p in grounded] == [
        p for p in answers if any(g["question"] == p["question"] for g in grounded)
    ]
    anchors = [
        json.loads(line)
        for line in (gen.parent / "base" / "anchors.jsonl").read_text().splitlines()
    ]
    trained = {p["question"] for p in read("train.jsonl")} - {a["question"] for a in anchors}
    assert trained <= {p["question"] for p in grounded}
    assert all("grounding" in p and "ifd" in p for p in read("qa.jsonl"))
    train = stages["train"]
    assert 2 <= train["epochs"] <= 4 and len(train["retention"]) == train["epochs"]
    # the base model's own answers to 5 of the anchor instructions are trained on beside the QA
    anchors = [
        json.loads(line)
        for line in (gen.parent / "base" / "anchors.jsonl").read_text().splitlines()
    ]
    instructions = json.loads((ROOT / "data" / "anchor_prompts.json").read_text())
    assert train["anchors"] == 5 and 0 < len(anchors) <= len(instructions)
    trained_pairs = [(p["question"], p["answer"]) for p in read("train.jsonl")]
    assert sum((a["question"], a["answer"]) in trained_pairs for a in anchors) == 5
    assert train["pairs"] == len(trained_pairs) - 5
    for folder in (gen, tmp_path / "runs" / "g" / "base"):
        answered = [
            json.loads(line) for line in (folder / "general.jsonl").read_text().splitlines()
        ]
        assert [p["question"] for p in answered] == [
            p["question"] for p in json.loads(general.read_text())
        ]
    summary = json.loads((tmp_path / "runs" / "g" / "summary.json").read_text())
    assert summary[0]["general_fact_recall"] is not None
    low, high = summary[1]["general_vs_base"][1:]
    assert low <= summary[1]["general_vs_base"][0] <= high
    assert "general facts" in (tmp_path / "runs" / "g" / "summary.md").read_text()


@pytest.mark.parametrize(
    "fit_precision, native, autocast",
    [("bf16-mixed", False, True), ("auto", True, True), ("auto", False, False)],
)
def test_fit_precision_applies_to_training_alone(
    tiny_model, tmp_path, monkeypatch, fit_precision, native, autocast
):
    """auto trains under bf16 autocast only where bf16 is native: elsewhere the CPU emulates it."""
    import torch

    from selfevo import hardware
    from selfevo.evaluate import Evaluator
    from selfevo.train import LoRAModule

    seen: dict[str, set] = {"train": set(), "evaluate": set()}
    for stage, cls, hook in (
        ("train", LoRAModule, "training_step"),
        ("evaluate", Evaluator, "test_step"),
    ):
        original = getattr(cls, hook)

        def recording(self, *args, _stage=stage, _original=original):
            seen[_stage].add(torch.is_autocast_enabled("cpu"))
            return _original(self, *args)

        monkeypatch.setattr(cls, hook, recording)
    monkeypatch.setattr(hardware, "bf16_is_native", lambda accelerator="auto": native)
    inputs = toy_domain_inputs(tmp_path)
    result = run(
        evolve_args(tiny_model, inputs, tmp_path, "p", "--end", "1",
                    "--trainer.fit_precision", fit_precision)
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen == {"train": {autocast}, "evaluate": {False}}


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_adapter_trains_each_generation_from_a_new_adapter(
    tiny_model, tmp_path, monkeypatch, fresh
):
    """train.fresh_adapter: generation 1 trains from A_0, not from generation 0's adapter."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from selfevo import loop

    starts = []  # the adapter each training began from, in order

    def recording(cfg, model, *args, **kwargs):
        starts.append({k: v.clone() for k, v in get_peft_model_state_dict(model).items()})
        return original(cfg, model, *args, **kwargs)

    original = loop.train_adapter
    monkeypatch.setattr(loop, "train_adapter", recording)
    inputs = toy_domain_inputs(tmp_path)
    result = run(
        evolve_args(tiny_model, inputs, tmp_path, "f", "--replay.mode", "all",
                    "--train.fresh_adapter", str(fresh).lower())
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    gen_0 = load_file(tmp_path / "runs" / "f" / "gen_0" / "adapter" / "adapter_model.safetensors")
    a_0, start_1 = starts

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    # continued: from generation 0's saved adapter; fresh: from A_0 again
    assert same(a_0, start_1) is fresh
    assert same(gen_0, start_1) is not fresh


def test_no_later_generation_asks_about_the_dev_splits_sentences(tiny_model, tmp_path):
    """Asking every sentence each generation, generation 1 asks all of them but those of the dev
    split: a dev sentence asked again, in any wording, would be trained on and the dev split would
    no longer measure what the model learnt."""
    inputs = toy_domain_inputs(tmp_path)
    result = run(
        evolve_args(tiny_model, inputs, tmp_path, "d", "--generation.questions_per_fragment", "8",
                    "--train.epochs", "1")
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "d"
    dev = {(p["id"], p["unit"]) for p in read(run_dir / "gen_0" / "dev.jsonl")}
    asked = {(q["id"], q["unit"]) for q in read(run_dir / "gen_1" / "questions.jsonl")}
    assert dev and asked and not dev & asked


def test_question_model_base_has_the_base_model_write_every_generations_questions(
    tiny_model, tmp_path, monkeypatch
):
    from selfevo.generate import HFGenerator

    calls = []  # (what was generated, whether the adapter was on)
    original = HFGenerator.generate

    def recording(self, prompts, sampling, **kwargs):
        calls.append((kwargs.get("description"), self.adapter_on))
        return original(self, prompts, sampling, **kwargs)

    monkeypatch.setattr(HFGenerator, "generate", recording)
    inputs = toy_domain_inputs(tmp_path)
    for question_model in ("current", "base"):
        calls.clear()
        result = run(
            evolve_args(tiny_model, inputs, tmp_path, question_model,
                        "--generation.question_model", question_model)
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        writers = [on for what, on in calls if what == "writing questions"]
        # generation 0's model is the base model either way; generation 1's is M_1 or M_0
        assert writers == [False, question_model == "current"]


def test_without_an_eval_set_generation_0_holds_one_out_and_sources_reach_the_training_set(
    tiny_model, tmp_path
):
    """data.eval null: one phrasing of a share of the sentences becomes the eval, never trained on,
    its open-book answer the reference; the base model is evaluated on it after the split; every
    pair keeps its fragment's source and position."""
    fragments = json.loads((ROOT / "data" / "quillmesh_fragments.json").read_text())[:4]
    path = tmp_path / "fragments.jsonl"
    path.write_text(
        "".join(
            json.dumps({"text": f["instruction"], "source": "guide.md", "position": i}) + "\n"
            for i, f in enumerate(fragments)
        )
    )
    args = evolve_args(tiny_model, (path, path), tmp_path)
    args[args.index("--data.eval") + 1] = "null"
    args += ["--end", "1", "--generation.phrasings", "2", "--data.eval_share", "0.5"]
    result = run(args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "t"
    held = read(run_dir / "gen_0" / "eval.jsonl")
    answers = read(run_dir / "gen_0" / "answers.jsonl")
    assert held and {"fragment", "question", "reference", "source", "position"} <= set(held[0])
    by_question = {p["question"]: p for p in answers}
    for r in held:  # the reference is the open-book answer to the held-out question
        assert by_question[r["question"]]["answer"] == r["reference"]
    trained = read(run_dir / "gen_0" / "train.jsonl")
    assert not {r["question"] for r in held} & {p["question"] for p in trained}
    # the fact is trained on in the sentence's other phrasing
    held_units = {(r["id"], r["unit"]) for r in held}
    assert held_units <= {(p["id"], p["unit"]) for p in read(run_dir / "gen_0" / "qa.jsonl")}
    base = read(run_dir / "base" / "predictions.jsonl")
    assert [p["question"] for p in base] == [r["question"] for r in held]
    assert all(p["source"] == "guide.md" and p["position"] == p["id"] for p in trained if "id" in p)
    assert "no labelled eval set was given" in (run_dir / "summary.md").read_text()


def test_training_without_any_logger(tiny_model, tmp_path):
    """trainer.logger []: no training logs (Lightning's learning-rate monitor needs a logger, so it
    is left out with them); the loop's own events are still written."""
    args = evolve_args(tiny_model, toy_domain_inputs(tmp_path), tmp_path, "t", "--end", "1")
    result = run([*args, "--trainer.logger", "[]"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "t" / "gen_0" / "adapter").is_dir()
    assert [p.name for p in (tmp_path / "logs" / "t").iterdir()] == ["evolve"]


def test_an_eval_share_without_room_is_refused(tiny_model, tmp_path):
    inputs = toy_domain_inputs(tmp_path)
    args = evolve_args(tiny_model, inputs, tmp_path)
    args[args.index("--data.eval") + 1] = "null"
    result = run([*args, "--data.eval_share", "1"])
    assert result.exit_code == 2 and "data.eval_share" in result.output
    assert not (tmp_path / "runs").exists()


def test_the_trainer_section_takes_loggers_callbacks_and_clipping(tiny_model, tmp_path):
    """trainer.logger and trainer.callbacks as LightningCLI writes them; the loggers are no part
    of the run's identity, clipping is."""
    inputs = toy_domain_inputs(tmp_path)
    csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x"}}
    csv["init_args"]["save_dir"] = str(tmp_path / "csv")
    timer = {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"interval": "step"}}
    args = evolve_args(tiny_model, inputs, tmp_path, "t", "--end", "1")
    result = run(
        [
            *args,
            "--trainer.logger",
            json.dumps([csv]),
            "--trainer.callbacks",
            json.dumps([timer]),
            "--trainer.gradient_clip_val",
            "null",
        ]
    )
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "csv" / "train_gen_0").rglob("metrics.csv"))
    assert not list((tmp_path / "logs" / "t").glob("train_gen_*"))  # TensorBoard replaced
    snap = json.loads((tmp_path / "runs" / "t" / "config.json").read_text())["config"]["trainer"]
    assert "logger" not in snap and snap["callbacks"] == [timer]
    assert snap["gradient_clip_val"] is None


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("logger", '[{"class_path": "no.such.Logger"}]', "trainer.logger[0]: cannot import"),
        (
            "callbacks",
            '[{"class_path": "lightning.pytorch.loggers.CSVLogger"}]',
            "trainer.callbacks[0]: lightning.pytorch.loggers.CSVLogger is not a Callback",
        ),
        ("gradient_clip_val", "-1", "trainer.gradient_clip_val: must be > 0 or null"),
    ],
)
def test_a_bad_logger_or_callback_stops_the_run_in_one_line(
    tiny_model, tmp_path, key, value, message
):
    args = evolve_args(tiny_model, toy_domain_inputs(tmp_path), tmp_path)
    result = run([*args, f"--trainer.{key}", value])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "runs").exists()
