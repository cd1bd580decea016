#!/usr/bin/env bash
# Train on GPUs. One host: all its GPUs form the mesh.
#
#   bash launch/gpu.sh configs/sft_llava15_7b.py --config.model.hf_dir=/data/llava-1.5-7b-hf
#
# Several hosts: run it on every host with the same WORKDIR (a shared filesystem). Under SLURM
# (`srun bash launch/gpu.sh ...`, one task per host) JAX finds the other hosts itself; otherwise
# set COORDINATOR=host0:1234, NUM_HOSTS and HOST_ID on each host. Rerunning resumes from the
# latest checkpoint. Exit code 75: stopped by SIGTERM after saving; run it again.
set -euo pipefail
CONFIG="${1:?usage: bash launch/gpu.sh CONFIG [--config.KEY=VALUE ...]}"
shift
WORKDIR="${WORKDIR:-$HOME/workdir/$(basename "$CONFIG" .py)}"

export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/lvlm_jax_xla}"
# JAX may take nearly all GPU memory up front (the default 75% leaves room that a 7B run needs).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# Overlap FSDP collectives with compute.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"

HOSTS=()
if [[ -n "${COORDINATOR:-}" ]]; then
  HOSTS=(--config.mesh.coordinator_address="$COORDINATOR"
         --config.mesh.num_processes="${NUM_HOSTS:?set NUM_HOSTS}"
         --config.mesh.process_id="${HOST_ID:?set HOST_ID}")
fi
exec python -m lvlm_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${HOSTS[@]}" "$@"
