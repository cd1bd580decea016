#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: run this same script on every host of the slice, e.g.
#
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
#     "cd lvlm_jax && WORKDIR=/mnt/shared/llava7b bash launch/tpu_vm.sh configs/sft_llava15_7b.py \
#      --config.model.hf_dir=/mnt/shared/llava-1.5-7b-hf"
#
# Install on every host with the TPU extra (`pip install -e ".[tpu]"`: jax[tpu] at the pinned jax
# version); plain `pip install -e .` gives a CPU-only jaxlib, which this script refuses. The train
# CLI's first line on stderr names the backend and device count it runs on.
#
# Every host runs the same command; JAX finds the other hosts itself (TPU_WORKER_HOSTNAMES), each
# host reads its own shard of the data, and checkpoints are written collectively, so WORKDIR must
# be one directory all hosts see (an NFS/Filestore mount). Rerunning the command resumes from the
# latest checkpoint. Exit code 75: stopped by SIGTERM after saving; run it again.
set -euo pipefail
CONFIG="${1:?usage: bash launch/tpu_vm.sh CONFIG [--config.KEY=VALUE ...]}"
shift
WORKDIR="${WORKDIR:-$HOME/workdir/$(basename "$CONFIG" .py)}"

if ! python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("libtpu") is None)'; then
  echo 'launch/tpu_vm.sh: libtpu is not installed, JAX would run on the CPU; run: pip install -e ".[tpu]"' >&2
  exit 2
fi

# Compiled programs are cached across restarts: a resumed 7B run skips minutes of compilation.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/lvlm_jax_xla}"
# Let XLA overlap the FSDP all-gathers with compute.
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_tpu_enable_latency_hiding_scheduler=true}"

exec python -m lvlm_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
