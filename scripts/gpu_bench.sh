#!/usr/bin/env bash
# The GPU measurement of BENCHMARKS.md in one call: the PyTorch reference step and
# glare_jax.bench on the same card, then a table. Every part has its own time limit
# and the script goes on when one fails; the whole stays inside BUDGET seconds.
#
# Prepared beforehand, in the repository root (both folders are git-ignored and
# travel with the call's `carry`; BENCHMARKS.md gives the exact commands):
#   .bench_ref/torch_ref_step.py   a copy of ../shared/bench/torch_ref_step.py
#   .whl/*.whl                     Python 3.12 wheels of what the GPU image lacks:
#                                  grain, array-record, portpicker, ml-collections
# Run there as:   bash scripts/gpu_bench.sh      (results: $OUT/*, table last)
#
# REHEARSE=1 runs the same sequence on a CPU with the tiny model, small batches and
# few synthetic records, so the call that spends GPU time has run once before: the
# wheels, every flag, the JSON lines and the table. REHEARSE_CONFIG (default `tiny`)
# names the config arguments of that rehearsal; tests/test_bench.py uses
# `tiny,objective=dino` to compile faster. RUNS (a comma list of run names, default
# all) runs only those; the others' flags and configs are checked without timing
# anything (`glare_jax.bench --check_flags`).
set -u
OUT=${OUT:-/tmp/glare_bench}
BUDGET=${BUDGET:-420}          # seconds for the whole script (device call: timeout_s=480)
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
unset JAX_COMPILATION_CACHE_DIR   # every compile_s is a cold compile, as a user's first run

log() { echo "[$(date +%T) +${SECONDS}s] $*" | tee -a "$OUT/log.txt"; }

# Runs "$@" under `timeout`, at most $1 seconds and never past the budget.
limited() {
  local want=$1 left
  shift
  left=$((BUDGET - SECONDS - 5))
  if ((left < 30)); then
    log "skipped (budget spent): $*"
    return 1
  fi
  timeout "$((want < left ? want : left))" "$@"
}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHEELS"/*.whl >> "$OUT/log.txt" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
log "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
log "$(python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' 2>&1 | tail -1)"

# 1. The reference, in the same call: eager batch 64 and 128.
if [[ -f .bench_ref/torch_ref_step.py ]]; then
  log "torch reference"
  limited 150 python3 .bench_ref/torch_ref_step.py > "$OUT/torch_ref.txt" 2>&1 \
    || log "torch reference failed or timed out (rc=$?)"
  grep -E "^torch " "$OUT/torch_ref.txt" | tee -a "$OUT/log.txt"
else
  log "no .bench_ref/torch_ref_step.py: reference skipped"
fi

# 2. glare_jax.bench: one JSON line per run into bench.jsonl, stderr tails kept.
# A run with the same arguments as an earlier one (the rehearsal's small batches
# make b128 and b64 alike) is skipped.
declare -A SEEN=()
bench() {
  local name=$1 want=$2 line
  shift 2
  if [[ -n ${SEEN["$*"]:-} ]]; then
    log "bench $name: the same run as ${SEEN["$*"]}, skipped"
    return 0
  fi
  SEEN["$*"]=$name
  if [[ -n ${RUNS:-} && ",$RUNS," != *",$name,"* ]]; then
    if limited 60 python3 -m glare_jax.bench "$@" --check_flags > /dev/null 2> "$OUT/stderr_$name.txt"; then
      log "bench $name: flags checked, not run (RUNS=$RUNS)"
    else
      log "bench $name: bad flags; stderr tail:"
      tail -n 5 "$OUT/stderr_$name.txt" | tee -a "$OUT/log.txt"
    fi
    rm -f "$OUT/stderr_$name.txt"
    return 0
  fi
  log "bench $name: $*"
  line=$(limited "$want" python3 -m glare_jax.bench "$@" 2> "$OUT/stderr_$name.txt" | tail -1)
  if [[ $line == "{"* ]]; then
    echo "{\"run\": \"$name\", ${line:1}" >> "$OUT/bench.jsonl"
    echo "$line" | tee -a "$OUT/log.txt"
    rm -f "$OUT/stderr_$name.txt"
  else
    log "bench $name failed; stderr tail:"
    [[ -f $OUT/stderr_$name.txt ]] && tail -n 15 "$OUT/stderr_$name.txt" | tee -a "$OUT/log.txt"
    rm -f "$OUT/stderr_$name.txt"
  fi
}
if [[ ${REHEARSE:-0} == 1 ]]; then
  TINY=${REHEARSE_CONFIG:-tiny}, B512=16 B128=8 B64=8 STEPS=2 FEW=2 EPOCH=2 WORKERS=2
  SMALL=(--records=32 --source_size=96 --config.crops.device_image_size=64)
else
  TINY='' B512=512 B128=128 B64=64 STEPS=15 FEW=10 EPOCH=8 WORKERS=12
  SMALL=()
fi
FAST=--config=configs/loveda.py:${TINY}fast
# In order of what the targets need, so that a spent budget skips the least needed:
# batch 512, then whole epochs with data (the 100-epoch time), then the remat
# trade at batch 512 (saving the blocks' matrix products instead of recomputing
# the student's forward: ~18% fewer FLOPs if it fits), then the batches of the
# reference, then what single switches buy.
bench fast_b512 170 "$FAST" --batch=$B512 --steps=$STEPS --profile="$OUT/trace" "${SMALL[@]}"
# Its profile (3 steps after the timed ones) as text, and the trace itself if small.
if [[ -d $OUT/trace ]]; then
  python3 -m glare_jax.profile_summary "$OUT/trace" --top 25 > "$OUT/profile_b512.txt" 2>&1
  head -n 40 "$OUT/profile_b512.txt" | tee -a "$OUT/log.txt"
  trace=$(find "$OUT/trace" -name '*.trace.json.gz' | head -n 1)
  if [[ -n $trace ]] && (($(stat -c %s "$trace") < 15000000)); then
    mv "$trace" "$OUT/trace_b512.json.gz"
  fi
  rm -rf "$OUT/trace"
fi
bench epoch_b512 180 "$FAST" --batch=$B512 --mode=epoch --steps=$EPOCH \
  --config.num_workers=$WORKERS "${SMALL[@]}"
bench fast_b512_save_dots 150 "$FAST" --batch=$B512 --steps=$FEW \
  --config.model.remat_policy=dots_with_no_batch_dims_saveable "${SMALL[@]}"
bench fast_b128 90 "$FAST" --batch=$B128 --steps=$STEPS "${SMALL[@]}"
bench fast_b64 80 "$FAST" --batch=$B64 --steps=$STEPS "${SMALL[@]}"
bench fast_b512_xla_attention 120 "$FAST" --batch=$B512 --steps=$FEW \
  --config.model.attention=xla "${SMALL[@]}"
bench plain_device_aug_b128 120 --config=configs/loveda.py${TINY:+:${TINY%,}} --batch=$B128 \
  --steps=$FEW --config.crops.augment_on=device --config.num_workers=$WORKERS "${SMALL[@]}"

# 3. The table (also in $OUT/table.txt).
python3 -m glare_jax.bench_table "$OUT" | tee "$OUT/table.txt"
log "done"
