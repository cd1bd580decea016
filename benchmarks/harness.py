"""Side-by-side timing of lvlm_jax and transformers: one worker process per framework, run alternately.

Each framework lives in its own process so that its peak RSS is its own, and neither's thread pools
or allocator state disturb the other. The parent alternates repetitions (jax, torch, jax, torch,
...) so that slow drifts of the machine hit both equally, and reports medians.

A workload is a module-level function `setup(preset: str, **options) -> run`, where `run()` does one
repetition and blocks until its results are computed (e.g. `jax.block_until_ready`); what it
returns is ignored.

Peak RSS is each worker's own high-water mark (Linux VmHWM), in three phases, the mark reset
between them: setup (imports, loading the weights, building the step), the first call (JAX
compiles here) and the steady repetitions after it (warm-up and timed); `peak_rss_gib` is the
largest. Not `ru_maxrss`: a spawned worker's starts at its parent's RSS at the fork (Linux keeps
the pre-exec high-water mark), so a parent that had just built the weights with torch would
raise both workers' peaks to its own size.
"""

import argparse
import importlib
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import numpy as np

import presets


def peak_rss_gib() -> float:
  """This process's own peak resident set in GiB (VmHWM) since it started or since the last
  `reset_peak_rss()`; `ru_maxrss` where /proc is missing (not reset there)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 2**20  # kB -> GiB
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def cpu_steal_seconds() -> float:
  """Seconds of CPU the hypervisor took from this machine's cores since boot (/proc/stat's steal
  column; 0 where there is none). On a shared VM, time stolen during a repetition slows it without
  anything in the process doing more work, so each repetition records it."""
  try:
    with open("/proc/stat") as f:
      fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")
  except (OSError, IndexError, ValueError):
    return 0.0


def _worker(connection, module: str, function: str, preset: str, options: dict, env: dict) -> None:
  os.environ.update(env)
  setup = getattr(importlib.import_module(module), function)
  start = time.perf_counter()
  run = setup(preset, **options)
  connection.send(("ready", time.perf_counter() - start))
  while True:
    command = connection.recv()
    if command == "stop":
      break
    if command == "peak":  # the phase's peak RSS, then a new phase
      connection.send(("peak", peak_rss_gib(), reset_peak_rss()))
      continue
    steal, start = cpu_steal_seconds(), time.perf_counter()
    run()
    connection.send(("time", time.perf_counter() - start, cpu_steal_seconds() - steal))
  connection.send(("peak", peak_rss_gib(), False))


class Worker:
  """A framework's setup and repetitions in a child process (spawned: no inherited JAX/torch state)."""

  def __init__(self, name: str, target: str, preset: str, options: dict, env: dict | None = None):
    module, function = target.split(":")
    self.name = name
    context = mp.get_context("spawn")
    self._parent, child = context.Pipe()
    self._process = context.Process(target=_worker, daemon=True,
                                    args=(child, module, function, preset, options, env or {}))
    self._process.start()
    _, self.setup_seconds = self._expect("ready")
    self.times: list[float] = []
    self.steals: list[float] = []  # CPU seconds stolen from the machine during each timed run

  def _expect(self, kind: str):
    if not self._parent.poll(3600):
      raise RuntimeError(f"{self.name}: worker did not answer within an hour")
    try:
      message = self._parent.recv()
    except EOFError:
      raise RuntimeError(f"{self.name}: worker died (its traceback is above)") from None
    if message[0] != kind:
      raise RuntimeError(f"{self.name}: expected {kind}, got {message}")
    return message

  def run(self) -> tuple[float, float]:
    """(seconds, CPU seconds stolen by the hypervisor meanwhile) of one repetition."""
    self._parent.send("run")
    return self._expect("time")[1:]

  def phase_peak(self) -> tuple[float, bool]:
    """(peak RSS in GiB since the previous phase, whether the worker could reset it: if not, the
    next phase's peak includes this one's)."""
    self._parent.send("peak")
    return self._expect("peak")[1:]

  def stop(self) -> float:
    """Ends the worker; returns the peak RSS in GiB of its last phase."""
    self._parent.send("stop")
    rss = self._expect("peak")[1]
    self._process.join(timeout=60)
    return rss


def compare(workload: str, preset: str, *, ours: str, theirs: str | None, reps: int, warmup: int,
            options: dict | None = None, work: float | None = None, work_unit: str = "",
            flops: float | None = None, peak_flops: float | None = None,
            devices: int = 1) -> dict[str, Any]:
  """Times `ours` (and `theirs`, when given) alternately; `work` = units per repetition (e.g. tokens).

  The first repetition of each framework is reported as its first-call time (compilation for JAX);
  `warmup` repetitions after it are discarded, then `reps` are timed.
  """
  options = options or {}
  workers = [Worker("lvlm_jax", ours, preset, options)]
  if theirs:
    workers.append(Worker("transformers", theirs, preset, options))
  peaks = {w.name: {"setup": w.phase_peak()} for w in workers}
  first = {}
  for w in workers:
    first[w.name] = w.run()[0]
    peaks[w.name]["first_call"] = w.phase_peak()
  for _ in range(warmup):
    for w in workers:
      w.run()
  for _ in range(reps):
    for w in workers:
      seconds, stolen = w.run()
      w.times.append(seconds)
      w.steals.append(stolen)
  result: dict[str, Any] = {"workload": workload, "preset": preset, "reps": reps, "options": options,
                            "machine": machine()}
  for w in workers:
    median = statistics.median(w.times)
    steady = w.stop()
    (setup_peak, phased), (first_peak, _) = peaks[w.name]["setup"], peaks[w.name]["first_call"]
    entry = {"median_s": median, "min_s": min(w.times), "times_s": w.times,
             "cpu_stolen_s": w.steals,
             "first_call_s": first[w.name],
             "setup_s": w.setup_seconds, "peak_rss_gib": max(setup_peak, first_peak, steady)}
    if phased:  # else each phase's number would include the ones before it
      entry.update(setup_peak_rss_gib=setup_peak, first_call_peak_rss_gib=first_peak,
                   steady_peak_rss_gib=steady)
    if work:
      entry[f"{work_unit}_per_s"] = work / median
      if devices > 1:
        entry[f"{work_unit}_per_s_per_device"] = work / median / devices
    result[w.name] = entry
  if flops:
    ours_entry = result["lvlm_jax"]
    ours_entry["flops_per_step"] = flops
    ours_entry["achieved_flops_per_s"] = flops / ours_entry["median_s"]
    if peak_flops:
      ours_entry["fraction_of_peak"] = flops / ours_entry["median_s"] / peak_flops
  if theirs:
    result["speedup"] = result["transformers"]["median_s"] / result["lvlm_jax"]["median_s"]
    result["speedup_of_min"] = result["transformers"]["min_s"] / result["lvlm_jax"]["min_s"]
    ours_entry, theirs_entry = result["lvlm_jax"], result["transformers"]
    result["memory_ratio"] = ours_entry["peak_rss_gib"] / theirs_entry["peak_rss_gib"]
    if "steady_peak_rss_gib" in ours_entry and "steady_peak_rss_gib" in theirs_entry:
      result["steady_memory_ratio"] = (ours_entry["steady_peak_rss_gib"]
                                       / theirs_entry["steady_peak_rss_gib"])
  return result


# The vector-ISA flags of /proc/cpuinfo that change how fast float32 matmuls run.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16")


def _cpuinfo() -> tuple[str, list[str]]:
  """(CPU model name, the VECTOR_FLAGS it has) from /proc/cpuinfo."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
        if flags and model:
          break
  except OSError:
    pass
  return model, [flag for flag in VECTOR_FLAGS if flag in flags]


def memory_bandwidth_gb_s(megabytes: int = 256, reps: int = 5) -> float:
  """Copy bandwidth of this machine's memory: bytes read + written by a numpy copy of a
  `megabytes` float32 array (far larger than any cache), best of `reps`, in GB/s."""
  src = np.ones(megabytes * 2**20 // 4, np.float32)
  dst = np.empty_like(src)
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * src.nbytes / best / 1e9


def machine() -> dict[str, Any]:
  """The facts a benchmark's numbers depend on: CPU model and vector ISA, cores, memory bandwidth."""
  model, isa = _cpuinfo()
  return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
          "cpu_model": model, "vector_isa": isa,
          "memory_bandwidth_gb_s": round(memory_bandwidth_gb_s(), 1),
          "python": platform.python_version()}


def measure_matmul_peak(size: int = 2048, reps: int = 10) -> dict[str, float]:
  """FLOP/s of a fp32 [size,size] @ [size,size] on this machine, jitted in XLA and in torch
  (oneDNN/MKL), each in a worker of its own like the workloads: {"xla": ..., "torch": ...}. The
  faster is the ceiling a step's fraction of peak is measured against: a step whose matmuls XLA
  hands to a faster library than its own plain dot can beat XLA's matmul alone (a DPO step
  measured at 107% of it, 2026-12-01)."""
  context = mp.get_context("spawn")
  with context.Pool(1) as pool:
    xla = pool.apply(_matmul_peak, (size, reps))
  with context.Pool(1) as pool:
    torch_peak = pool.apply(_torch_matmul_peak, (size, reps))
  return {"xla": xla, "torch": torch_peak}


def device_count() -> int:
  """Number of JAX devices the workers will see (asked in a worker of its own)."""
  context = mp.get_context("spawn")
  with context.Pool(1) as pool:
    return pool.apply(_device_count)


def _device_count() -> int:
  import jax
  return jax.device_count()


def flops_peak(peak_tflops: float | None) -> tuple[float, int, str]:
  """(peak FLOP/s of all devices, device count, where the figure comes from). With
  `peak_tflops` (a chip's datasheet bf16 dense peak, as MaxText computes MFU) it is that times the
  device count; else a jitted fp32 matmul measured on this machine."""
  devices = device_count()
  if peak_tflops:
    return peak_tflops * 1e12 * devices, devices, f"datasheet {peak_tflops} TFLOP/s x {devices} devices"
  peaks = measure_matmul_peak()
  best = max(peaks, key=peaks.get)
  return peaks[best], devices, ("measured fp32 2048^3 matmul on this machine, the faster of "
                                + " and ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items())
                                + f" ({best})")


def _best_seconds(run, reps: int) -> float:
  run()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return min(times)


def _torch_matmul_peak(size: int, reps: int) -> float:
  import torch
  a = torch.randn(size, size, dtype=torch.float32)
  return 2 * size**3 / _best_seconds(lambda: a @ a, reps)


def _matmul_peak(size: int, reps: int) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  return 2 * size**3 / _best_seconds(lambda: matmul(a).block_until_ready(), reps)


def print_table(result: dict[str, Any]) -> None:
  frameworks = [k for k in ("lvlm_jax", "transformers") if k in result]
  keys = [k for k in result["lvlm_jax"] if k not in ("flops_per_step", "times_s", "cpu_stolen_s")]
  print(f"\n{result['workload']} ({result['preset']}), {result['reps']} timed repetitions each")
  print(f"{'':28s}" + "".join(f"{f:>16s}" for f in frameworks))
  for key in keys:
    cells = []
    for f in frameworks:
      value = result[f].get(key)
      cells.append(f"{value:16.4g}" if isinstance(value, (int, float)) else f"{'-':>16s}")
    print(f"{key:28s}" + "".join(cells))
  if "speedup" in result:
    steady = (f" (after the first call: {result['steady_memory_ratio']:.2f})"
              if "steady_memory_ratio" in result else "")
    print(f"speedup (transformers time / lvlm_jax time): {result['speedup']:.2f}x of medians, "
          f"{result['speedup_of_min']:.2f}x of minima; "
          f"peak RSS ratio (lvlm_jax / transformers): {result['memory_ratio']:.2f}{steady}")
  for f in frameworks:
    stolen, wall = sum(result[f]["cpu_stolen_s"]), sum(result[f]["times_s"])
    print(f"{f}: the hypervisor took {stolen:.1f} CPU-s during {wall:.1f} s of timed runs")


def write_json(result: dict[str, Any], directory: str) -> str:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{result['workload']}_{result['preset']}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def common_flags(description: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="small", choices=sorted(presets.PRESETS),
                      help="model/batch size preset (see presets.py): small runs on a CPU against "
                      "transformers, 7b/13b on accelerators, lvlm_jax only")
  parser.add_argument("--reps", type=int, default=5, help="timed repetitions per framework")
  parser.add_argument("--warmup", type=int, default=1,
                      help="untimed repetitions after the first call, per framework")
  parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON result")
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="one chip's datasheet peak in TFLOP/s (bf16 dense, e.g. TPU v5e 197, "
                      "v5p 459, H100 SXM 989): MFU against it x the device count, as MaxText "
                      "reports it; default: a fp32 matmul measured on this machine")
  parser.add_argument("--attention", default="auto", choices=("auto", "xla", "fused"),
                      help="lvlm_jax's decoder attention (model.attention): the reference XLA "
                      "path, jax.nn.dot_product_attention (cuDNN on a GPU), or auto")
  parser.add_argument("--no_transformers", action="store_true",
                      help="time lvlm_jax alone (accelerator presets have no transformers side)")
  return parser
