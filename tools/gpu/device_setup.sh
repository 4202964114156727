#!/usr/bin/env bash
# On the GPU machine (no network): install the packages carried in .carry/wheels-*/ and gather
# model chunks into /tmp/stage. Run from the repository root in each device call; it is idempotent.
# Stage the model first with ../shared/device/stage (tools/gpu/README.md, docs/reproduce.md).
set -euo pipefail
shopt -s nullglob
mkdir -p /tmp/stage /tmp/shared
# The seed's data and reference scorer (carried as .shared) stay on the machine for later calls.
if [ -d .shared ]; then cp -r .shared/. /tmp/shared/; fi
for f in .carry/*/*; do
  case "$f" in
    .carry/wheels-*) ;;  # installed below, from where they were carried
    *) mv "$f" /tmp/stage/ ;;
  esac
done
# Only this call's wheels: those of earlier calls are installed already.
wheels=(.carry/wheels-*/*.whl)
sdists=(.carry/wheels-*/*.tar.gz)
if ((${#wheels[@]})); then python -m pip install -q --no-index --no-deps "${wheels[@]}"; fi
if ((${#sdists[@]})); then python -m pip install -q --no-index --no-deps --no-build-isolation "${sdists[@]}"; fi
# Join a staged file once its chunks all match its checksum; until then the chunks stay (they may
# arrive in any order).
for sum in /tmp/stage/*.sha256; do
  name=$(basename "$sum" .sha256)
  parts=(/tmp/stage/"$name".part*)
  if ((${#parts[@]})); then
    cat "${parts[@]}" > /tmp/stage/"$name"
    if (cd /tmp/stage && sha256sum --quiet -c "$name.sha256" 2>/dev/null); then
      rm "${parts[@]}"; echo "joined $name"
    else
      rm /tmp/stage/"$name"; echo "$name: ${#parts[@]} chunk(s) so far"
    fi
  fi
done
echo "device set-up done; staged: $(ls /tmp/stage | tr '\n' ' ')"
