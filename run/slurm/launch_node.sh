#!/bin/bash
# Start this node's ranks of a multi-node run (one call per node, e.g. from srun in kdqat.sbatch).
#   launch_node.sh CONFIG [train.py args ...]
# Reads: SLURM_NODEID (this node's index), KDQAT_HOSTS (node names, space-separated, in SLURM order),
# MASTER_ADDR, MASTER_PORT; optional KDQAT_SLOTS_PER_NODE (ranks per node: default the GPUs SLURM gave
# this node, else 1), KDQAT_LAUNCHER (deepspeed | torchrun; default deepspeed), KDQAT_PYTHON_BIN (the
# folder holding deepspeed/torchrun; default: the one of `python` on PATH).
# With the deepspeed launcher the ranks start through run/launch.py, so a SIGTERM from SLURM (time limit,
# scancel, --signal) makes them checkpoint at the end of the step, and this script exits 143 once they are
# gone; re-submitting resumes.
set -euo pipefail

# Run "$@" in the background and wait for it, passing SIGTERM/SIGINT on to it (run/launch.py counts a repeat
# within 2 s, e.g. SLURM signalling every process of the step, as one request); return its exit status.
run_forwarding_signals() {
  "$@" &
  local child=$! status=0
  trap 'kill -TERM "$child" 2> /dev/null || true' TERM
  trap 'kill -INT "$child" 2> /dev/null || true' INT
  while kill -0 "$child" 2> /dev/null; do
    wait "$child" || true  # returns early when a trapped signal arrives
  done
  wait "$child" || status=$?
  trap - TERM INT
  return "$status"
}

config=${1:?usage: launch_node.sh CONFIG [train.py args ...]}
shift
: "${SLURM_NODEID:?SLURM_NODEID is not set (run this under srun, or set it)}"
: "${KDQAT_HOSTS:?KDQAT_HOSTS must list the nodes}"
: "${MASTER_ADDR:?MASTER_ADDR is not set}"
port=${MASTER_PORT:-29500}
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${KDQAT_PYTHON_BIN:-$(dirname "$(command -v python)")}
python_exe="$bin/python"
[ -x "$python_exe" ] || python_exe="$bin/python3"
read -r -a hosts <<< "$KDQAT_HOSTS"
slots=${KDQAT_SLOTS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
case "${KDQAT_LAUNCHER:-deepspeed}" in
  deepspeed)
    hostfile=$(mktemp "${TMPDIR:-/tmp}/kdqat-hostfile.XXXXXX")
    trap 'rm -f "$hostfile"' EXIT
    for host in "${hosts[@]}"; do echo "$host slots=$slots"; done > "$hostfile"
    extra=()
    # Without a GPU, tell the launcher how many CPU ranks a node runs.
    if ! command -v nvidia-smi > /dev/null 2>&1; then extra=(--num_accelerators "$slots"); fi
    run_forwarding_signals "$python_exe" "$here/run/launch.py" --hostfile "$hostfile" --no_ssh \
      --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$port" "${extra[@]}" \
      "$here/run/train.py" --ds_config "$config" "$@"
    ;;
  torchrun)
    "$bin/torchrun" --nnodes "${#hosts[@]}" --node_rank "$SLURM_NODEID" --nproc_per_node "$slots" \
      --master_addr "$MASTER_ADDR" --master_port "$port" \
      "$here/run/train.py" --ds_config "$config" "$@"
    ;;
  *) echo "KDQAT_LAUNCHER must be deepspeed or torchrun, got ${KDQAT_LAUNCHER}" >&2; exit 2 ;;
esac
