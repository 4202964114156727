"""Print pip constraints that hold pyproject.toml's pure-Python dependencies at their floors.

    python .ci/floor_constraints.py [EXTRA ...]      (default: test; needs Python 3.11+ for tomllib)

Every requirement of [project] dependencies and of the named extras (and the extras those name,
such as test's selfevo[ingest]) with a `>=` floor becomes `name==floor`. Left to pip, at their
newest: the compiled packages (COMPILED: their oldest releases have no wheels for newer Pythons or
numpy 2, and torch stays the CPU wheel the Makefile installs), and the requirements without a
floor (`==` pins are exact already). .ci/floor-pins installs with this, then runs the fast tier.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib  # third-party to ruff, whose target is Python 3.10

COMPILED = {"torch", "numpy", "scipy", "matplotlib", "safetensors", "pyyaml"}
# name, [extras], specifiers, ;marker
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][\w.-]*)\s*(?:\[([^\]]*)\])?\s*([^;]*?)\s*(;.*)?$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floors(project: dict, extras: list[str]) -> dict[str, str]:
    own = normalize(project["name"])
    optional = project.get("optional-dependencies", {})
    todo, seen = [None, *extras], set()
    pins: dict[str, str] = {}
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for text in project["dependencies"] if extra is None else optional[extra]:
            match = REQUIREMENT.match(text)
            if not match:
                sys.exit(f"floor_constraints.py: cannot read the requirement {text!r}")
            name, names, spec, marker = match.groups()
            if normalize(name) == own:  # selfevo[ingest]: that extra's requirements too
                todo += [n.strip() for n in (names or "").split(",") if n.strip()]
                continue
            lows = [s.strip()[2:].strip() for s in spec.split(",") if s.strip().startswith(">=")]
            if lows and normalize(name) not in COMPILED:
                pins[normalize(name)] = f"{normalize(name)}=={lows[0]}{marker or ''}"
    return pins


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    for line in sorted(floors(project, sys.argv[1:] or ["test"]).values()):
        print(line)


if __name__ == "__main__":
    main()
