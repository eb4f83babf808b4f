#!/usr/bin/env bash
# GLARE on a Cloud TPU VM pod slice: create it, copy the code, run on every
# worker, fetch the logs, delete it.
#
#   launch/tpu_pod.sh [--dry-run] --name NAME --zone ZONE [--type v4-32] \
#       [--version tpu-ubuntu2204-base] COMMAND [-- glare_jax arguments]
#
# COMMAND: create | setup | copy | run | logs | delete
#   create  create the TPU VM slice
#   setup   pip-install the project (its pinned versions) plus jax[tpu] on every worker
#   copy    copy this checkout to ~/glare_jax on every worker
#   run     start `python -m glare_jax.main ARGS` on every worker (jax.distributed
#           finds the pod by itself), logging to ~/glare_logs/worker.log
#   logs    fetch every worker's log into ./tpu_logs/NAME/
#   delete  delete the slice
# Use a workdir on a file system every worker mounts (e.g. a GCS FUSE or NFS mount)
# so that every worker writes the same checkpoints.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$here/common.sh"

name="" zone="" type="v4-32" version="tpu-ubuntu2204-base" cmd=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    --) shift; break ;;
    create|setup|copy|run|logs|delete) cmd=$1; shift ;;
    *) die "unknown argument $1" ;;
  esac
done
[[ -n "$cmd" ]] || die "no command given (create | setup | copy | run | logs | delete)"
[[ -n "$name" ]] || die "--name is required"
[[ -n "$zone" ]] || die "--zone is required"

tpu=(gcloud compute tpus tpu-vm)
on_all() { run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$1"; }

case "$cmd" in
  create)
    run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$type" --version="$version" ;;
  setup)
    on_all "cd ~/glare_jax && python3 -m pip install -q -e . 'jax[tpu]>=0.10.2,<0.11' -c constraints.txt -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" ;;
  copy)
    root=$(cd "$here/.." && pwd)
    run "${tpu[@]}" scp --recurse "$root" "$name":~/glare_jax --zone="$zone" --worker=all ;;
  run)
    [[ $# -gt 0 ]] || die "run needs glare_jax arguments after --"
    on_all "mkdir -p ~/glare_logs && cd ~/glare_jax && nohup python3 -m glare_jax.main $(quote_args "$@") > ~/glare_logs/worker.log 2>&1 &" ;;
  logs)
    run mkdir -p "tpu_logs/$name"
    run "${tpu[@]}" scp "$name":~/glare_logs/worker.log "tpu_logs/$name/" --zone="$zone" --worker=all ;;
  delete)
    run "${tpu[@]}" delete "$name" --zone="$zone" --quiet ;;
esac
