"""DPO for VLMs: a pure step over chosen + rejected responses in one forward, and the reference pass.

    dpo_step(state, batch) -> (state, metrics)       one optimizer update on one preference batch
    reference_logps(model, batch) -> (chosen [B], rejected [B])
    write_reference_logps(model, ...)                 precompute: ref_*_logp beside a preference JSONL

A preference batch is the data layer's (`chosen_*` / `rejected_*` token arrays [B, T] sharing
`pixel_values` [B, N, H, W, 3]). Chosen and rejected rows are concatenated into one [2B, T] batch,
so the policy runs one forward per step; a response's log-prob is the sum over its `loss_mask`
tokens (TRL's `average_log_prob=False`, which STIC and CSR keep).

The reference log-probs come from the batch (`ref_chosen_logp`, `ref_rejected_logp`, written by
`write_reference_logps`) or, in the step, from the reference model: the policy with its LoRA
adapters switched off and every other trainable parameter at its initial value. Those initial
values live in the train state as `state["ref"]` (`with_reference`): the projector that STIC trains
beside its adapters, or a frozen copy of all trainable parameters for full fine-tuning.
(STIC's released code disables the adapter but keeps the *trained* projector in its reference;
a reference that moves with the policy is not DPO's, so it is not copied here.)
"""

import dataclasses
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from lvlm_jax import preemption
from lvlm_jax.artifacts import JsonlWriter, read_jsonl
from lvlm_jax.data.pipeline import Collate, DataConfig, Preprocess, Skipped
from lvlm_jax.data.sources import PreferenceSource
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.llava_next import IMAGE_KEYS
from lvlm_jax.models.llm import LLM
from lvlm_jax.models.lora import lora_disabled
from lvlm_jax.models.lvlm import LVLM
from lvlm_jax.sharding import batch_sharding, place
from lvlm_jax.training.losses import hidden_states, masked_token_logprobs
from lvlm_jax.training.preference import (LOSS_TYPES, PreferenceLossConfig, noisy_token_logps,
                                          preference_loss)
from lvlm_jax.training.state import TrainState
from lvlm_jax.training.steps import accumulate, apply_gradients, model_for_step

REFERENCES = ("in_step", "precomputed")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The preference loss and where its reference log-probs come from."""
  loss_type: str = help_field("sigmoid", f"One of {LOSS_TYPES}: DPO's sigmoid, IPO or SLiC's "
                              "hinge. IPO compares per-token mean log-probs (as TRL), the others "
                              "summed log-probs.")
  beta: float = help_field(0.1, "Inverse temperature of the implicit reward "
                           "(TRL's default 0.1, kept by STIC and CSR).")
  label_smoothing: float = help_field(0.0, "Conservative DPO: assumed share of flipped "
                                      "labels, in [0, 0.5) (sigmoid only).")
  nll_coef: float = help_field(0.0, "Weight of -log pi(chosen) (summed over its "
                               "tokens) added to the loss; STIC: 1/1024.")
  reference: str = help_field("in_step", f"One of {REFERENCES}: 'in_step' runs the reference model "
                              "(adapters off, other trainables at their initial values) in every "
                              "step; 'precomputed' reads ref_chosen_logp/ref_rejected_logp from "
                              "the data (written by a reference pass first).")
  noisy_rejected: bool = help_field(False, "Score rejected responses (policy and reference) by the "
                                    "model's own top-1 token, or top-2 where top-1 is the label, "
                                    "as STIC's released code does; False scores the rejected "
                                    "labels (the paper's DPO).")

  def __post_init__(self):
    if self.reference not in REFERENCES:
      raise UserError(f"dpo.reference={self.reference!r} is not one of {REFERENCES}")
    try:
      self.loss()
    except ValueError as e:
      raise UserError(f"dpo: {e}") from None
    if self.beta <= 0:
      raise UserError(f"dpo.beta={self.beta} must be > 0")

  def loss(self) -> PreferenceLossConfig:
    return PreferenceLossConfig(self.loss_type, self.beta, self.label_smoothing, self.nll_coef)


def concatenated(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """A preference batch -> one token batch [2B, T]: the B chosen rows, then the B rejected rows,
  each with its images (the vision tower runs twice on them; next to the decoder it is cheap)."""
  out = {key: jnp.concatenate([batch["chosen_" + key], batch["rejected_" + key]])
         for key in ("input_ids", "loss_mask", "attention_mask", "positions")}
  for key in IMAGE_KEYS:
    if key in batch:
      out[key] = jnp.concatenate([batch[key]] * 2)
  return out


def _noisy_aware_logprobs(model: LLM | LVLM, both: dict[str, jax.Array], rows: int) -> jax.Array:
  """float32 [2B, T]: label log-probs on the first `rows` rows, the noisy ones on the rest."""
  llm = model.llm if isinstance(model, LVLM) else model
  logits = llm.logits(hidden_states(model, both)[:, :-1]).astype(jnp.float32)  # [2B, T-1, V]
  targets = both["input_ids"][:, 1:]
  labels = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None],
                               axis=-1)[..., 0]
  noisy = noisy_token_logps(logits, targets)
  picked = jnp.where(jnp.arange(targets.shape[0])[:, None] < rows, labels, noisy)
  return jnp.pad(picked, ((0, 0), (1, 0)))


def response_logps(model: LLM | LVLM, batch: dict[str, jax.Array], *, noisy_rejected: bool = False,
                   logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Summed log-probs float32 [B] of the chosen and the rejected responses (their loss_mask
  tokens), from one forward over both; the LM head runs at the response positions only
  (`masked_token_logprobs`). `logits_chunk` (label log-probs only) bounds the memory of the LM
  head as in SFT; the noisy mode needs whole logits."""
  both = concatenated(batch)
  rows = batch["chosen_input_ids"].shape[0]
  if noisy_rejected:
    logp = _noisy_aware_logprobs(model, both, rows)
  else:
    logp = masked_token_logprobs(model, both, both["loss_mask"], logits_chunk)
  sums = jnp.sum(logp * both["loss_mask"].astype(jnp.float32), axis=1)
  return sums[:rows], sums[rows:]


def reference_part(params: nnx.State) -> nnx.State:
  """The trainable parameters the reference model keeps at their initial values: every one but
  the LoRA adapters, which it switches off instead."""
  return nnx.split_state(params, nnx.LoRAParam, ...)[1]


def with_reference(state: TrainState) -> TrainState:
  """The state plus "ref": a copy of `reference_part(params)` in buffers of its own (the step
  donates `params`, never `ref`). Checkpoints save it, so a resumed run keeps the same reference."""
  return {**state, "ref": jax.tree.map(jnp.copy, reference_part(state["params"]))}


def reference_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
  """The in-step reference: `state["ref"]` for the non-adapter trainables, the frozen rest, and
  adapters present (their current values) but switched off by the caller (`lora_disabled`)."""
  adapters = nnx.split_state(state["params"], nnx.LoRAParam, ...)[0]
  model = nnx.merge(graphdef, adapters, state["ref"], state["frozen"])
  model.eval()
  return model


def reference_logps(model: LLM | LVLM, batch: dict[str, jax.Array], *,
                    noisy_rejected: bool = False,
                    logits_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """`response_logps` of `model` with its adapters off, without gradient: (chosen [B], rejected [B])."""
  with lora_disabled(model):
    chosen, rejected = response_logps(model, batch, noisy_rejected=noisy_rejected,
                                      logits_chunk=logits_chunk)
  return jax.lax.stop_gradient(chosen), jax.lax.stop_gradient(rejected)


def preference_loss_sums(config: PreferenceLossConfig, policy_chosen: jax.Array,
                         policy_rejected: jax.Array, ref_chosen: jax.Array,
                         ref_rejected: jax.Array, **tokens) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`preference_loss` as sums over the B examples (loss and metrics times B), so micro-batches
  add up and one division by the batch's rows gives the means."""
  rows = policy_chosen.shape[0]
  mean, metrics = preference_loss(config, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                                  **tokens)
  return mean * rows, {k: v * rows for k, v in metrics.items()}


def dpo_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, loss: PreferenceLossConfig,
             noisy_rejected: bool = False, accum_steps: int = 1,
             logits_chunk: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on the mean preference loss of `batch`.

  Reference log-probs: the batch's `ref_chosen_logp` / `ref_rejected_logp` [B] when present, else
  `state["ref"]` (see `with_reference`). With `accum_steps = k` the batch is cut into k equal
  micro-batches whose loss and gradient sums are accumulated: the update of the whole batch.
  Metrics (float32 scalars): loss, tokens, grad_norm, lr (+ lr/<group>), and preference_loss's
  rewards/{chosen,rejected,margin,accuracy}, logps/{chosen,rejected}.
  """
  step_rng = jax.random.fold_in(state["rng"], state["step"])
  precomputed = "ref_chosen_logp" in batch
  if not precomputed and "ref" not in state:
    raise ValueError("the batch has no ref_*_logp and the state no 'ref' (with_reference)")

  def loss_sums(params, micro, refs, index):
    model = model_for_step(graphdef, params, state["frozen"], jax.random.fold_in(step_rng, index))
    chosen, rejected = response_logps(model, micro, noisy_rejected=noisy_rejected,
                                      logits_chunk=logits_chunk)
    lengths = {f"{side}_tokens": jnp.sum(micro[f"{side}_loss_mask"][:, 1:], axis=1)
               for side in ("chosen", "rejected")}  # the tokens response_logps sums over
    return preference_loss_sums(loss, chosen, rejected, *refs, **lengths)

  def summed(micro, index):
    if precomputed:
      refs = micro["ref_chosen_logp"], micro["ref_rejected_logp"]
    else:
      refs = reference_logps(reference_model(graphdef, state), micro,
                             noisy_rejected=noisy_rejected, logits_chunk=logits_chunk)
    (loss_sum, metrics), grads = jax.value_and_grad(loss_sums, has_aux=True)(
        state["params"], micro, refs, index)
    return grads, loss_sum, metrics

  grads, loss_sum, metric_sums = accumulate(summed, batch, accum_steps)
  rows = batch["chosen_input_ids"].shape[0]
  grads = jax.tree.map(lambda g: g / rows, grads)
  new_state, metrics = apply_gradients(state, grads, tx)
  metrics.update({k: v / rows for k, v in metric_sums.items()})
  metrics.update(loss=loss_sum / rows,
                 tokens=(jnp.sum(batch["chosen_attention_mask"])
                         + jnp.sum(batch["rejected_attention_mask"])).astype(jnp.float32))
  return new_state, metrics


# The precompute pass: reference log-probs of every record of a preference JSONL.


@functools.partial(jax.jit, static_argnames=("graphdef", "noisy_rejected"))
def _reference_pass(graphdef: nnx.GraphDef, model_state: nnx.State, batch: dict[str, jax.Array],
                    noisy_rejected: bool) -> tuple[jax.Array, jax.Array]:
  model = nnx.merge(graphdef, model_state)
  model.eval()
  return reference_logps(model, batch, noisy_rejected=noisy_rejected)


def _to_host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(array)


def write_reference_logps(model: LLM | LVLM, path: str, out_path: str, tokenizer,
                          data: DataConfig, mesh: Mesh, *, image_roots: tuple[str, ...] = (),
                          batch_size: int = 8, noisy_rejected: bool = False,
                          log: Callable[[str], None] = lambda message: None) -> dict[str, int]:
  """Writes `out_path`: every record of the preference JSONL `path` (one JSON object per line),
  as it is, plus `ref_chosen_logp` and `ref_rejected_logp` under `model` (the reference: the
  model before training, adapters off). Records the pipeline cannot use (too long, bad image)
  are written without them, so training skips and counts them. Records go to
  `out_path.partial` batch by batch and the file is renamed when complete: rerun after a kill or
  a preemption (`lvlm_jax.preemption`), it resumes after the last record written. Every process
  must call it (process 0 writes). Returns counts.

  `data`: the training run's pipeline config (template, lengths, image processing);
  `batch_size` must be a multiple of the mesh's batch shards.
  """
  with open(path) as f:
    raw = [line for line in f.read().splitlines() if line.strip()]
  source = PreferenceSource(path, image_roots or None)
  if len(source) != len(raw):
    raise UserError(f"{path}: {len(raw) - len(source)} malformed records; fix or drop them first")
  config = dataclasses.replace(data, kind="preference", with_ref_logps=False, batch_size=batch_size)
  preprocess = Preprocess(source, tokenizer, config)
  collate = Collate(config, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
  graphdef, model_state = nnx.split(model)
  # One line per record, so the partial file's complete lines are the records done.
  writer = JsonlWriter(out_path, 1)
  start = writer.resume()
  if start:
    log(f"reference: resuming after {start} of {len(raw)} records")
  counts = {"records": len(raw), "with_ref_logps": 0, "skipped": 0}
  for first in range(start, len(raw), batch_size):
    preemption.check()
    examples = {i: preprocess(i) for i in range(first, min(first + batch_size, len(raw)))}
    scored = [i for i, e in examples.items() if not isinstance(e, Skipped)]
    logps = {}
    if scored:
      rows = [examples[i] for i in scored]
      rows += [rows[-1]] * (batch_size - len(rows))  # one batch shape for all
      batch = collate(rows)
      batch = place(batch, {k: batch_sharding(mesh) for k in batch})
      with jax.set_mesh(mesh):
        chosen, rejected = _reference_pass(graphdef, model_state, batch, noisy_rejected)
      logps = {i: (float(c), float(r)) for i, c, r in zip(scored, _to_host(chosen),
                                                          _to_host(rejected))}
    records = []
    for i in examples:
      record = json.loads(raw[i])
      if i in logps:
        record["ref_chosen_logp"], record["ref_rejected_logp"] = logps[i]
      records.append(record)
    writer.append(records)
    counts["with_ref_logps"] += len(logps)
    counts["skipped"] += len(examples) - len(logps)
    log(f"reference: {min(first + batch_size, len(raw))}/{len(raw)}")
  writer.close()
  if start:  # the counts of the records written before the resume
    records = read_jsonl(out_path)
    counts["with_ref_logps"] = sum("ref_chosen_logp" in r for r in records)
    counts["skipped"] = len(records) - counts["with_ref_logps"]
  return counts
