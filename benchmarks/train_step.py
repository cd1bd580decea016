"""Train-step benchmarks, lvlm_jax vs transformers on the same weights and batch.

  python benchmarks/train_step.py --workload sft   # one AdamW update: CE on the response tokens
  python benchmarks/train_step.py --workload dpo   # chosen + rejected + reference log-probs

Both sides train the projector and the LLM (full fine-tuning, fp32), keep the vision tower
frozen, clip gradients at 1.0 and use AdamW. FLOPs are counted as MaxText does: 6 x matmul
parameters x tokens for the trained path, 2 x for the frozen vision tower's forward, plus causal
attention (halved).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import harness  # noqa: E402
import presets  # noqa: E402

LR = 1e-5


def train_flops(preset: presets.Preset, passes: float = 3.0) -> float:
  """FLOPs of one SFT step (forward + backward = 3 forward passes) over the preset's batch."""
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


def setup_jax(preset_name: str, workload: str):
  import jax

  from lvlm_jax.sharding import make_mesh
  from lvlm_jax.training import optim, state as train_state, steps

  preset = presets.PRESETS[preset_name]
  model = presets.lvlm_jax_model(preset_name)
  config = optim.OptimConfig(lr=LR, trainable=r"(llm|projector)\..*", warmup_ratio=0.0,
                             schedule="constant", clip_norm=1.0)
  graphdef, params, frozen = train_state.split_model(model, optim.trainable_filter(config))
  tx = optim.make_optimizer(config, 1000, params)
  mesh = make_mesh()
  shardings = train_state.state_shardings(train_state.abstract_state(params, frozen, tx), mesh)
  state = [train_state.init_state(params, frozen, tx, 0, shardings)]
  batch = presets.batch_arrays(preset)
  if workload == "sft":
    step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx)
  else:
    from lvlm_jax.training import dpo
    step, batch = dpo.benchmark_step(graphdef, tx, shardings, mesh, batch)

  def run():
    with jax.set_mesh(mesh):
      state[0], metrics = step(state[0], batch)
    jax.block_until_ready(metrics)
  return run


def setup_torch(preset_name: str, workload: str):
  import torch
  import torch.nn.functional as F
  import transformers

  preset = presets.PRESETS[preset_name]
  model = transformers.LlavaForConditionalGeneration.from_pretrained(
      presets.weights_dir(preset_name)).train()
  model.model.vision_tower.requires_grad_(False)
  trainable = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
  arrays = presets.batch_arrays(preset)
  ids = torch.tensor(arrays["input_ids"]).long()
  mask = torch.tensor(arrays["attention_mask"])
  pixels = torch.tensor(arrays["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())
  labels = torch.where(torch.tensor(arrays["loss_mask"]) > 0, ids, torch.full_like(ids, -100))

  def sequence_logps(input_ids, attention_mask, pixel_values, target):
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   pixel_values=pixel_values).logits[:, :-1]
    target = target[:, 1:]
    valid = target != -100
    logp = torch.gather(F.log_softmax(logits.float(), -1), 2,
                        torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return (logp * valid).sum(-1)

  def run():
    optimizer.zero_grad(set_to_none=True)
    if workload == "sft":
      loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    else:  # chosen and rejected in one batch (TRL's concatenated_forward); reference under no_grad
      both_ids, both_mask = torch.cat([ids, ids.flip(1)]), torch.cat([mask, mask])
      both_labels = torch.cat([labels, labels.flip(1)])
      both_pixels = torch.cat([pixels, pixels])
      both_ids[ids.shape[0]:, 4:4 + presets.tokens_per_image(preset)] = presets.IMAGE_TOKEN_ID
      with torch.no_grad():
        ref = sequence_logps(both_ids, both_mask, both_pixels, both_labels)
      policy = sequence_logps(both_ids, both_mask, both_pixels, both_labels)
      b = ids.shape[0]
      logits = (policy[:b] - policy[b:]) - (ref[:b] - ref[b:])
      loss = -F.logsigmoid(0.1 * logits).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
  return run


def main() -> None:
  parser = harness.common_flags(__doc__)
  parser.add_argument("--workload", choices=("sft", "dpo"), default="sft",
                      help="which train step to time")
  args = parser.parse_args()
  preset = presets.PRESETS[args.preset]
  compare_torch = preset.compare_with_transformers and not args.no_transformers
  if compare_torch:
    presets.weights_dir(args.preset)
  # DPO: policy forward+backward on 2B sequences plus a reference forward on 2B = 2 x (3 + 1) passes.
  flops = train_flops(preset) if args.workload == "sft" else 2 * train_flops(preset, passes=4.0)
  peak = harness.measure_matmul_peak()
  result = harness.compare(
      f"train_{args.workload}", args.preset, ours="train_step:setup_jax",
      theirs="train_step:setup_torch" if compare_torch else None, reps=args.reps,
      warmup=args.warmup, options={"workload": args.workload},
      work=preset.batch * preset.seq_len * (1 if args.workload == "sft" else 2),
      work_unit="tokens", flops=flops, peak_flops=peak)
  result["matmul_peak_flops_per_s"] = peak
  harness.print_table(result)
  print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  print("wrote", harness.write_json(result, args.out))


if __name__ == "__main__":
  main()
