#!/usr/bin/env bash
# Train on GPUs. One host: all its GPUs form the mesh.
#
#   bash launch/gpu.sh configs/sft_llava15_7b.py --config.model.hf_dir=/data/llava-1.5-7b-hf
#
# Install with the CUDA 12 extra (`pip install -e ".[cuda12]"`: jax[cuda12] at the pinned jax
# version, with its CUDA wheels); plain `pip install -e .` gives a CPU-only jaxlib, which this script
# refuses. The train CLI's first line on stderr names the backend and device count it runs on.
#
# Several hosts: run it on every host with the same WORKDIR (a shared filesystem). Under SLURM
# (`srun bash launch/gpu.sh ...`, one task per host) JAX finds the other hosts itself; otherwise
# set COORDINATOR=host0:1234, NUM_HOSTS and HOST_ID on each host. Rerunning resumes from the
# latest checkpoint. Exit code 75: stopped by SIGTERM after saving; run it again.
set -euo pipefail
CONFIG="${1:?usage: bash launch/gpu.sh CONFIG [--config.KEY=VALUE ...]}"
shift
WORKDIR="${WORKDIR:-$HOME/workdir/$(basename "$CONFIG" .py)}"

if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("jax_cuda12_plugin") is None)'; then
  echo 'launch/gpu.sh: the JAX CUDA 12 plugin is not installed, JAX would run on the CPU; run: pip install -e ".[cuda12]"' >&2
  exit 2
fi

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
