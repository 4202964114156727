"""A run's folder: its config snapshot and identity, its lock, its files written atomically, and the
skip-if-done stages of its generations, each recorded with its files' checksums.

Every stage writes its result atomically into runs/NAME/gen_<i>/ (or base/) and records its files'
SHA-256 in that folder's stages.json; it is skipped when they are there and match, so an interrupted
run resumes at the first unfinished stage (training at its last checkpoint) and a damaged one is
refused with one line that says what to delete (docs/reliability.md).

On several ranks, global rank 0 alone holds the lock and reads and writes run files; what it read or
decided is handed to the other ranks inside `Stages.stage` (selfevo.ranks), so callers never do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils.tensorboard import SummaryWriter

from selfevo.config import EvolveConfig, identity
from selfevo.data import DataError
from selfevo.faults import kill_point
from selfevo.prompts import prompts_digest, prompts_for
from selfevo.ranks import Strategy, on_rank_zero

log = logging.getLogger(__name__)

FORMAT = 1
"""The run folder's format, in config.json: a folder of another format is refused, not guessed
at."""
LIBRARIES = (
    "selfevo",
    "torch",
    "transformers",
    "peft",
    "lightning",
    "torchmetrics",
    "nltk",
    "jieba",
    "rouge-chinese",
)
EVAL_FILES = ("predictions.jsonl", "metrics.json")
OPEN_BOOK_FILES = ("open_book/predictions.jsonl", "open_book/metrics.json")
ADAPTER_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors")


class RunError(RuntimeError):
    """A run directory that cannot be used as it is: the message says how to recover."""


# --- run files: written to a temporary file in the same folder and renamed, so that a reader never
# sees half a file, whenever the writer is killed.

_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_SUFFIX = ".tmp"


def check_can_create(folder: Path, what: str) -> None:
    """Fail before any work when `folder` cannot be created (or written, if it exists)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"{folder}: cannot create the {what} directory ({existing} is not a writable folder)"
        )


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make run files private
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            # a process killed now leaves half a file under its temporary name (the crash tests
            # kill here)
            f.flush()
            kill_point("write")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a full disk fails in write() or fsync(), which name no file
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove_temporary_files(folder: Path) -> int:
    """Delete what killed writers left behind (`.NAME.*.tmp` files and folders); returns how
    many."""
    leftovers = [p for p in folder.rglob(f".*{TEMP_SUFFIX}")]
    for p in leftovers:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return len(leftovers)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: damaged (not UTF-8 at byte {e.start})") from None
    if text and not text.endswith("\n"):
        raise DataError(f"{path}: truncated (no newline after the last record)")
    out = []
    # not splitlines(), which would also cut at U+2028 inside a record (data._JSONL_LINE_BREAK)
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            raise DataError(f"{path}: line {lineno}: damaged record") from None
    return out


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(Path(path), json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{path}: damaged JSON") from None


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# Keys added to the config after runs had begun, each with the value that does what those runs
# did: a snapshot without one is read as holding it.
ADDED_KEYS = {
    ("generation", "phrasings"): 1,
    ("generation", "question_model"): "current",
    ("train", "fresh_adapter"): False,
    ("train", "anchor_share"): None,
    ("data", "eval_share"): 0.1,
    ("model", "revision"): None,
    ("trainer", "gradient_clip_val"): 1.0,
    ("trainer", "callbacks"): [],
    ("prompts", "question"): None,
    ("prompts", "fact_question"): None,
    ("prompts", "answer"): None,
    ("prompts", "closed_book"): None,
    ("prompts", "example_terms"): None,
}


def with_added_keys(snapshot: dict) -> dict:
    """The snapshot's config with every key of ADDED_KEYS it lacks, at its old behaviour's
    value (a section added whole, such as prompts, with all of its keys)."""
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in snapshot.items()}
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(config.setdefault(section, {}), dict):
            config[section].setdefault(key, value)
    return config


def counted_keys(snapshot: dict, now: dict) -> dict:
    """A snapshot's identity without the keys that `identity` no longer counts (such as
    generation.backend): a run begun before a key was found not to change results goes on."""
    return {
        k: counted_keys(v, now[k]) if isinstance(v, dict) and isinstance(now[k], dict) else v
        for k, v in snapshot.items()
        if k in now
    }


def first_difference(a: dict, b: dict) -> str:
    """The first key where two run identities differ, as "key: old -> new", and for a plain old
    value the option that goes on with the run."""
    path: tuple[str, ...] = ()
    while isinstance(a, dict) and isinstance(b, dict):
        key = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        path += (key,)
        a, b = a.get(key), b.get(key)
    name = ".".join(path)
    hint = (
        f"; it was begun with {a}: add --{name} {shlex.quote(str(a))} to go on with it"
        if isinstance(a, (str, int, float)) and not (isinstance(a, str) and _long_text(a))
        else ""
    )
    return f"{name}: {a!r} -> {b!r}{hint}"


def _long_text(value: str) -> bool:
    """A value too long or many-lined to give back as a command-line option (a prompt)."""
    return len(value) > 60 or any(c.isspace() and c != " " for c in value)


def inside(run_dir: Path, folder: Path) -> Path:
    """`folder`, after checking that writing into it stays inside run_dir (no symbolic link leads
    out)."""
    if folder.is_symlink() or not folder.resolve().is_relative_to(run_dir.resolve()):
        raise RunError(f"{folder}: is a symbolic link; selfevo writes only inside {run_dir}")
    return folder


_digests: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read once per process while the file stays the same: run files are
    replaced by rename, never edited in place, so (inode, size, mtime) names one content."""
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()
    return _digests[key]


def _snapshot_problem(snapshot: Path, cfg: EvolveConfig, prompts: str) -> Optional[str]:
    """Why the run in this folder is not this config's run, or None."""
    try:
        old = read_json(snapshot)
    except DataError:
        old = {}
    if old.get("format") != FORMAT:
        return (
            f"{snapshot}: made by another version of selfevo (run folder format "
            f"{old.get('format', 'none')}, "
            f"this one reads {FORMAT}); pass --force to set the run aside and start over, or "
            "choose another --name"
        )
    if old.get("sha256") != config_digest(old.get("config")):
        return (
            f"{snapshot}: changed since the run began (its checksum does not match); put the "
            "original back, "
            "or pass --force to set this run aside and start over"
        )
    # The config first: a prompt set in it that changed is named as its key (prompts.answer: ...);
    # the digest catches what the config does not say, a built-in preset changed in the code.
    begun = counted_keys(with_added_keys(old["config"]), identity(cfg))
    if begun != identity(cfg):
        return (
            f"{snapshot.parent} holds a run of a different config "
            f"({first_difference(begun, identity(cfg))}); "
            "pass --force to set it aside and start over, or choose another --name"
        )
    if old.get("prompts") != prompts:
        return (
            f"{snapshot.parent} was begun with other question and answer prompts (this version of "
            "selfevo changed "
            f"them); pass --force to set it aside and start over, or finish it with that version"
        )
    return None


def prepare(cfg: EvolveConfig, force: bool) -> Path:
    """Create runs/NAME with a config snapshot, or check that an existing one holds this config's
    run."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    log_dir = Path(cfg.logs_dir) / cfg.name
    for folder, what in ((run_dir, "run"), (log_dir, "log")):
        check_can_create(folder, what)
        if folder.is_symlink():
            raise RunError(
                f"{folder}: is a symbolic link; selfevo writes a run only into a real folder of "
                "its own"
            )
    snapshot = run_dir / "config.json"
    prompts = prompts_digest(
        prompts_for(cfg.generation.language, cfg.prompts), cfg.generation.question_focus
    )
    problem = _snapshot_problem(snapshot, cfg, prompts) if snapshot.exists() else None
    if problem:
        if not force:
            raise RunError(problem)
        stamp = f"replaced-{datetime.now():%Y%m%d-%H%M%S}"
        for folder in (run_dir, log_dir):
            if folder.exists():
                shutil.move(folder, folder.with_name(f"{folder.name}.{stamp}"))
        log.warning("moved the old run and its logs aside (*.%s)", stamp)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(
            f"{e.filename}: cannot create the run or log directory ({e.strerror})"
        ) from None
    if not snapshot.exists():
        write_json(
            snapshot,
            {
                "format": FORMAT,
                "config": identity(cfg),
                "sha256": config_digest(identity(cfg)),
                "seed": cfg.seed,
                "prompts": prompts,
                "versions": library_versions(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )
    return run_dir


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold runs/NAME/.lock while working, so that two processes never write one run; the kernel
    releases it when the process dies, however it dies."""
    with open(run_dir / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{run_dir}: another selfevo process is working on this run; wait for it to end"
            ) from None
        swept = remove_temporary_files(run_dir)
        if swept:
            log.info("removed %d temporary file(s) left by an interrupted write", swept)
        yield


def verify(run_dir: Path) -> None:
    """Check every recorded stage of the run before any work, so that damage stops it at once."""
    for folder in [run_dir / "base", *sorted(run_dir.glob("gen_*"))]:
        if (folder / "stages.json").exists() or folder.is_symlink():
            stages = Stages(run_dir, folder.name)
            for stage, record in stages.log.items():
                stages.done(stage, tuple(record.get("files", {})))


def check_earlier_generations(run_dir: Path, start: int) -> None:
    """What generation `start` builds on must be there, intact: the previous generation's adapter
    and every earlier generation's scored pairs and evaluation (older adapters may be gone)."""
    for j in range(start):
        earlier = Stages(run_dir, f"gen_{j}")
        needed = (("train", ADAPTER_FILES),) if j == start - 1 else ()
        for stage, files in needed + (("score", ("qa.jsonl",)), ("evaluate", EVAL_FILES)):
            if not earlier.done(stage, files):
                raise RunError(
                    f"{earlier.folder} is unfinished ({stage}); resume from it with --start {j}"
                )


def _read(path: Path) -> Any:
    return read_jsonl(path) if path.suffix == ".jsonl" else read_json(path)


class Stages:
    """The skip-if-done stages of one folder of a run (base/ or gen_<i>/), kept in its stages.json:
    per stage, the files it wrote with their SHA-256, its seconds and its counts.

    A stage is done when its record lists its files and each is there with that checksum. A stage
    without a record (killed before it was recorded), or with none of its files left (deleted to
    redo it), runs again. A recorded stage with a file missing or changed is a damaged run: that is
    an error that says what to delete, never a result silently trusted.

    With a strategy of several ranks, rank 0 checks, reads and writes, and the others get its
    answers; without one (the checks before the work, on rank 0) it works alone.
    """

    def __init__(
        self,
        run_dir: Path,
        name: str,
        writer: SummaryWriter | None = None,
        step: int = 0,
        strategy: Strategy | None = None,
    ):
        self.folder = on_rank_zero(strategy, lambda: inside(run_dir, run_dir / name))
        self.writer = writer
        self.step = step
        self.strategy = strategy
        self.log_file = self.folder / "stages.json"
        self.log = on_rank_zero(strategy, self._read_log)

    def _read_log(self) -> dict:
        try:
            return read_json(self.log_file) if self.log_file.exists() else {}
        except DataError:
            raise RunError(
                f"{self.log_file}: damaged; delete it and run the same command to redo this "
                "folder's stages"
            ) from None

    def on_rank_zero(self, make: Callable[[], Any]) -> Any:
        return on_rank_zero(self.strategy, make)

    def done(self, stage: str, files: tuple[str, ...]) -> bool:
        return self.on_rank_zero(lambda: self._done_here(stage, files))

    def _done_here(self, stage: str, files: tuple[str, ...]) -> bool:
        recorded = self.log.get(stage, {}).get("files")
        if recorded is None or not any((self.folder / f).exists() for f in files):
            return False
        for f in files:
            path = self.folder / f
            problem = "missing" if not path.exists() else None
            if problem is None and (f not in recorded or file_digest(path) != recorded[f]):
                problem = "changed or damaged since it was written (checksum differs)"
            if problem:
                redo = " and ".join(sorted({str(self.folder / f.split("/")[0]) for f in files}))
                raise RunError(
                    f"{path}: {problem}; delete {redo} and run the same command to redo the "
                    f"{stage} stage"
                )
        return True

    def stage(
        self, name: str, files: tuple[str, ...], make: Callable[[], tuple[dict[str, Any], dict]]
    ) -> dict[str, Any]:
        """Run a stage once: {file: content} of its JSON and JSONL files, read back if an earlier
        attempt finished it, else made now.

        make() runs on every rank and returns (outputs, counts): the contents to write ({file:
        records or object}; a file it wrote itself, such as an adapter, is left out) and the counts
        to record. Rank 0 writes them atomically and records the stage; a crash before the record
        leaves the stage to run again.
        """
        if self.done(name, files):
            data = [f for f in files if f.endswith((".json", ".jsonl"))]
            return self.on_rank_zero(lambda: {f: _read(self.folder / f) for f in data})
        if self.log.pop(name, None) is not None:  # no stale checksums while the files are rewritten
            self.on_rank_zero(lambda: write_json(self.log_file, self.log))
        t = time.perf_counter()
        outputs, counts = make()

        def write() -> None:
            for f, content in outputs.items():
                (write_jsonl if f.endswith(".jsonl") else write_json)(self.folder / f, content)

        self.on_rank_zero(write)
        self._record(name, time.perf_counter() - t, files, counts)
        return outputs

    def _record(self, stage: str, seconds: float, files: tuple[str, ...], counts: dict) -> None:
        # The stage's cached GPU blocks go back to the device, for what shares it between stages:
        # the vLLM engine, or another run's process.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        digests = self.on_rank_zero(lambda: {f: file_digest(self.folder / f) for f in files})
        self.log[stage] = {"seconds": round(seconds, 2), **counts, "files": digests}
        self.on_rank_zero(lambda: write_json(self.log_file, self.log))
        if self.writer is not None:
            self.writer.add_scalar(f"seconds/{stage}", seconds, self.step)
            for key, value in counts.items():  # kept, and each drop by its reason
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"stages/{stage}/{key}", value, self.step)
        extra = ", ".join(f"{k} {v}" for k, v in counts.items())
        log.info("  %s: %.1fs%s", stage, seconds, f" ({extra})" if extra else "")
        kill_point("stage")

    def remove(self, name: str) -> None:
        """Delete a working folder inside this one (rank 0; gone already is fine)."""
        self.on_rank_zero(
            lambda: shutil.rmtree(
                inside(self.folder.parent, self.folder / name), ignore_errors=True
            )
        )
