"""Documents to knowledge fragments: `selfevo ingest DOCS... --out fragments.jsonl`.

Each file (.txt, .md, .html, .pdf, .docx; a folder is walked) is read into blocks, headings and
paragraphs, by a library made for its format (the extra selfevo[ingest]); the blocks are grouped
into sections by heading, and each section's paragraphs are packed into fragments of at most
`max_tokens` tokens of the model's tokenizer, consecutive fragments of a section overlapping by up
to `overlap_tokens`. Duplicates are dropped, and the fragments are written at once, atomically, as
JSONL records {"text", "source", "position"} (and "page" for a PDF), which `data.load_fragments`
reads. A file that cannot be read is named, skipped and counted; the others are still written.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

from rich.markup import escape

from selfevo.data import DataError

log = logging.getLogger(__name__)

INSTALL = 'pip install "selfevo[ingest]"'
SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx")
HEADING_SEPARATOR = " > "
MIN_TOKENS = 16


class Tokenizer(Protocol):
    """What the chunker needs of a tokenizer: a Hugging Face tokenizer has it."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


class Unreadable(Exception):
    """A file that is skipped: the message is the reason, shown after its name."""


@dataclass(frozen=True)
class Block:
    """A heading (level 1-6) or a paragraph (level 0) of a document, as its reader found it."""

    text: str
    level: int = 0
    page: Optional[int] = None
    verbatim: bool = False  # code or preformatted text: its lines and indentation are kept


@dataclass(frozen=True)
class Piece:
    """A sentence (or a line of code, or a token-cut part of a long sentence) of a section."""

    text: str
    joiner: str  # what goes before it after another piece: "\n" where it starts a paragraph
    page: Optional[int] = None


@dataclass
class Section:
    path: tuple[str, ...]  # the headings above it, outermost first
    paragraphs: list[Block] = field(default_factory=list)


@dataclass
class IngestResult:
    """What `ingest` did: the counts its command prints."""

    out: Path
    files_read: int = 0
    files_skipped: dict[str, str] = field(default_factory=dict)  # file: why it was skipped
    unsupported: dict[str, int] = field(default_factory=dict)  # extension: files passed over
    fragments: int = 0
    duplicates: int = 0

    def skip(self, path: Any, reason: str) -> None:
        """A file left out: named on the terminal with why, and counted."""
        self.files_skipped[str(path)] = reason
        log.warning("%s: skipped: %s", escape(str(path)), escape(reason))


# --- reading --------------------------------------------------------------------------------------


def require(module: str) -> Any:
    """Import an optional library of the ingest extra, or say how to install it."""
    if importlib.util.find_spec(module) is None:
        raise Unreadable(f"needs the {module} library: {INSTALL}")
    return importlib.import_module(module)


def decode_text(path: Path) -> str:
    """A text file's content, strictly UTF-8 (a BOM is allowed), with "\\n" line breaks."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise Unreadable("holds NUL bytes: a binary file, not text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Unreadable(f"not UTF-8 (byte {e.start}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
_LIST_ITEM = re.compile(r"(?:[-*+•]|\d{1,3}[.)])\s")


def clean(text: str, verbatim: bool = False) -> str:
    """Text without control characters (load_fragments refuses them; PDFs are full of them) nor
    empty lines; outside code, each line's whitespace collapsed and hard-wrapped lines joined."""
    text = _CONTROL.sub(" ", text.replace("\t", "    " if verbatim else " "))
    if verbatim:
        lines = [line.rstrip() for line in text.split("\n")]
        while lines and not lines[0].strip():
            lines.pop(0)
        return "\n".join(lines).rstrip()
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return reflow([line for line in lines if line])


def reflow(lines: list[str]) -> str:
    """Lines of a paragraph joined into one, where they were only wrapped: the loop cuts fragments
    into sentences at line breaks (prompts.fact_sentences), so a wrapped line would cut a sentence.
    A list item keeps its line."""
    out = ""
    for line in lines:
        if not out:
            out = line
        elif _LIST_ITEM.match(line):
            out += "\n" + line
        else:
            out += " " + line
    return out


_ATX_HEADING = re.compile(r"^(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")


def read_plain_text(path: Path) -> list[Block]:
    """A .txt file: paragraphs split at blank lines; a line such as "## Setup", which plain-text
    notes often use, is a heading."""
    blocks: list[Block] = []
    lines: list[str] = []

    def end_paragraph() -> None:
        if lines:
            blocks.append(Block("\n".join(lines)))
            lines.clear()

    for line in decode_text(path).split("\n"):
        heading = _ATX_HEADING.match(line)
        if heading and heading[2].strip():
            end_paragraph()
            blocks.append(Block(heading[2], level=len(heading[1])))
        elif not line.strip():
            end_paragraph()
        else:
            lines.append(line)
    end_paragraph()
    return blocks


def inline_text(token: Any) -> str:
    """The plain text of a markdown-it inline token: emphasis and link syntax dropped, an image by
    its alt text, a soft line break a space."""
    parts = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "image":
            parts.append(inline_text(child))
    return "".join(parts)


_FRONT_MATTER = re.compile(r"\A---\n.*?\n(?:---|\.\.\.)\n", re.DOTALL)


def read_markdown(path: Path) -> list[Block]:
    """A Markdown file, parsed by markdown-it-py (CommonMark and tables): headings, paragraphs and
    list items ("- item", "2. item"), code blocks verbatim, a table's rows one paragraph each
    ("cell | cell"); YAML front matter (static site generators') left out."""
    markdown_it = require("markdown_it")
    text = _FRONT_MATTER.sub("", decode_text(path), count=1)
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    blocks: list[Block] = []
    row: Optional[list[str]] = None
    marker = ""  # a list item's, for its first paragraph
    for i, token in enumerate(tokens):
        if token.type == "inline":
            opener = tokens[i - 1]
            if opener.type == "heading_open":
                blocks.append(Block(inline_text(token), level=int(opener.tag[1])))
            elif row is not None:
                row.append(" ".join(inline_text(token).split()))
            else:
                blocks.append(Block(marker + inline_text(token)))
                marker = ""
        elif token.type == "list_item_open":
            marker = f"{token.info}. " if token.info else "- "
        elif token.type in ("fence", "code_block"):
            blocks.append(Block(token.content, verbatim=True))
        elif token.type == "tr_open":
            row = []
        elif token.type == "tr_close" and row is not None:
            blocks.append(Block(" | ".join(cell for cell in row if cell)))
            row = None
    return blocks


HTML_DROPPED = ("script", "style", "nav", "noscript", "template", "head")
HTML_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
HTML_BLOCKS = (*HTML_HEADINGS, "p", "li", "pre", "tr", "td", "th", "dt", "dd", "blockquote")
HTML_BLOCKS += ("caption", "figcaption")


def read_html(path: Path) -> list[Block]:
    """An HTML file, parsed by Beautiful Soup: the text of its headings, paragraphs, list items,
    preformatted blocks and table rows, in document order; scripts, styles and navigation
    dropped. A page with none of those (text in bare <div>s) gives its text line by line."""
    bs4 = require("bs4")
    # From bytes: Beautiful Soup finds the encoding from the page's <meta charset> or by guessing.
    soup = bs4.BeautifulSoup(path.read_bytes(), "html.parser")
    for element in soup.find_all(HTML_DROPPED):
        element.decompose()
    blocks = []
    for element in soup.find_all(HTML_BLOCKS):
        # The outermost block alone: a list item's <p>, a row's cells, are in its text already.
        if element.find_parent(HTML_BLOCKS) is not None:
            continue
        if element.name == "pre":
            blocks.append(Block(element.get_text(), verbatim=True))
        elif element.name == "tr":
            cells = [" ".join(c.get_text(" ").split()) for c in element.find_all(("td", "th"))]
            blocks.append(Block(" | ".join(cell for cell in cells if cell)))
        else:
            level = int(element.name[1]) if element.name in HTML_HEADINGS else 0
            marker = "- " if element.name == "li" else ""
            blocks.append(Block(marker + " ".join(element.get_text(" ").split()), level=level))
    if not blocks:
        blocks = [Block(line) for line in soup.get_text("\n").split("\n")]
    return blocks


_LINE_END_HYPHEN = re.compile(r"(?<=[^\W\d_])-\n(?=[a-z])")


def read_pdf(path: Path) -> list[Block]:
    """A PDF's text, page by page, extracted by pypdf; paragraphs split at blank lines. A PDF has
    no headings that pypdf can tell from its text: its sections are its pages' text."""
    pypdf = require("pypdf")
    # pypdf logs each repair it makes to a damaged file, through the root logger's stderr handler;
    # what counts here is whether the text came out.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):  # many open with an empty password
            raise Unreadable("encrypted: it needs a password")
        pages = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except Exception as e:  # pypdf raises many kinds on damaged files, not only PdfReadError
        raise Unreadable(f"not a readable PDF ({type(e).__name__}: {e})") from None
    blocks = []
    for number, text in enumerate(pages, 1):
        # A word hyphenated at a line's end is whole again: typesetting cut it, not its author.
        text = _LINE_END_HYPHEN.sub("", text.replace("\r\n", "\n"))
        blocks += [Block(paragraph, page=number) for paragraph in re.split(r"\n\s*\n", text)]
    return blocks


_DOCX_HEADING = re.compile(r"^(?:heading|Heading)\s*([1-6])$")


def read_docx(path: Path) -> list[Block]:
    """A Word file, read by python-docx: paragraphs, in order with tables (a row one paragraph);
    a paragraph of a Heading N style (or Title) is a heading."""
    docx = require("docx")
    from docx.table import Table

    try:
        document = docx.Document(str(path))
        blocks = []
        for item in document.iter_inner_content():
            if isinstance(item, Table):
                blocks.extend(Block(row) for row in docx_rows(item))
                continue
            style = item.style.name if item.style is not None else ""
            heading = _DOCX_HEADING.match(style or "")
            level = int(heading[1]) if heading else 1 if style == "Title" else 0
            blocks.append(Block(item.text, level=level))
    except Exception as e:  # a damaged zip or XML fails deep inside python-docx and lxml
        raise Unreadable(f"not a readable .docx ({type(e).__name__}: {e})") from None
    return blocks


def docx_rows(table: Any) -> Iterator[str]:
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:
            text = " ".join(cell.text.split())
            if text and (not cells or cells[-1] != text):  # a merged cell repeats in each column
                cells.append(text)
        yield " | ".join(cells)


READERS: dict[str, Callable[[Path], list[Block]]] = {
    ".txt": read_plain_text,
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".html": read_html,
    ".htm": read_html,
    ".pdf": read_pdf,
    ".docx": read_docx,
}


def read_blocks(path: Path) -> list[Block]:
    """A file's blocks, cleaned, without those that hold no letter or digit (rules, blank
    cells)."""
    try:
        blocks = READERS[path.suffix.lower()](path)
    except OSError as e:
        raise Unreadable(e.strerror or str(e)) from None
    except RecursionError:  # deeply nested HTML or Markdown
        raise Unreadable("nested too deeply") from None
    except (Unreadable, MemoryError):
        raise
    except Exception as e:  # a parser's failure on one odd file is that file's, not the run's
        raise Unreadable(f"could not be parsed ({type(e).__name__}: {e})") from None
    blocks = [Block(clean(b.text, b.verbatim), b.level, b.page, b.verbatim) for b in blocks]
    return [b for b in blocks if any(c.isalnum() for c in b.text)]


# --- finding the files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    path: Path  # to read
    source: str  # as written in the records


def walk(folder: Path, on_error: Callable[[OSError], None]) -> list[Path]:
    """Every file under `folder`, sorted by path (docs/a/z.md before docs/b.md) so that runs agree.

    Hidden files and folders (.git, .DS_Store), links to folders, and what is not a regular file
    (a named pipe would block the read) are passed over; a folder that cannot be listed goes to
    `on_error`."""
    found = []
    for root, dirs, files in os.walk(folder, onerror=on_error):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(folder).parts)


def find_documents(paths: list[Path], result: IngestResult) -> list[Document]:
    """The files to read, in argument order, each once.

    Its source is its path relative to its argument's parent (a file argument: its name; a folder
    argument docs/: docs/sub/file.md, "." too by its own name), with "/": the same on every
    machine and from every working directory, so that the output's bytes are too. Two files that
    would get the same source keep their paths as given instead."""
    found: list[Document] = []
    seen: set[Path] = set()

    for arg in paths:
        if arg.is_dir():
            listing = walk(arg, lambda e: result.skip(e.filename, e.strerror or str(e)))
            files = [(p, Path(arg.resolve().name) / p.relative_to(arg)) for p in listing]
        elif arg.is_file():
            files = [(arg, Path(arg.name))]
        else:
            result.skip(arg, "not a file" if arg.exists() else "no such file or folder")
            continue
        for path, relative in files:
            if path.suffix.lower() not in READERS:
                if arg.is_dir():  # counted only: a folder of images would fill the terminal
                    suffix = path.suffix.lower() or "(none)"
                    result.unsupported[suffix] = result.unsupported.get(suffix, 0) + 1
                else:
                    result.skip(
                        path, f"unsupported type; selfevo ingest reads {', '.join(SUFFIXES)}"
                    )
                continue
            key = path.resolve()
            if key not in seen:  # a file named again, or inside a folder also named
                seen.add(key)
                found.append(Document(path, source_name(relative)))
    uses = Counter(d.source for d in found)
    return [d if uses[d.source] == 1 else Document(d.path, source_name(d.path)) for d in found]


def source_name(path: Path) -> str:
    """A path as a record's source: with "/", and "?" for what a file name may hold and JSON text
    may not (control characters; undecodable bytes, which Python keeps as lone surrogates)."""
    return _CONTROL.sub("?", path.as_posix())


# --- chunking -------------------------------------------------------------------------------------


def sections(blocks: list[Block]) -> list[Section]:
    """The blocks grouped by heading, each section with the path of headings above it; text before
    the first heading is a section of its own with an empty path."""
    out = [Section(())]
    stack: list[tuple[int, str]] = []
    for block in blocks:
        if block.level:
            while stack and stack[-1][0] >= block.level:
                stack.pop()
            stack.append((block.level, " ".join(block.text.split())))
            out.append(Section(tuple(text for _, text in stack)))
        else:
            out[-1].paragraphs.append(block)
    return [s for s in out if s.paragraphs]


# A sentence ends at . ! ? before a space and a capital or digit (not "e.g. the"), after a
# Chinese or Japanese full stop, or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[。！？；])\s*|\s*\n\s*")


def split_sentences(paragraph: Block) -> list[Piece]:
    """A paragraph's sentences (code: its lines), each with what joined it to the one before."""
    if paragraph.verbatim:
        return [
            Piece(line, "\n", paragraph.page) for line in paragraph.text.split("\n") if line.strip()
        ]
    pieces: list[Piece] = []
    start, joiner = 0, "\n"
    for match in _SENTENCE_END.finditer(paragraph.text):
        if match.start() > start:
            pieces.append(Piece(paragraph.text[start : match.start()], joiner, paragraph.page))
            separator = match.group()
            joiner = "\n" if "\n" in separator else " " if separator else ""
        start = match.end()
    if start < len(paragraph.text):
        pieces.append(Piece(paragraph.text[start:], joiner, paragraph.page))
    return pieces


def render(prefix: str, pieces: list[Piece]) -> str:
    return prefix + "".join(p.text if i == 0 else p.joiner + p.text for i, p in enumerate(pieces))


def check_lengths(max_tokens: int, overlap_tokens: int) -> None:
    if max_tokens < MIN_TOKENS:  # room for a heading and a few words
        raise DataError(f"max_tokens: must be >= {MIN_TOKENS}, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise DataError(
            f"overlap_tokens: must be in [0, max_tokens) = [0, {max_tokens}), got {overlap_tokens}"
        )


class Chunker:
    """Packs a section's paragraphs into fragments of at most `max_tokens` tokens, heading included,
    each overlapping the one before by at most `overlap_tokens`.

    What decides is the count of a fragment's whole text, never a sum of its parts' counts: a
    tokenizer may merge across a join, and every fragment must fit."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap_tokens: int):
        check_lengths(max_tokens, overlap_tokens)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prefix(self, path: tuple[str, ...]) -> str:
        """The heading path that starts each fragment of a section: "Install > Linux: ".

        The loop sees one fragment at a time, and asks about it sentence by sentence
        (prompts.fact_sentences): on the first sentence's line, the headings tell what the text
        is about, as the page did. Outer headings are dropped while the path would take more
        than half a fragment; a lone heading that long is dropped too."""
        for start in range(len(path)):
            text = HEADING_SEPARATOR.join(path[start:]) + ": "
            if self.count(text) <= self.max_tokens // 2:
                return text
        return ""

    def fragments(self, section: Section) -> list[tuple[str, Optional[int]]]:
        """A section's fragments, each with the page it starts on (None: a file without pages).

        Packing by the sum of the pieces' lengths, measuring a candidate whole only near the limit,
        is several times faster; but a tokenizer may merge across a join, so every fragment is
        measured at the end, and a section with one too long is packed again measuring each
        candidate whole."""
        prefix = self.prefix(section.path)
        packed = self.pack(section, prefix, exact=False)
        if any(self.count(render(prefix, pieces)) > self.max_tokens for pieces in packed):
            packed = self.pack(section, prefix, exact=True)
        return [(render(prefix, pieces), pieces[0].page) for pieces in packed]

    def pack(self, section: Section, prefix: str, exact: bool) -> list[list[Piece]]:
        """A section's fragments, each as its pieces."""
        sizes: dict[str, int] = {}
        slack = max(4, self.max_tokens // 16)

        def size(text: str) -> int:
            if text not in sizes:
                sizes[text] = self.count(text)
            return sizes[text]

        def fits(pieces: list[Piece]) -> bool:
            if not exact:
                estimate = size(prefix) + sum(size(p.text) + (p.joiner == "\n") for p in pieces)
                if estimate < self.max_tokens - slack:
                    return True
                if estimate > self.max_tokens + slack:
                    return False
            return self.count(render(prefix, pieces)) <= self.max_tokens

        # A paragraph that fits in a fragment is kept whole; a longer one goes sentence by sentence
        # (and a sentence too long for a fragment, cut between tokens).
        groups: list[list[Piece]] = []
        for paragraph in section.paragraphs:
            sentences = split_sentences(paragraph)
            if fits(sentences):
                groups.append(sentences)
            else:
                groups.extend([piece] for s in sentences for piece in self.cut_to_fit(s, fits))
        out: list[list[Piece]] = []
        current: list[Piece] = []
        for group in groups:
            if fits(current + group):
                current += group
                continue
            if current:
                out.append(current)
            overlap = self.overlap(current)
            while overlap and not fits(overlap + group):
                overlap = overlap[1:]
            current = overlap + group
        if current:
            out.append(current)
        return out

    def overlap(self, pieces: list[Piece]) -> list[Piece]:
        """The end of a fragment that starts the next one: its last whole sentences within
        overlap_tokens; where even the last sentence is longer, its last overlap_tokens tokens,
        from a word's start."""
        if not self.overlap_tokens or not pieces:
            return []
        taken = 0
        while taken < len(pieces) and (
            self.count(render("", pieces[-taken - 1 :])) <= self.overlap_tokens
        ):
            taken += 1
        if taken:
            return pieces[-taken:]
        last = pieces[-1]
        tail = self.tail(last.text, self.overlap_tokens)
        return [Piece(tail, last.joiner, last.page)] if tail else []

    def cut_to_fit(self, piece: Piece, fits: Callable[[list[Piece]], bool]) -> list[Piece]:
        """A piece cut into parts that each fit a fragment, at a space where there is one."""
        parts: list[Piece] = []
        text, joiner = piece.text, piece.joiner
        while text:
            end = self.longest_prefix(text, lambda t: fits([Piece(t, joiner)]))
            if end == len(text):
                parts.append(Piece(text, joiner, piece.page))
                break
            space = text.rfind(" ", 0, end)
            cut = space if space > end // 2 else end
            parts.append(Piece(text[:cut], joiner, piece.page))
            joiner = " " if text[cut : cut + 1] == " " else ""
            text = text[cut:].lstrip(" ")
        return parts

    def last_tokens_start(self, text: str, tokens: int) -> int:
        """Where the last `tokens` tokens of `text` start: by the offsets of a fast tokenizer's
        tokens, checked, else by bisection."""
        try:
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            start = encoding["offset_mapping"][-tokens][0]
            if self.count(text[start:]) <= tokens:
                return start
        except Exception:  # a slow tokenizer has no offsets, a bare one no __call__
            pass
        return len(text) - self.longest_prefix(text[::-1], lambda t: self.count(t[::-1]) <= tokens)

    def longest_prefix(self, text: str, fits: Callable[[str], bool]) -> int:
        """The length of the longest start of `text` that fits (at least 1 character, so that a
        cut always moves on), by bisection over a window that grows from a fragment's worth."""
        low, high = 1, min(len(text), 16 * (self.max_tokens + 1))
        while high < len(text) and fits(text[:high]):
            low, high = high, min(len(text), 2 * high)
        while low < high:  # fits(text[:low]) holds, or low is 1
            middle = (low + high + 1) // 2
            if fits(text[:middle]):
                low = middle
            else:
                high = middle - 1
        return low

    def tail(self, text: str, tokens: int) -> str:
        """The end of `text` of at most `tokens` tokens, from the start of a word where it can."""
        start = self.last_tokens_start(text, tokens)
        space = text.find(" ", start)
        if space != -1 and space + 1 < len(text) and start > 0 and text[start - 1] != " ":
            start = space + 1
        tail = text[start:].strip()
        return tail if tail and self.count(tail) <= tokens else ""


# --- writing --------------------------------------------------------------------------------------


def normalized(text: str) -> str:
    """What two fragments must share to be duplicates: their text, NFKC, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def fragment_records(
    document: Document, chunker: Chunker, seen: set[str], result: IngestResult
) -> list[dict]:
    """The records of one file's fragments, less those already `seen` (counted as duplicates).

    A fragment's position is its index among its file's fragments before duplicates were dropped:
    it depends on that file alone, not on which other files came before it."""
    blocks = read_blocks(document.path)
    if not blocks:
        scanned = document.path.suffix.lower() == ".pdf"
        raise Unreadable(
            "no text found" + (" (a scanned PDF? it needs OCR first)" if scanned else "")
        )
    records = []
    fragments = [f for section in sections(blocks) for f in chunker.fragments(section)]
    for position, (text, page) in enumerate(fragments):
        key = normalized(text)
        if key in seen:
            result.duplicates += 1
            continue
        seen.add(key)
        record: dict = {"text": text, "source": document.source, "position": position}
        if page is not None:
            record["page"] = page  # where the fragment starts, from 1
        records.append(record)
    return records


def default_tokenizer() -> Tokenizer:
    from selfevo.config import ModelConfig
    from selfevo.models import load_tokenizer

    return load_tokenizer(ModelConfig().name)


def check_arguments(out: Path, max_tokens: int, overlap_tokens: int) -> None:
    """Fail before any work (and before a tokenizer is loaded) on arguments that would fail
    later."""
    from selfevo.rundir import check_can_create

    check_lengths(max_tokens, overlap_tokens)
    if out.is_dir():
        raise DataError(f"{out}: is a folder; the output is the JSONL file to write")
    check_can_create(out.parent, "output")


def ingest(
    paths: list[Path],
    out: Path,
    max_tokens: int = 256,
    overlap_tokens: int = 32,
    tokenizer: Optional[Tokenizer] = None,
) -> IngestResult:
    """Read the documents at `paths` (files and folders) into fragments of at most `max_tokens`
    tokens and write them to `out` (JSONL), atomically.

    A file that cannot be read is logged, skipped and counted in the result. A DataError, with
    nothing written, if no fragment came out of any file. `tokenizer`: the one whose tokens are
    counted (default: the bundled model's, SmolLM2-135M-Instruct's)."""
    from selfevo.log import progress
    from selfevo.rundir import write_jsonl

    out = Path(out)
    check_arguments(out, max_tokens, overlap_tokens)
    result = IngestResult(out)
    documents = find_documents([Path(p) for p in paths], result)
    if result.unsupported:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(result.unsupported.items()))
        log.info(
            "passing over %d files of other types (%s)", sum(result.unsupported.values()), kinds
        )
    records: list[dict] = []
    if documents:  # else no tokenizer to load
        chunker = Chunker(
            tokenizer if tokenizer is not None else default_tokenizer(), max_tokens, overlap_tokens
        )
        seen: set[str] = set()
        with progress("reading documents", len(documents)) as advance:
            for document in documents:
                try:
                    records += fragment_records(document, chunker, seen, result)
                    result.files_read += 1
                except Unreadable as e:
                    result.skip(document.path, str(e))
                advance(1)
    if not records:
        raise DataError(
            f"{out}: not written: no fragment came out of the documents ({result.files_read} "
            f"files read, {len(result.files_skipped)} skipped, "
            f"{sum(result.unsupported.values())} of other types); selfevo ingest reads "
            f"{', '.join(SUFFIXES)}"
        )
    write_jsonl(out, records)
    result.fragments = len(records)
    return result
