"""Reading and validating input files: fragments, eval sets and QA pairs."""

from __future__ import annotations

import json
import os
import random
import re
import unicodedata
from pathlib import Path
from typing import Any

from selfevo.config import DataConfig


class DataError(ValueError):
    """Bad input: the message is one line naming the file and the record."""


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()  # a set, not keys.count(): an object of 30,000 keys took 11 s
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen.add(k)
    return dict(pairs)


def _parse(text: str) -> Any:
    """One JSON document, strictly; ValueError, whose message is reported, if it is not one."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise ValueError("nested too deeply") from None


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in a JSON value, keys included, as "U+D800"; None if there is none.

    A JSON escape such as \\ud800 decodes to one, which is no Unicode text: UTF-8 cannot encode it,
    so the tokenizer and every run file would fail on it, after work was done."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"U+{ord(e.object[e.start]):04X}"
    return None


# Line breaks of a JSONL file. Not str.splitlines(): a JSON string may hold U+0085, U+2028 and
# U+2029 as they are, and splitlines() would cut the record there.
_JSONL_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read a JSON list or JSONL file of objects, strictly: UTF-8, no BOM, no duplicate keys, no
    lone surrogates."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raise DataError(
            f"{path}: starts with a UTF-8 byte-order mark; save it as UTF-8 without BOM"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 (byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            records = _parse(text)
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from None
    else:
        records = []
        for lineno, line in enumerate(_JSONL_LINE_BREAK.split(text), 1):
            if not line.strip():
                continue
            try:
                records.append(_parse(line))
            except ValueError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON: {e}") from None
    if not records:
        raise DataError(f"{path}: holds no records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(r).__name__}")
        for key, value in r.items():
            if bad := _lone_surrogate([key, value]):
                raise DataError(
                    f"{path}: record {i}: field {key!r} holds a lone surrogate {bad}, "
                    "which is not valid Unicode text"
                )
    return records


# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt): characters that print as
# nothing, such as U+200B ZERO WIDTH SPACE, U+3164 HANGUL FILLER and the variation selectors; and
# U+2800 BRAILLE PATTERN BLANK, which prints as a blank and is used as one.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]"
)


def _invisible(c: str) -> bool:
    """Whether a character prints as nothing: whitespace, control, format, or one of the above."""
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf") or _INVISIBLE.match(c) is not None


def _text_field(path: Path, i: int, record: dict, key: str) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{path}: record {i}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: record {i}: field {key!r} must be a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise DataError(f"{path}: record {i}: field {key!r} is empty")
    bad = [c for c in value if ord(c) < 32 and c not in "\n\t\r"]
    if bad:
        raise DataError(
            f"{path}: record {i}: field {key!r} holds control character {ord(bad[0]):#04x}"
        )
    if all(_invisible(c) for c in value):  # prints as nothing: as good as empty, to the model too
        shown = next(c for c in value if not c.isspace())
        raise DataError(
            f"{path}: record {i}: field {key!r} is empty once invisible characters are removed "
            f"(it holds only those, such as U+{ord(shown):04X})"
        )
    return value


def load_fragments(path: str | os.PathLike) -> tuple[list[str], list[dict], int]:
    """Knowledge fragments in first-seen order, without duplicates; returns (fragments, their
    origins, duplicates dropped). A fragment's origin is what its record says of where it comes
    from, `source` (a file) and `position` (its place there), as `selfevo ingest` writes them; {}
    where the record says nothing. The QA pairs about a fragment carry its origin to the exports."""
    path = Path(path)
    records = read_records(path)
    fragments: list[str] = []
    origins: list[dict] = []
    seen: set[str] = set()
    for i, r in enumerate(records):
        key = "instruction" if "instruction" in r else "text"
        text = _text_field(path, i, r, key).strip()
        origin = _origin(path, i, r)
        if text not in seen:
            seen.add(text)
            fragments.append(text)
            origins.append(origin)
    return fragments, origins, len(records) - len(fragments)


def _origin(path: Path, i: int, record: dict) -> dict:
    origin = {}
    if record.get("source") is not None:
        origin["source"] = _text_field(path, i, record, "source")
    position = record.get("position")
    if position is not None:
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise DataError(
                f"{path}: record {i}: field 'position' must be a whole number >= 0, got "
                f"{position!r}"
            )
        origin["position"] = position
    return origin


def with_origins(records: list[dict], origins: list[dict]) -> list[dict]:
    """Records about fragments (each with the fragment's index as `id`), each given its fragment's
    origin (source, position)."""
    return [{**r, **origins[r["id"]]} for r in records]


def load_eval(path: str | os.PathLike) -> list[dict]:
    """Eval QA records {"fragment", "question", "reference"}."""
    path = Path(path)
    out = []
    for i, r in enumerate(read_records(path)):
        out.append(
            {
                "fragment": _text_field(path, i, r, "instruction"),
                "question": _text_field(path, i, r, "input"),
                "reference": _text_field(path, i, r, "output"),
            }
        )
    return out


def select_fragments(
    fragments: list[str], eval_set: list[dict], data: DataConfig, seed: int
) -> tuple[list[str], int]:
    """The training fragments that `data.limit`, `data.include_eval` and `data.fill` choose from
    the deduplicated `fragments`, in file order; returns (fragments, how many are eval fragments).

    With include_eval, every eval fragment is chosen first (bad input, one line: an eval fragment
    that is not in the fragment file, or a limit below their number); the rest of the limit is
    filled with the other fragments, the first ones or a random choice seeded by `seed`.
    """
    keep: set[str] = set()
    if data.include_eval:
        known = set(fragments)
        for i, record in enumerate(eval_set):
            fragment = record["fragment"].strip()  # fragments are stripped when loaded
            if fragment not in known:
                raise DataError(
                    f"{data.eval}: record {i}: its fragment ('instruction') is not among the "
                    f"fragments of {data.fragments}; data.include_eval needs every eval fragment "
                    "in the fragment file"
                )
            keep.add(fragment)
        if data.limit is not None and data.limit < len(keep):
            raise DataError(
                f"{data.eval}: holds {len(keep)} distinct fragments, which data.include_eval "
                f"keeps, more than data.limit ({data.limit}); raise data.limit or leave "
                "data.include_eval off"
            )
    if data.limit is not None and data.limit < len(fragments):
        others = [f for f in fragments if f not in keep]
        room = data.limit - len(keep)
        chosen = set(
            others[:room] if data.fill == "first" else random.Random(seed).sample(others, room)
        )
        fragments = [f for f in fragments if f in keep or f in chosen]
    return fragments, len(keep)


def load_qa(path: str | os.PathLike, texts: bool = False) -> list[dict]:
    """QA pairs as selfevo writes them ({"question", "answer", ...}); the seed's {"input",
    "output"} too. With `texts`, a record of a "text" alone (a training set's plain text, such as a
    fragment) is read as {"text"}."""
    path = Path(path)
    out = []
    for i, r in enumerate(read_records(path)):
        if texts and "text" in r and not {"question", "input", "answer", "output"} & set(r):
            out.append({"text": _text_field(path, i, r, "text")})
            continue
        # selfevo's keys or the seed's, mixed too; a missing one is named in the style of the other
        q_key = "question" if "question" in r or ("input" not in r and "answer" in r) else "input"
        a_key = "answer" if "answer" in r or ("output" not in r and "question" in r) else "output"
        out.append(
            {
                **r,
                "question": _text_field(path, i, r, q_key),
                "answer": _text_field(path, i, r, a_key),
            }
        )
    return out


def load_questions(path: str | os.PathLike) -> list[str]:
    """Questions alone: a JSON list or JSONL of {"question"} (or the seed's {"input"})."""
    path = Path(path)
    return [
        _text_field(path, i, r, "question" if "question" in r else "input")
        for i, r in enumerate(read_records(path))
    ]
