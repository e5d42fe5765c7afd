#!/usr/bin/env bash
# N processes on this machine, as if they were N hosts: each gets DEVICES_PER_PROCESS CPU devices and its
# share of the data; they meet through jax.distributed on 127.0.0.1 (CPU collectives: gloo). This is how the
# multi-host code path is tested without a cluster. Logs: WORKDIR/process_<i>.log; metrics from process 0.
# A SIGTERM (or Ctrl-C) to this script goes to every process; it returns once all have saved and exited.
#
#   launch/multiprocess_local.sh 2 configs/demo.py:runlocal /tmp/gt_mp [--config.total_steps=10 ...]
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NUM_PROCESSES CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
num_processes=$1 config=$2 workdir=$3
shift 3
[[ "${workdir}" == *://* ]] || workdir=$(realpath -m -- "${workdir}")  # relative to the caller, not the repository
# A config file found from the caller's directory too (its own configs); else the repository's (configs/...).
config_file=${config%%:*}
[[ -f "${config_file}" ]] && config="$(realpath -- "${config_file}")${config:${#config_file}}"
cd "$(dirname "$0")/.."
mkdir -p "${workdir}"
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# CPU devices only, also on a machine with GPUs (each process would otherwise claim every GPU).
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}"
export GAUSSIANTOKEN_COORDINATOR_ADDRESS="127.0.0.1:${port}" GAUSSIANTOKEN_NUM_PROCESSES="${num_processes}"

echo "${num_processes} processes; their logs: ${workdir}/process_<i>.log (metrics and pictures from process 0)" >&2
pids=()
for ((i = 0; i < num_processes; i++)); do
  GAUSSIANTOKEN_PROCESS_ID=$i python -m gaussiantoken_jax.main --config="${config}" --workdir="${workdir}" "$@" \
      > "${workdir}/process_${i}.log" 2>&1 &
  pids+=($!)
done
# A SIGTERM to this script reaches every process, which all stop at the same step and save together.
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for i in "${!pids[@]}"; do
  pid=${pids[$i]}
  code=0
  wait "${pid}" || code=$?
  # A trapped signal ends `wait` early (status > 128) while the process may still be saving: wait on. If it
  # has exited meanwhile, one more `wait` returns its own status (127 if the first `wait` already did).
  while ((code > 128)) && kill -0 "${pid}" 2>/dev/null; do
    code=0
    wait "${pid}" || code=$?
  done
  if ((code > 128)); then
    own=0
    wait "${pid}" 2>/dev/null || own=$?
    ((own == 127)) || code=${own}
  fi
  if ((code != 0)); then
    status=${code}
    echo "process ${i} exited with status ${code}; the end of ${workdir}/process_${i}.log:" >&2
    tail -n 5 "${workdir}/process_${i}.log" >&2
  fi
done
exit "${status}"
