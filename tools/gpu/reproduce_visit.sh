#!/usr/bin/env bash
# The small-scale reproduction of the paper on the GPU machine (docs/reproduce.md has the whole flow,
# the exact device calls and the plan). Run from the repository root, one step per device call:
#
#   bash tools/gpu/reproduce_visit.sh setup                # after the staging calls: install, join, convert, restore runs
#   bash tools/gpu/reproduce_visit.sh run SECONDS NAME...  # resume the named runs until SECONDS are spent, then pack
#   bash tools/gpu/reproduce_visit.sh fetch FIRST          # the pieces FIRST.. of the last pack into $OUT
#   bash tools/gpu/reproduce_visit.sh sampled NAME GEN     # greedy and the seed's sampled decoding, HF, on one adapter
#   bash tools/gpu/reproduce_visit.sh first SECONDS LR...  # qwen-hard from the start, and the learning-rate probe beside it
#   bash tools/gpu/reproduce_visit.sh probe SECONDS LR...  # generation 0 trained at other learning rates (runs qwen-lr-LR)
#   bash tools/gpu/reproduce_visit.sh status               # what is staged, installed and how far each run is
#
# NAME is one of the runs below: the same config (configs/aiops_qwen_small.yaml), different replay; or a
# probe run qwen-lr-RATE (generation 0 only, trained at RATE).
# Every step first does whatever of `setup` is not done yet, so a step on a warm machine costs nothing extra.
# Environment: PARALLEL (runs at once, default 1), STAGGER (seconds between parallel starts, 45),
# RESERVE (seconds kept for packing, 60), ADAPTERS (resume | latest | all | none: which adapters the pack
# brings back, default resume = the latest of each unfinished run), END (default 6), PIECES (pieces of
# 15 MiB per call, default 4), LR (the learning rate every run but the probes trains at, once the probe
# chose one: passed as --train.learning_rate; a qwen-hard begun at another rate is set aside and
# qwen-hard starts again from the probe run qwen-lr-LR's generation 0), KV (GiB of vLLM KV cache per
# process, for several processes on one GPU), SAMPLED ("NAME GEN": with `run`, that adapter's `sampled`
# evaluation beside the runs, packed with them), RECIPE_EPOCHS / RECIPE_MAX_EPOCHS and MICRO / ACCUM
# (the recipe's epochs and micro-batch x accumulation, 16 x 1: 8 x 2 leaves room for three runs at once).
set -uo pipefail
export PYTHONPATH=$PWD SELFEVO_SHARED=$PWD/.shared SELFEVO_CACHE=${SELFEVO_CACHE:-/tmp/cache} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The trimmed vLLM install has no FlashInfer (docs/vllm.md).
export VLLM_USE_V2_MODEL_RUNNER=0 VLLM_USE_FLASHINFER_SAMPLER=0
OUT=${OUT:-/tmp/out}
R=${REPRO_DIR:-/tmp/repro}  # runs, logs and packs on the GPU machine
RUNS=$R/runs LOGS=$R/logs PACKS=$R/packs
STAGE=${STAGE_DIR:-/tmp/stage}  # where tools/gpu/device_setup.sh joins what was carried
# MODEL, DATA_DIR and CONFIG are for the tests (tests/test_reproduce.py: a tiny model on the CPU)
M=${MODEL:-$STAGE/qwen.gguf}
D=${DATA_DIR:-/tmp/shared/data}  # where tools/gpu/device_setup.sh keeps the carried .shared/data
CONFIG=${CONFIG:-configs/aiops_qwen_small.yaml}
FORK_FROM=qwen-hard
# Runs that start from qwen-hard's base evaluation and generation 0 (identical in every replay mode, and
# for either answer model: generation 0's model is the base model).
FORKS=${FORKS:-qwen-none qwen-random qwen-all qwen-hard-current qwen-easy qwen-even}
END=${END:-6} PARALLEL=${PARALLEL:-1} STAGGER=${STAGGER:-45} RESERVE=${RESERVE:-60}
ADAPTERS=${ADAPTERS:-resume} PIECES=${PIECES:-4} PIECE_MIB=${PIECE_MIB:-15} LR=${LR:-} KV=${KV:-}
MIN_RUN=${MIN_RUN:-150}  # less than this left: not worth starting a process (imports, model, vLLM engine ~100 s)
mkdir -p "$OUT" $RUNS $LOGS $PACKS $R/log
tools() { python tools/gpu/reproduce_runs.py "$@"; }

# selfevo's recipe (docs/results.md): the levers configs/aiops_qwen_small.yaml turns off for the paper's
# loop, at selfevo's defaults but one phrasing a sentence (so that the runs the docs report resume as
# they began; the -phr3, -qbase and -anch16 modes ask three, the default), and the epochs that let a
# generation retain what it is trained on.
RECIPE="--generation.question_focus sentence --generation.questions_per_fragment 4 --generation.question_filters true
  --generation.phrasings 1 --generation.standalone_answers true --generation.min_grounding 0.0 --targeting.dev_share 0.1
  --targeting.check_pairs 200 --targeting.retarget true --data.general data/general_qa.json
  --train.epochs ${RECIPE_EPOCHS:-3} --train.max_epochs ${RECIPE_MAX_EPOCHS:-3} --train.patience 1
  --train.micro_batch_size ${MICRO:-16} --train.grad_accum ${ACCUM:-1}"
# The English domain of data/README.md (Black's documentation): every fragment, English prompts.
BLACK="--generation.language en --data.fragments data/black_docs_fragments.json --data.eval data/black_docs_eval.json --data.limit null"
ANCHORS="--train.anchors data/anchor_prompts.json --train.anchor_pairs 224"

mode_args() {  # the ablations differ only here (and in --name)
  case "$1" in
    qwen-facts) echo "$RECIPE" ;;
    qwen-facts-s1) echo "$RECIPE --seed 1" ;;  # a second seed: other sampled questions, answers and fill
    qwen-facts-noretarget) echo "$RECIPE --targeting.retarget false" ;;
    qwen-recipe-lr*) echo "$RECIPE --train.learning_rate ${1#qwen-recipe-lr}"; return 0 ;;  # the recipe at another rate
    qwen-black-lr*) echo "$RECIPE --train.learning_rate ${1#qwen-black-lr} $BLACK"; return 0 ;;  # the recipe on Black's docs
    qwen-black-anchors*|qwen-black-phr3*|qwen-black-qbase*|qwen-black-anch16*|qwen-black-fresh*|qwen-black-rank*)
      # The anchor runs' recipe on Black's docs (1e-3; all 224 anchors a generation, against
      # forgetting) with one lever more; -s1: a second seed. docs/results.md has why each.
      local lever=${1%-s1} extra=""
      case "$lever" in
        qwen-black-anchors) ;;
        qwen-black-anchors-text) extra=" --train.fragment_weight 1" ;;  # the fragments as text too
        # 3 phrasings a sentence at 2 epochs (about the anchor runs' steps on the QA; their anchors
        # then get 2 epochs instead of 6), or trained to retention (2 to 6)
        qwen-black-phr3) extra=" --generation.phrasings 3 --train.epochs 2 --train.max_epochs 2" ;;
        qwen-black-phr3-ret) extra=" --generation.phrasings 3" ;;
        # and the base model writes every generation's questions (the trained one copies the
        # prompt's examples in 21-64% of them)
        qwen-black-qbase) extra=" --generation.phrasings 3 --generation.question_model base" ;;
        # or the anchors kept at the anchor runs' 16% of the training set, repeated as needed
        qwen-black-anch16) extra=" --generation.phrasings 3 --train.anchor_share 0.16" ;;
        # a fresh adapter each generation on every pair so far: its training grows with them
        qwen-black-fresh) extra=" --train.fresh_adapter true --replay.mode all" ;;
        qwen-black-rank[1-9]*)
          local r=${lever#qwen-black-rank}
          [[ $r =~ ^[0-9]+$ ]] || return 1
          extra=" --lora.r $r --lora.alpha $((2 * r))" ;;
        *) return 1 ;;
      esac
      if [ "$lever" != "$1" ]; then extra+=" --seed 1"; fi
      echo "$RECIPE --train.learning_rate 1e-3 $BLACK $ANCHORS$extra"; return 0 ;;
    qwen-hard) echo "--replay.mode hard" ;;
    qwen-hard-current) echo "--replay.mode hard --generation.answer_model current" ;;  # the paper's answer writer
    qwen-none) echo "--replay.mode hard --replay.k 0" ;;
    qwen-random) echo "--replay.mode random" ;;
    qwen-all) echo "--replay.mode all" ;;
    qwen-easy) echo "--replay.mode easy" ;;
    qwen-even) echo "--replay.mode even" ;;
    qwen-lr-*) echo "--replay.mode hard --train.learning_rate ${1#qwen-lr-}"; return 0 ;;
    *) return 1 ;;
  esac
  if [ -n "$LR" ]; then echo "--train.learning_rate $LR"; fi
}

run_end() {  # the generation a run stops before: a probe run trains generation 0 only
  case "$1" in qwen-lr-*) echo 1 ;; *) echo "$END" ;; esac
}

run_rate() {  # RUN_DIR: the learning rate the run trains at, from its config.json
  python -c "import json, sys; print(json.load(open(sys.argv[1]))['config']['train']['learning_rate'])" "$1/config.json"
}

best_rate() {  # the probed rate (qwen-hard's own among them) whose generation 0 scores the highest BLEU-4
  python - "$RUNS" "$FORK_FROM" "$(run_rate $RUNS/$FORK_FROM)" "$@" <<'PY'
import json, sys
from pathlib import Path
runs, hard, own, rates = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
def bleu(run):
    try:
        return json.loads((runs / run / "gen_0" / "metrics.json").read_text())["bleu-4"]
    except (OSError, ValueError, KeyError):
        return None
scores = {own: bleu(hard), **{r: bleu(f"qwen-lr-{r}") for r in rates}}
for rate, score in scores.items():
    print(f"rate {rate}: generation 0 BLEU-4 {score}", file=sys.stderr)
done = {r: b for r, b in scores.items() if b is not None}
print(max(done, key=done.get) if done else "")
PY
}

setup() {
  shopt -s nullglob
  local carried=(.carry/*/*)
  if ((${#carried[@]})) || [ -d .shared ]; then  # device_setup.sh also keeps .shared in /tmp/shared
    bash tools/gpu/device_setup.sh || return 1
    rm -rf .carry/wheels-*  # installed now; they would be installed again by every later call
  fi
  if ! python -c "import vllm" 2>/dev/null && [ -f $STAGE/vllm-wheels.tar ]; then
    tar -xf $STAGE/vllm-wheels.tar -C $STAGE && rm $STAGE/vllm-wheels.tar
    bash tools/gpu/vllm_h100_setup.sh $STAGE/vllm-wheels || return 1
  fi
  if [ -f $M ] && [ ! -f $SELFEVO_CACHE/.qwen-converted ]; then  # dequantize once (~70 s), before any run needs it
    python -c "from selfevo.models import resolve_model; print('model:', resolve_model('$M'))" || return 1
    touch $SELFEVO_CACHE/.qwen-converted
  fi
  if [ -f $STAGE/runs-carry.tar.gz ]; then  # run folders carried in from the last visit
    tools unpack $STAGE/runs-carry.tar.gz --dest $RUNS || { echo "could not restore the carried runs"; return 1; }
    rm $STAGE/runs-carry.tar.gz
  fi
  shopt -u nullglob
  return 0
}

status() {
  echo "staged: $(ls $STAGE 2>/dev/null | tr '\n' ' ')"
  python -c "import vllm; print('vllm', vllm.__version__)" 2>/dev/null || echo "vllm: not installed"
  python -c "import jieba, gguf, jsonargparse; print('jieba, gguf, jsonargparse: installed')" 2>/dev/null || echo "jieba/gguf/jsonargparse: missing"
  [ -f $SELFEVO_CACHE/.qwen-converted ] && echo "qwen: converted" || echo "qwen: not converted"
  [ -f $D/AIOps_data.json ] && echo "data: $D" || echo "data: MISSING ($D; carry .shared once)"
  for run in $RUNS/*/; do
    [ -d "$run" ] && echo "run $(basename "$run"): next generation $(tools next-start "$run") of $END"
  done
  return 0
}

one_run() {  # NAME SECONDS [END]: resume one run, stopped by SIGINT when its time is up (resume is crash-safe)
  local name=$1 limit=$2 end=${3:-} args start rc=0
  args=$(mode_args "$name") || { echo "unknown run $name" >&2; return 2; }
  if [ -n "$KV" ]; then args="$args --generation.vllm_kv_cache_gib $KV"; fi
  start=$(tools next-start $RUNS/"$name") end=${end:-$(run_end "$name")}
  if ((start >= end)); then echo "$name: finished ($end generations)"; return 0; fi
  if ((limit < 1)); then echo "$name: not started, no time left"; return 0; fi
  echo "$name: generations $start..$((end - 1)), ${limit}s at most, $(date +%T)"
  local stop_at=$((SECONDS + limit)) tries=0 log=$R/log/"$name".log offset
  while :; do
    rc=0 offset=$(stat -c %s "$log" 2>/dev/null || echo 0)
    # shellcheck disable=SC2086
    timeout -s INT -k 30 $((stop_at - SECONDS)) python -m selfevo.cli evolve --config $CONFIG --name "$name" --start "$(tools next-start $RUNS/"$name")" --end "$end" \
      --model.name $M --data.fragments $D/AIOps_data.json --data.eval $D/AIOps_eval_data.json \
      --runs_dir $RUNS --logs_dir $LOGS $args >> "$log" 2>&1 || rc=$?
    # Runs sharing the GPU peak at different times: one whose training ran out of memory beside another's
    # (four runs at 8 x 2 did, twice) starts again from its finished stages, twice at most (one that
    # does not fit alone would only spend the call), while there is time.
    ((rc == 2 && ++tries <= 2 && stop_at - SECONDS > MIN_RUN + 30)) || break
    tail -c +$((offset + 1)) "$log" | grep "^selfevo: error: out of GPU memory in training" > /dev/null || break
    echo "$name: out of GPU memory, starting again in 30 s ($(date +%T))"
    sleep 30
  done
  case $rc in
    0) echo "$name: done, now at generation $(tools next-start $RUNS/"$name")" ;;
    124 | 130 | 137) echo "$name: stopped by the time budget (rc $rc), now at generation $(tools next-start $RUNS/"$name")" ;;
    *) echo "$name: FAILED (rc $rc); the end of its log:"; tail -n 15 $R/log/"$name".log ;;
  esac
  return 0
}

pack_out() {  # NAMES...: pack these runs, send the manifest, a log and the first pieces
  local tag names=() name
  tag=$(date +%m%d-%H%M%S)
  for name in "$@"; do
    [[ " ${names[*]} " == *" $name "* ]] && continue
    [ -f $RUNS/"$name"/config.json ] || [ -f $RUNS/"$name"/FORKED_FROM ] && names+=("$name")
  done
  ((${#names[@]})) || { echo "nothing to pack"; return 0; }
  tools pack $RUNS --out $PACKS/$tag --names "${names[@]}" --adapters "$ADAPTERS" --end "$END" --piece-mib "$PIECE_MIB" --tag "$tag" || return 1
  echo "$tag" > $PACKS/last
  fetch 0
}

fetch() {  # FIRST: the manifest, the visit log and pieces FIRST .. FIRST+PIECES-1 of the last pack into $OUT
  local tag first=$1 k=0 total
  tag=$(cat $PACKS/last 2>/dev/null) || { echo "no pack yet"; return 1; }
  cp $PACKS/$tag/runs-$tag.manifest.json "$OUT"/
  mapfile -t all < <(python -c "import json,sys; [print(p['name']) for p in json.load(open(sys.argv[1]))['pieces']]" $PACKS/$tag/runs-$tag.manifest.json)
  total=${#all[@]}
  if ((first >= total)); then echo "pack runs-$tag has $total piece(s): none from $first"; return 0; fi
  for ((k = first; k < first + PIECES && k < total; k++)); do cp $PACKS/$tag/"${all[$k]}" "$OUT"/; done
  for f in $R/log/*.log; do echo "=== $(basename "$f")"; tail -n 40 "$f"; done > "$OUT"/runs-$tag.log 2>/dev/null
  if ((first + PIECES < total)); then
    echo "pack runs-$tag: pieces $first..$((k - 1)) of $total sent; NEXT CALL: bash tools/gpu/reproduce_visit.sh fetch $k"
  else
    echo "pack runs-$tag: pieces $first..$((total - 1)) of $total sent; the pack is complete"
  fi
}

fork_all() {  # start every run of FORKS from qwen-hard's generation 0, once it is there
  local name
  for name in $FORKS; do
    tools fork $RUNS/$FORK_FROM $RUNS/"$name" | grep -q forked && echo "$name" >> $R/forked
  done
  return 0
}

adopt_rate() {  # with LR set: qwen-hard trains at LR; one begun at another rate gives way to the probe's run
  [ -n "$LR" ] && [ -f $RUNS/$FORK_FROM/config.json ] || return 0
  local have
  have=$(run_rate $RUNS/$FORK_FROM)
  python -c "import sys; sys.exit(float(sys.argv[1]) != float(sys.argv[2]))" "$have" "$LR" && return 0
  [ -e $RUNS/$FORK_FROM-lr$have ] && { echo "LR=$LR: $RUNS/$FORK_FROM-lr$have is in the way"; return 1; }
  tools fork $RUNS/qwen-lr-"$LR" $RUNS/$FORK_FROM.new | grep -q forked \
    || { echo "LR=$LR: the probe run qwen-lr-$LR has no finished generation 0"; rm -rf $RUNS/$FORK_FROM.new; return 1; }
  mv $RUNS/$FORK_FROM $RUNS/$FORK_FROM-lr"$have" && mv $RUNS/$FORK_FROM.new $RUNS/$FORK_FROM
  [ -d $LOGS/$FORK_FROM ] && mv $LOGS/$FORK_FROM $LOGS/$FORK_FROM-lr"$have"
  # the forks of the old one trained at the old rate too
  for name in $FORKS; do [ -d $RUNS/"$name" ] && mv $RUNS/"$name" $RUNS/"$name"-lr"$have"; done
  echo "LR=$LR: $FORK_FROM (begun at $have) set aside as $FORK_FROM-lr$have; $FORK_FROM goes on from qwen-lr-$LR's generation 0"
}

run() {  # SECONDS NAME...
  local deadline=$(($1 + SECONDS - RESERVE))
  shift
  [ -e $M ] || { echo "the model is not staged ($M)"; return 1; }
  [ -f $D/AIOps_data.json ] || { echo "the data is not on this machine ($D): carry .shared once"; return 1; }
  rm -f $R/forked $R/started
  # SAMPLED="NAME GEN": that adapter's greedy and sampled evaluation beside the runs, stopped at the
  # deadline like them and packed with them (it takes one of the PARALLEL places while it runs)
  if [ -n "${SAMPLED:-}" ]; then
    # shellcheck disable=SC2086
    evaluate_both_ways $SAMPLED $((deadline - SECONDS)) > $R/log/sampled.log 2>&1 &
    echo "$SAMPLED" | cut -d' ' -f1 >> $R/started
  fi
  run_until $deadline "$@" || return 1
  # the runs worked on, and those forked in this call (their gen_0 is the same bytes: packed once)
  pack_out $(cat $R/started $R/forked 2>/dev/null | sort -u)
}

run_until() {  # DEADLINE NAME...: the runs, PARALLEL at a time, until DEADLINE (in $SECONDS)
  local deadline=$1 name limit pids=()
  shift
  adopt_rate || return 1
  fork_all
  for name in "$@"; do
    limit=$((deadline - SECONDS))
    if ((limit < MIN_RUN)); then echo "$name: not started, ${limit}s left"; continue; fi
    echo "$name" >> $R/started
    if ((PARALLEL > 1)); then
      one_run "$name" "$limit" &
      pids+=($!)
      if ((${#pids[@]} >= PARALLEL)); then wait -n; pids=($(jobs -pr)); fi
      sleep "$STAGGER"  # vLLM checks free GPU memory as it starts: not two starts at once
    else
      one_run "$name" "$limit"
      fork_all
    fi
  done
  wait
  fork_all
}

probe_runs() {  # DEADLINE LR...: generation 0 trained at each rate, from qwen-hard's questions and answers,
  # all at once beside whatever runs (vLLM like qwen-hard, so a probe's generation 0 can become its own)
  local deadline=$1 lr name started=()
  shift
  for lr in "$@"; do
    name=qwen-lr-$lr
    tools fork $RUNS/$FORK_FROM $RUNS/"$name" --before-train >/dev/null
    [ -d $RUNS/"$name" ] || { echo "$name: $FORK_FROM has no generation 0 answers yet"; continue; }
    started+=("$name")
    one_run "$name" $((deadline - SECONDS)) &
    sleep "$STAGGER"  # vLLM checks free GPU memory as it starts: not two starts at once
  done
  wait
  for name in "${started[@]}"; do echo "$name: $(cat $RUNS/"$name"/gen_0/metrics.json 2>/dev/null | tr -d '\n ')"; done
  echo "${started[*]}" > $R/probed
}

probe() {  # SECONDS LR...
  local deadline=$(($1 + SECONDS - RESERVE))
  shift
  probe_runs $deadline "$@"
  ADAPTERS=none pack_out $(cat $R/probed)
}

first() {  # SECONDS LR...: a visit's first call on a new reproduction. qwen-hard's base evaluation and
  # generation 0, and beside it the probe (generation 0 at each LR); then the rate whose generation 0
  # scores best (qwen-hard's own among them) is taken (LR, adopt_rate), and RUNS go on PARALLEL at a
  # time for the rest of the call.
  local deadline=$(($1 + SECONDS - RESERVE)) pid
  shift
  rm -f $R/forked $R/started $R/probed
  one_run $FORK_FROM $((deadline - SECONDS)) 1 &
  pid=$!
  until tools stage-done $RUNS/$FORK_FROM/gen_0 answers replay; do
    kill -0 $pid 2>/dev/null && ((SECONDS < deadline - MIN_RUN)) || break
    sleep 5
  done
  probe_runs $deadline "$@"  # waits for qwen-hard's generation 0 too
  echo "base: $(cat $RUNS/$FORK_FROM/base/metrics.json 2>/dev/null | tr -d '\n ')"
  LR=$(best_rate "$@")
  if [ -n "$LR" ]; then
    echo "learning rate taken: $LR"
    run_until $deadline ${RUNS_AFTER:-qwen-hard qwen-none qwen-random qwen-all}
  fi
  pack_out $FORK_FROM $(cat $R/probed $R/started $R/forked 2>/dev/null | sort -u)
}

sampled() {  # NAME GEN
  evaluate_both_ways "$@"
  pack_out "$1"
}

evaluate_both_ways() {  # NAME GEN [SECONDS]: the same adapter decoded greedily and with the seed's sampling,
  # both by HF generate (stopped after SECONDS, if given)
  local name=$1 gen=$2 folder adapter=() stop_at=$((SECONDS + ${3:-86400}))
  folder=$RUNS/$name/sampled/gen_$gen
  [ "$gen" = base ] && folder=$RUNS/$name/sampled/base || adapter=(--adapter $RUNS/"$name"/gen_"$gen"/adapter)
  for way in greedy sample; do
    flag=(); [ $way = sample ] && flag=(--evaluation.do_sample true)
    rm -rf "$folder/$way"
    ((stop_at > SECONDS)) || { echo "$name $gen $way: not started, no time left"; continue; }
    timeout -s INT -k 30 $((stop_at - SECONDS)) \
      python -m selfevo.cli evaluate $D/AIOps_eval_data.json --out "$folder/$way" --model.name $M "${adapter[@]}" \
      "${flag[@]}" --evaluation.batch_size 100 --evaluation.max_new_tokens 512 --model.max_length 1024 \
      --generation.language zh 2>&1 | tail -n 3
  done
}

step=${1:-status}
shift || true
setup || { echo "set-up failed"; exit 1; }
case "$step" in  # the GPU's memory and load every 5 s while runs share it (comes back in $OUT)
  # (in a subshell, so that no `wait` of the runs waits for it, and off this script's output, so
  # that a pipe from it ends when it does)
  run | first | probe) command -v nvidia-smi >/dev/null && (nvidia-smi --format=csv,noheader -l 5 \
    --query-gpu=timestamp,memory.used,utilization.gpu > "$OUT"/gpu-$step-$(date +%H%M%S).csv 2>/dev/null </dev/null &) ;;
esac
case "$step" in
  setup) status ;;
  status) status ;;
  run) run "$@" ;;
  first) first "$@" ;;
  fetch) fetch "$@" ;;
  sampled) sampled "$@" ;;
  probe) probe "$@" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
