"""Moving selfevo run folders between this machine and a GPU machine whose visits are short.

A run of the small-scale reproduction (docs/reproduce.md) spans several GPU visits. Between them its
folder travels: back through the device tool's $OUT (at most 8 files of 16 MiB, 64 MiB a call) and
out again as carried chunks. What travels is the run *slim*: every file except
  - the adapters older than the one `selfevo evolve --start N` needs (17.6 MB each for Qwen2.5-0.5B,
    r=8, fp32): it needs only gen_<N-1>'s adapter (and any trained since) and every earlier
    generation's qa.jsonl,
  - checkpoints/ (mid-training state, three times an adapter; a training cut off there starts
  again),
  - .lock and the temporary files of interrupted writes,
and the TensorBoard logs, which live outside the run folder. `--adapters all` keeps every adapter.

Subcommands (standard library only, so they run on the GPU machine as they are):
  pack RUNS_DIR --out DIR [--names N ...] [--adapters latest|resume|all|none] [--end E]
  [--piece-mib 15] [--tag T]
      one tar.gz of the slim runs, split into pieces of at most --piece-mib MiB (0: one file),
      with a manifest (pieces, sizes, SHA-256) beside them
  unpack ARCHIVE --dest RUNS_DIR
      lay each run of a (joined) archive over its folder in RUNS_DIR: the archive's files replace
      those there, files it lacks stay (runs not in it too)
  collect DIR ... --incoming DIR --dest RUNS_DIR
      gather pieces that came back over several calls (each call's files land in another folder);
      unpack every archive whose pieces are all there, then delete its pieces
  next-start RUN_DIR      the first generation without an evaluation (0 for a new run)
  stage-done FOLDER STAGE...
                          exit status 0 when a run folder (base/, gen_N/) has finished every STAGE
  fork SRC DST [--before-train]
                          start run DST from SRC's base model evaluation and generation 0 (which do
                          not depend on the replay settings), if SRC has them and DST does not
                          exist;
                          --before-train: only generation 0's questions and answers (a
                          learning-rate probe)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

GEN = re.compile(r"gen_(\d+)")
ADAPTER = "adapter"
MiB = 2**20


def generations(run_dir: Path) -> list[tuple[int, Path]]:
    return sorted(
        (int(m.group(1)), p)
        for p in run_dir.glob("gen_*")
        if (m := GEN.fullmatch(p.name)) and p.is_dir()
    )


def is_run(folder: Path) -> bool:
    """A selfevo run folder, or one that `fork` started and selfevo has not yet opened."""
    return (folder / "config.json").is_file() or (folder / "FORKED_FROM").is_file()


def stages_of(folder: Path) -> dict:
    try:
        return json.loads((folder / "stages.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def stage_done(folder: Path, stage: str) -> bool:
    """Recorded in stages.json with all its files there (the checksums are selfevo's to check)."""
    record = stages_of(folder).get(stage)
    return bool(record) and all((folder / f).is_file() for f in record.get("files", {}))


def next_start(run_dir: Path) -> int:
    """The first generation that is not evaluated: where `selfevo evolve --start` resumes the
    run."""
    n = 0
    for i, folder in generations(run_dir):
        if i != n or not stage_done(folder, "evaluate"):
            break
        n += 1
    return n


def resume_adapters(run_dir: Path) -> set[int]:
    """The generations whose adapters `selfevo evolve --start next_start` needs: the one before it,
    and any trained since (a generation cut off after training resumes from its own adapter)."""
    start = next_start(run_dir)
    return {
        i for i, folder in generations(run_dir) if i >= start - 1 and stage_done(folder, "train")
    }


def slim_files(run_dir: Path, adapters: str) -> list[Path]:
    """The files of one run that travel, relative to the run's parent, in a stable order."""
    keep = resume_adapters(run_dir) if adapters == "latest" else set()
    out = []
    for path in sorted(run_dir.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        rel = path.relative_to(run_dir)
        parts = rel.parts
        if (
            rel.name == ".lock"
            or rel.name.endswith(".tmp")
            or any(p.startswith(".") and p.endswith(".tmp") for p in parts)
        ):
            continue
        if "checkpoints" in parts:
            continue
        if len(parts) >= 3 and GEN.fullmatch(parts[0]) and parts[1] == ADAPTER:
            if adapters == "none" or (adapters == "latest" and int(parts[0][4:]) not in keep):
                continue
        out.append(path.relative_to(run_dir.parent))
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def pack(
    runs_dir: Path,
    out: Path,
    names: list[str] | None,
    adapters: str,
    piece_mib: float,
    tag: str,
    end: int | None = None,
) -> Path:
    """Write runs-TAG.tar.gz (split into .partNN pieces when piece_mib > 0) and
    runs-TAG.manifest.json into out. adapters "resume": the latest adapter of each run that is not
    finished (has fewer than `end` generations)."""
    if adapters == "resume" and end is None:
        raise SystemExit("reproduce_runs: --adapters resume needs --end")
    runs = (
        [runs_dir / n for n in names]
        if names
        else sorted(p for p in runs_dir.iterdir() if is_run(p))
    )
    for run in runs:
        if not is_run(run):
            raise SystemExit(
                f"reproduce_runs: {run}: not a selfevo run folder (no config.json, not forked)"
            )
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"runs-{tag}.tar.gz"
    members = {}
    first: dict[str, str] = {}  # SHA-256 -> the member that holds those bytes
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        for run in runs:
            which = (
                adapters
                if adapters != "resume"
                else ("latest" if next_start(run) < end else "none")
            )
            files = slim_files(run, which)
            members[run.name] = len(files)
            for rel in files:
                info = tar.gettarinfo(runs_dir / rel, arcname=str(rel))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                digest = sha256_file(runs_dir / rel)
                # the same bytes again (a forked run's gen_0): a link, not a copy
                if digest in first:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, first[digest], 0
                    tar.addfile(info)
                    continue
                first[digest] = str(rel)
                with open(runs_dir / rel, "rb") as f:
                    tar.addfile(info, f)
    manifest = {
        "archive": archive.name,
        "sha256": sha256_file(archive),
        "bytes": archive.stat().st_size,
        "runs": members,
        "adapters": adapters,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pieces": [],
    }
    if piece_mib > 0 and archive.stat().st_size > piece_mib * MiB:
        size = int(piece_mib * MiB)
        with open(archive, "rb") as f:
            for k, block in enumerate(iter(lambda: f.read(size), b"")):
                piece = out / f"{archive.name}.part{k:02d}"
                piece.write_bytes(block)
                manifest["pieces"].append(
                    {
                        "name": piece.name,
                        "bytes": len(block),
                        "sha256": hashlib.sha256(block).hexdigest(),
                    }
                )
        archive.unlink()
    else:
        manifest["pieces"].append(
            {"name": archive.name, "bytes": manifest["bytes"], "sha256": manifest["sha256"]}
        )
    path = out / f"runs-{tag}.manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    total = manifest["bytes"] / MiB
    print(
        f"packed {', '.join(f'{k} ({v} files)' for k, v in members.items())}: {total:.1f} MiB in "
        f"{len(manifest['pieces'])} piece(s) -> {path}"
    )
    return path


def _check_member(member: tarfile.TarInfo) -> None:
    for name in (member.name, member.linkname) if member.islnk() else (member.name,):
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts or not parts:
            raise SystemExit(
                f"reproduce_runs: refusing archive member {name!r} (only paths inside run folders)"
            )
    if not (member.isfile() or member.isdir() or member.islnk()):
        raise SystemExit(
            f"reproduce_runs: refusing archive member {member.name!r} (only plain files)"
        )


def unpack_archive(archive: Path, dest: Path) -> list[str]:
    """Lay each run of the archive over its folder in dest (a file of the archive replaces the one
    there; files the archive lacks, such as adapters left out of it, stay); returns the run
    names."""
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".incoming-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(m)
            for m in members:  # a link names an earlier member: it becomes a copy of that file
                if m.isfile() or m.islnk():
                    target = tmp / m.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if m.islnk():
                        shutil.copyfile(tmp / m.linkname, target)
                    else:
                        with tar.extractfile(m) as src, open(target, "wb") as dst:
                            shutil.copyfileobj(src, dst)
                    os.utime(target, (m.mtime, m.mtime))
        names = sorted(p.name for p in tmp.iterdir())
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                target = dest / path.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        return names
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def join_pieces(manifest_path: Path, folders: list[Path]) -> Path | None:
    """The archive a manifest names, joined from its pieces found in `folders` and checked; None if
    a piece is missing."""
    manifest = json.loads(manifest_path.read_text())
    found = []
    for piece in manifest["pieces"]:
        path = next((f / piece["name"] for f in folders if (f / piece["name"]).is_file()), None)
        if path is None:
            return None
        if path.stat().st_size != piece["bytes"] or sha256_file(path) != piece["sha256"]:
            raise SystemExit(
                f"reproduce_runs: {path}: damaged (size or SHA-256 differs from "
                f"{manifest_path.name})"
            )
        found.append(path)
    if len(found) == 1 and found[0].name == manifest["archive"]:
        return found[0]
    joined = manifest_path.parent / f".{manifest['archive']}.joining"
    with open(joined, "wb") as out:
        for path in found:
            with open(path, "rb") as f:
                shutil.copyfileobj(f, out)
    if sha256_file(joined) != manifest["sha256"]:
        joined.unlink()
        raise SystemExit(
            f"reproduce_runs: {manifest['archive']}: the joined pieces do not match its SHA-256"
        )
    return joined


def collect(sources: list[Path], incoming: Path, dest: Path) -> int:
    """Copy manifests and pieces from `sources` into `incoming`; unpack each complete archive,
    oldest first, once (incoming/.unpacked remembers which). Returns how many were unpacked."""
    incoming.mkdir(parents=True, exist_ok=True)
    done_file = incoming / ".unpacked"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}  # archive -> its runs
    for src in sources:
        for path in sorted(src.rglob("runs-*")):
            if path.is_file() and (path.name.endswith(".manifest.json") or ".tar.gz" in path.name):
                if not any(path.name.startswith(a.removesuffix(".tar.gz") + ".") for a in done):
                    shutil.copyfile(path, incoming / path.name)
    unpacked = 0
    # tags are times: oldest first
    for manifest_path in sorted(incoming.glob("runs-*.manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        newer = [
            a
            for a, runs in done.items()
            if a > manifest["archive"] and set(runs) & set(manifest["runs"])
        ]
        if newer:
            print(f"{manifest['archive']}: skipped, {newer[0]} (newer) already brought these runs")
        else:
            archive = join_pieces(manifest_path, [incoming])
            if archive is None:
                have = sum((incoming / p["name"]).is_file() for p in manifest["pieces"])
                print(
                    f"{manifest['archive']}: {have} of {len(manifest['pieces'])} pieces here; "
                    "waiting for the rest"
                )
                continue
            names = unpack_archive(archive, dest)
            print(f"{manifest['archive']}: unpacked {', '.join(names)} into {dest}")
            if archive.parent == incoming and archive.name.startswith("."):
                archive.unlink(missing_ok=True)
            unpacked += 1
        done[manifest["archive"]] = sorted(manifest["runs"])
        done_file.write_text(json.dumps(done, indent=1) + "\n")
        for p in manifest["pieces"]:
            (incoming / p["name"]).unlink(missing_ok=True)
        manifest_path.unlink()
    return unpacked


BEFORE_TRAIN = ("questions", "answers", "replay")


def fork(src: Path, dst: Path, before_train: bool = False) -> bool:
    """Copy SRC's base/ and gen_0/ into a new run DST: generation 0 replays nothing whatever the
    replay settings (its history is empty), so runs that differ only in those share it exactly. With
    before_train, only gen_0's questions, answers and (empty) replay: runs that differ in training
    settings (a learning-rate probe) share what generation 0 wrote before training."""
    if dst.exists():
        return False
    needed = ("answers", "replay") if before_train else ("train", "evaluate")
    if not (
        stage_done(src / "base", "evaluate") and all(stage_done(src / "gen_0", s) for s in needed)
    ):
        return False
    dst.mkdir(parents=True)
    shutil.copytree(src / "base", dst / "base", ignore=shutil.ignore_patterns("*.tmp"))
    if before_train:
        stages = {k: v for k, v in stages_of(src / "gen_0").items() if k in BEFORE_TRAIN}
        (dst / "gen_0").mkdir()
        for record in stages.values():
            for f in record.get("files", {}):
                shutil.copy2(src / "gen_0" / f, dst / "gen_0" / f)
        (dst / "gen_0" / "stages.json").write_text(
            json.dumps(stages, ensure_ascii=False, indent=1) + "\n"
        )
    else:
        shutil.copytree(
            src / "gen_0", dst / "gen_0", ignore=shutil.ignore_patterns("checkpoints", "*.tmp")
        )
    what = "generation 0 before training" if before_train else "generation 0"
    (dst / "FORKED_FROM").write_text(
        f"{src.name}: base/ and {what} copied from it ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
    )
    print(f"forked {dst.name} from {src.name} (base model evaluation and {what})")
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--names", nargs="*")
    p.add_argument("--adapters", choices=("latest", "resume", "all", "none"), default="latest")
    p.add_argument("--end", type=int, help="the runs' generation count, for --adapters resume")
    p.add_argument("--piece-mib", type=float, default=15)
    p.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    p = sub.add_parser("unpack")
    p.add_argument("archive", type=Path)
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("collect")
    p.add_argument("sources", type=Path, nargs="*")
    p.add_argument("--incoming", type=Path, required=True)
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("next-start")
    p.add_argument("run_dir", type=Path)
    p = sub.add_parser("stage-done")
    p.add_argument("folder", type=Path)
    p.add_argument("stages", nargs="+")
    p = sub.add_parser("fork")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument(
        "--before-train", action="store_true", help="only what generation 0 wrote before training"
    )
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        pack(a.runs_dir, a.out, a.names, a.adapters, a.piece_mib, a.tag, a.end)
    elif a.cmd == "unpack":
        print(f"unpacked {', '.join(unpack_archive(a.archive, a.dest))} into {a.dest}")
    elif a.cmd == "collect":
        collect(a.sources, a.incoming, a.dest)
    elif a.cmd == "next-start":
        print(next_start(a.run_dir))
    elif a.cmd == "stage-done":
        sys.exit(0 if all(stage_done(a.folder, s) for s in a.stages) else 1)
    elif a.cmd == "fork":
        fork(a.src, a.dst, a.before_train)


if __name__ == "__main__":
    main(sys.argv[1:])
