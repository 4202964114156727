"""Builds data/black_docs_fragments.json from the documentation that Black's source distribution
ships (PyPI: black==26.10.1, MIT licence, data/LICENSE.black-docs): its docs/ pages and CHANGES.md,
cut into fragments of about 120 words, each opening with the title path of its section.

    pip download --no-deps --no-binary :all: black==26.10.1 && tar -xzf black-26.10.1.tar.gz
    python tools/data/black_docs.py black-26.10.1 data/black_docs_fragments.json

The eval set (data/black_docs_eval.json) was written by hand against these fragments: each record's
`instruction` is the fragment that holds its answer.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

WORDS = 120  # about a paragraph or two: one fragment, a few facts
SKIP = {"authors.md", "change_log.md", "license.md", "index.md"}  # includes and link lists
MARKUP = re.compile(r"<!--.*?-->|```\{[^}]*\}.*?```|^\([\w/.-]+\)=\s*$", re.S | re.M)
LINK = re.compile(r"\[([^\]]+)\]\([^)]+\)")


def clean(text: str) -> str:
    text = MARKUP.sub("", text)
    text = LINK.sub(r"\1", text)  # keep a link's words, not its address
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def blocks(text: str) -> list[str]:
    """Paragraphs and fenced code blocks (a code block is never cut)."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        if not line.strip() and not fenced:
            if current:
                out.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def sections(text: str, title: str) -> list[tuple[str, str]]:
    """(title path, body) of each heading's section; a `#` line inside a code block is code."""
    path: dict[int, str] = {}
    out, body, fenced = [], [], False

    def close() -> None:
        if "\n".join(body).strip():
            out.append((" > ".join([title, *(path[k] for k in sorted(path))]), "\n".join(body)))

    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^(#{1,4})\s+(.*)", line)
        if heading:
            close()
            body = []
            level = len(heading.group(1))
            path = {k: v for k, v in path.items() if k < level} | {level: heading.group(2).strip()}
        else:
            body.append(line)
    close()
    return out


def fragments_of(text: str, title: str) -> list[str]:
    out = []
    for path, body in sections(clean(text), title):
        group: list[str] = []
        for block in blocks(body):
            if group and sum(len(b.split()) for b in group) + len(block.split()) > WORDS:
                out.append(path + "\n\n" + "\n\n".join(group))
                group = []
            group.append(block)
        if group and sum(len(b.split()) for b in group) >= 12:  # a stray line is not a fragment
            out.append(path + "\n\n" + "\n\n".join(group))
    return out


def main(source: str, out: str) -> None:
    root = Path(source)
    fragments = []
    for page in sorted((root / "docs").rglob("*.md")):
        if page.name in SKIP:
            continue
        title = "Black documentation: " + page.relative_to(root / "docs").with_suffix("").as_posix()
        fragments += fragments_of(page.read_text(encoding="utf-8"), title)
    fragments += fragments_of((root / "CHANGES.md").read_text(encoding="utf-8"), "Black change log")
    seen, unique = set(), []
    for f in fragments:
        if f not in seen:
            seen.add(f)
            unique.append({"instruction": f})
    Path(out).write_text(json.dumps(unique, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(unique)} fragments, {sum(len(f['instruction'].split()) for f in unique)} words")


if __name__ == "__main__":
    main(*sys.argv[1:])
