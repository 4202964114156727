#!/usr/bin/env bash
# The open-book ceiling of the AIOps reproduction on the GPU machine (docs/results.md): the base model
# (Qwen2.5-Coder-0.5B-Instruct) answers the 100 AIOps eval questions closed book and open book, greedy,
# at the reproduction runs' cap (512 new tokens, max_length 1024), on the vLLM backend the runs were
# evaluated with, and open book on the Hugging Face backend too (both backends of --open-book).
#
#   bash tools/gpu/open_book_visit.sh     # after the staging calls of docs/reproduce.md (Qwen, wheels, vLLM)
#
# Writes $OUT/open_book.tar.gz: closed_vllm/, open_vllm/, open_hf/ (predictions.jsonl, metrics.json each),
# and prints each evaluation's metrics and seconds.
set -uo pipefail
bash tools/gpu/reproduce_visit.sh setup || exit 1
export PYTHONPATH=$PWD SELFEVO_CACHE=${SELFEVO_CACHE:-/tmp/cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-/tmp/stage/qwen.gguf}
EVAL=${EVAL:-.shared/data/AIOps_eval_data.json}
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for way in "closed vllm" "open vllm" "open hf"; do
  set -- $way
  book=$([ "$1" = open ] && echo --open-book)
  start=$(date +%s)
  python -m selfevo.cli evaluate "$EVAL" --out "$work/$1_$2" --model.name "$MODEL" \
    --generation.backend "$2" $book --generation.language zh --evaluation.max_new_tokens 512 \
    --model.max_length 1024 --evaluation.batch_size 100 --generation.vllm_kv_cache_gib 8 2>&1 \
    | grep -v -e "it/s" -e "s/it" -e "━"
  echo "$1 book, $2: $(( $(date +%s) - start )) s (process, model load and engine start included)"
done
tar -czf "$OUT/open_book.tar.gz" -C "$work" .
ls -la "$OUT"
