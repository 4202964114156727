"""selfevo's one logger: Python's `logging` under the name "selfevo", shown on the terminal by rich
(stderr, so that stdout stays for what a command outputs) and kept in the run folder's run.log.

Modules log through `logging.getLogger(__name__)`; tables and progress bars go to `console`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress

console = Console(stderr=True)
logger = logging.getLogger("selfevo")


def setup_logging(quiet: bool = False) -> None:
    """The terminal's handler (once per process); quiet: warnings only (the ranks other than 0)."""
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=console, show_time=False, show_path=False, markup=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    console.quiet = quiet


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Also write the log to `path` (appended: a resumed run adds to it) while the block runs."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextmanager
def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on the console; yields the function that advances it."""
    with Progress(transient=True, console=console) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
