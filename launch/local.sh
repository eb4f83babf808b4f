#!/usr/bin/env bash
# Run glare_jax on the GPUs of this machine.
#
#   launch/local.sh [--procs N] [--dry-run] -- --config=configs/loveda.py --workdir=DIR [...]
#
# Default: one process drives every local GPU (JAX's single-process multi-device
# mode; the batch is sharded over a 'data' mesh axis). With --procs N, N processes
# are started, one per GPU (CUDA_VISIBLE_DEVICES=i), joined by jax.distributed
# through a coordinator on 127.0.0.1 — the same code path as a multi-node run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

procs=1
port=${GLARE_PORT:-12355}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --procs) procs=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) die "unknown option $1 (arguments for glare_jax go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no glare_jax arguments given (e.g. -- --config=configs/loveda.py --workdir=DIR)"
[[ "$procs" =~ ^[1-9][0-9]*$ ]] || die "--procs must be a positive integer, got '$procs'"

if [[ "$procs" == 1 ]]; then
  run python -m glare_jax.main "$@"
  exit 0
fi

pids=()
for ((i = 0; i < procs; i++)); do
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    run env CUDA_VISIBLE_DEVICES="$i" python -m glare_jax.main "$@" \
      --config.distributed.coordinator_address="127.0.0.1:$port" \
      --config.distributed.num_processes="$procs" --config.distributed.process_id="$i"
  else
    CUDA_VISIBLE_DEVICES="$i" python -m glare_jax.main "$@" \
      --config.distributed.coordinator_address="127.0.0.1:$port" \
      --config.distributed.num_processes="$procs" --config.distributed.process_id="$i" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
