"""Fact recall on hand-made pairs, in English and Chinese (no model, no data files)."""

import pytest
import torch

from selfevo.facts import (
    NO,
    YES,
    FactRecall,
    fact_recall,
    normalise,
    polarity,
    reference_facts,
    states,
)

# (reference, question, language, facts extracted)
EXTRACTED = [
    (
        "使用RELRGCHG命令可以修改区域变更参数，超时时间为30s。",
        "如何修改区域变更参数？",
        "zh",
        ["relrgchg", "30"],
    ),
    ("执行 `show vm` 命令查看虚机列表。", "如何查看虚机列表？", "zh", ["show vm"]),
    ("默认端口为8080。", "OMC服务的默认端口是多少？", "zh", ["8080"]),
    ("否，不支持跨VDC迁移虚机。", "是否支持跨VDC迁移虚机？", "zh", [NO]),
    ("是的，后续请求优先携带FQDN。", "后续请求是否可以优先携带IP地址？", "zh", [YES, "fqdn"]),
    (
        "单击“规格导入”按钮，打开「导入文件」对话框，参见《运维手册》。",
        "如何导入规格？",
        "zh",
        ["规格导入", "导入文件", "运维手册"],
    ),
    ("在申请License时，请填写合同号。", "如何申请？", "zh", ["license"]),
    (
        "Peer traffic runs over TCP port 7741; the listen_port key changes it.",
        "Which port does qmeshd use for peer traffic?",
        "en",
        ["tcp", "7741", "listen_port"],
    ),
    (
        "Edit /etc/qmeshd/qmeshd.toml and set net.ipv4.tcp_syncookies, then run `qmesh reload "
        "--force`.",
        "How do I apply the setting?",
        "en",
        ["/etc/qmeshd/qmeshd.toml", "net.ipv4.tcp_syncookies", "qmesh reload --force", "force"],
    ),
    (
        "Upgrade to v2.3.1 (or 1.4.0 for the agent) with --max-retries 5.",
        "How do I upgrade?",
        "en",
        ["2.3.1", "1.4.0", "max-retries", "5"],
    ),
    (
        "Interfaces eth0 and eth1 speak IPv6 and gRPC.",
        "What then?",
        "en",
        ["eth0", "eth1", "ipv6", "grpc"],
    ),
    (
        "Mail doc@x.org or see https://x.org/faq.",
        "Where?",
        "en",
        ["doc@x.org", "https://x.org/faq"],
    ),
    # a unit is no fact, nor is "i.e."
    ("The cache holds 4 MiB, i.e. 4096 KiB.", "How big is it?", "en", ["4", "4096"]),
    (
        "5G网络由NSSF（Network Slice Selection Function）选择切片。",  # one name, not four
        "5G网络如何选择切片？",
        "zh",
        ["nssf", "network slice selection function"],
    ),
]


@pytest.mark.parametrize(("reference", "question", "language", "facts"), EXTRACTED)
def test_reference_facts(reference, question, language, facts):
    assert reference_facts(reference, question, language) == facts


def test_capitalised_names_count_in_english_except_at_a_sentence_start():
    reference = (
        "Thonquin stores snapshots. They are copied to Quillmesh nodes by the Harbor daemon."
    )
    assert reference_facts(reference, "Where do snapshots go?", "en") == ["quillmesh", "harbor"]
    reference = "The Harbor Daemon copies them. Yes, Thonquin does."
    assert reference_facts(reference, "Who copies them?", "en") == ["harbor daemon", "thonquin"]


def test_versions_match_with_or_without_their_v():
    reference, question = "Upgrade to v2.3.1.", "Which version fixes it?"
    assert fact_recall("Version 2.3.1 does.", reference, question, "en") == 1.0
    assert fact_recall("v2.3.1", reference, question, "en") == 1.0
    assert fact_recall("v2.3.10 or 12.3.1", reference, question, "en") == 0.0


def test_facts_in_the_question_are_left_out():
    reference = "Run SHOWVMAUTOHEALING on port 8080 of the Thonquin node."
    assert reference_facts(reference, "What does showvmautohealing do on port 8,080?", "en") == [
        "thonquin"
    ]
    # but only as a whole number or word: 80 is not given away by 8080
    assert reference_facts("The port is 80.", "Is it 8080?", "en") == ["80"]


def test_thousands_separators_case_and_full_width_are_normalised():
    assert normalise("Up to 1,000,000 ROWS") == "up to 1000000 rows"
    assert normalise("ＲＥＬＲＧＣＨＧ　１０００") == "relrgchg 1000"
    assert reference_facts("The limit is 1,000 sessions.", "What is the limit?", "en") == ["1000"]
    assert states("1000", "about 1000 of them", "en") and states(
        "1000", "about 1,000 of them", "en"
    )
    assert states("relrgchg", "使用ｒｅｌｒｇｃｈｇ命令", "zh")
    # a full-width comma separates items, it does not group thousands
    assert reference_facts("端口为80，443。", "使用哪些端口？", "zh") == ["80", "443"]


def test_numbers_match_whole_and_with_any_unit():
    reference = "The timeout is 30s and the cache 512MB (50% of memory)."
    assert reference_facts(reference, "What are the limits?", "en") == ["30", "512", "50"]
    assert (
        states("30", "等待30秒", "zh")
        and states("30", "30 seconds", "en")
        and states("30", "30s", "en")
    )
    assert not states("30", "300 seconds", "en") and not states("30", "1.30", "en")
    assert not states("80", "port 8080", "en")


def test_step_and_figure_numbers_are_layout_not_facts():
    reference = "1. 单击“确定”按钮，如图3所示。\n2. 等待5分钟。"
    assert reference_facts(reference, "如何操作？", "zh") == ["确定", "5"]


@pytest.mark.parametrize(
    ("text", "language", "sign"),
    [
        ("Yes, the QHELLO message carries the version.", "en", YES),
        ("No. Discovery stays on.", "en", NO),
        ("**No**, it cannot.", "en", NO),
        ("No one needs to restart it.", "en", None),
        ("Nothing changes.", "en", None),
        ("是的，可以。", "zh", YES),
        ("是。", "zh", YES),
        ("可以，单击按钮即可。", "zh", YES),
        ("否，不支持。", "zh", NO),
        ("不能，INFO_ATTR_M需要GTDI已经配置。", "zh", NO),
        ("不支持跨VDC迁移。", "zh", NO),
        ("是指虚拟数据中心。", "zh", None),
        ("是否支持取决于版本。", "zh", None),
        ("可以使用SHOWPARTITIONPARA命令查询。", "zh", None),
        ("不同的版本默认值不同。", "zh", None),
    ],
)
def test_polarity(text, language, sign):
    assert polarity(text, language) == sign


def test_polarity_is_a_fact_the_answer_states_by_opening_the_same_way():
    reference, question = "否，不支持跨VDC迁移。", "是否支持跨VDC迁移虚机？"
    assert fact_recall("不支持，跨VDC不能迁移。", reference, question, "zh") == 1.0
    assert fact_recall("是的，支持。", reference, question, "zh") == 0.0
    assert fact_recall("跨VDC迁移不被支持。", reference, question, "zh") == 0.0  # no opening no
    reference = "Yes, QPULSE is sent every 15 seconds."
    assert fact_recall(
        "Yes. Every 15 s.", reference, "Is there a heartbeat?", "en"
    ) == pytest.approx(2 / 3)


def test_recall_is_the_share_of_facts_stated():
    reference = "使用RELRGCHG命令，默认端口为8080，超时时间为30秒。"
    question = "如何修改区域参数？"
    assert fact_recall("执行relrgchg命令，端口8,080，超时30s。", reference, question, "zh") == 1.0
    assert fact_recall("执行RELRGCHG命令即可。", reference, question, "zh") == pytest.approx(1 / 3)
    assert fact_recall("请联系管理员。", reference, question, "zh") == 0.0


def test_a_reference_without_facts_scores_none():
    assert (
        fact_recall("anything", "Open the settings page and save.", "How do I save?", "en") is None
    )
    assert fact_recall("任何回答", "在规格管理页面单击导入按钮。", "如何导入？", "zh") is None
    # its only fact is in the question
    assert fact_recall("8080", "The port is 8080.", "Is the port 8080?", "en") is None


def test_metric_means_over_scored_pairs_only():
    metric = FactRecall(language="zh")
    references = ["默认端口为8080。", "使用RELRGCHG命令，超时30秒。", "在页面单击导入按钮。"]
    questions = ["默认端口是多少？", "如何修改？", "如何导入？"]
    metric.update(
        ["端口是8080。", "使用RELRGCHG命令。"], references[:2], questions[:2]
    )  # 1 and 1/2
    metric.update(["单击导入。"], references[2:], questions[2:])  # no facts: left out
    assert float(metric.compute()) == pytest.approx(75.0)
    assert metric.scored == 2
    assert metric.compute().dtype == torch.float64


def test_metric_all_stated_is_100_none_is_0_nothing_scored_is_0():
    references = ["Peer traffic runs over TCP port 7741.", "Yes, set max_connections to 1,000."]
    questions = ["Which port carries peer traffic?", "Can the number of connections be limited?"]
    everything, nothing, empty = FactRecall(), FactRecall(), FactRecall()
    everything.update(["TCP, port 7741.", "Yes: max_connections = 1000."], references, questions)
    nothing.update(["I do not know.", "It depends."], references, questions)
    empty.update(["ok"], ["Open the page."], ["How?"])
    assert float(everything.compute()) == 100.0 and everything.scored == 2
    assert float(nothing.compute()) == 0.0 and nothing.scored == 2
    assert float(empty.compute()) == 0.0 and empty.scored == 0


def test_metric_rejects_mismatched_lengths_and_unknown_languages():
    with pytest.raises(ValueError):
        FactRecall().update(["a"], ["b", "c"], ["d", "e"])
    with pytest.raises(ValueError):
        FactRecall(language="fr")
