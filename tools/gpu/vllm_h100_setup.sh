#!/usr/bin/env bash
# vllm_h100_setup.sh WHEELS [MODEL]
#
# On the GPU machine (no network; Python 3.12, torch 2.11 CUDA 13, transformers 5.17, numpy 2.5.2):
# install vLLM 0.26.0 from WHEELS, a folder of the wheels of tools/gpu/vllm_h100_wheels.txt, with
# `pip install --no-index --no-deps`, each wheel only if its package is not installed already (what
# the machine has stays as it is: torch, transformers, numpy...). Then check that vLLM imports, and,
# given MODEL (anything model.name takes: a Hugging Face folder or a .gguf), that selfevo's vLLM
# engine loads it with LoRA enabled and generates, with no adapter and with a fresh one.
#
# vllm 0.26.0 pins torch==2.11.0 and numba==0.65.0 (which wants numpy < 2.5); --no-deps skips both
# pins, and numba is left out: vLLM imports it only for n-gram speculative decoding.
#
# Download and staging (on the development machine, from the repository root; 28 wheels, 309 MiB,
# six chunks):
#   P=$(for v in $(seq 5 35); do printf -- '--platform manylinux_2_%s_x86_64 ' $v; done)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 $P \
#       -r tools/gpu/vllm_h100_wheels.txt -d .carry/vllm-wheels
#   tar -cf .carry/vllm-wheels.tar -C .carry vllm-wheels
#   ../shared/device/stage .carry/vllm-wheels.tar
# then, in the last call: tar -xf /tmp/stage/vllm-wheels.tar -C /tmp/stage &&
#   bash tools/gpu/vllm_h100_setup.sh /tmp/stage/vllm-wheels [MODEL]
set -euo pipefail
# No FlashInfer in this set: vLLM 0.26's new model runner imports it for sampling (docs/vllm.md).
export VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER:-0} VLLM_USE_FLASHINFER_SAMPLER=${VLLM_USE_FLASHINFER_SAMPLER:-0}
wheels=${1:?usage: vllm_h100_setup.sh WHEELS [MODEL]}
model=${2:-}
py=${PYTHON:-python}

# The wheels whose packages the machine lacks (names compared as PEP 503 normalises them), installed
# in one pip call that does not byte-compile: the set-up is on the clock of a short GPU visit, and a
# call per wheel, each compiling its files, took minutes (docs/results.md).
listed=$($py - "$wheels" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
if not wheels:
    sys.exit(f"{sys.argv[1]}: no wheels")
installed = {norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]}
for whl in wheels:
    print("kept" if norm(whl.name.split("-")[0]) in installed else "added", whl)
EOF
)
add=()
while read -r what whl; do
  echo "$what $(basename "$whl")"
  if [ "$what" = added ]; then add+=("$whl"); fi
done <<< "$listed"
if ((${#add[@]})); then $py -m pip install -q --no-index --no-deps --no-compile "${add[@]}"; fi

$py - <<'EOF'
import torch, triton, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
from vllm import LLM, SamplingParams  # the offline engine
from vllm.lora.request import LoRARequest
EOF

[ -z "$model" ] && exit 0
# selfevo's own engine, run from the repository root (no install needed: it imports only what the
# machine has, plus vLLM).
PYTHONPATH=. $py - "$model" <<'EOF'
import sys, tempfile, time
from pathlib import Path

from selfevo.config import GenerationConfig, LoraConfig, ModelConfig
from selfevo.generate import Sampling
from selfevo.models import add_lora, load_model, resolve_model, save_adapter
from selfevo.prompts import question_prompt
from selfevo.vllm_engine import VLLMEngine

model_cfg = ModelConfig(name=sys.argv[1])
base, tokenizer = load_model(model_cfg)
adapter = Path(tempfile.mkdtemp()) / "adapter"
save_adapter(add_lora(base, LoraConfig(), seed=0), adapter)  # fresh: B = 0, so it must not change the text
del base
t = time.perf_counter()
engine = VLLMEngine(resolve_model(model_cfg.name), model_cfg, GenerationConfig(), LoraConfig().r, seed=0)
print(f"engine up in {time.perf_counter() - t:.1f} s")
prompts = [question_prompt(tokenizer, f"Fragment {i}: the service listens on port {7000 + i}.", "en") for i in range(256)]
greedy = Sampling(max_new_tokens=64)
outputs = {}
for label, path in (("no adapter", None), ("fresh adapter", adapter)):
    engine.use_adapter(path)
    t = time.perf_counter()
    outputs[label] = engine.generate(tokenizer, prompts, greedy, max_length=1024, seed=0)
    print(f"{label}: {len(prompts)} prompts in {time.perf_counter() - t:.1f} s; first: {outputs[label][0]!r}")
same = sum(a == b for a, b in zip(*outputs.values()))
print(f"greedy texts equal with and without the fresh adapter: {same} of {len(prompts)}")
engine.close()
EOF
