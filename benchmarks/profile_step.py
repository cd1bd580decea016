"""Where a workload's time goes: a jax.profiler trace of lvlm_jax's step, split among XLA ops.

  python benchmarks/profile_step.py --workload sft --preset small
  python benchmarks/profile_step.py --workload sample --torch   # and transformers' top ops

Builds the workload exactly as the timing scripts do (train_step.py, dpo_step.py, generation.py),
runs it `--warmup` times, then traces `--steps` repetitions. Under --out it leaves the trace (open
it with XProf/TensorBoard or Perfetto), the optimized HLO of every compiled module and
`summary.json`. It prints the traced wall time split among the ops: at each instant the time is
shared equally among the XLA ops running then, so the shares add up to the wall time. Dot products
are grouped by shape, other ops by kind, each tagged forward/backward from its HLO metadata.
"no named op" is wall time during which no op event is open: Eigen's asynchronous dot work, host
dispatch and while-loop bookkeeping land there.

With --torch it also runs transformers' side of the workload under torch.profiler and prints its
top ops by self CPU time.
"""

import argparse
import collections
import glob
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import presets  # noqa: E402

WORKLOADS = {  # name -> (module, setup function, extra arguments after the preset name)
    "sft": ("train_step", "setup_jax", ()),
    "dpo": ("dpo_step", "setup_jax", ()),
    "greedy": ("generation", "setup_jax", ("greedy",)),
    "sample": ("generation", "setup_jax", ("sample",)),
    "sentence": ("generation", "setup_jax", ("sentence",)),
}
# Events on the XLA thread pool's timelines that are not ops.
NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "while")


def flags() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workload", default="sft", choices=sorted(WORKLOADS),
                      help="which benchmark workload to profile")
  parser.add_argument("--preset", default="small", choices=sorted(presets.PRESETS),
                      help="model/batch size preset (see presets.py)")
  parser.add_argument("--warmup", type=int, default=2,
                      help="untraced repetitions first (the first one compiles)")
  parser.add_argument("--steps", type=int, default=1, help="traced repetitions")
  parser.add_argument("--top", type=int, default=25, help="rows of each printed table")
  parser.add_argument("--out", default="benchmarks/results/profile",
                      help="directory for the trace, the HLO dumps and summary.json")
  parser.add_argument("--torch", action="store_true",
                      help="also profile transformers' side with torch.profiler")
  return parser


def hlo_index(dump_dir: str) -> dict[str, str]:
  """Instruction name -> its HLO line, over every optimized module (largest module first, so a
  name that several modules use resolves to the main step's instruction)."""
  index: dict[str, str] = {}
  files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")),
                 key=os.path.getsize, reverse=True)
  computations: dict[str, str] = {}
  for path in files:
    text = open(path).read()
    for m in re.finditer(r"^%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", text, re.M | re.S):
      computations.setdefault(m.group(1), m.group(2))
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)", text, re.M):
      index.setdefault(m.group(1), m.group(2))
  # A fusion that wraps one dot (YNNPACK's) is labelled with that dot's shapes.
  for name, line in list(index.items()):
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called and called.group(1) in computations:
      index[name] = line + "\n" + computations[called.group(1)]
  return index


def describe(name: str, index: dict[str, str]) -> tuple[str, str]:
  """(phase, label) of an op: phase forward/backward; label the dot's shapes or the op's kind."""
  text = index.get(name, "")
  op_name = re.search(r'op_name="([^"]*)"', text)
  phase = "backward" if op_name and "transpose(jvp" in op_name.group(1) else "forward"
  shapes = dict(re.findall(r"%?([\w.\-]+) = (\w+\[[0-9,]*\])", text))
  dots = re.findall(r"(\w+\[[0-9,]*\])\{[0-9,]*\} dot\(%?([\w.\-]+), %?([\w.\-]+)\), "
                    r"([^\n]*?)lhs_contracting_dims=\{([\d,]*)\}, rhs_contracting_dims=\{([\d,]*)\}",
                    text)
  if dots:
    out, lhs, rhs, batch, lc, rc = dots[0]
    engine = "YNNPACK" if name.startswith("ynn_fusion") else "XLA/Eigen"
    batch = " batched" if "batch_dims" in batch else ""
    return phase, (f"dot{batch} {shapes.get(lhs, lhs)} x {shapes.get(rhs, rhs)} -> {out} "
                   f"(contracting {lc}/{rc}, {engine})")
  kind = re.sub(r"\.\d+$", "", name)
  if name.startswith("ynn_fusion"):  # YNNPACK also fuses elementwise ops and reductions
    ops = sorted(set(re.findall(r"= \w+\[[0-9,]*\]\S* (\w+)\(", text)) - {"parameter", "constant"})
    kind += f" ({','.join(ops)})" if ops else ""
  out = re.match(r"\(?(\w+\[[0-9,]*\])", text)
  return phase, kind + (f" -> {out.group(1)}" if out else "")


def split_wall_time(trace_dir: str) -> tuple[collections.Counter, collections.Counter, float, float]:
  """(op name -> ns of wall time, op name -> events, ns with no op open, traced span ns) from the
  XLA thread pool's timelines of the trace's host plane."""
  from jax.profiler import ProfileData
  path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")))[-1]
  plane = next(p for p in ProfileData.from_file(path).planes if p.name == "/host:CPU")
  events = []
  for line in plane.lines:
    if line.name == "python":
      continue
    for e in line.events:
      if e.duration_ns > 0 and not e.name.startswith(NOT_OPS):
        events.append((e.start_ns, e.start_ns + e.duration_ns, e.name))
  events.sort()
  edges = sorted({t for s, e, _ in events for t in (s, e)})
  share: collections.Counter = collections.Counter()
  calls = collections.Counter(name for _, _, name in events)
  idle, open_events, i = 0.0, [], 0
  for a, b in zip(edges, edges[1:]):
    while i < len(events) and events[i][0] <= a:
      open_events.append(events[i])
      i += 1
    open_events = [e for e in open_events if e[1] > a]
    if not open_events:
      idle += b - a
      continue
    for _, _, name in open_events:
      share[name] += (b - a) / len(open_events)
  return share, calls, idle, (edges[-1] - edges[0]) if edges else 0.0


def summarize(share: collections.Counter, calls: collections.Counter, idle: float, span: float,
              index: dict[str, str], steps: int) -> dict:
  groups: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for name, ns in share.items():
    key = describe(name, index)
    groups[key] += ns
    counts[key] += calls[name]
  per_step = lambda ns: ns / 1e6 / steps  # noqa: E731
  dot_ms = sum(ns for (_, label), ns in groups.items() if label.startswith("dot "))
  return {
      "wall_ms_per_step": per_step(span), "no_named_op_ms_per_step": per_step(idle),
      "dot_ms_per_step": per_step(dot_ms),
      "groups": [{"phase": phase, "op": label, "ms_per_step": per_step(ns),
                  "calls_per_step": counts[(phase, label)] / steps}
                 for (phase, label), ns in groups.most_common()],
  }


def print_summary(summary: dict, top: int) -> None:
  wall = summary["wall_ms_per_step"]
  print(f"\ntraced wall time per step: {wall:.0f} ms; in dot products "
        f"{summary['dot_ms_per_step']:.0f} ms ({100 * summary['dot_ms_per_step'] / wall:.0f}%), "
        f"no named op {summary['no_named_op_ms_per_step']:.0f} ms")
  print(f"{'ms/step':>9s} {'%':>5s} {'calls':>6s}  phase     op")
  for g in summary["groups"][:top]:
    print(f"{g['ms_per_step']:9.1f} {100 * g['ms_per_step'] / wall:5.1f} {g['calls_per_step']:6.0f}"
          f"  {g['phase']:9s} {g['op']}")


def profile_torch(workload: str, preset: str, warmup: int, top: int) -> None:
  import importlib

  import torch
  module, _, extra = WORKLOADS[workload]
  run = getattr(importlib.import_module(module), "setup_torch")(preset, *extra)
  for _ in range(warmup):
    run()
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    run()
  print(f"\ntransformers, one step under torch.profiler: {time.perf_counter() - start:.2f} s")
  print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def main() -> None:
  args = flags().parse_args()
  out = os.path.abspath(args.out)
  dump_dir, trace_dir = os.path.join(out, "hlo"), os.path.join(out, "trace")
  for stale in (dump_dir, trace_dir):  # a previous run's modules would mislabel this run's ops
    shutil.rmtree(stale, ignore_errors=True)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_dump_to={dump_dir} --xla_dump_hlo_as_text").strip()
  import importlib

  import jax
  module, function, extra = WORKLOADS[args.workload]
  presets.weights_dir(args.preset)
  run = getattr(importlib.import_module(module), function)(args.preset, *extra)
  for i in range(args.warmup):
    start = time.perf_counter()
    run()
    print(f"warm-up {i + 1}: {time.perf_counter() - start:.2f} s", flush=True)
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(args.steps):
      run()
    elapsed = time.perf_counter() - start
  print(f"traced {args.steps} step(s): {elapsed / args.steps:.2f} s each")
  share, calls, idle, span = split_wall_time(trace_dir)
  summary = summarize(share, calls, idle, span, hlo_index(dump_dir), args.steps)
  summary.update(workload=args.workload, preset=args.preset, seconds_per_step=elapsed / args.steps)
  print_summary(summary, args.top)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"\ntrace: {trace_dir}\nHLO: {dump_dir}\nsummary: {os.path.join(out, 'summary.json')}")
  if args.torch:
    profile_torch(args.workload, args.preset, args.warmup, args.top)


if __name__ == "__main__":
  main()
