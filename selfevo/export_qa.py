"""A generation's training QA pairs as a dataset for other trainers: Alpaca, ShareGPT or OpenAI
messages, as a JSON list with LLaMA-Factory's dataset_info.json beside it.

What is exported is gen_N/train.jsonl less what is not a QA pair about the domain's fragments: the
fragments as plain text (train.fragment_weight) and the anchors (the base model's answers to general
instructions, train.anchors), each pair once. A pair's fragment, IFD and origin (source, position)
come from the generation that produced it (its qa.jsonl), joined by question and answer: train.jsonl
of older runs holds nothing else.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from selfevo.data import DataError
from selfevo.report import best_generation_number
from selfevo.rundir import RunError, Stages, check_can_create, read_json, read_jsonl, write_json

Format = Literal["alpaca", "sharegpt", "messages"]
FORMATS: tuple[str, ...] = get_args(Format)
EXTRA_FIELDS = ("source", "position", "ifd", "generation")
"""Kept beside each pair where known: its fragment's file and place there, its IFD, and the
generation that wrote it."""

# Where a generation's pairs are, best first: qa.jsonl has the IFD; an unscored generation (killed
# after training) still has its answers. Each with the stage that records its checksum.
PAIR_FILES = (("score", "qa.jsonl"), ("ground", "grounded.jsonl"), ("answers", "answers.jsonl"))

Key = tuple[str, str]  # (question, answer): what identifies a pair in train.jsonl


@dataclass(frozen=True)
class ExportResult:
    path: Path
    """The data file: a JSON list of records in the chosen format."""
    dataset_info: Path
    """LLaMA-Factory's dataset_info.json, with this file's entry."""
    generation: int
    written: int
    dropped: dict[str, int] = field(default_factory=dict)
    """Records of train.jsonl not written, by reason: fragment_texts, anchors, repeats, unmatched
    (a pair no generation's files hold), no_ifd and below_min_ifd (with min_ifd)."""


def export_qa(
    run: Path,
    out: Optional[Path],
    fmt: Format,
    generation: Optional[int] = None,
    min_ifd: Optional[float] = None,
    with_fragment: bool = False,
) -> ExportResult:
    """Write generation `generation`'s training QA pairs (default: the best by the dev split) in
    `fmt` to OUT/<run>_gen<N>_<fmt>.json (OUT default: RUN/export_qa) and their entry into
    OUT/dataset_info.json. `min_ifd` keeps the pairs whose IFD is at least that; `with_fragment`
    puts each pair's fragment in the prompt (Alpaca's input, ShareGPT's system)."""
    if fmt not in FORMATS:
        raise DataError(f"--format: one of {', '.join(FORMATS)}, got {fmt!r}")
    if min_ifd is not None and not math.isfinite(min_ifd):
        raise DataError(f"--min-ifd: a number, got {min_ifd}")
    run = Path(run)
    check_run_folder(run)
    n = best_generation_number(run) if generation is None else generation
    out = Path(out) if out is not None else run / "export_qa"
    check_can_create(out, "output")
    training = read_training_set(run, n)
    pairs, dropped = domain_pairs(training, pairs_by_key(run, n), anchor_keys(run))
    if min_ifd is not None:
        pairs, below = at_least(pairs, min_ifd)
        dropped.update(below)
    if not pairs:  # an empty file would fail later, in the trainer that reads it
        left_out = ", ".join(f"{count} {why}" for why, count in dropped.items())
        raise RunError(
            f"{run / f'gen_{n}'}: no QA pair to export (left out: {left_out or 'none'})"
            + ("; lower --min-ifd" if min_ifd is not None else "")
        )
    name = f"{run.resolve().name}_gen{n}_{fmt}"
    path, info = out / f"{name}.json", out / "dataset_info.json"
    registry = merged_info(info, name, dataset_entry(path.name, fmt, with_fragment))  # read first
    write_json(path, formatted(pairs, fmt, with_fragment, closed_book_template(run)))
    write_json(info, registry)
    return ExportResult(path, info, n, len(pairs), dict(dropped))


# --- the run folder -------------------------------------------------------------------------------


def check_run_folder(run: Path) -> None:
    snapshot = run / "config.json"
    if not snapshot.is_file():
        raise RunError(f"{snapshot}: missing; not a selfevo run directory")


def generation_stages(run: Path, n: int) -> Stages:
    folder = run / f"gen_{n}"
    if n < 0 or not folder.is_dir():
        raise RunError(f"{folder}: missing; the run has no generation {n}")
    return Stages(run, folder.name)


def read_training_set(run: Path, n: int) -> list[dict]:
    """gen_N/train.jsonl, once generation N's training has finished (its record in stages.json);
    each record a QA pair or a plain text."""
    stages = generation_stages(run, n)
    record = stages.log.get("train")
    if record is None:
        raise RunError(f"{stages.folder}: generation {n} has not finished training")
    # Checks the checksums of what the training recorded and is still there (older adapters may
    # have been deleted: README, "For more generations later").
    stages.done("train", tuple(record.get("files", {})))
    path = stages.folder / "train.jsonl"
    if not path.is_file():
        raise RunError(f"{path}: missing; generation {n}'s training set is gone")
    records = read_jsonl(path)
    for lineno, r in enumerate(records, 1):
        if not (is_text(r) or is_pair(r)):
            raise DataError(f"{path}: line {lineno}: neither a QA pair nor a fragment text")
    return records


def is_text(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("text"), str)


def is_pair(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("question"), str)
        and isinstance(record.get("answer"), str)
    )


def intact_file(stages: Stages, stage: str, name: str) -> Optional[Path]:
    """The file when its stage recorded it and it still has that checksum; None when the stage
    never finished (a changed file is a RunError that says what to delete)."""
    return stages.folder / name if stages.done(stage, (name,)) else None


def pairs_by_key(run: Path, n: int) -> dict[Key, dict]:
    """The pairs of generations 0..N (those that wrote any), by question and answer: where
    generation N's own pairs and its replayed ones come from. A pair asked again later is the later
    generation's."""
    out: dict[Key, dict] = {}
    for j in range(n + 1):
        stages = generation_stages(run, j)
        found = (intact_file(stages, stage, name) for stage, name in PAIR_FILES)
        path = next((p for p in found if p is not None), None)
        for p in read_jsonl(path) if path else []:
            if is_pair(p):
                out[(p["question"], p["answer"])] = {"generation": j, **p}
    return out


def anchor_keys(run: Path) -> set[Key]:
    """The base model's anchor answers (base/anchors.jsonl): what train.jsonl of older runs holds
    without a mark."""
    path = run / "base" / "anchors.jsonl"
    if not path.is_file():
        return set()
    stages = Stages(run, "base")
    stages.done("anchors", ("anchors.jsonl",))  # a changed file stops here, with what to delete
    return {(p["question"], p["answer"]) for p in read_jsonl(path) if is_pair(p)}


# --- what is exported -----------------------------------------------------------------------------


def domain_pairs(
    training: list[dict], produced: dict[Key, dict], anchors: set[Key]
) -> tuple[list[dict], Counter]:
    """The QA pairs about the domain's fragments, each once, in training-set order, joined with
    the record that produced it; and the records left out, by reason."""
    kept: list[dict] = []
    seen: set[Key] = set()
    dropped: Counter = Counter()
    for r in training:
        if not is_pair(r):
            dropped["fragment_texts"] += 1
            continue
        key = (r["question"], r["answer"])
        if r.get("anchor") or (key in anchors and key not in produced):
            dropped["anchors"] += 1
        elif key in seen:
            dropped["repeats"] += 1  # written alike by two generations, one replayed
        elif key not in produced:
            dropped["unmatched"] += 1
        else:
            seen.add(key)
            kept.append(joined(r, produced[key]))
    return kept, dropped


def joined(trained: dict, produced: dict) -> dict:
    """A pair with what is known of it: the producing record's fields, then the training record's
    where that one lacks them."""
    pair = {**produced}
    for k in EXTRA_FIELDS:
        if pair.get(k) is None and trained.get(k) is not None:
            pair[k] = trained[k]
    pair["ifd"] = finite(pair.get("ifd"))
    return pair


def finite(value: Any) -> Optional[float]:
    """An IFD as a number, or None where there is none (NaN, which JSON readers refuse, too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def at_least(pairs: list[dict], min_ifd: float) -> tuple[list[dict], Counter]:
    """The pairs with IFD >= min_ifd; those without an IFD are dropped too, and counted apart."""
    dropped: Counter = Counter()
    kept = []
    for p in pairs:
        if p["ifd"] is None:
            dropped["no_ifd"] += 1
        elif p["ifd"] < min_ifd:
            dropped["below_min_ifd"] += 1
        else:
            kept.append(p)
    return kept, dropped


def closed_book_template(run: Path) -> str:
    """The run's prompts.closed_book: how its model was asked each question in training."""
    prompts = read_json(run / "config.json")["config"].get("prompts") or {}
    return prompts.get("closed_book") or "{question}"


def formatted(
    pairs: list[dict], fmt: Format, with_fragment: bool, template: str = "{question}"
) -> list[dict]:
    """The records of the data file, each question in the run's closed-book template (as it was
    trained on). Every record has the same extra fields, null where unknown: a column missing from
    the first record would be lost to readers that take the schema from it (pyarrow's
    from_pylist)."""
    extras = [k for k in EXTRA_FIELDS if any(p.get(k) is not None for p in pairs)]
    shape = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages}[fmt]
    return [
        shape(
            template.format(question=p["question"]),
            p["answer"],
            fragment_of(p) if with_fragment else None,
        )
        | {k: p.get(k) for k in extras}
        for p in pairs
    ]


def fragment_of(pair: dict) -> str:
    return pair.get("fragment") or ""


def alpaca(question: str, answer: str, fragment: Optional[str]) -> dict:
    # Closed book, as the loop trains: the fragment goes in only when asked for.
    return {"instruction": question, "input": fragment or "", "output": answer}


def sharegpt(question: str, answer: str, fragment: Optional[str]) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns} | ({"system": fragment} if fragment is not None else {})


def messages(question: str, answer: str, fragment: Optional[str]) -> dict:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    system = [{"role": "system", "content": fragment}] if fragment is not None else []
    return {"messages": system + turns}


# --- LLaMA-Factory's dataset_info.json (its data/README.md) ---------------------------------------


def dataset_entry(file_name: str, fmt: Format, with_fragment: bool) -> dict:
    if fmt == "alpaca":
        columns = {"prompt": "instruction", "query": "input", "response": "output"}
        return {"file_name": file_name, "columns": columns}
    if fmt == "sharegpt":
        columns = {"messages": "conversations"} | ({"system": "system"} if with_fragment else {})
        tags = {
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
        }
    else:  # OpenAI's messages: sharegpt formatting with its own tags; a system message leads
        columns = {"messages": "messages"}
        tags = {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        }
    return {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": tags}


def merged_info(path: Path, name: str, entry: dict) -> dict:
    """The dataset_info.json at `path` (if any) with `name`'s entry set: other datasets registered
    there are kept."""
    info = read_json(path) if path.is_file() else {}
    if not isinstance(info, dict):
        raise DataError(f"{path}: not a JSON object of datasets; move it away or fix it")
    return {**info, name: entry}
