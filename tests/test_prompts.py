from selfevo.prompts import clean_answer, clean_question, is_degenerate


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
    assert clean_answer("??") is None
    assert clean_answer("the the the the " * 20) is None
    assert is_degenerate("abababababababababababababababababababababab")
    assert not is_degenerate("The daemon listens on TCP port 7741 for peer traffic.")


def test_answer_label_is_stripped():
    assert clean_answer("Answer: Port 7741.") == "Port 7741."
    assert clean_answer("答：端口 7741。") == "端口 7741。"


def test_control_characters_are_removed():
    assert clean_question("Which\x0e port\x07 is used?") == "Which port is used?"
    assert clean_answer("Port\x00 7741\x1b.") == "Port 7741."
