"""The matrix products of the small preset, alone: XLA (jax.jit(jnp.dot)) vs torch.mm, fp32.

  python benchmarks/gemm.py

The train and generation steps spend most of their time in these products (see profile_step.py),
so their speed bounds how the steps compare. Each product runs `--reps` times after a warm-up,
alternating the frameworks; the table shows median GFLOP/s and time ratios.
"""

import argparse
import json
import os
import statistics
import time

SHAPES = [  # (m, k, n, what it is in the small preset)
    (1536, 512, 1408, "MLP gate/up, batch 4 x 384 tokens"),
    (1536, 1408, 512, "MLP down"),
    (1532, 512, 32064, "LM head over the batch"),
    (2048, 2048, 2048, "square (the harness's peak)"),
    (4, 512, 1408, "MLP gate/up, one decoding step of 4 rows"),
    (4, 512, 32064, "LM head, one decoding step of 4 rows"),
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=20, help="timed calls per product and framework")
  parser.add_argument("--out", default="benchmarks/results", help="directory for gemm.json")
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  matmul = jax.jit(jnp.dot)
  rows = []
  print(f"{'m x k x n':>20s} {'XLA GFLOP/s':>12s} {'torch GFLOP/s':>14s} {'speedup':>8s}  product")
  for m, k, n, what in SHAPES:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    runs = {"xla": lambda: matmul(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
    times = {name: [] for name in runs}
    for run in runs.values():
      run()
    for _ in range(args.reps):
      for name, run in runs.items():
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    flops = 2 * m * k * n
    median = {name: statistics.median(t) for name, t in times.items()}
    row = dict(m=m, k=k, n=n, what=what, xla_gflops=flops / median["xla"] / 1e9,
               torch_gflops=flops / median["torch"] / 1e9,
               speedup=median["torch"] / median["xla"])
    rows.append(row)
    print(f"{f'{m} x {k} x {n}':>20s} {row['xla_gflops']:12.1f} {row['torch_gflops']:14.1f} "
          f"{row['speedup']:7.2f}x  {what}")
  print("speedup: torch time / XLA time (above 1: XLA faster)")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "gemm.json")
  with open(path, "w") as f:
    json.dump(rows, f, indent=2)
  print("wrote", path)


if __name__ == "__main__":
  main()
