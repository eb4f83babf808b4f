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
set -u
OUT=${OUT:-/tmp/glare_bench}
BUDGET=${BUDGET:-420}          # seconds for the whole script (device call: timeout_s=480)
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=/tmp/glare_jax_cache   # the epoch run reuses batch 512's compile

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

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >> "$OUT/log.txt" 2>&1 \
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
bench() {
  local name=$1 want=$2 line
  shift 2
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
FAST=--config=configs/loveda.py:fast
bench fast_b512 150 "$FAST" --batch=512 --steps=15
bench fast_b128 90 "$FAST" --batch=128 --steps=15
bench fast_b64 80 "$FAST" --batch=64 --steps=15
bench epoch_b512 150 "$FAST" --batch=512 --mode=epoch --steps=8 --config.num_workers=12
bench fast_b512_xla_attention 120 "$FAST" --batch=512 --steps=10 --config.model.attention=xla
bench plain_device_aug_b128 120 --config=configs/loveda.py --batch=128 --steps=10 \
  --config.crops.augment_on=device --config.num_workers=12

# 3. The table (also in $OUT/table.txt).
python3 - "$OUT" <<'PY' | tee "$OUT/table.txt"
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
ref = {}
if (out / "torch_ref.txt").exists():
  for m in re.finditer(r"torch eager batch=(\d+): ([\d.]+) ms/step, (\d+) img/s.*peak mem ([\d.]+) GiB",
                       (out / "torch_ref.txt").read_text()):
    ref[int(m[1])] = (float(m[3]), float(m[2]), float(m[4]))
rows = [json.loads(l) for l in (out / "bench.jsonl").read_text().splitlines()] \
    if (out / "bench.jsonl").exists() else []
best_ref = max((v[0] for v in ref.values()), default=None)
print("| run | batch | img/s | step ms | compile s | peak GiB | x ref | epoch s | 100 epochs s |")
print("|---|---|---|---|---|---|---|---|---|")
for b, (ips, ms, mem) in sorted(ref.items()):
  print(f"| torch eager | {b} | {ips:.0f} | {ms:.1f} | - | {mem} | 1.0 | - | - |")
for r in rows:
  x = f"{r['img_per_s'] / best_ref:.1f}" if best_ref and r.get("img_per_s") else "-"
  print(f"| {r['run']} | {r['batch']} | {r.get('img_per_s')} | {r.get('step_ms')} | "
        f"{r.get('compile_s')} | {r.get('peak_mem_gb')} | {x} | {r.get('epoch_s', '-')} | "
        f"{r.get('run_s', '-')} |")
print("device:", rows[0]["device"] if rows else "?", "| x ref: over the best torch eager img/s above")
PY
log "done"
