#!/usr/bin/env bash
# N processes on this machine, as if they were N hosts: each gets DEVICES_PER_PROCESS CPU devices and its
# share of the data; they meet through jax.distributed on 127.0.0.1 (CPU collectives: gloo). This is how the
# multi-host code path is tested without a cluster. Logs: WORKDIR/process_<i>.log; metrics from process 0.
#
#   launch/multiprocess_local.sh 2 configs/demo.py:runlocal /tmp/gt_mp [--config.total_steps=10 ...]
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
num_processes=$1 config=$2 workdir=$3
shift 3
cd "$(dirname "$0")/.."
mkdir -p "${workdir}"
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
export GAUSSIANTOKEN_COORDINATOR_ADDRESS="127.0.0.1:${port}" GAUSSIANTOKEN_NUM_PROCESSES="${num_processes}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  GAUSSIANTOKEN_PROCESS_ID=$i python -m gaussiantoken_jax.main --config="${config}" --workdir="${workdir}" "$@" \
      > "${workdir}/process_${i}.log" 2>&1 &
  pids+=($!)
done
# A SIGTERM to this script reaches every process, which all stop at the same step and save together.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
exit "${status}"
