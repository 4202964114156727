#!/usr/bin/env bash
# This machine's side of tools/gpu/reproduce_visit.sh (docs/reproduce.md). Run from the checkout
# whose working tree the device tool sends (its .carry/ and .shared/ are git-ignored there).
#
#   bash tools/gpu/reproduce_local.sh prepare           # .shared: the two AIOps files and the seed's IFD, for carrying
#   bash tools/gpu/reproduce_local.sh collect DIR...    # what a device call brought back (its files_at folder)
#   bash tools/gpu/reproduce_local.sh carry NAME...     # stage these runs for the next visit; prints the calls
#   bash tools/gpu/reproduce_local.sh list              # the runs collected so far, and how far each is
#
# Runs are kept in .carry/runs/ (STORE overrides): each collected pack is laid over it, so adapters
# brought back earlier stay. Pieces of a pack that came back over several calls wait in .carry/runs-incoming/.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
STORE=${STORE:-$top/.carry/runs}
INCOMING=${INCOMING:-$top/.carry/runs-incoming}
END=${END:-6}
PY=${PYTHON:-python3}
tools() { "$PY" tools/gpu/reproduce_runs.py "$@"; }
grep -qxF '/.carry/' .git/info/exclude 2>/dev/null || git check-ignore -q .carry/x || { echo "/.carry/ is not ignored here" >&2; exit 1; }

case "${1:-list}" in
  prepare)
    git check-ignore -q .shared/x || { echo "/.shared/ is not ignored here: add it to .git/info/exclude first" >&2; exit 1; }
    mkdir -p .shared/data .shared/bench
    cp "$top"/../shared/data/AIOps_data.json "$top"/../shared/data/AIOps_eval_data.json "$top"/../shared/data/LICENSE.seed-data .shared/data/
    # the seed's IFD, the speed baseline of benchmarks/stage_speed.py (tools/gpu/h100_visit.sh profile)
    cp "$top"/../shared/bench/seed_ifd_reference.py .shared/bench/
    du -sh .shared ;;
  collect)
    shift
    tools collect "$@" --incoming "$INCOMING" --dest "$STORE"
    bash "$0" list ;;
  carry)
    shift
    (($#)) || { echo "usage: reproduce_local.sh carry NAME..." >&2; exit 2; }
    tmp=$(mktemp -d)
    tools pack "$STORE" --out "$tmp" --names "$@" --adapters latest --piece-mib 0 --tag carry
    # 40 MiB chunks: the first rides with .carry/wheels-b (19 MiB) in one call of at most 64 MiB
    bash "$top"/../shared/device/stage "$tmp/runs-carry.tar.gz" runs-carry.tar.gz 40
    rm -rf "$tmp"
    echo "each call above also runs: bash tools/gpu/reproduce_visit.sh setup  (the last one unpacks the runs)" ;;
  list)
    for run in "$STORE"/*/; do
      [ -f "$run/config.json" ] || [ -f "$run/FORKED_FROM" ] || continue
      echo "$(basename "$run"): next generation $(tools next-start "$run") of $END; latest adapter here: gen_$(ls -d "$run"/gen_*/adapter 2>/dev/null | sed 's#.*/gen_\([0-9]*\)/adapter#\1#' | sort -n | tail -1)"
    done ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
