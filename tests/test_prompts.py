from selfevo.prompts import answer_fault, clean_answer, clean_question, is_degenerate


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
    assert answer_fault(clean_answer("??"), "en") == "looping"
    assert answer_fault(clean_answer("the the the the " * 20), "en") == "looping"
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
    assert answer_fault(looped, "zh") == "looping"
    code = (
        "```python\n# 1. 选择用户和抄送人\n# 2. 选择相关组和人员\n# 3. 选择相关组和人员\n"
        "# 4. 选择相关组和人员\n# 5. 选择相关组和人员"
    )
    assert answer_fault(code, "zh") == "looping"
    steps = (
        "1. 使用admin账号登陆TECS，选择系统管理→项目。\n2. 单击添加项目按钮，打开添加项目页面。\n"
        "3. 根据资源规划填写参数。\n4. 单击创建按钮，完成创建。"
    )
    assert answer_fault(steps, "zh") is None  # numbered steps that differ stay
    # short rows of one shape stay too
    table = "参数A：必填。\n参数B：必填。\n参数C：可选。\n参数D：可选。"
    assert answer_fault(table, "zh") is None


def test_answers_that_restate_the_answer_prompt_are_dropped():
    # the sentence the second attempt's models gave for every question (docs/results.md), and others
    assert (
        answer_fault("写出文档中与问题相关的操作步骤、条件和结果，不要添加文档中没有的内容。", "zh")
        == "restating"
    )
    assert (
        answer_fault(
            "把文档中与问题相关的操作步骤、条件和结果都写出来，不要添加文档中没有的内容。", "zh"
        )
        == "restating"
    )
    assert (
        answer_fault(clean_answer("回答：文档中与问题相关的操作步骤、条件和结果是：配置。"), "zh")
        == "restating"
    )
    assert (
        answer_fault("Answer accurately and concisely, using the facts in the passage.", "en")
        == "restating"
    )
    # a few words of content of its own (8 characters or more) keep an answer
    assert answer_fault("文档中与问题相关的操作步骤、条件和结果是：配置NFS偶联数。", "zh") is None
    assert answer_fault("Using the facts in the passage: port 7741.", "en") is None
    steps = "操作步骤：登录CSC系统，选择License申请并上传申请模板。适用条件：合同号已在系统中登记。"
    assert answer_fault(steps, "zh") is None
    opening = (
        "文档中与问题相关的操作步骤如下：1. 使用admin账号登陆TECS，选择系统管理→项目。"
        "2. 单击添加项目按钮，填写参数后单击创建按钮。"
    )
    assert answer_fault(opening, "zh") is None  # the prompt's words as an opening, then content


def test_an_answer_that_gives_back_its_question_is_dropped():
    question = "For how many days does the BlackConnect plugin work?"
    assert answer_fault(question, "en", True, question) == "echoing"
    assert answer_fault(question + " 1", "en", True, question) == "echoing"
    assert (
        answer_fault("qmeshd 默认监听哪个端口？", "zh", True, "qmeshd默认监听哪个端口") == "echoing"
    )
    # the question's words and a fact after them: an answer
    asked = "For how many days does the Orvin router keep its logs?"
    assert answer_fault(asked + " For 30 days.", "en", True, asked) is None
    assert answer_fault("It listens on port 7742.", "en", True, "Which port?") is None
    assert answer_fault(question, "en", False, question) is None  # the paper's loop keeps it
