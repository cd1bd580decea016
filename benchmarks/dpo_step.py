"""DPO train-step benchmark, lvlm_jax vs transformers on the same weights and preference batch.

  python benchmarks/dpo_step.py --preset small           # time both, print the table, write JSON
  python benchmarks/dpo_step.py --preset small --check   # 2 steps of each, metrics side by side

One step = one AdamW update on the sigmoid DPO loss (beta 0.1, no label smoothing, no NLL term,
mean over pairs) of `pairs = preset.batch / 2` preference pairs, so the policy sees preset.batch
sequences [B, T], as many as the SFT workload (train_step.py): the two steps differ by the
reference forward and the reference's copy of the parameters. Each pair shares its prompt and
image (the preset's SFT layout: one image block, response = the last quarter of the tokens) and
differs in its response tokens; log-probs are summed over the response tokens.

Both sides, as TRL's DPOTrainer does: the reference runs first, without gradient, on chosen and
rejected rows concatenated into one batch [2P, T] (images repeated); then the policy does the
same forward with gradient. The policy trains the projector and the LLM (full fine-tuning, fp32,
as in train_step.py), the vision tower is frozen; the reference is a frozen copy of the projector
and the LLM sharing the vision tower (lvlm_jax: `dpo.with_reference`, state["ref"]; transformers:
a deep copy of the model but its vision tower). Gradients are clipped at 1.0; AdamW.

FLOPs (MaxText's way): the policy's 3 passes (forward + backward) of the LLM and projector and the
reference's 1 pass, each over the preset.batch sequences, plus two forwards of the frozen vision
tower (policy and reference) over their images. Tokens/s counts the preset.batch x seq_len
tokens of chosen + rejected (as dpo_step's `tokens` metric), not the reference's second look.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import harness  # noqa: E402
import presets  # noqa: E402
import train_step  # noqa: E402

BETA = 0.1


def pairs_of(preset: presets.Preset) -> int:
  if preset.batch % 2:
    raise ValueError(f"the DPO workload needs an even preset batch (pairs = batch / 2), got "
                     f"{preset.batch}")
  return preset.batch // 2


def preference_arrays(preset: presets.Preset, seed: int = 0) -> dict[str, np.ndarray]:
  """A preference batch as numpy, in the data layer's keys: chosen_* / rejected_* ([P, T]
  input_ids, loss_mask, attention_mask, positions), pixel_values [P, 1, S, S, 3], image_mask
  [P, 1]; P = preset.batch / 2. The rejected rows are the chosen ones with other response tokens."""
  rows = presets.batch_arrays(preset, seed)  # preset.batch rows: the first P become the pairs
  p = pairs_of(preset)
  response = rows["loss_mask"][:p] > 0
  rejected_ids = np.where(response, rows["input_ids"][p:], rows["input_ids"][:p])
  out = {}
  for key in ("input_ids", "loss_mask", "attention_mask", "positions"):
    out["chosen_" + key] = rows[key][:p]
    out["rejected_" + key] = rejected_ids if key == "input_ids" else rows[key][:p]
  out["pixel_values"] = rows["pixel_values"][:p]
  out["image_mask"] = rows["image_mask"][:p]
  return out


def dpo_flops(preset: presets.Preset) -> float:
  """FLOPs of one DPO step: policy forward + backward and reference forward over preset.batch
  sequences, each with its forward of the frozen vision tower."""
  return train_step.train_flops(preset, passes=3.0) + train_step.train_flops(preset, passes=1.0)


def setup_jax(preset_name: str, attention: str = "auto"):
  from lvlm_jax.training import dpo, steps
  from lvlm_jax.training.preference import PreferenceLossConfig

  mesh, graphdef, tx, shardings, state = train_step.jax_train_state(preset_name, reference=True,
                                                                   attention=attention)
  batch = preference_arrays(presets.PRESETS[preset_name])
  step = steps.jit_train_step(dpo.dpo_step, shardings, mesh, graphdef=graphdef, tx=tx,
                              loss=PreferenceLossConfig("sigmoid", beta=BETA))
  return train_step.jax_runner(step, state, batch, mesh)


def setup_torch(preset_name: str, attention: str = "auto"):
  del attention  # transformers runs its own (sdpa on CPU)
  import copy

  import torch
  import torch.nn.functional as F

  model, trainable, optimizer = train_step.torch_model(preset_name)
  tower = model.model.vision_tower
  reference = copy.deepcopy(model, memo={id(tower): tower}).eval().requires_grad_(False)
  arrays = preference_arrays(presets.PRESETS[preset_name])
  p = pairs_of(presets.PRESETS[preset_name])

  def both(key):  # [2P, T]: chosen rows, then rejected rows (TRL's concatenated_inputs)
    return torch.tensor(np.concatenate([arrays["chosen_" + key], arrays["rejected_" + key]]))

  ids, mask, response = both("input_ids").long(), both("attention_mask"), both("loss_mask")[:, 1:]
  pixels = torch.tensor(arrays["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())
  pixels = torch.cat([pixels, pixels])
  targets = ids[:, 1:, None]

  def logps(net):
    """Summed response log-probs (chosen [P], rejected [P]), TRL's selective_log_softmax for fp32:
    the label's logit minus a row-by-row logsumexp."""
    logits = net(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, :-1]
    picked = torch.gather(logits, -1, targets)[..., 0]
    per_token = picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    sums = (per_token * response).sum(-1)
    return sums[:p], sums[p:]

  def run():
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
      ref_chosen, ref_rejected = logps(reference)
    chosen, rejected = logps(model)
    margin = (chosen - rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(BETA * margin).mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm,
            "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean(),
            "rewards/margin": BETA * margin.detach().mean()}
  return run


def check(preset_name: str, steps: int = 2) -> None:
  """Runs `steps` DPO steps in each framework (in this process) and prints their metrics: the
  first step's loss is log 2 on both sides (policy = reference); its log-probs and gradient
  norm, and the second step's loss and margin, show that both compute the same update."""
  keys = ("loss", "logps/chosen", "logps/rejected", "grad_norm", "rewards/margin")
  seen = {}
  for name, setup in (("lvlm_jax", setup_jax), ("transformers", setup_torch)):
    run = setup(preset_name)
    seen[name] = [{k: float(v) for k, v in run().items() if k in keys} for _ in range(steps)]
  print(f"{'step / metric':28s}{'lvlm_jax':>18s}{'transformers':>18s}{'rel. diff':>12s}")
  for i in range(steps):
    for key in keys:
      a, b = seen["lvlm_jax"][i][key], seen["transformers"][i][key]
      rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
      print(f"{f'{i + 1} {key}':28s}{a:18.8g}{b:18.8g}{rel:12.2e}")


def main() -> None:
  parser = harness.common_flags(__doc__)
  parser.add_argument("--check", action="store_true",
                      help="run 2 steps of each framework and print their metrics, no timing")
  args = parser.parse_args()
  preset = presets.PRESETS[args.preset]
  compare_torch = preset.compare_with_transformers and not args.no_transformers
  if compare_torch or args.check:
    presets.weights_dir(args.preset)  # build the shared weights once, before the workers start
  if args.check:
    check(args.preset)
    return
  flops = dpo_flops(preset)
  peak, devices, peak_source = harness.flops_peak(args.peak_tflops)
  result = harness.compare(
      "train_dpo", args.preset, ours="dpo_step:setup_jax",
      theirs="dpo_step:setup_torch" if compare_torch else None, reps=args.reps,
      warmup=args.warmup, options={"attention": args.attention},
      work=preset.batch * preset.seq_len, work_unit="tokens", flops=flops,
      peak_flops=peak, devices=devices)
  result.update(peak_flops_per_s=peak, peak_source=peak_source)
  result["pairs"] = pairs_of(preset)
  harness.print_table(result)
  print(f"peak: {peak / 1e9:.1f} GFLOP/s ({peak_source})")
  print("wrote", harness.write_json(result, args.out))


if __name__ == "__main__":
  main()
