#!/usr/bin/env bash
# Multi-node training, two ways. Every node needs the repo, .venv, the model and the data at
# the same paths (a shared filesystem is easiest).
#
# 1) DeepSpeed launcher with a hostfile (run once, on the first node; it ssh-es to the others):
#      cat hostfile              # one line per node: "<hostname> slots=<GPUs>"
#      node1 slots=8
#      node2 slots=8
#      scripts/launch_multinode.sh deepspeed hostfile recipes/zero3-multinode-27b.yaml
#    Without ssh (schedulers such as Slurm start one launcher per node): set NODE_RANK and
#    MASTER_ADDR (and MASTER_PORT) on every node and run the same line there; DeepSpeed's
#    --no_ssh --node_rank mode starts only that node's workers.
#
# 2) torchrun on every node (NODE_RANK=0..N-1, MASTER_ADDR = the first node's address):
#      NNODES=2 NODE_RANK=0 MASTER_ADDR=node1 scripts/launch_multinode.sh torchrun recipes/zero3-multinode-27b.yaml
#      NNODES=2 NODE_RANK=1 MASTER_ADDR=node1 scripts/launch_multinode.sh torchrun recipes/zero3-multinode-27b.yaml
#
# Extra arguments after the recipe are dotted.key=value overrides.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
mode="${1:?usage: launch_multinode.sh deepspeed HOSTFILE RECIPE [k=v ...] | torchrun RECIPE [k=v ...]}"
shift
case "$mode" in
  deepspeed)
    hostfile="$1"; shift
    if [ -n "${NODE_RANK:-}" ]; then
      exec "$ROOT/.venv/bin/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" --no_local_rank \
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node}" \
        --master_port "${MASTER_PORT:-29500}" --module gemma3_tune train "$@"
    fi
    exec "$ROOT/.venv/bin/deepspeed" --hostfile "$hostfile" --no_local_rank --module gemma3_tune train "$@"
    ;;
  torchrun)
    GPUS="${GPUS_PER_NODE:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
    exec "$PY" -m torch.distributed.run \
      --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
      -m gemma3_tune train "$@"
    ;;
  *) echo "unknown mode $mode: use deepspeed or torchrun" >&2; exit 2 ;;
esac
