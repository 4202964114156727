#!/usr/bin/env bash
# install_torch.sh PYTHON SPEC [cpu]: installs torch into PYTHON's environment (the Makefile's and
# .ci/floor-pins' set-up). Without "cpu" it is `pip install SPEC` (a GPU user's own choice).
# With "cpu" (the Makefile's default spec), never PyPI's CUDA build onto a machine without an NVIDIA
# GPU by surprise: PyPI's torch for Linux x86-64 is that build, about 3 GB with its CUDA libraries.
#   1. PyTorch's CPU index (TORCH_CPU_INDEX; empty: skip it) when it answers within 5 s;
#   2. else pip's own indexes and find-links (CI's machines hold the CPU wheel in pip's find-links),
#      after a dry run: if that would bring the CUDA build and no NVIDIA GPU is here, it stops, with
#      one line that says how to get the CPU wheel.
set -euo pipefail
py=${1:?usage: install_torch.sh PYTHON SPEC [cpu]}
spec=${2:?usage: install_torch.sh PYTHON SPEC [cpu]}
mode=${3:-}
index=${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}

if [ "$mode" != cpu ]; then
    exec "$py" -m pip install -q "$spec"
fi

if [ -n "$index" ] && "$py" - "$index" 2>/dev/null <<'EOF'; then
import sys
import urllib.request

urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
EOF
    echo "torch: $spec from PyTorch's CPU index $index"
    exec "$py" -m pip install -q "$spec" --index-url "$index"
fi

report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$py" -m pip install -q --dry-run --report "$report" "$spec"
# The CUDA build is the one that needs NVIDIA's packages (nvidia-*, cuda-toolkit, cuda-bindings).
if "$py" - "$report" <<'EOF'; then
import json
import sys

items = json.load(open(sys.argv[1]))["install"]
names = [i["metadata"]["name"].lower() for i in items]
sys.exit(0 if any(n.startswith(("nvidia-", "nvidia_", "cuda-", "cuda_")) for n in names) else 1)
EOF
    if ! { [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1; }; then
        echo "error: $spec would be PyPI's CUDA build (about 3 GB) and this machine has no NVIDIA GPU; PyTorch's CPU index ($index) did not answer. Get the CPU wheel where it does (pip download --no-deps \"$spec\" --index-url https://download.pytorch.org/whl/cpu -d DIR), then run make again with PIP_FIND_LINKS=DIR; or take the CUDA build anyway: make TORCH=\"$spec\"" >&2
        exit 1
    fi
fi
exec "$py" -m pip install -q "$spec"
