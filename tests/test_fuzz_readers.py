"""Property-based fuzzing of the input readers: fragments, eval and QA files (issue 19).

The invariant, for any file: either it loads, and then every text in it survives what a run does to
it (UTF-8, the tokenizer and its chat template, a run file written and read back) and prints as
something; or the reader raises DataError, one line naming the file and the line or record.
Conversely, a well-formed file whose texts are all plainly good always loads.

The files are records with the reader's fields holding arbitrary Unicode (every category and code
point, lone surrogates included) or arbitrary JSON, written as a JSON list or as JSONL, then maybe
re-encoded, truncated, flipped, given a BOM or nested deeply. CI runs 1,000 examples per reader from
a fixed seed; SELFEVO_FUZZ_EXAMPLES and SELFEVO_FUZZ_SEED choose others (docs/reliability.md, the
deep run). A failure prints the seed and a blob that replays it (@reproduce_failure).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

from selfevo.data import DataError, load_eval, load_fragments, load_qa
from selfevo.prompts import closed_book_prompt
from selfevo.rundir import read_jsonl, write_jsonl

EXAMPLES = int(os.environ.get("SELFEVO_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("SELFEVO_FUZZ_SEED", "0"))
# Fixed seed, no example database: CI runs the same examples every time.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Characters that broke a reader or a run, or could: lone surrogates; invisible and format
# characters; the line separators that str.splitlines() splits on; controls; JSON's and str.format's
# specials.
INVISIBLE = (
    "\u200b\u200d\u2060\ufeff\u00ad\u034f\u115f\u1160\u3164\uffa0\u2800\ufe0f\U000e0041\u180e"
)
TRICKY = (
    "\ud800",
    "\udbff",
    "\udc00",
    "\udfff",
    *INVISIBLE,
    "\u2028",
    "\u2029",
    "\x85",
    "\x00",
    "\x07",
    "\x1b",
    "\x7f",
    "\x9f",
    "\t",
    "\n",
    "\r",
    " ",
    "\u3000",
    '"',
    "\\",
    "{",
    "}",
    "\ufffd",
    "\uffff",
    "\U0010ffff",
    "\u0301",
    "é",
    "中",
    "😀",
)
CHARS = st.one_of(st.characters(), st.characters(codec="ascii"), st.sampled_from(TRICKY))


def surrogate(c: str) -> bool:
    return "\ud800" <= c <= "\udfff"


def control(c: str) -> bool:
    return c < " " and c not in "\t\n\r"


def around(chars: st.SearchStrategy[str], middle: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    side = st.text(chars, max_size=3)
    return st.builds(lambda a, b, c: a + b + c, side, middle, side)


# Two kinds of field value. Any: arbitrary text or JSON, which a reader mostly refuses. Likely good:
# a word, or arbitrary valid characters, between arbitrary valid characters (not lone surrogates or
# controls): what a reader mostly loads, and the texts that must then survive the run.
WORDS = st.text(st.characters(codec="ascii", categories=["L", "N", "P"]), min_size=1, max_size=8)
VALID_CHARS = st.one_of(
    st.characters(exclude_categories=["Cs", "Cc"]),
    st.characters(codec="ascii", exclude_categories=["Cc"]),
    st.sampled_from([c for c in TRICKY if not surrogate(c) and not control(c)]),
)
TEXTS = st.one_of(
    st.text(CHARS, max_size=16),
    around(CHARS, WORDS),
    st.text(st.sampled_from(INVISIBLE + " \t\u3000"), min_size=1, max_size=4),
    st.sampled_from(["", " ", "<|im_end|>", "{fragment}", "\\ud800", "a\ud800", "\udfffb"]),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=8,
)
LIKELY_GOOD = around(VALID_CHARS, WORDS | st.text(VALID_CHARS, min_size=1, max_size=6))
ENCODINGS = ("utf-8-sig", "utf-16", "utf-16-be", "utf-32", "latin-1", "cp1252", "gb18030")
MUTATIONS = ("none",) * 9 + ("truncate", "flip", "insert", "bom", "nest", "encoding")

# A reader's text fields: each a group of names it accepts, the first one present being read.
Fields = tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Reader:
    load: Callable[[Path], Any]
    fields: Fields
    texts: Callable[[Any], list[str]]  # the texts of a loaded file that the run tokenizes


READERS = {
    "fragments": Reader(load_fragments, (("instruction", "text"),), lambda loaded: loaded[0]),
    "eval": Reader(
        load_eval,
        (("instruction",), ("input",), ("output",)),
        lambda loaded: [t for r in loaded for t in r.values()],
    ),
    "qa": Reader(
        load_qa,
        (("question", "input"), ("answer", "output")),
        lambda loaded: [t for r in loaded for t in (r["question"], r["answer"])],
    ),
}


@dataclass(frozen=True)
class Document:
    data: bytes
    records: list | None  # what it holds, when it is the JSON or JSONL written as is, in UTF-8


@st.composite
def records(draw, fields: Fields, good: bool) -> dict:
    """An object with the reader's fields (one in 20 left out) and up to 2 extra fields; good:
    likely good texts everywhere, else any text or JSON."""
    values = LIKELY_GOOD if good else st.one_of(TEXTS, TEXTS, JSON)
    present = [names for names in fields if draw(st.sampled_from(range(20))) != 10]
    record = {draw(st.sampled_from(names)): draw(values) for names in present}
    record.update(draw(st.dictionaries(LIKELY_GOOD if good else TEXTS, values, max_size=2)))
    return record


@st.composite
def documents(draw, fields: Fields) -> Document:
    good = draw(st.booleans())
    items = [
        draw(JSON if not good and draw(st.sampled_from(range(6))) == 3 else records(fields, good))
        for _ in range(draw(st.integers(0, 4)))
    ]
    ascii_only = draw(
        st.booleans()
    )  # True writes a lone surrogate as a JSON escape, False as raw bytes
    if draw(st.booleans()):
        plain = True
        text = json.dumps(items, ensure_ascii=ascii_only, indent=draw(st.sampled_from([None, 1])))
    else:
        end = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
        text = "".join(json.dumps(item, ensure_ascii=ascii_only) + end for item in items)
        plain = not text.startswith("[")  # JSONL whose first record is a list reads as a JSON list
    data, intact = draw(damaged(text))
    return Document(data, items if intact and plain else None)


@st.composite
def damaged(
    draw, text: str, depths: tuple[int, ...] = (1, 50, 900, 1000, 5000)
) -> tuple[bytes, bool]:
    """The text as bytes, most often UTF-8 as it is (then intact), else re-encoded, truncated,
    flipped, with bytes inserted or a BOM before it, or nested `depths` deep (json's limit is about
    1,000). Lone surrogates go in as raw bytes."""
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation == "nest":
        depth = draw(st.sampled_from(depths))
        text = "[" * depth + text + "]" * depth
    encoding = draw(st.sampled_from(ENCODINGS)) if mutation == "encoding" else "utf-8"
    data = text.encode(encoding, "surrogatepass" if encoding.startswith("utf") else "replace")
    at = draw(st.integers(0, len(data)))
    if mutation == "truncate":
        data = data[:at]
    elif mutation == "flip" and data:
        at = min(at, len(data) - 1)
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
    elif mutation == "insert":
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    elif mutation == "bom":
        data = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])) + data
    try:
        return data, mutation == "none" and data.decode("utf-8") == text
    except UnicodeDecodeError:
        return data, False


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from strings(v)


def prints(text: str) -> bool:
    """Whether a text prints as something: not only whitespace, control, format, invisible."""
    return any(
        not (c.isspace() or unicodedata.category(c) in ("Cc", "Cf") or c in INVISIBLE) for c in text
    )


def plainly_good(text: Any) -> bool:
    """A text no reader may refuse: a letter, digit, punctuation mark or symbol that prints, and no
    lone surrogate or control character (but tab, LF and CR)."""
    return (
        isinstance(text, str)
        and not any(surrogate(c) or control(c) for c in text)
        and any(unicodedata.category(c)[0] in "LNPS" and c not in INVISIBLE for c in text)
    )


def all_plainly_good(items: list, fields: Fields) -> bool:
    """Records, all objects, with plainly good texts and no lone surrogate anywhere."""
    return bool(items) and all(
        isinstance(r, dict)
        and all(
            plainly_good(r.get(next((n for n in names if n in r), names[-1]))) for names in fields
        )
        and not any(surrogate(c) for s in strings(r) for c in s)
        for r in items
    )


def assert_survives(texts: list[str], every_string: list[str], tokenizer, folder: Path) -> None:
    """What a run does to the texts of a loaded file: none of it may fail or change them."""
    for s in every_string:
        assert s.encode("utf-8").decode("utf-8") == s
    for t in texts:
        assert prints(t) and not any(control(c) for c in t), ascii(t)
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        assert ids and tokenizer.decode(ids, clean_up_tokenization_spaces=False) == t, ascii(t)
        assert tokenizer(closed_book_prompt(tokenizer, t), add_special_tokens=False)["input_ids"]
    run_file = (
        folder / "run.jsonl"
    )  # a run file, as every stage writes them, read back as on resume
    write_jsonl(run_file, [{"text": s} for s in every_string])
    assert [r["text"] for r in read_jsonl(run_file)] == every_string


# What the readers' messages say, most specific first: the statistics count refusals by these.
REASONS = (
    "lone surrogate",
    "control character",
    "invisible",
    "the file is empty",
    "is empty",
    "must be a string",
    "missing field",
    "expected an object",
    "not UTF-8",
    "nested too deeply",
    "duplicate key",
    "not valid JSON",
    "byte-order mark",
    "holds no records",
)


def message_shape(path: Path) -> re.Pattern:
    """A reader's DataError: the file, then what is wrong with the whole, or the line or record."""
    return re.compile(
        re.escape(str(path)) + r": (the file is empty|holds no records|starts with a UTF-8 "
        r"byte-order mark; .*|not valid JSON: .*|line \d+: .*|record (\d+): .*)"
    )


def check(reader: Reader, doc: Document, path: Path, tokenizer) -> None:
    """The invariant of the module docstring, for one file."""
    path.write_bytes(doc.data)
    try:
        loaded = reader.load(path)
    except DataError as e:
        message = str(e)
        shape = message_shape(path).fullmatch(message)
        assert shape and len(message.splitlines()) == 1, message
        event(
            "refused: " + next((w for w in REASONS if w in message), "other")
        )  # counted in the statistics
        if doc.records is not None:
            assert not all_plainly_good(doc.records, reader.fields), (
                f"a good file refused: {message}"
            )
            assert shape[2] is None or int(shape[2]) < len(doc.records), message
        return
    event("loads")
    assert_survives(reader.texts(loaded), list(strings(loaded)), tokenizer, path.parent)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    """The tiny model's byte-level BPE, with a chat template: loads offline in milliseconds."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.parametrize("name", READERS)
@FUZZ
@seed(SEED)
@given(data=st.data())
def test_a_file_loads_and_survives_the_run_or_is_refused_in_one_line(name, data, tokenizer, folder):
    note(f"SELFEVO_FUZZ_SEED={SEED} SELFEVO_FUZZ_EXAMPLES={EXAMPLES} (reader {name})")
    reader = READERS[name]
    check(
        reader,
        data.draw(documents(reader.fields), label="document"),
        folder / f"{name}.json",
        tokenizer,
    )


# The findings of this fuzzing, each pinned as it was found (docs/reliability.md).


def test_a_lone_surrogate_is_refused_at_the_door(tmp_path):
    """It used to pass validation and break the tokenizer in the questions stage, after the base
    model's evaluation was written (issue 19)."""
    path = tmp_path / "f.json"
    path.write_text('[{"instruction": "ok"}, {"instruction": "qmeshd \\ud800 listens"}]')
    with pytest.raises(DataError) as refused:
        load_fragments(path)
    assert str(refused.value) == (
        f"{path}: record 1: field 'instruction' holds a lone surrogate U+D800, "
        "which is not valid Unicode text"
    )
    path.write_text(
        '{"question": "q?", "answer": "a", "note": {"\\udfff": 1}}\n'
    )  # anywhere, keys too
    with pytest.raises(DataError, match=r"record 0: field 'note' holds a lone surrogate U\+DFFF"):
        load_qa(path)


@pytest.mark.parametrize(
    "text", ["\u200b", " \u2060\ufeff ", "\u3164\u00ad", "\u2800", "\U000e0041\ufe0f"]
)
def test_a_text_that_prints_as_nothing_is_empty(tmp_path, text):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([{"instruction": "f", "input": text, "output": "a"}]))
    with pytest.raises(
        DataError, match=r"record 0: field 'input' is empty once invisible characters are"
    ):
        load_eval(path)


def test_a_text_with_a_line_separator_survives_a_run_file(tmp_path):
    """U+2028, U+2029 and U+0085 are valid in a JSON string as they are; str.splitlines() cut
    records at them, so such a fragment loaded and its run files then read as damaged
    (gen_0/qa.jsonl at replay)."""
    text = "qmeshd\u2028listens\u2029on\x85port 7741"
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps({"instruction": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_fragments(path) == ([text], [{}], 0)
    write_jsonl(tmp_path / "run.jsonl", [{"fragment": text}])
    assert read_jsonl(tmp_path / "run.jsonl") == [{"fragment": text}]


def test_a_file_nested_too_deeply_is_refused_in_one_line(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("[" * 100_000)
    with pytest.raises(
        DataError, match=r"^\S+: not valid JSON: nested too deeply$"
    ):  # not RecursionError
        load_fragments(path)
    path.write_text('{"instruction": "ok"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match=r": line 2: not valid JSON: nested too deeply$"):
        load_fragments(path)


def test_a_record_of_many_keys_is_read_in_linear_time(tmp_path):
    """The duplicate-key check counted each key among all: 30,000 keys took 11 s."""
    path = tmp_path / "f.jsonl"
    path.write_text(
        json.dumps({"instruction": "ok", **{f"k{i}": i for i in range(100_000)}}) + "\n"
    )
    started = time.perf_counter()
    assert load_fragments(path) == (["ok"], [{}], 0)
    assert time.perf_counter() - started < 5


# End to end: generated bad files through `selfevo evolve`, real processes of the venv's command.

FRAGMENTS = b'[{"instruction": "qmeshd listens on port 7741."}]'
EVAL = (
    b'[{"instruction": "qmeshd listens on port 7741.", "input": "Which port?", "output": "7741."}]'
)


def refused(reader: Reader, doc: Document) -> bool:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.json"
        path.write_bytes(doc.data)
        try:
            reader.load(path)
        except DataError:
            return True
    return False


def bad(name: str) -> st.SearchStrategy[tuple[str, Document]]:
    reader = READERS[name]
    return st.tuples(st.just(name), documents(reader.fields).filter(lambda d: refused(reader, d)))


# The class of issue 19, beside the generated files.
REGRESSIONS = [("fragments", Document(b'[{"instruction": "qmeshd \\ud800 listens"}]', None))]


@settings(
    max_examples=1,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)
@seed(SEED)
@given(generated=st.lists(st.one_of(bad("fragments"), bad("eval")), min_size=2, max_size=2))
def test_bad_files_stop_evolve_at_the_door(tmp_path_factory, generated):
    """Exit code 2, at most 3 lines on stderr, one naming the file, no traceback, no run folder."""
    note(f"SELFEVO_FUZZ_SEED={SEED}")
    selfevo = Path(sys.executable).parent / "selfevo"
    runs = []
    for name, doc in (
        REGRESSIONS + generated
    ):  # all at once: each process spends its seconds importing torch
        root = tmp_path_factory.mktemp("evolve")
        inputs = {"fragments": root / "fragments.json", "eval": root / "eval.json"}
        inputs["fragments"].write_bytes(FRAGMENTS)
        inputs["eval"].write_bytes(EVAL)
        inputs[name].write_bytes(doc.data)
        args = [
            str(selfevo),
            "evolve",
            "--data.fragments",
            str(inputs["fragments"]),
            "--data.eval",
            str(inputs["eval"]),
            "--runs_dir",
            str(root / "runs"),
            "--logs_dir",
            str(root / "logs"),
            "--model.name",
            str(root / "no-model"),
        ]  # a file let through would stop here, named otherwise
        proc = subprocess.Popen(
            args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        runs.append((root, inputs[name], proc))
    for root, path, proc in runs:
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, stderr
        assert 1 <= len(lines) <= 3 and "Traceback" not in stderr, stderr
        assert any(line.startswith(f"selfevo: error: {path}: ") for line in lines), stderr
        assert sorted(p.name for p in root.iterdir()) == [
            "eval.json",
            "fragments.json",
        ]  # no runs/, no logs/
