from selfevo.config import GenerationConfig, ModelConfig
from selfevo.generate import HFGenerator, Sampling, pair_answers, write_answers, write_questions
from selfevo.models import load_model
from selfevo.prompts import chat_prompt, prompts_for

EN, ZH = prompts_for("en"), prompts_for("zh")


def test_batched_greedy_equals_one_at_a_time_in_input_order(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    prompts = [
        chat_prompt(tokenizer, t)
        for t in ["short", "a much longer prompt about qmeshd ports", "mid length one"]
    ]
    greedy = Sampling(max_new_tokens=8)
    generator = HFGenerator(model, tokenizer, max_length=256)
    batched = generator.generate(prompts, greedy, batch_size=3, seed=0)
    single = [generator.generate([p], greedy, batch_size=1, seed=0)[0] for p in prompts]
    assert batched == single


def test_sampling_reproduces_with_the_same_seed(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    prompts = [chat_prompt(tokenizer, t) for t in ["one", "two", "three"]]
    sampled = Sampling(max_new_tokens=8, do_sample=True, temperature=0.9, top_p=0.95)
    generator = HFGenerator(model, tokenizer, 256)

    def run(seed):
        return generator.generate(prompts, sampled, batch_size=2, seed=seed)

    assert run(3) == run(3)


def test_questions_then_answers_keep_fragment_and_count_drops(tiny_model):
    model, tokenizer = load_model(ModelConfig(name=tiny_model, dtype="float32"))
    fragments = ["qmeshd listens on TCP port 7741.", "Q-409 means an edit conflict."]
    generator = HFGenerator(model, tokenizer, max_length=256)
    for focus in ("fragment", "sentence"):
        cfg = GenerationConfig(
            batch_size=2,
            question_max_new_tokens=12,
            answer_max_new_tokens=12,
            question_focus=focus,
            questions_per_fragment=2,
            phrasings=1,
        )
        questions, counts = write_questions(generator, fragments, cfg, seed=0, prompts=EN)
        assert counts["planned"] == (4 if focus == "fragment" else 2)  # one sentence each
        reasons = ("unreadable", "copies_example", "unspecific", "recurring", "asked_before")
        dropped = sum(counts[r] for r in reasons)
        assert counts["kept"] == len(questions) == counts["planned"] - dropped
        assert all(q["fragment"] == fragments[q["id"]] and q["question"] for q in questions)
    qa, drops = write_answers(generator, questions, cfg, seed=0, prompts=EN)
    assert len(qa) + drops["dropped"] == len(questions)
    faults = ("looping", "restating", "echoing", "refers_to_source", "repeated")
    assert drops["dropped"] == sum(drops[f] for f in faults)
    assert all(p["answer"] and p["question"] for p in qa)


def test_one_reply_given_to_several_questions_is_dropped_from_all_of_them():
    questions = [
        {"id": i, "fragment": f"fragment {i}", "question": f"question {i}?"} for i in range(7)
    ]
    stock = "This is handled by the system administrator."
    port = "qmeshd listens on port 7741."
    replies = [
        stock,
        port,
        stock,
        "Answer: " + port,
        stock,
        "",
        "Answer accurately and concisely, using the facts in the passage.",
    ]
    pairs, drops = pair_answers(questions, replies, EN)
    # the reply given three times goes; the one given twice (two questions on one topic) stays
    assert [(p["id"], p["answer"]) for p in pairs] == [(1, port), (3, port)]
    assert drops == {
        "dropped": 5,
        "looping": 1,
        "restating": 1,
        "echoing": 0,
        "refers_to_source": 0,
        "repeated": 3,
        "commonest_given": 3,
    }


def test_answers_that_speak_of_their_source_are_dropped_where_answers_must_stand_alone():
    questions = [{"id": i, "fragment": "f", "question": f"q{i}?"} for i in range(3)]
    replies = [
        "According to the passage, qmeshd listens on port 7741.",
        "qmeshd listens on TCP port 7741 by default.",
        "The text says that the port is 7742.",
    ]
    kept, drops = pair_answers(questions, replies, EN, standalone=True)
    assert [p["id"] for p in kept] == [1]
    assert drops["refers_to_source"] == 2
    kept, _ = pair_answers(questions, replies, EN, standalone=False)  # the paper's loop keeps them
    assert len(kept) == 3
    zh = pair_answers(
        questions[:2], ["根据文档，端口是7741。", "端口是7741。"], ZH, standalone=True
    )
    assert [p["id"] for p in zh[0]] == [1]


def test_auto_backend_is_vllm_only_with_a_gpu_and_an_importable_vllm(monkeypatch):
    import sys
    import types

    import torch

    from selfevo.generate import resolve_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "hf"
    assert resolve_backend("vllm") == "vllm" and resolve_backend("hf") == "hf"  # as asked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    assert resolve_backend("auto") == "vllm"
    # vLLM would serve a 4-bit model's adapter on the unquantized base; it runs on one rank
    assert resolve_backend("auto", quantization="nf4") == "hf"
    assert resolve_backend("auto", ranks=2) == "hf"
    monkeypatch.setitem(sys.modules, "vllm", None)  # installed but not importable
    assert resolve_backend("auto") == "hf"
