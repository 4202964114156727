#!/usr/bin/env bash
# One step of the GPU visit whose figures are in docs/benchmarks.md: benchmarks/stage_speed.py per stage,
# one whole loop generation, or benchmarks/scaling.py. Run on the GPU machine from the repository root
# after tools/gpu/device_setup.sh (the model staged as /tmp/stage/smollm2.gguf, the AIOps data carried in
# .shared/data and kept in /tmp/shared: scratch folders of the GPU machine); each step writes its JSON and
# log under $OUT.
#   bash tools/gpu/h100_visit.sh ifd | generation [VLLM_KV_GIB] | train | whole hf|vllm [ARGS] | qlora
#                               | scaling N   (on a machine of N GPUs: each stage on 1 GPU and on N)
#                               | profile [MODEL]  (IFD and training under torch.profiler: what binds
#                                 each; MODEL: another staged GGUF, e.g. /tmp/stage/qwen.gguf;
#                                 STAGES=ifd or train for one of them)
set -euo pipefail
export PYTHONPATH=$PWD SELFEVO_SHARED=/tmp/shared SELFEVO_CACHE=/tmp/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The trimmed vLLM install (tools/gpu/vllm_h100_setup.sh) has no FlashInfer: use the runner and
# sampler that do without it (docs/vllm.md).
export VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0
M=/tmp/stage/smollm2.gguf
D=/tmp/shared/data
OUT=${OUT:-/tmp/out}
bench() { python benchmarks/stage_speed.py --model $M "$@"; }
evolve() {
  python -m selfevo.cli evolve --config configs/aiops.yaml --end 1 --model.name $M \
    --data.fragments $D/AIOps_data.json --data.eval $D/AIOps_eval_data.json \
    --train.learning_rate 2e-4 --train.micro_batch_size 16 --train.grad_accum 1 --ifd.batch_size 128 \
    --evaluation.batch_size 100 --runs_dir /tmp/runs --logs_dir /tmp/logs "$@"
}
case "$1" in
  ifd) bench --stages ifd --seed-pairs 20 --ifd-batch-sizes 64 128 256 --ifd-compile-batch 256 --out $OUT/h100_ifd.json ;;
  generation) bench --stages generation --prompts 1024 --seed-prompts 128 --gen-batch-sizes 512 \
                --vllm-kv-cache-gib "${2:-0}" --out $OUT/h100_generation.json ;;
  train) bench --stages train --train-steps 30 --train-compile --out $OUT/h100_train.json ;;
  whole)
    backend=${2:-hf}
    start=$SECONDS
    evolve --name whole_$backend --generation.backend $backend --generation.vllm_kv_cache_gib 20 \
      --generation.batch_size 512 "${@:3}"
    echo "whole command, model loading included: $((SECONDS - start)) s" | tee $OUT/whole_${backend}_wall.txt
    for g in /tmp/runs/whole_$backend/gen_*; do cp $g/stages.json $OUT/whole_${backend}_$(basename $g)_stages.json; done
    cp /tmp/runs/whole_$backend/base/stages.json $OUT/whole_${backend}_base_stages.json
    cp /tmp/runs/whole_$backend/summary.md $OUT/whole_${backend}_summary.md ;;
  qlora)
    evolve --name qlora --model.quantization nf4 --data.limit 200 --generation.batch_size 256 \
      --evaluation.limit 50
    cp /tmp/runs/qlora/gen_0/stages.json $OUT/qlora_stages.json
    cp /tmp/runs/qlora/summary.md $OUT/qlora_summary.md ;;
  scaling)
    python benchmarks/scaling.py --devices "$2" --root /tmp/scaling --out $OUT/scaling_$2.json -- \
      --config configs/aiops.yaml --model.name $M --data.fragments $D/AIOps_data.json \
      --data.eval $D/AIOps_eval_data.json --train.micro_batch_size 16 --train.grad_accum "$2" \
      --ifd.batch_size 128 --evaluation.batch_size 100 --generation.batch_size 512 2>&1 | tee $OUT/scaling_$2.log ;;
  profile)
    M=${2:-$M}
    # STAGES=ifd or STAGES=train: one of the two (SmolLM2's both ran past 170 s on the H200)
    bench --stages ${STAGES:-ifd train} --profile --seed-pairs 4 --pairs 1024 --ifd-batch-sizes 128 --train-steps 12 \
      --out $OUT/profile_$(basename $M .gguf).json 2>&1 | tee $OUT/profile_$(basename $M .gguf).log ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
