"""Property-based fuzzing of the config reader, `selfevo evolve --config FILE [--KEY VALUE ...]`.

The invariant, for any YAML file and overrides: either `fail()` ends the command with exit code 2
and one line on stderr; or they parse into an EvolveConfig whose every value has its declared type
(a float finite, a text that the tokenizer takes valid Unicode), which validate() accepts or refuses
with a one-line ConfigError. Nothing else, such as a traceback.

The files are YAML of the config's sections and keys, with plausible values and arbitrary ones (any
Unicode, NaN and infinities, lists, mappings), unknown keys and sections, damaged as the readers'
files are (tests/test_fuzz_readers.py); the overrides are any bytes a shell may pass, decoded as
Python decodes argv. CI runs 1,000 examples; SELFEVO_FUZZ_EXAMPLES and SELFEVO_FUZZ_SEED as there.
"""

from __future__ import annotations

import functools
import io
import math
import os
import typing
from contextlib import redirect_stderr
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import typer
import yaml
from hypothesis import event, given, note, seed
from hypothesis import strategies as st

from selfevo import cli
from selfevo.config import ConfigError, EvolveConfig, validate
from tests.test_fuzz_readers import EXAMPLES, FUZZ, SEED, TEXTS, WORDS, damaged, surrogate

# Every key of the config, dotted, with its declared type.
KEYS: dict[str, Any] = {}
for _top, _kind in typing.get_type_hints(EvolveConfig).items():
    if is_dataclass(_kind):
        KEYS.update({f"{_top}.{k}": t for k, t in typing.get_type_hints(_kind).items()})
    else:
        KEYS[_top] = _kind
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
# Texts that reach the tokenizer (the IFD prompts); the others are names, paths, Lightning settings.
TOKENIZED = {"ifd.prompt", "ifd.answer_prefix"}

YAML_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3),
    max_leaves=6,
)


def plausible(kind: Any) -> st.SearchStrategy:
    """Values of a declared type, edge values included (negative, zero, NaN, infinite, empty)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is Union:
        return st.one_of(*map(plausible, args))
    if origin is list:
        return st.lists(plausible(args[0]), max_size=3)
    return {
        type(None): st.none(),
        bool: st.booleans(),
        int: st.integers(-2, 20) | st.integers(),
        float: st.floats(),
        str: WORDS | TEXTS,
    }.get(kind, YAML_ANY)  # a type added later: anything


def value(kind: Any) -> st.SearchStrategy:
    return st.one_of(plausible(kind), plausible(kind), YAML_ANY)


@st.composite
def config_files(draw) -> bytes:
    """YAML with some of the config's keys (and, one time in 8 each, an unknown key or section, or a
    section that is no mapping), dumped in block or flow style, then maybe damaged."""
    doc: dict = {}
    for key in draw(st.lists(st.sampled_from(sorted(KEYS)), max_size=6, unique=True)):
        top, _, sub = key.partition(".")
        if sub:
            doc.setdefault(top, {})[sub] = draw(value(KEYS[key]))
        else:
            doc[top] = draw(value(KEYS[key]))
    if draw(st.sampled_from(range(8))) == 3:
        doc[draw(st.sampled_from(SECTIONS)) if draw(st.booleans()) else draw(WORDS)] = draw(
            YAML_ANY
        )
    if doc and draw(st.sampled_from(range(8))) == 3:
        section = doc.get(draw(st.sampled_from(SECTIONS)))
        if isinstance(section, dict):
            section[draw(WORDS)] = draw(YAML_ANY)
    text = yaml.safe_dump(
        doc,
        allow_unicode=draw(st.booleans()),
        default_flow_style=draw(st.sampled_from([None, True, False])),
    )
    return draw(damaged(text, depths=(1, 50, 500)))[
        0
    ]  # PyYAML gives up at about 500, slowly beyond


# What a shell may pass: any bytes but NUL, decoded as Python decodes argv (lone surrogates for
# bytes that are not UTF-8), or a plausible value written out.
ARGV = st.binary(max_size=12).filter(lambda b: b"\0" not in b).map(os.fsdecode)
FLAGS = st.sampled_from([f"--{k}" for k in KEYS] + ["--nokey", "--data.nokey"])
SPELLED = st.sampled_from(["nan", "inf", "-1", "0", "null", "[]", "{}"])
OVERRIDES = st.lists(st.tuples(FLAGS, st.one_of(WORDS, ARGV, SPELLED)), max_size=2)


def conforms(value: Any, kind: Any) -> bool:
    """Whether a parsed value has its declared type; a float must be finite."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return value in args
    if origin is Union:
        return any(conforms(value, k) for k in args)
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if kind is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    return not isinstance(kind, type) or isinstance(
        value, kind
    )  # bool, str, or a class added later


def one_line(text: str) -> bool:
    return len(text.splitlines()) == 1


def check(path: Path, overrides: list[tuple[str, str]]) -> str:
    """The invariant of the module docstring; returns the outcome, for the statistics."""
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            cfg, _ = cli.parse_evolve_args(
                ["--config", str(path), *[a for pair in overrides for a in pair]]
            )
    except typer.Exit as e:
        assert e.exit_code == 2 and one_line(err.getvalue()), err.getvalue()
        assert err.getvalue().startswith("selfevo: error: "), err.getvalue()
        return "refused by the parser"
    try:
        validate(cfg)
    except ConfigError as e:
        assert one_line(str(e)), str(e)
        return "refused by validate"
    assert_valid(cfg)
    return "valid"


def assert_valid(cfg: EvolveConfig) -> None:
    """Every value of its declared type, every float finite, every prompt valid Unicode."""
    for key, kind in KEYS.items():
        top, _, sub = key.partition(".")
        value = getattr(getattr(cfg, top), sub) if sub else getattr(cfg, top)
        assert conforms(value, kind), f"{key}: {value!r} is not a {kind}"
        assert key not in TOKENIZED or not any(map(surrogate, value)), (
            f"{key}: {value!r} is no Unicode text"
        )


@pytest.fixture(scope="module")
def one_parser():
    """One parser for all examples: built anew for each, it would take most of their time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "evolve_parser", functools.cache(cli.evolve_parser))
        yield


@FUZZ
@seed(SEED)
@given(data=config_files(), overrides=OVERRIDES)
def test_a_config_parses_into_a_valid_one_or_is_refused_in_one_line(
    one_parser, tmp_path_factory, data, overrides
):
    note(f"SELFEVO_FUZZ_SEED={SEED} SELFEVO_FUZZ_EXAMPLES={EXAMPLES}")
    path = tmp_path_factory.getbasetemp() / "fuzz-config.yaml"
    path.write_bytes(data)
    event(check(path, overrides))


# What this fuzzing found in the config reader, one example each: `selfevo evolve` must stop them
# with exit code 2 and one line (fail() or a ConfigError), before any work. Fixed in cli.py and
# config.py.
FOUND = {
    "not UTF-8": (b"\xff\xfe{}\n", []),
    "nested too deeply": (b"[" * 600 + b"]" * 600, []),
    "section no mapping": (b"data: 5\n", []),
    "null for an int": (b"replay:\n  k: null\n", []),
    "null for a text": (b"model:\n  name: null\n", []),
    "NaN temperature": (b"generation:\n  temperature: .nan\n", []),
    "infinite dropout": (b"lora:\n  dropout: .inf\n", []),
    "prompt not UTF-8 on the command line": (
        b"{}\n",
        ["--ifd.answer_prefix", os.fsdecode(b"\x80")],
    ),
    "escape beyond Unicode": (b'name: "\\U00110000"\n', []),
    "escape beyond C's int": (b'name: "\\UA0010000"\n', []),
    "a mapping as a key": (b"{evaluation:, {batch_size: 0}}\n", []),
    "a list as a key": (b"? [a]\n: 1\n", []),
    "a section as a text with a NUL": (b'{data: "\\0"}\n', []),
    "the key config in a config file": (b"{config: false}\n", []),
}


@pytest.mark.parametrize("case", FOUND)
def test_a_config_that_fuzzing_found_is_refused_in_one_line(tmp_path, case):
    data, overrides = FOUND[case]
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    err = io.StringIO()
    try:
        with redirect_stderr(err):
            cfg, _ = cli.parse_evolve_args(["--config", str(path), *overrides])
        validate(cfg)
    except typer.Exit as e:
        assert e.exit_code == 2 and one_line(err.getvalue()), err.getvalue()
        return
    except ConfigError as e:
        assert one_line(str(e)), str(e)
        return
    assert_valid(cfg)  # or let through, as a valid config
