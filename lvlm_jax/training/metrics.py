"""Training metrics: stdout, `workdir/metrics.jsonl`, TensorBoard, and the numbers behind MFU.

MFU here = FLOPs of the compiled step (XLA's cost analysis of what actually runs, so remat
recomputation counts: strictly this is hardware FLOPs utilisation) / step time / peak FLOPs of
all devices. The peak is the vendor's dense bf16 figure per chip for known TPUs and GPUs, a
matmul measured on this host for CPUs, or `train.peak_flops` when set; `peak_source` says which.
"""

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

# Dense bf16 FLOP/s per JAX device, from the vendors' spec sheets. Matched as substrings of
# `device.device_kind`, most specific first.
PEAK_FLOPS = (
    ("TPU v6 lite", 918e12),  # Trillium / v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),       # v5p reports "TPU v5"
    ("TPU v4", 275e12),
    ("H200", 989e12),
    ("H100", 989e12),         # SXM; the PCIe card is lower (756e12)
    ("A100", 312e12),
    ("L4", 121e12),
)


def measured_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 [size, size] matmul on the default device, best of `repeats`."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops(override: float = 0.0) -> tuple[float | None, str]:
  """(peak FLOP/s of all devices of the run, where the figure comes from); None when unknown."""
  devices = jax.devices()
  if override:
    return override * len(devices), f"train.peak_flops={override:g} per device"
  kind = devices[0].device_kind
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops * len(devices), f"spec sheet: {name} dense bf16 {flops / 1e12:g} TFLOP/s per device"
  if devices[0].platform == "cpu":
    # Forced CPU devices share the host's cores, so the host, not the device, is the unit.
    per_host = measured_cpu_flops()
    return per_host * jax.process_count(), (f"measured: f32 1024^3 matmul on this host, "
                                            f"{per_host / 1e9:.1f} GFLOP/s per host")
  return None, f"unknown for device kind {kind!r}; set train.peak_flops"


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled (AOT) function over all devices, per XLA's cost analysis."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # not every backend implements it; MFU is then unknown
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if not flops or flops < 0:
    return None
  # The SPMD-partitioned program is one device's share.
  return float(flops) * jax.device_count()


def _format(value: float) -> str:
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"


def _drop_after(path: str, step: int) -> None:
  """Keeps the records of `path` (metrics JSONL) up to `step`, and no torn last line."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, "rb") as f:
    for line in f.read().split(b"\n"):
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line)
  with open(path + ".tmp", "wb") as f:
    f.write(b"".join(line + b"\n" for line in kept))
  os.replace(path + ".tmp", path)


class MetricsWriter:
  """Writes scalars to stdout (above the progress bar), a JSONL file and TensorBoard; only
  process 0 writes anything.

  resumed_from: the step the run (re)starts after. What an earlier attempt logged past it (the
  steps after its last checkpoint, which this attempt runs again) is dropped from the JSONL, and
  TensorBoard is told to purge it, so every step is logged once.
  """

  def __init__(self, workdir: str | None, *, tensorboard: bool = True, resumed_from: int = 0):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tensorboard = self._clock_path = None
    self._started, self._earlier = time.time(), 0.0
    if self.enabled and workdir:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      _drop_after(path, resumed_from)
      self._clock_path = os.path.join(workdir, "wall_time.json")
      try:
        with open(self._clock_path) as f:
          clock = json.load(f)
        self._earlier = float(clock["earlier_attempts_s"]) + float(clock["last_attempt_s"])
      except (OSError, ValueError, KeyError, TypeError):
        self._earlier = 0.0
      self._jsonl = open(path, "a")
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                          purge_step=resumed_from + 1 if resumed_from else None)

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train",
            echo: bool = True) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, "kind": prefix, **scalars}) + "\n")
      self._jsonl.flush()
      self._save_clock()
    if self._tensorboard is not None:
      for key, value in scalars.items():
        if np.isfinite(value):
          self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
      self._tensorboard.flush()
    if echo:
      line = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items())
      tqdm.tqdm.write(f"[{prefix}] step {step} | {line}")

  def wall_time_s(self) -> float:
    """Seconds this run has taken over all its attempts (a killed attempt counts up to its last
    logged step)."""
    return self._earlier + time.time() - self._started

  def _save_clock(self) -> None:
    if self._clock_path is None:
      return
    with open(self._clock_path + ".tmp", "w") as f:
      json.dump({"earlier_attempts_s": self._earlier,
                 "last_attempt_s": time.time() - self._started}, f)
    os.replace(self._clock_path + ".tmp", self._clock_path)

  def close(self) -> None:
    self._save_clock()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tensorboard is not None:
      self._tensorboard.close()
