#!/usr/bin/env bash
# On the GPU machine (no network): install the packages carried in .carry/wheels-*/ and gather
# model chunks into /tmp/stage. Run from the repository root in each device call; it is idempotent.
# Stage the model first with ../shared/device/stage (see docs/benchmarks.md, "How the GPU runs were made").
set -euo pipefail
shopt -s nullglob
mkdir -p /tmp/stage /tmp/wheels
for f in .carry/*/*; do
  case "$f" in
    .carry/wheels-*) cp "$f" /tmp/wheels/ ;;
    *) mv "$f" /tmp/stage/ ;;
  esac
done
wheels=(/tmp/wheels/*.whl)
sdists=(/tmp/wheels/*.tar.gz)
if ((${#wheels[@]})); then python -m pip install -q --no-index --no-deps "${wheels[@]}"; fi
if ((${#sdists[@]})); then python -m pip install -q --no-index --no-deps --no-build-isolation "${sdists[@]}"; fi
# Join a staged file once its last chunk and its checksum have arrived.
for sum in /tmp/stage/*.sha256; do
  name=$(basename "$sum" .sha256)
  parts=(/tmp/stage/"$name".part*)
  if ((${#parts[@]})); then
    cat "${parts[@]}" > /tmp/stage/"$name" && rm "${parts[@]}"
    sha256sum -c "$sum"
  fi
done
echo "device set-up done; staged: $(ls /tmp/stage | tr '\n' ' ')"
