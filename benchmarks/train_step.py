"""Train-step benchmark (SFT), lvlm_jax vs transformers on the same weights and batch.

  python benchmarks/train_step.py --preset small   # one AdamW update: CE on the response tokens

(The DPO step is benchmarks/dpo_step.py; it reuses this file's model, optimizer and FLOP count.)

Both sides train the projector and the LLM (full fine-tuning, fp32), keep the vision tower
frozen, clip gradients at 1.0 and use AdamW. FLOPs are counted as MaxText does: 6 x matmul
parameters x tokens for the trained path, 2 x for the frozen vision tower's forward, plus causal
attention (halved).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import presets  # noqa: E402

LR = 1e-5


def train_flops(preset: presets.Preset, passes: float = 3.0) -> float:
  """FLOPs of `passes` forward-pass equivalents of the LLM and projector over the preset's batch
  plus one forward of the frozen vision tower over its images: passes = 3 is an SFT step
  (forward + backward), passes = 1 a forward only (DPO's reference)."""
  v, t = preset.vision, preset.text
  b, seq = preset.batch, preset.seq_len
  patches = (v["image_size"] // v["patch_size"]) ** 2
  vision_layer = 4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"] * v["intermediate_size"]
  # LLaVA's feature layer -2: the last vision layer does not run.
  vision = 2 * vision_layer * (v["num_hidden_layers"] - 1) * b * (patches + 1)
  vision += 4 * (patches + 1) ** 2 * v["hidden_size"] * (v["num_hidden_layers"] - 1) * b
  d, heads, kv = t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"]
  head_dim = d // heads
  layer = d * head_dim * (2 * heads + 2 * kv) + 3 * d * t["intermediate_size"]
  matmul_params = t["num_hidden_layers"] * layer + d * t["vocab_size"]
  projector = v["hidden_size"] * d + d * d
  dense = 2 * passes * (matmul_params * b * seq + projector * b * patches)
  attention = passes * 4 * b * seq**2 * heads * head_dim * t["num_hidden_layers"] / 2
  return vision + dense + attention


TRAINABLE = r"(llm|projector)\..*"


def jax_train_state(preset_name: str, reference: bool = False, attention: str = "auto") -> tuple:
  """The preset's model as a train state on a one-axis mesh, projector + LLM trainable, AdamW
  (constant lr, clip 1.0): (mesh, graphdef, tx, shardings, state). With `reference`, the state
  also holds "ref", a frozen copy of the trainable parameters (DPO's in-step reference model)."""
  from lvlm_jax.sharding import make_mesh
  from lvlm_jax.training import dpo, optim, state as train_state

  model = presets.lvlm_jax_model(preset_name, attention)
  config = optim.OptimConfig(lr=LR, trainable=TRAINABLE, warmup_ratio=0.0, schedule="constant",
                             clip_norm=1.0)
  graphdef, params, frozen = train_state.split_model(model, optim.trainable_filter(config))
  tx = optim.make_optimizer(config, 1000, params)
  mesh = make_mesh()
  abstract = train_state.abstract_state(params, frozen, tx)
  if reference:
    abstract["ref"] = dpo.reference_part(params)
  shardings = train_state.state_shardings(abstract, mesh)
  state = train_state.init_state(params, frozen, tx, 0, shardings)
  if reference:
    state = dpo.with_reference(state)
  return mesh, graphdef, tx, shardings, state


def torch_model(preset_name: str) -> tuple:
  """The preset's transformers model in train mode with its vision tower frozen, its trainable
  parameters, and AdamW over them (no weight decay, like lvlm_jax's default): (model, trainable,
  optimizer)."""
  import torch
  import transformers

  model = transformers.LlavaForConditionalGeneration.from_pretrained(
      presets.weights_dir(preset_name)).train()
  model.model.vision_tower.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  return model, trainable, torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)


def setup_jax(preset_name: str, attention: str = "auto"):
  from lvlm_jax.training import steps

  mesh, graphdef, tx, shardings, state = jax_train_state(preset_name, attention=attention)
  batch = presets.batch_arrays(presets.PRESETS[preset_name])
  step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
  return jax_runner(step, state, batch, mesh)


def jax_runner(step, state, batch, mesh):
  """run() -> metrics: one `step` on `batch`, carrying the (donated) state from call to call."""
  import jax

  state = [state]

  def run():
    with jax.set_mesh(mesh):
      state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics)
    return metrics
  return run


def setup_torch(preset_name: str, attention: str = "auto"):
  del attention  # transformers runs its own (sdpa on CPU)
  import torch

  model, trainable, optimizer = torch_model(preset_name)
  arrays = presets.batch_arrays(presets.PRESETS[preset_name])
  ids = torch.tensor(arrays["input_ids"]).long()
  mask = torch.tensor(arrays["attention_mask"])
  pixels = torch.tensor(arrays["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())
  labels = torch.where(torch.tensor(arrays["loss_mask"]) > 0, ids, torch.full_like(ids, -100))

  def run():
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm}
  return run


def main() -> None:
  args = harness.common_flags(__doc__).parse_args()
  preset = presets.PRESETS[args.preset]
  compare_torch = preset.compare_with_transformers and not args.no_transformers
  if compare_torch:
    presets.weights_dir(args.preset)
  flops = train_flops(preset)
  peak, devices, peak_source = harness.flops_peak(args.peak_tflops)
  result = harness.compare(
      "train_sft", args.preset, ours="train_step:setup_jax",
      theirs="train_step:setup_torch" if compare_torch else None, reps=args.reps,
      warmup=args.warmup, options={"attention": args.attention},
      work=preset.batch * preset.seq_len,
      work_unit="tokens", flops=flops, peak_flops=peak, devices=devices)
  result.update(peak_flops_per_s=peak, peak_source=peak_source)
  harness.print_table(result)
  print(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})")
  print("wrote", harness.write_json(result, args.out))


if __name__ == "__main__":
  main()
