"""The prompts the model sees, and the clean-up of what it writes.

Questions and answers are written open book (the fragment is in the prompt); training and
evaluation are closed book (the question alone, or in the config's closed-book template), so the
knowledge must end up in the weights. The templates are the config's `prompts` section, each one
left unset the built-in preset of generation.language below (`prompts_for`).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from selfevo.config import PromptsConfig

Language = Literal["en", "zh"]

QUESTION_PROMPT = {
    "en": (
        "Read this passage:\n\n{fragment}\n\n"
        "Write one specific question that this passage answers. The question must make sense "
        "without the passage, so name the product or topic it is about. "
        "Reply with the question only."
    ),
    # Example question forms: without them a 0.5B model often wrote a title or label
    # ("产品：订单管理") instead of a question.
    "zh": (
        "下面是一段产品文档：\n\n{fragment}\n\n"
        "根据上面的文档，提出一个这段文档能够回答的具体问题，例如“如何……？”、“……是什么？”或“……有哪些……？”，"
        "并在问题中写出所涉及的产品或功能的名称。只输出问题本身。"
    ),
}

# One question per sentence of the fragment (generation.question_focus: sentence), by example: asked
# in words to write a specific question, SmolLM2-135M wrote "What is the product or topic that this
# passage discusses?" for most sentences; shown two examples, it asks about the sentence ("What is
# the purpose of UDP port 7743?"). A plain completion, not a chat turn: the examples are the
# instruction, and in a chat turn the small model answered them instead of going on.
FACT_QUESTION_PROMPT = {
    "en": (
        "Write a question that the sentence answers. Name what it is about.\n\n"
        "Sentence: The Orvin router keeps its logs in /var/log/orvin for 30 days.\n"
        "Question: For how many days does the Orvin router keep its logs?\n\n"
        "Sentence: Tessel database backups run every night at 02:00 UTC, unless backup_enabled "
        "is false.\n"
        "Question: When do Tessel database backups run?\n\n"
        "Sentence: {focus}\n"
        "Question:"
    ),
    "zh": (
        "为句子写一个它能回答的问题，问题中写出所涉及的产品或功能的名称。\n\n"
        "句子：Orvin路由器把日志保存在/var/log/orvin目录中，保留30天。\n"
        "问题：Orvin路由器的日志保留多少天？\n\n"
        "句子：Tessel数据库每天凌晨2点自动备份，除非backup_enabled设为false。\n"
        "问题：Tessel数据库什么时候自动备份？\n\n"
        "句子：{focus}\n"
        "问题："
    ),
}

# Terms (`terms`) of the examples above that a question about another sentence has no reason to
# use: a model copies the examples' frame onto sentences that say nothing of it ("For how many days
# does the BlackConnect plugin work?", "the pre-commit hook used for Tessel database backups"), and
# the answers then state invented facts. On Black's documentation with Qwen2.5-Coder-0.5B, 6% of the
# trained pairs with one phrasing a sentence, 14% with three (docs/results.md). In Chinese, a
# character pair of 路由器; not 天 (days), a single character, which a fragment can state as "7天".
EXAMPLE_TERMS = {
    "en": frozenset({"orvin", "tessel", "router", "backups", "days"}),
    "zh": frozenset({"orvin", "tessel", "由器"}),
}

ANSWER_PROMPT = {
    "en": (
        "Use this passage to answer the question.\n\n"
        "Passage:\n{fragment}\n\nQuestion: {question}\n\n"
        "Answer accurately and concisely, using the facts in the passage."
    ),
    # Full sentences with the relevant steps, conditions and results, as the eval references give
    # them: asked for concise answers, a small model's answers shortened generation after
    # generation. No colon before the instructions: after one, the model took them for the start of
    # its answer.
    "zh": (
        "请根据下面的内部文档回答问题。\n\n文档：\n{fragment}\n\n问题：{question}\n\n"
        "请依据文档中的事实，用完整的句子回答，把文档中与问题相关的操作步骤、条件和结果都写出来，不要添加文档中没有的内容。"
    ),
}


CLOSED_BOOK_PROMPT = "{question}"
"""The closed-book prompt's preset: the question alone."""


@dataclass(frozen=True)
class Prompts:
    """The prompts of a run, resolved once from generation.language and the config's prompts
    section (`prompts_for`): each template with its named fields, and the terms of the
    fact-question prompt's examples that `filter_questions` looks for."""

    language: Language
    question: str
    """A question about a whole fragment ({fragment}); through the chat template."""
    fact_question: str
    """A question about one sentence ({focus}); a plain completion."""
    answer: str
    """The open-book answer ({fragment}, {question}); through the chat template."""
    closed_book: str = CLOSED_BOOK_PROMPT
    """Training's, evaluation's, the retention probe's and the anchors' prompt ({question});
    through the chat template."""
    example_terms: frozenset[str] = frozenset()
    """Terms of the fact-question prompt's examples (case-folded)."""


PRESETS: dict[str, Prompts] = {
    language: Prompts(
        language,
        QUESTION_PROMPT[language],
        FACT_QUESTION_PROMPT[language],
        ANSWER_PROMPT[language],
        CLOSED_BOOK_PROMPT,
        EXAMPLE_TERMS[language],
    )
    for language in ("en", "zh")
}


def normalised_term(term: str) -> str:
    """An example term as `terms` gives words: NFKC, case-folded, without outer whitespace."""
    return unicodedata.normalize("NFKC", term).casefold().strip()


def prompts_for(language: Language, cfg: Optional[PromptsConfig] = None) -> Prompts:
    """The prompts of a run: each template of `cfg` that is set, the built-in preset of `language`
    for the others. The example terms: cfg.example_terms if set; else the preset's while the
    fact-question prompt is the preset's, and none for a custom one."""
    preset = PRESETS[language]
    if cfg is None:
        return preset
    fact_question = cfg.fact_question if cfg.fact_question is not None else preset.fact_question
    if cfg.example_terms is not None:
        example_terms = frozenset(normalised_term(t) for t in cfg.example_terms)
    elif fact_question == preset.fact_question:
        example_terms = preset.example_terms
    else:
        example_terms = frozenset()
    return Prompts(
        language,
        cfg.question if cfg.question is not None else preset.question,
        fact_question,
        cfg.answer if cfg.answer is not None else preset.answer,
        cfg.closed_book if cfg.closed_book is not None else preset.closed_book,
        example_terms,
    )


def prompts_digest(prompts: Prompts, question_focus: str = "fragment") -> str:
    """SHA-256 of the prompts a run uses: the question prompt of its question_focus, the answer
    prompt and, where they are not the language's presets, the closed-book prompt and the example
    terms. A run whose generations were written from different prompts is not one run: its
    snapshot records this, and a built-in preset changed in the code is caught by it. (With the
    presets' closed-book prompt and terms the digest is the one recorded before they could be
    set, so such runs go on.)"""
    question = prompts.fact_question if question_focus == "sentence" else prompts.question
    text = question + "\0" + prompts.answer
    preset = PRESETS[prompts.language]
    if (prompts.closed_book, prompts.example_terms) != (
        preset.closed_book,
        preset.example_terms,
    ):
        text += "\0" + prompts.closed_book + "\0" + "\0".join(sorted(prompts.example_terms))
    return hashlib.sha256(text.encode()).hexdigest()


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The text the model continues: the user turn through the tokenizer's chat template."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
    return user_text + "\n"


def question_prompt(tokenizer: PreTrainedTokenizerBase, fragment: str, prompts: Prompts) -> str:
    """The prompt for a question about a whole fragment (prompts.question, a chat turn)."""
    return chat_prompt(tokenizer, prompts.question.format(fragment=fragment))


def fact_question_prompt(sentence: str, prompts: Prompts) -> str:
    """The prompt for a question about one sentence of a fragment (prompts.fact_question, a plain
    completion)."""
    return prompts.fact_question.format(focus=sentence)


def answer_prompt(
    tokenizer: PreTrainedTokenizerBase, fragment: str, question: str, prompts: Prompts
) -> str:
    """The open-book prompt (prompts.answer, a chat turn)."""
    return chat_prompt(tokenizer, prompts.answer.format(fragment=fragment, question=question))


def closed_book_prompt(
    tokenizer: PreTrainedTokenizerBase, question: str, template: str = CLOSED_BOOK_PROMPT
) -> str:
    """Training's and evaluation's prompt: the question in the closed-book template
    (Prompts.closed_book; the preset, the question alone), through the chat template. Training,
    evaluation, the retention probe and the anchors all pass the run's template, so that the model
    is asked as it was taught."""
    return chat_prompt(tokenizer, template.format(question=question))


# Where a fragment's sentences end: after . ! ? before the next one's start (not inside "v2.3" or
# "e.g. x"), after 。！？；, and at every line break (AIOps fragments are often one step per line).
_SENTENCE_END = {
    "en": re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|\s*\n\s*"),
    "zh": re.compile(r"(?<=[。！？；])\s*|\s*\n\s*"),
}
# A piece shorter than this joins the next: a heading, "*是→3" or "Default: 5." says too little to
# be asked about on its own. Chinese says in 15 characters what English says in about 40.
MIN_SENTENCE_CHARS = {"en": 40, "zh": 15}


def fact_sentences(fragment: str, language: Language) -> list[str]:
    """The fragment cut into sentences (and lines), the units the questions are asked about: a
    fragment states one fact or a few per sentence, so one question per sentence covers them all,
    where one question per fragment asks about its main fact again and again."""
    pieces = [p.strip() for p in _SENTENCE_END[language].split(fragment.strip())]
    glue = " " if language == "en" else "\n"  # a Chinese piece is often a line of its own
    sentences: list[str] = []
    pending = ""
    for piece in filter(None, pieces):
        joined = f"{pending}{glue}{piece}" if pending else piece
        if len(joined) < MIN_SENTENCE_CHARS[language]:
            pending = joined
            continue
        sentences.append(joined)
        pending = ""
    if pending:  # a short tail joins the last sentence, or is the only one
        if sentences:
            sentences[-1] += glue + pending
        else:
            sentences.append(pending)
    return sentences


# --- clean-up ------------------------------------------------------------------------------

_LEADING_LABEL = re.compile(
    r"^\s*(?:[-*#>\d.)\s]+)?(?:\*\*)?(?:question|q|answer|a|问题|问|回答|答案|答)\s*(?:\d+)?\s*(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*",
    re.IGNORECASE,
)
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\d+[.)、])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_ITEM_MARK = re.compile(r"^[\s#*>\-•\d.)、]+")


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def is_degenerate(text: str) -> bool:
    """Looping or near-empty output: too few distinct characters, one chunk repeated over and over,
    or the same lines again and again under new list numbers."""
    compact = _compact(text)
    if len(compact) < 4 or len(set(compact)) < 3:
        return True
    if len(compact) >= 40:
        # A loop leaves most 8-character windows repeated.
        grams = [compact[i : i + 8] for i in range(0, len(compact) - 7)]
        if len(set(grams)) / len(grams) < 0.3:
            return True
    # A loop of whole lines keeps its windows varied by the item numbers ("7. X", "8. Y", "9. X",
    # ...), as a collapsed adapter writes.
    lines = [_ITEM_MARK.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if len(line) >= 6]
    return len(lines) >= 4 and len(set(lines)) <= len(lines) / 2


def clean_question(text: str) -> Optional[str]:
    """Reduce a model's reply to one question, or None if there is none worth keeping."""
    text = _CONTROL.sub("", text)
    lines = [
        _LEADING_LABEL.sub("", _LIST_MARK.sub("", line)).strip().strip('"“”').strip()
        for line in text.splitlines()
    ]
    lines = [line for line in lines if line]
    if not lines:
        return None
    # Prefer the first line that is a question; cut anything after its question mark.
    question = next((line for line in lines if "?" in line or "？" in line), lines[0])
    cut = min((i for i in (question.find("?"), question.find("？")) if i >= 0), default=-1)
    if cut >= 0:
        question = question[: cut + 1]
    question = question.strip()
    return None if is_degenerate(question) else question


def restates_instructions(answer: str, prompts: Prompts) -> bool:
    """An answer made of the answer prompt's own instructions (fewer than 8 of its characters lie
    outside 6-character windows that occur in them) says nothing about the question; trained on, it
    teaches the next model to write it again. Counting what is left over, not the share of windows,
    keeps a short answer that opens with the prompt's words ("Using the facts in the passage: port
    7741.")."""
    instructions = _compact(prompts.answer.format(fragment="", question="")).lower()
    compact = _compact(answer).lower()
    covered = [False] * len(compact)
    for i in range(len(compact) - 5):
        if compact[i : i + 6] in instructions:
            covered[i : i + 6] = [True] * 6
    return any(covered) and covered.count(False) < 8


# A closed-book answer must stand alone: one that cites "the passage" teaches the model to talk
# about a text it will never see again.
_SOURCE_REFERENCE = {
    "en": re.compile(
        r"\b(?:the|this|that|above|given|provided)\s+(?:passage|text|document|documentation|"
        r"article|excerpt|paragraph|context|sentence)s?\b",
        re.IGNORECASE,
    ),
    "zh": re.compile(
        r"文中|文档中|根据文档|该文档|本文|上文|原文|这段文字|这段文档|根据上述|根据以上|文章中"
    ),
}


def refers_to_source(answer: str, language: Language) -> bool:
    """Whether an answer speaks of the text it was written from ("the passage", "根据文档")."""
    return _SOURCE_REFERENCE[language].search(answer) is not None


def clean_answer(text: str) -> str:
    """An answer without control characters, a leading label ("答：", "Answer:") or outer
    whitespace."""
    return _LEADING_LABEL.sub("", _CONTROL.sub("", text).strip()).strip()


AnswerFault = Literal["looping", "restating", "echoing", "refers_to_source"]


def gives_back_question(question: str, answer: str) -> bool:
    """The answer is its question given back, with at most 3 letters or digits more ("For how many
    days does ... work? 1"): it states nothing, and trained on, it teaches the model to answer with
    the question (1.3% of the sixth GPU visit's pairs, docs/results.md). Stricter than the eval's
    echo control (`report.echoes_question`, 80% of the answer in the question), which would also
    drop a question given back with its fact after it ("...? For 30 days.")."""
    asked, given = normalised_question(question), normalised_question(answer)
    return bool(asked) and given.startswith(asked) and len(given) - len(asked) <= 3


def answer_fault(
    answer: str, prompts: Prompts, standalone: bool = False, question: str = ""
) -> Optional[AnswerFault]:
    """Why a cleaned answer is not worth keeping, or None: "looping" (near-empty or repeating
    itself), "restating" (the instructions of the answer prompt, `prompts.answer`, given back) and,
    where answers must stand alone (standalone; off in the paper's loop), "echoing" (its `question`
    given back) and "refers_to_source" (in prompts.language)."""
    if is_degenerate(answer):
        return "looping"
    if restates_instructions(answer, prompts):
        return "restating"
    if standalone and gives_back_question(question, answer):
        return "echoing"
    if standalone and refers_to_source(answer, prompts.language):
        return "refers_to_source"
    return None


# --- which questions are worth answering ------------------------------------------------------

# Words that name nothing: a question made of these and the domain's everyday words asks about no
# fact in particular ("What is the answer to this question?").
_STOPWORDS = frozenset(
    """a about above after all also an and any are as at be been before being between both but by
    can could did do does doing during each few for from had has have having how if in into is it
    its may might more most must no not of on once only or other our out over own same should so
    some such than that the their them then there these they this those through to too under until
    up very was were what when where which while who whom why will with would you your
    product topic passage text document question answer sentence""".split()
)
_WORD = re.compile(r"[a-z0-9_]+(?:[.\-/][a-z0-9_]+)*")
_HAN = re.compile(r"[\u3400-\u9fff]+")


def terms(text: str, language: Language) -> set[str]:
    """The words of a text that may name something: Latin words (case-folded, not stop words, 3 or
    more characters, or any with a digit) and, in Chinese, each pair of adjacent Han characters."""
    text = unicodedata.normalize("NFKC", text).casefold()
    found = {
        w
        for w in _WORD.findall(text)
        if w not in _STOPWORDS and (len(w) >= 3 or any(c.isdigit() for c in w))
    }
    if language == "zh":
        found |= {run[i : i + 2] for run in _HAN.findall(text) for i in range(len(run) - 1)}
    return found


def normalised_question(question: str) -> str:
    """The form in which two questions are the same: NFKC, case-folded, letters and digits only."""
    text = unicodedata.normalize("NFKC", question).casefold()
    return "".join(c for c in text if c.isalnum())


def filter_questions(
    records: list[dict],
    fragments: list[str],
    asked_before: set[str],
    prompts: Prompts,
) -> tuple[list[dict], dict]:
    """The questions worth answering, and how many were dropped and why:

    - "copies_example": it names a term of the question prompt's examples (`prompts.example_terms`)
      that its fragment does not hold, even as a singular or inside a word ("day", "today");
    - "unspecific": it shares with its fragment no term (`terms`) that fewer than half of all
      fragments hold: it names nothing particular to its fragment;
    - "recurring": the same question (`normalised_question`) was written for two or more fragments;
    - "asked_before": an earlier generation or the dev split asked it, or it repeats a question
      kept for the same fragment this generation.
    """
    language, example_terms = prompts.language, prompts.example_terms
    fragment_terms = [terms(f, language) for f in fragments]
    frequency = Counter(t for ts in fragment_terms for t in ts)
    common = len(fragments) / 2 if len(fragments) >= 4 else len(fragments) + 1
    forms = [normalised_question(r["question"]) for r in records]
    fragments_of: dict[str, set[int]] = {}
    for r, form in zip(records, forms):
        fragments_of.setdefault(form, set()).add(r["id"])
    seen = set(asked_before)
    kept: list[dict] = []
    drops = Counter()
    texts = [unicodedata.normalize("NFKC", f).casefold() for f in fragments]
    for r, form in zip(records, forms):
        asked = terms(r["question"], language)
        if any(t.rstrip("s") not in texts[r["id"]] for t in asked & example_terms):
            drops["copies_example"] += 1
        elif not any(frequency[t] < common for t in asked & fragment_terms[r["id"]]):
            drops["unspecific"] += 1
        elif len(fragments_of[form]) > 1:
            drops["recurring"] += 1
        elif form in seen:
            drops["asked_before"] += 1
        else:
            seen.add(form)
            kept.append(r)
    reasons = ("copies_example", "unspecific", "recurring", "asked_before")
    return kept, {k: drops[k] for k in reasons}
