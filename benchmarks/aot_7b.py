"""Proof of scale without an accelerator: the LLaVA-1.5-7B train steps lowered and compiled
ahead of time on a simulated 8-device CPU mesh, nothing executed, nothing allocated.

  python benchmarks/aot_7b.py                      # the default sweep (see --help)
  python benchmarks/aot_7b.py --steps sft_lora --meshes fsdp8 --batch 1 --seq 1024 --remat full

For each (step, mesh, batch, seq, remat) the project's own pieces build the program: the `7b`
preset's HF config through `building.abstract_model` (bf16 weights and compute by default, LoRA
and remat applied as a run applies them), `state.abstract_state` / `state_shardings` (the
sharding rules of lvlm_jax/sharding.py), and `steps.jit_train_step` over `steps.sft_step` or
`dpo.dpo_step` (in-step reference, `dpo.reference_part`), as train_step.py and dpo_step.py build
them. The parameters are `jax.ShapeDtypeStruct`s with their shardings, so `.lower().compile()`
runs XLA's SPMD partitioner and buffer assignment for one device of the mesh.

Written per combination (JSON under --out): `compiled.memory_analysis()` of one device
(argument, output, aliased, temp and generated-code bytes; total = argument + output - aliased
+ temp + code, the donated state counted once), `compiled.cost_analysis()` FLOPs of one device's
program, the compile time and this process's peak RSS while compiling. The table says which
combinations fit a chip's HBM: v5e 16 GiB, v5p 95 GiB, H100 80 GiB (per-device total <= capacity;
XLA:CPU's buffer assignment stands in for the accelerator's, which fuses differently, so a
combination within ~10% of a capacity is marginal).

XLA:CPU's temp figure overstates an accelerator's: it runs bf16 matrix products in f32, so every
all-gathered bf16 weight gets a whole f32 copy, and with the 32 layers unrolled the scheduler
keeps many of them live at once. In sft_lora on fsdp8 (1 x 1024 tokens per device, full remat,
76 GiB per device) the memory-usage report of `XLA_FLAGS=--xla_dump_to=DIR` lists 52 GiB of
allocations that hold nothing but f32 copies of whole weight matrices ([4096, 11008] and the
like). TPU and GPU multiply bf16 natively; scanned layers (issue 19) would also bound the
gathered weights to about one layer's.

FLOPs beside XLA's count (all devices): `expected` is train_step.py's MaxText-style count for
the step's global batch: passes x 2 x (LLM + projector matmul parameters) x tokens + causal
attention + the frozen vision tower's forward, with passes = 3 for full fine-tuning (forward,
activation and weight gradients), 2 for LoRA (the frozen base computes no weight gradient; the
adapters' FLOPs are left out), plus 1 for DPO's reference forward; and `6NT` = 6 x N x tokens
with N the LLM's and projector's parameters (trainable or not). XLA counts recomputation
(remat) and counts a loop body once (the attention's query blocks run in a `lax.map`), so its
figure can sit on either side of these.
"""

import argparse
import dataclasses
import itertools
import json
import os
import sys
import tempfile
import time

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported anywhere
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_step  # noqa: E402
import harness  # noqa: E402
import presets  # noqa: E402
import train_step  # noqa: E402

GIB = 2**30
CHIPS = {"v5e": 16 * GIB, "v5p": 95 * GIB, "H100": 80 * GIB}
MESHES = {"fsdp8": (1, 8, 1), "fsdp4_tp2": (1, 4, 2)}
STEPS = ("sft_lora", "sft_full", "dpo_lora", "dpo_full")
# LLaVA-1.5's LoRA recipe: rank 128, alpha 256 on every LLM projection; the projector trains too.
LORA_TARGET = r"llm\.layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_TRAINABLE = r".*\.lora_[ab]|projector\..*"


def model_config(hf_dir: str, lora: bool, remat: str, dtype: str, param_dtype: str):
  from lvlm_jax.models.building import ModelConfig
  from lvlm_jax.models.lora import LoraConfig
  return ModelConfig(hf_dir=hf_dir, tokenizer="", dtype=dtype, param_dtype=param_dtype,
                     remat=remat, use_lora=lora,
                     lora=LoraConfig(rank=128, alpha=256.0, target=LORA_TARGET))


def abstract_batch(kind: str, preset: presets.Preset, mesh) -> dict:
  """The step's batch as ShapeDtypeStructs split by rows (the data layer's keys and dtypes)."""
  import jax
  from lvlm_jax.sharding import batch_sharding
  arrays = (dpo_step.preference_arrays(preset) if kind.startswith("dpo")
            else presets.batch_arrays(preset))
  sharding = batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in arrays.items()}


def compile_step(kind: str, mesh_name: str, batch: int, seq: int, remat: str, hf_dir: str,
                 dtype: str, param_dtype: str) -> dict:
  """Lowers and compiles one step; its memory and cost analyses, compile time and peak RSS."""
  import jax
  from lvlm_jax.models import building
  from lvlm_jax.sharding import abstract_tree, batch_shards, make_mesh
  from lvlm_jax.training import dpo, optim, state as train_state, steps
  from lvlm_jax.training.preference import PreferenceLossConfig

  mesh = make_mesh(MESHES[mesh_name])
  lora = kind.endswith("lora")
  rows = batch * batch_shards(mesh)  # SFT: sequences; DPO: pairs, each 2 sequences
  sequences = rows * 2 if kind.startswith("dpo") else rows
  preset = dataclasses.replace(presets.PRESETS["7b"], batch=sequences, seq_len=seq)
  config = optim.OptimConfig(lr=train_step.LR, warmup_ratio=0.0, schedule="constant",
                             clip_norm=1.0,
                             trainable=LORA_TRAINABLE if lora else train_step.TRAINABLE)
  abstract_model = building.abstract_model(
      model_config(hf_dir, lora, remat, dtype, param_dtype), None)
  graphdef, params, frozen = train_state.split_model(abstract_model,
                                                     optim.trainable_filter(config))
  tx = optim.make_optimizer(config, 1000, params)
  abstract = train_state.abstract_state(params, frozen, tx)
  if kind.startswith("dpo"):
    abstract["ref"] = dpo.reference_part(params)
    step = steps.jit_train_step(dpo.dpo_step, train_state.state_shardings(abstract, mesh), mesh,
                                graphdef=graphdef, tx=tx,
                                loss=PreferenceLossConfig("sigmoid", beta=dpo_step.BETA))
  else:
    step = steps.jit_train_step(steps.sft_step, train_state.state_shardings(abstract, mesh), mesh,
                                graphdef=graphdef, tx=tx)
  state = abstract_tree(abstract, train_state.state_shardings(abstract, mesh))
  batch_structs = abstract_batch(kind, preset, mesh)

  harness.reset_peak_rss()
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(state, batch_structs)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start - lower_s
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost  # a list of one dict on older jax
  per_device = {
      "argument": memory.argument_size_in_bytes, "output": memory.output_size_in_bytes,
      "alias": memory.alias_size_in_bytes, "temp": memory.temp_size_in_bytes,
      "generated_code": memory.generated_code_size_in_bytes}
  per_device["total"] = (per_device["argument"] + per_device["output"] - per_device["alias"]
                         + per_device["temp"] + per_device["generated_code"])

  passes = 2.0 if lora else 3.0
  expected = train_step.train_flops(preset, passes=passes)
  if kind.startswith("dpo"):
    expected += train_step.train_flops(preset, passes=1.0)
  n_lm = train_state.count_params(nnx_part(abstract_model, r"(llm|projector)\..*"))
  tokens = sequences * seq
  devices = mesh.devices.size
  return {
      "step": kind, "mesh": mesh_name, "mesh_shape": dict(mesh.shape), "devices": devices,
      "batch_per_shard": batch, "global_sequences": sequences, "seq_len": seq, "remat": remat,
      "dtype": dtype, "param_dtype": param_dtype,
      "trainable_params": train_state.count_params(params),
      "frozen_params": train_state.count_params(frozen),
      "memory_per_device_bytes": per_device,
      "fits": {chip: per_device["total"] <= capacity for chip, capacity in CHIPS.items()},
      "xla_flops_per_device": cost.get("flops"),
      "xla_flops_all_devices": cost.get("flops", 0.0) * devices,
      "expected_flops": expected, "expected_formula": f"train_flops(passes={passes:g})"
      + (" + train_flops(passes=1) (reference)" if kind.startswith("dpo") else ""),
      "six_n_t": 6.0 * n_lm * tokens, "n_llm_projector_params": n_lm, "tokens": tokens,
      "lower_s": lower_s, "compile_s": compile_s, "compile_peak_rss_gib": harness.peak_rss_gib()}


def nnx_part(model, pattern: str):
  """The parameters of `model` whose dotted path matches `pattern` (an abstract State)."""
  from flax import nnx
  from lvlm_jax.training import optim
  return nnx.state(model, optim.trainable_filter(dataclasses.replace(optim.OptimConfig(),
                                                                     trainable=pattern)))


def print_table(rows: list[dict]) -> None:
  print(f"\n{'step':9s} {'mesh':10s} {'b/shard':>7s} {'seq':>5s} {'remat':6s} "
        f"{'arg':>7s} {'temp':>7s} {'total':>7s} GiB/dev  "
        + " ".join(f"{c:>5s}" for c in CHIPS)
        + f" {'XLA/expected':>12s} {'compile':>8s}")
  for r in rows:
    m = {k: v / GIB for k, v in r["memory_per_device_bytes"].items()}
    ratio = r["xla_flops_all_devices"] / r["expected_flops"]
    print(f"{r['step']:9s} {r['mesh']:10s} {r['batch_per_shard']:7d} {r['seq_len']:5d} "
          f"{r['remat']:6s} {m['argument']:7.2f} {m['temp']:7.2f} {m['total']:7.2f}          "
          + " ".join(f"{'yes' if r['fits'][c] else 'no':>5s}" for c in CHIPS)
          + f" {ratio:12.2f} {r['compile_s']:7.0f}s")


def main() -> None:
  from lvlm_jax.models.building import DTYPES
  from lvlm_jax.models.llm import REMAT_POLICIES
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", nargs="+", default=["sft_lora", "sft_full", "dpo_lora"],
                      choices=STEPS, help="train steps: SFT or DPO (in-step reference), LoRA "
                      "(rank 128 on the LLM's projections, + projector) or full (LLM + projector)")
  parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES),
                      help="('data', 'fsdp', 'tensor') meshes over the 8 simulated devices")
  parser.add_argument("--batch", nargs="+", type=int, default=[1],
                      help="rows per batch shard (fsdp8: x8, fsdp4_tp2: x4 global); SFT rows are "
                      "sequences, DPO rows are pairs (2 sequences each)")
  parser.add_argument("--seq", nargs="+", type=int, default=[1024],
                      help="sequence lengths (576 of them are image tokens)")
  parser.add_argument("--remat", nargs="+", default=["full"], choices=list(REMAT_POLICIES),
                      help="decoder-layer remat policies")
  parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="compute dtype")
  parser.add_argument("--param_dtype", default="bfloat16", choices=DTYPES,
                      help="weights and Adam moments (LoRA adapters take their base's dtype)")
  parser.add_argument("--out", default="benchmarks/results", help="directory of aot_7b.json")
  args = parser.parse_args()

  import jax
  result = {"workload": "aot_7b", "jax": jax.__version__, "devices": jax.device_count(),
            "machine": harness.machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "chips_bytes": CHIPS,
            "command": " ".join(sys.argv), "rows": []}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "aot_7b.json")
  with tempfile.TemporaryDirectory() as hf_dir:
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
      json.dump(presets.hf_config(presets.PRESETS["7b"]), f)
    for kind, mesh_name, batch, seq, remat in itertools.product(
        args.steps, args.meshes, args.batch, args.seq, args.remat):
      print(f"compiling {kind} {mesh_name} batch/shard {batch} seq {seq} remat {remat}",
            flush=True)
      row = compile_step(kind, mesh_name, batch, seq, remat, hf_dir, args.dtype, args.param_dtype)
      print(f"  {row['compile_s']:.0f} s compile, peak RSS {row['compile_peak_rss_gib']:.1f} GiB, "
            f"total {row['memory_per_device_bytes']['total'] / GIB:.2f} GiB/device", flush=True)
      result["rows"].append(row)
      with open(path, "w") as f:  # after every program: a sweep cut short keeps what it compiled
        json.dump(result, f, indent=2)
  print_table(result["rows"])
  print("wrote", path)


if __name__ == "__main__":
  main()
