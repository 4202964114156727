import json

import pytest
import yaml

from selfevo.prompts import (
    answer_fault,
    clean_answer,
    clean_question,
    is_degenerate,
    prompts_for,
)

EN, ZH = prompts_for("en"), prompts_for("zh")


def test_question_is_cut_to_one_question():
    text = "Question: Which port does qmeshd use?\nIt uses 7741. Another? maybe"
    assert clean_question(text) == "Which port does qmeshd use?"
    assert clean_question("1. **Q1:** What is Quillmesh? Explain.") == "What is Quillmesh?"
    assert clean_question("问题：qmeshd 默认监听哪个端口？请回答。") == "qmeshd 默认监听哪个端口？"


def test_question_without_mark_keeps_first_line():
    assert clean_question("\n  Describe the QHELLO message\nmore") == "Describe the QHELLO message"


def test_empty_and_degenerate_outputs_are_dropped():
    assert clean_question("") is None
    assert clean_question("   \n ") is None
    assert answer_fault(clean_answer("??"), EN) == "looping"
    assert answer_fault(clean_answer("the the the the " * 20), EN) == "looping"
    assert is_degenerate("abababababababababababababababababababababab")
    assert not is_degenerate("The daemon listens on TCP port 7741 for peer traffic.")


def test_answer_label_is_stripped():
    assert clean_answer("Answer: Port 7741.") == "Port 7741."
    assert clean_answer("答：端口 7741。") == "端口 7741。"


def test_control_characters_are_removed():
    assert clean_question("Which\x0e port\x07 is used?") == "Which port is used?"
    assert clean_answer("Port\x00 7741\x1b.") == "Port 7741."


def test_answers_that_repeat_their_lines_under_new_numbers_are_dropped():
    looped = "\n".join(
        f"{i}. **{'查询License版本号' if i % 2 else '填写申请单'}**：用户在此时选择“无”。"
        for i in range(1, 9)
    )
    assert answer_fault(looped, ZH) == "looping"
    code = (
        "```python\n# 1. 选择用户和抄送人\n# 2. 选择相关组和人员\n# 3. 选择相关组和人员\n"
        "# 4. 选择相关组和人员\n# 5. 选择相关组和人员"
    )
    assert answer_fault(code, ZH) == "looping"
    steps = (
        "1. 使用admin账号登陆TECS，选择系统管理→项目。\n2. 单击添加项目按钮，打开添加项目页面。\n"
        "3. 根据资源规划填写参数。\n4. 单击创建按钮，完成创建。"
    )
    assert answer_fault(steps, ZH) is None  # numbered steps that differ stay
    # short rows of one shape stay too
    table = "参数A：必填。\n参数B：必填。\n参数C：可选。\n参数D：可选。"
    assert answer_fault(table, ZH) is None


def test_answers_that_restate_the_answer_prompt_are_dropped():
    # the sentence the second attempt's models gave for every question (docs/results.md), and others
    assert (
        answer_fault("写出文档中与问题相关的操作步骤、条件和结果，不要添加文档中没有的内容。", ZH)
        == "restating"
    )
    assert (
        answer_fault(
            "把文档中与问题相关的操作步骤、条件和结果都写出来，不要添加文档中没有的内容。", ZH
        )
        == "restating"
    )
    assert (
        answer_fault(clean_answer("回答：文档中与问题相关的操作步骤、条件和结果是：配置。"), ZH)
        == "restating"
    )
    assert (
        answer_fault("Answer accurately and concisely, using the facts in the passage.", EN)
        == "restating"
    )
    # a few words of content of its own (8 characters or more) keep an answer
    assert answer_fault("文档中与问题相关的操作步骤、条件和结果是：配置NFS偶联数。", ZH) is None
    assert answer_fault("Using the facts in the passage: port 7741.", EN) is None
    steps = "操作步骤：登录CSC系统，选择License申请并上传申请模板。适用条件：合同号已在系统中登记。"
    assert answer_fault(steps, ZH) is None
    opening = (
        "文档中与问题相关的操作步骤如下：1. 使用admin账号登陆TECS，选择系统管理→项目。"
        "2. 单击添加项目按钮，填写参数后单击创建按钮。"
    )
    assert answer_fault(opening, ZH) is None  # the prompt's words as an opening, then content


def test_an_answer_that_gives_back_its_question_is_dropped():
    question = "For how many days does the BlackConnect plugin work?"
    assert answer_fault(question, EN, True, question) == "echoing"
    assert answer_fault(question + " 1", EN, True, question) == "echoing"
    assert (
        answer_fault("qmeshd 默认监听哪个端口？", ZH, True, "qmeshd默认监听哪个端口") == "echoing"
    )
    # the question's words and a fact after them: an answer
    asked = "For how many days does the Orvin router keep its logs?"
    assert answer_fault(asked + " For 30 days.", EN, True, asked) is None
    assert answer_fault("It listens on port 7742.", EN, True, "Which port?") is None
    assert answer_fault(question, EN, False, question) is None  # the paper's loop keeps it


# --- prompts from the config (the prompts section) -------------------------------------------

GERMAN = {
    "question": "Lies diesen Abschnitt:\n\n{fragment}\n\nSchreibe eine Frage, die er beantwortet.",
    "fact_question": "Schreibe eine Frage zu dem Satz.\n\nSatz: {focus}\nFrage:",
    "answer": (
        "Beantworte die Frage mit Hilfe des Abschnitts.\n\nAbschnitt:\n{fragment}\n\n"
        "Frage: {question}\n\nAntworte genau und knapp, mit den Fakten des Abschnitts."
    ),
    "closed_book": "Frage: {question}\nAntworte auf Deutsch.",
}


class RecordingTokenizer:
    chat_template = None  # prompts.chat_prompt: the user text and a line break


class RecordingGenerator:
    """A generator that records the prompts it is given and answers from a script."""

    def __init__(self, reply):
        self.tokenizer, self.reply, self.prompts = RecordingTokenizer(), reply, []

    def generate(self, prompts, sampling, seed, batch_size, description="", strategy=None):
        self.prompts += prompts
        return [self.reply(p) for p in prompts]


def test_the_presets_are_the_languages_and_unset_keys_keep_them():
    from selfevo.config import PromptsConfig
    from selfevo.prompts import ANSWER_PROMPT, EXAMPLE_TERMS, QUESTION_PROMPT, prompts_for

    for language in ("en", "zh"):
        assert prompts_for(language, PromptsConfig()) == prompts_for(language)
    custom = prompts_for("en", PromptsConfig(answer=GERMAN["answer"]))
    assert custom.answer == GERMAN["answer"] and custom.question == QUESTION_PROMPT["en"]
    assert custom.closed_book == "{question}" and custom.example_terms == EXAMPLE_TERMS["en"]
    assert (
        prompts_for("zh", PromptsConfig(closed_book="问：{question}")).answer == ANSWER_PROMPT["zh"]
    )
    # the preset's example terms go with the preset's examples; a custom prompt has none, or its own
    assert prompts_for(
        "en", PromptsConfig(fact_question=GERMAN["fact_question"])
    ).example_terms == (frozenset())
    own = PromptsConfig(fact_question=GERMAN["fact_question"], example_terms=["Orvin", "SPEICHER"])
    assert prompts_for("en", own).example_terms == {"orvin", "speicher"}


def test_the_digest_of_the_presets_is_the_one_runs_recorded_before_prompts_could_be_set():
    import hashlib
    from dataclasses import replace

    from selfevo.config import PromptsConfig
    from selfevo.prompts import (
        ANSWER_PROMPT,
        FACT_QUESTION_PROMPT,
        QUESTION_PROMPT,
        prompts_digest,
        prompts_for,
    )

    for language in ("en", "zh"):
        for focus, question in (("fragment", QUESTION_PROMPT), ("sentence", FACT_QUESTION_PROMPT)):
            before = hashlib.sha256(
                (question[language] + "\0" + ANSWER_PROMPT[language]).encode()
            ).hexdigest()
            assert prompts_digest(prompts_for(language, PromptsConfig()), focus) == before
    # every prompt the run uses counts
    preset = prompts_for("en")
    digests = {
        prompts_digest(p, "sentence")
        for p in (
            preset,
            replace(preset, fact_question=GERMAN["fact_question"]),
            replace(preset, answer=GERMAN["answer"]),
            replace(preset, closed_book=GERMAN["closed_book"]),
            replace(preset, example_terms=frozenset({"orvin"})),
        )
    }
    assert len(digests) == 5


def test_custom_question_and_answer_prompts_are_what_the_model_is_given():
    from selfevo.config import GenerationConfig, PromptsConfig
    from selfevo.generate import write_answers, write_questions
    from selfevo.prompts import prompts_for

    prompts = prompts_for("en", PromptsConfig(**GERMAN))
    fragment = "Der Orvin-Router speichert seine Protokolle 30 Tage lang in /var/log/orvin."
    for focus in ("sentence", "fragment"):
        cfg = GenerationConfig(
            question_focus=focus, question_filters=False, phrasings=1, questions_per_fragment=1
        )
        asking = RecordingGenerator(lambda p: "Wie lange speichert der Orvin-Router Protokolle?")
        questions, _ = write_questions(asking, [fragment], cfg, seed=0, prompts=prompts)
        template = GERMAN["fact_question" if focus == "sentence" else "question"]
        chat = "\n" if focus == "fragment" else ""  # a chat turn; the other a plain completion
        assert asking.prompts == [template.format(focus=fragment, fragment=fragment) + chat]
        answering = RecordingGenerator(lambda p: "30 Tage lang.")
        qa, _ = write_answers(answering, questions, cfg, seed=0, prompts=prompts)
        assert answering.prompts == [
            GERMAN["answer"].format(fragment=fragment, question=questions[0]["question"]) + "\n"
        ]
        assert [p["answer"] for p in qa] == ["30 Tage lang."]


def test_an_answer_that_restates_the_custom_answer_prompt_is_dropped_not_the_presets():
    from selfevo.config import PromptsConfig
    from selfevo.prompts import prompts_for

    german = prompts_for("en", PromptsConfig(answer=GERMAN["answer"]))
    restated = "Antworte genau und knapp, mit den Fakten des Abschnitts."
    assert answer_fault(restated, german) == "restating"
    assert answer_fault(restated, EN) is None
    preset = "Answer accurately and concisely, using the facts in the passage."
    assert answer_fault(preset, german) is None


def test_the_example_terms_of_a_custom_fact_question_prompt_drop_the_questions_that_copy_them():
    from selfevo.config import PromptsConfig
    from selfevo.prompts import filter_questions, prompts_for

    fragments = [
        "The qmeshd daemon listens on TCP port 7741 for peer traffic.",
        "Quillmesh stores its state in /var/lib/quillmesh with mode 0700.",
    ]
    records = [
        {"id": 0, "question": "Which port does qmeshd use for Zephyr backups?"},
        {"id": 1, "question": "Where does Quillmesh store its state?"},
    ]
    own = PromptsConfig(fact_question=GERMAN["fact_question"], example_terms=["Zephyr"])
    kept, drops = filter_questions(records, fragments, set(), prompts_for("en", own))
    assert kept == records[1:] and drops["copies_example"] == 1
    # the preset's terms (backups) are not a custom prompt's
    no_terms = prompts_for("en", PromptsConfig(fact_question=GERMAN["fact_question"]))
    kept, drops = filter_questions(records, fragments, set(), no_terms)
    assert kept == records and drops["copies_example"] == 0
    kept, drops = filter_questions(records, fragments, set(), EN)  # the preset's: backups
    assert kept == records[1:] and drops["copies_example"] == 1


def test_training_and_evaluation_ask_in_the_same_closed_book_prompt(tiny_model, tmp_path):
    from selfevo.config import EvolveConfig, PromptsConfig
    from selfevo.evaluate import eval_prompt
    from selfevo.loop import retention_probe
    from selfevo.models import load_tokenizer
    from selfevo.prompts import prompts_for
    from selfevo.train import QADataModule, encode_qa
    from tests.helpers import write_records

    tokenizer = load_tokenizer(tiny_model)
    prompts = prompts_for("en", PromptsConfig(closed_book=GERMAN["closed_book"]))
    question, answer = "Welchen Port nutzt qmeshd?", "Port 7741."
    asked = eval_prompt(tokenizer, {"question": question}, prompts, open_book=False)
    assert GERMAN["closed_book"].format(question=question) in asked
    taught = encode_qa(tokenizer, question, answer, 1024, prompts.closed_book)
    prompt_ids = [t for t, label in zip(taught["input_ids"], taught["labels"]) if label == -100]
    assert prompt_ids == tokenizer(asked, add_special_tokens=False)["input_ids"]
    # QADataModule (`selfevo fit`'s data.closed_book too) encodes in it
    train_file = write_records(tmp_path / "qa.jsonl", [{"question": question, "answer": answer}])
    data = QADataModule(str(train_file), tiny_model, closed_book=prompts.closed_book)
    data.setup("fit")
    assert data.examples == [taught]
    with pytest.raises(ValueError, match=r"closed_book: must contain \{question\}"):
        QADataModule(str(train_file), tiny_model, closed_book="Frage:")
    # and so does the retention probe
    cfg = EvolveConfig(prompts=PromptsConfig(closed_book=GERMAN["closed_book"]))
    probe = retention_probe(cfg, tokenizer, [{"question": question, "answer": answer}], seed=0)
    assert probe.closed_book == GERMAN["closed_book"]


def test_the_retention_probe_asks_in_the_closed_book_prompt(tiny_model, monkeypatch):
    from selfevo.generate import HFGenerator
    from selfevo.models import load_tokenizer
    from selfevo.sampling import Sampling
    from selfevo.train import RetentionProbe

    asked = []

    def generate(self, prompts, sampling, seed, batch_size, description="", strategy=None):
        asked.extend(prompts)
        return ["Port 7741." for _ in prompts]

    monkeypatch.setattr(HFGenerator, "generate", generate)
    tokenizer = load_tokenizer(tiny_model)
    pairs = [{"question": "Welchen Port nutzt qmeshd?", "answer": "Port 7741."}]
    probe = RetentionProbe(pairs, tokenizer, "en", Sampling(4), 2, 256, 1, GERMAN["closed_book"])
    assert probe.retention(model=None) == 100.0
    assert [GERMAN["closed_book"].format(question=pairs[0]["question"]) in p for p in asked] == [
        True
    ]


@pytest.mark.parametrize(
    ("key", "template", "needle"),
    [
        ("answer", "Frage: {question}", "prompts.answer: must contain {fragment}"),
        ("closed_book", "Frage: {frage}", "prompts.closed_book: unknown field {frage}"),
        ("question", "Abschnitt: {fragment} {", "prompts.question: not a template"),
        ("fact_question", "Satz: {0}", "prompts.fact_question: not a template"),
    ],
)
def test_a_prompt_without_its_fields_or_with_others_is_refused_before_any_work(
    tiny_model, tmp_path, key, template, needle
):
    from typer.testing import CliRunner

    from selfevo.cli import app
    from tests.helpers import evolve_args, toy_domain_inputs

    inputs = toy_domain_inputs(tmp_path)
    yaml_file = tmp_path / "de.yaml"
    yaml_file.write_text(yaml.safe_dump({"prompts": {key: template}}, allow_unicode=True))
    for how in ((f"--prompts.{key}", template), ("--config", str(yaml_file))):
        result = CliRunner().invoke(app, evolve_args(tiny_model, inputs, tmp_path, "t", *how))
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert needle in message and "\n" not in message and "Traceback" not in result.output
        assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()
    # the stage commands that take the prompts check them as evolve does
    fragments, eval_file = inputs
    for command, source in (("generate", fragments), ("evaluate", eval_file)):
        if command == "evaluate" and key in ("question", "fact_question"):
            continue  # not evaluate's
        out = tmp_path / command
        result = CliRunner().invoke(
            app,
            [command, str(source), "--out", str(out), "--model.name", tiny_model]
            + [f"--prompts.{key}", template],
        )
        if command == "generate" and key == "closed_book":
            assert result.exit_code == 2 and "closed_book" in result.stderr  # not generate's
            continue
        assert result.exit_code == 2, result.output
        assert needle in result.stderr.strip() and not out.exists()


def test_the_evaluate_command_asks_in_the_prompts_of_a_config_file(
    tiny_model, toy_inputs, tmp_path, monkeypatch
):
    """A whole evolve config's prompts section, the keys evaluate does not use passed over."""
    from typer.testing import CliRunner

    from selfevo.cli import app
    from selfevo.generate import HFGenerator

    asked = []
    real = HFGenerator.generate_batch

    def recording(self, prompts, sampling, seed):
        asked.extend(prompts)
        return real(self, prompts, sampling, seed)

    monkeypatch.setattr(HFGenerator, "generate_batch", recording)
    config = tmp_path / "de.yaml"
    config.write_text(
        yaml.safe_dump({"prompts": {**GERMAN, "example_terms": ["Orvin"]}}, allow_unicode=True)
    )
    _, eval_file = toy_inputs
    for open_book, template in ((False, "closed_book"), (True, "answer")):
        asked.clear()
        args = ["evaluate", str(eval_file), "--out", str(tmp_path / f"eval{open_book}")]
        args += ["--config", str(config), "--model.name", tiny_model]
        args += ["--model.max_length", "256", "--evaluation.max_new_tokens", "4"]
        result = CliRunner().invoke(app, args + (["--open-book"] if open_book else []))
        assert result.exit_code == 0, result.output
        head = GERMAN[template].split("{")[0]
        assert len(asked) == 4 and all(head in p for p in asked), asked


def test_a_run_asks_in_its_prompts_and_is_not_resumed_with_others(
    tiny_model, tmp_path, monkeypatch
):
    """Every stage of a run uses the config's prompts (questions, answers, training, evaluation);
    they are part of the run's identity: another prompt is refused, naming its key; --force sets the
    run aside."""
    from typer.testing import CliRunner

    import selfevo.train
    from selfevo import rundir
    from selfevo.cli import app, parse_evolve_args
    from selfevo.generate import HFGenerator
    from tests.helpers import evolve_args, toy_domain_inputs

    asked, trained_in = [], set()
    real_batch, real_encode = HFGenerator.generate_batch, selfevo.train.encode_qa

    def recording(self, prompts, sampling, seed):
        asked.extend(prompts)
        return real_batch(self, prompts, sampling, seed)

    def encoding(tokenizer, question, answer, max_length, closed_book="{question}"):
        trained_in.add(closed_book)
        return real_encode(tokenizer, question, answer, max_length, closed_book)

    monkeypatch.setattr(HFGenerator, "generate_batch", recording)
    monkeypatch.setattr(selfevo.train, "encode_qa", encoding)
    inputs = toy_domain_inputs(tmp_path)
    german = [x for key, text in GERMAN.items() for x in (f"--prompts.{key}", text)]
    args = evolve_args(tiny_model, inputs, tmp_path, "de", "--end", "1", *german)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "de"
    questions = [json.loads(x) for x in (run_dir / "gen_0" / "questions.jsonl").open()]
    answers = [json.loads(x) for x in (run_dir / "gen_0" / "answers.jsonl").open()]
    assert questions and answers
    for q in questions:
        assert GERMAN["fact_question"].format(focus=q["focus"]) in asked
    for a in answers:
        answer = GERMAN["answer"].format(fragment=a["fragment"], question=a["question"])
        assert any(answer in p for p in asked)
    eval_questions = [r["input"] for r in json.loads(inputs[1].read_text())]
    for q in eval_questions:
        assert any(GERMAN["closed_book"].format(question=q) in p for p in asked)
    assert not any("Sentence:" in p or "Use this passage" in p for p in asked)  # no preset
    assert trained_in == {GERMAN["closed_book"]}
    assert json.loads((run_dir / "config.json").read_text())["config"]["prompts"] == {
        **GERMAN,
        "example_terms": None,
    }
    # the same prompts go on with the run; another answer prompt is another run
    assert CliRunner().invoke(app, args).exit_code == 0
    other = [*args, "--prompts.answer", "Antworte: {question} ({fragment})"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    refused = CliRunner().invoke(app, other)
    assert refused.exit_code == 2, refused.output
    message = refused.stderr.strip()
    assert "prompts.answer: " in message and "--force" in message and "\n" not in message
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before
    cfg, _ = parse_evolve_args(other[1:])
    assert rundir.prepare(cfg, force=True) == run_dir  # the old run set aside
    assert list(tmp_path.glob("runs/de.replaced-*"))
    snapshot = json.loads((run_dir / "config.json").read_text())
    assert snapshot["config"]["prompts"]["answer"] == "Antworte: {question} ({fragment})"


def test_a_run_begun_before_the_prompts_section_resumes_with_the_presets(
    finished_run, tiny_model, tmp_path
):
    import hashlib
    import shutil

    from selfevo import rundir
    from selfevo.cli import parse_evolve_args
    from selfevo.prompts import ANSWER_PROMPT, FACT_QUESTION_PROMPT
    from tests.helpers import evolve_args

    root, inputs = finished_run
    run_dir = tmp_path / "runs" / "t"
    shutil.copytree(root / "runs" / "t", run_dir)
    snapshot = json.loads((run_dir / "config.json").read_text())
    # its digest is the one selfevo recorded before the prompts could be set
    before = FACT_QUESTION_PROMPT["en"] + "\0" + ANSWER_PROMPT["en"]
    assert snapshot["prompts"] == hashlib.sha256(before.encode()).hexdigest()
    del snapshot["config"]["prompts"]  # as selfevo wrote it before the prompts section
    snapshot["sha256"] = rundir.config_digest(snapshot["config"])
    (run_dir / "config.json").write_text(json.dumps(snapshot))

    def config(*extra: str):
        return parse_evolve_args(evolve_args(tiny_model, inputs, tmp_path, "t", *extra)[1:])[0]

    assert rundir.prepare(config(), False) == run_dir
    with pytest.raises(
        rundir.RunError, match=r"prompts.closed_book: None -> 'Frage: \{question\}'"
    ):
        rundir.prepare(config("--prompts.closed_book", "Frage: {question}"), False)
