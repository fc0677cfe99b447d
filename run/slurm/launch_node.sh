#!/bin/bash
# Start this node's ranks of a multi-node run (one call per node, e.g. from srun in kdqat.sbatch).
#   launch_node.sh CONFIG [train.py args ...]
# Reads: SLURM_NODEID (this node's index), KDQAT_HOSTS (node names, space-separated, in SLURM order),
# MASTER_ADDR, MASTER_PORT; optional KDQAT_SLOTS_PER_NODE (ranks per node: default the GPUs SLURM gave
# this node, else 1), KDQAT_LAUNCHER (deepspeed | torchrun; default deepspeed), KDQAT_PYTHON_BIN (the
# folder holding deepspeed/torchrun; default: the one of `python` on PATH).
set -euo pipefail
config=${1:?usage: launch_node.sh CONFIG [train.py args ...]}
shift
: "${SLURM_NODEID:?SLURM_NODEID is not set (run this under srun, or set it)}"
: "${KDQAT_HOSTS:?KDQAT_HOSTS must list the nodes}"
: "${MASTER_ADDR:?MASTER_ADDR is not set}"
port=${MASTER_PORT:-29500}
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${KDQAT_PYTHON_BIN:-$(dirname "$(command -v python)")}
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
    "$bin/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$SLURM_NODEID" \
      --master_addr "$MASTER_ADDR" --master_port "$port" "${extra[@]}" \
      "$here/run/train.py" --ds_config "$config" "$@"
    ;;
  torchrun)
    "$bin/torchrun" --nnodes "${#hosts[@]}" --node_rank "$SLURM_NODEID" --nproc_per_node "$slots" \
      --master_addr "$MASTER_ADDR" --master_port "$port" \
      "$here/run/train.py" --ds_config "$config" "$@"
    ;;
  *) echo "KDQAT_LAUNCHER must be deepspeed or torchrun, got ${KDQAT_LAUNCHER}" >&2; exit 2 ;;
esac
