"""Fact recall: the share of a reference answer's facts that a model's answer states.

BLEU and ROUGE reward wording; an answer can share most of the reference's words and still give the
wrong port. Fact recall looks only at the checkable parts: the reference's numbers and identifiers
(and its yes or no) that the question does not already give away. docs/metrics.md has the rules
with examples; in short:

- numbers: 8080, 0.5, 1,000 (= 1000), 50% (= 50); a number glued to a unit counts as the number
  (30s, 512MB, 10Gbps, 30秒 -> 30, 512, 10, 30), since answers write units in many ways;
- identifiers: Latin tokens with a digit, an underscore or a capital after the first letter
  (RELRGCHG, eth0, IPv6, gRPC, max_connections), dotted names (net.ipv4.tcp_syncookies,
  config.yaml), paths, URLs and e-mail addresses, --flags and versions (counted without the dashes
  or the v: max-retries, 2.3.1), `code` spans;
- English adds capitalised names (Thonquin; a run of them, Harbor Daemon, is one) that do not start
  a sentence (there a capital says nothing); Chinese adds every capitalised Latin word (License) and
  quoted terms (“…”「…」『…』《…》"…"); step, figure and table numbers (1., 图2) are layout,
  not facts;
- a reference that opens with yes or no (是的/否/不能/...) also counts its polarity as a fact.

Values are compared normalised (NFKC, case-folded, thousands separators dropped, spaces collapsed),
and a fact whose edge is a letter or digit must stand alone in the text: 80 is not stated by 8080.
"""

from __future__ import annotations

import re
import unicodedata

import torch
from torchmetrics import Metric

from selfevo.prompts import Language

METRIC_KEY = "fact-recall"  # its key in metrics.json
YES, NO = "polarity:yes", "polarity:no"

# Only an ASCII comma between digit groups is a thousands separator: in Chinese the full-width comma
# separates list items ("端口80，443"), so it must not be merged after NFKC makes it ASCII.
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_SPACES = re.compile(r"\s+")
_DIGITS = frozenset("0123456789")
_LATIN = frozenset(
    "abcdefghijklmnopqrstuvwxyz0123456789_"
)  # what a word is made of, once case-folded
# Step numbers ("1. ", "2、", "(3)") and figure or table numbers ("如图2所示", "Table 1") are the
# layout of the text, not its facts.
_LAYOUT = re.compile(
    r"(?m)^[ \t]*(?:\(\d{1,2}\)|\d{1,2}[.、)](?!\d))"  # at a line's start: 1.  2、  3)  (4)
    r"|(?:图|(?<![代列报发])表|\b(?:Figure|Fig\.|Table) ?)\d+"  # 图2, 表1 (not 代表3个), Figure 2
)
_CODE = re.compile(r"`([^`\n]+)`")
# A quoted term is a name (a button, a menu, a document); a quote longer than 40 characters is
# prose.
_QUOTED = re.compile(
    r"“([^”\n]{1,40})”|「([^」\n]{1,40})」|『([^』\n]{1,40})』|《([^》\n]{1,40})》|\"([^\"\n]{1,40})\""
)
# Units a number may carry glued on; longest first so that "10Gbps" is not read as "10G" + "bps".
_UNITS = "gbps|mbps|kbps|bps|ghz|mhz|khz|hz|tib|gib|mib|kib|tb|gb|mb|kb|ms|us|ns|min|px|[bkmgtshd]"
_TOKEN = re.compile(
    r"(?P<url>[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9_.~/:%?#=&+@-]+"  # a URL or an e-mail address
    r"|[A-Za-z0-9_.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
    r"|(?P<path>(?<![A-Za-z0-9_])(?:~|\.{1,2})?(?:/[A-Za-z0-9_.~-]+)+/?)"
    r"|(?P<flag>(?<![A-Za-z0-9_-])--[A-Za-z0-9][A-Za-z0-9_-]*)"
    r"|(?P<version>(?:[vV]\d+(?:\.\d+)+|\d+(?:\.\d+){2,})(?![A-Za-z0-9_]|\.\d))"
    rf"|(?P<number>\d+(?:\.\d+)?)(?:\s?%|(?i:{_UNITS}))?(?![A-Za-z0-9_]|\.\d)"
    # A run of capitalised words is one name: "Service Based Architecture", not three facts.
    r"|(?P<name>[A-Z][a-z]+(?: [A-Z][a-z]+)+)(?![A-Za-z0-9_]|\.[A-Za-z0-9_])"
    r"|(?P<dotted>[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*(?:\.[A-Za-z0-9_]+(?:-[A-Za-z0-9_]+)*)+)"
    r"|(?P<word>[A-Za-z0-9_]+)"
)
_UNIT_WORD = re.compile(
    rf"(?:{_UNITS})", re.IGNORECASE
)  # "4 MiB": the number is the fact, not "MiB"
# What may stand between a sentence's end and its first word: spaces, opening quotes, bullets.
_OPENERS = set(" \t\"'([{“‘*#>•-")
_LEAD = re.compile(r"^[\W_]+")  # punctuation, spaces and markdown before the first word
# "No" only before punctuation or the end: "No one ..." and "No matter ..." are not answers.
_POLARITY = {
    "en": (re.compile(r"yes\b"), re.compile(r"no(?=\s*(?:[^\w\s]|$))")),
    # 是/对/可以... alone (before punctuation or the end) say yes; "是指...", "是否...",
    # "可以使用..." do not.
    # 不能/不支持/不需要... say no whatever follows; 不同, 不一定 do not.
    "zh": (
        re.compile(r"是的|(?:是|对|可以|能|会|支持|需要|有|行)(?=\s*(?:[^\w\s]|$))"),
        re.compile(
            r"(?:否|不|没有|没)(?=\s*(?:[^\w\s]|$))|不(?:是|能|会|可|支持|需|允许|行|用|必|应|对|存在)"
        ),
    ),
}


def _nfkc(text: str) -> str:
    """Thousands separators dropped (1,000 -> 1000), then NFKC: full-width letters, digits and
    punctuation as their ASCII forms."""
    return unicodedata.normalize("NFKC", _THOUSANDS.sub(lambda m: m.group().replace(",", ""), text))


def normalise(text: str) -> str:
    """The form facts are compared in: _nfkc, case-folded, runs of white space as one space."""
    return _SPACES.sub(" ", _nfkc(text).casefold()).strip()


def polarity(text: str, language: Language) -> str | None:
    """YES or NO when the text opens with a yes or a no, else None."""
    head = _LEAD.sub("", normalise(text))
    yes, no = _POLARITY[language]
    return YES if yes.match(head) else NO if no.match(head) else None


def _sentence_start(text: str, start: int) -> bool:
    i = start - 1
    while i >= 0 and text[i] in _OPENERS:
        i -= 1
    return i < 0 or text[i] in ".!?:\n"


def _token_fact(m: re.Match, text: str, language: Language) -> str | None:
    """The fact a token states, or None for an ordinary word."""
    kind, value = m.lastgroup, m.group(m.lastgroup)
    if kind in ("url", "path"):
        return value.rstrip(".:")
    if kind == "flag":
        return value.lstrip("-")  # the flag's name: "--max-retries" and "max-retries" both state it
    if kind == "version":
        return value.lstrip("vV")  # "version 2.3.1" states v2.3.1
    if kind == "number":
        return value
    if kind == "dotted":  # config.yaml, net.ipv4.tcp_syncookies; not "e.g" or "i.e"
        return value if any(len(part) > 1 for part in value.split(".")) else None
    if kind == "name":  # in English a sentence's first word may be capitalised only for being first
        sentence_start = language == "en" and _sentence_start(text, m.start())
        return value.split(" ", 1)[1] if sentence_start else value
    if len(value) < 2 or _UNIT_WORD.fullmatch(value):
        return None
    if any(c.isdigit() or c == "_" for c in value) or any(c.isupper() for c in value[1:]):
        return value
    if value[0].isupper() and (language == "zh" or not _sentence_start(text, m.start())):
        return value  # a name; in English a capital at a sentence start says nothing
    return None


def _mentions(text: str, fact: str) -> bool:
    """Whether the normalised text holds the normalised fact as a whole: a letter or digit at the
    fact's edge may not run on into the text's letters or digits, except that a number may carry a
    unit ("30" is stated by "30s" and "30秒", not by "300" or "1.30") and a version a v
    ("v2.3.1")."""
    start = text.find(fact)
    while start >= 0:
        end = start + len(fact)
        prev2, prev = text[max(0, start - 2) : start].rjust(2)
        after = text[end : end + 2]
        follow, follow2 = after[:1], after[1:2]
        left = fact[0] in _LATIN and prev in _LATIN
        # not inside a word or a number; a lone v (v2.3.1) before it is allowed
        if fact[0] in _DIGITS:
            lone_v = prev == "v" and prev2 not in _LATIN
            left = (prev in _LATIN and not lone_v) or (prev == "." and prev2 in _DIGITS)
        right = fact[-1] in _LATIN and follow in _LATIN
        if fact[-1] in _DIGITS:  # not inside a number; a unit after it is allowed
            right = follow in _DIGITS or (follow == "." and follow2 in _DIGITS)
        if not (left or right):
            return True
        start = text.find(fact, start + 1)
    return False


def reference_facts(reference: str, question: str, language: Language) -> list[str]:
    """The reference's normalised facts that the question does not already state, deduplicated, in
    order of appearance; a polarity (YES or NO) first when the reference opens with one."""
    text = _LAYOUT.sub(lambda m: " " * len(m.group()), _nfkc(reference))  # spaces keep the offsets
    found: list[tuple[int, str]] = [(m.start(), m.group(1)) for m in _CODE.finditer(text)]
    if language == "zh":
        found += [(m.start(), next(g for g in m.groups() if g)) for m in _QUOTED.finditer(text)]
    found += [
        (m.start(), fact) for m in _TOKEN.finditer(text) if (fact := _token_fact(m, text, language))
    ]
    asked = normalise(question)
    facts: list[str] = []
    for _, raw in sorted(found, key=lambda f: f[0]):
        fact = normalise(raw)
        if fact and fact not in facts and not _mentions(asked, fact):
            facts.append(fact)
    sign = polarity(reference, language)
    return [sign, *facts] if sign else facts


def states(fact: str, answer: str, language: Language) -> bool:
    """Whether the answer states the (normalised) fact; a polarity fact, whether it opens the same
    way."""
    if fact in (YES, NO):
        return polarity(answer, language) == fact
    return _mentions(normalise(answer), fact)


def fact_recall(answer: str, reference: str, question: str, language: Language) -> float | None:
    """The share (0 to 1) of the reference's facts that the answer states; None when it has none."""
    facts = reference_facts(reference, question, language)
    if not facts:
        return None
    return sum(states(f, answer, language) for f in facts) / len(facts)


class FactRecall(Metric):
    """Mean fact recall x100 over the pairs whose reference has facts; the others are left out, and
    `scored` says how many were counted."""

    full_state_update = False

    def __init__(self, language: Language = "en", **kwargs):
        super().__init__(**kwargs)
        if language not in _POLARITY:
            raise ValueError(f"language must be en or zh, not {language!r}")
        self.language = language
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, answers: list[str], references: list[str], questions: list[str]) -> None:
        for a, r, q in zip(answers, references, questions, strict=True):
            recall = fact_recall(a, r, q, self.language)
            if recall is not None:
                self.total += recall
                self.count += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1) * 100  # 0 when nothing was scored

    @property
    def scored(self) -> int:
        """The number of pairs scored, over all ranks where compute() syncs them."""
        with self.sync_context(should_sync=self.sync_on_compute):
            return int(self.count)
