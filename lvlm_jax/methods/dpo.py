"""A DPO training run on a preference JSONL: model, sharded train state, loop, checkpoints, export.

A training stage of the methods that train on preference pairs (STIC stage 1; CSR's rounds),
through the one training-run helper (methods/training_run.py, which gives the workdir layout).
"""

import dataclasses
import math

from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.sources import PreferenceSource
from lvlm_jax.methods import training_run
from lvlm_jax.models import building
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, dpo, loop, optim, steps


def num_steps(records: int, epochs: float, batch_size: int) -> int:
  """Updates for `epochs` passes over `records` examples in batches of `batch_size`."""
  return max(1, math.ceil(epochs * records / batch_size))


def run(*, model: building.ModelConfig, tokenizer, preferences: str, image_roots: tuple[str, ...],
        pipeline: DataConfig, dpo_config: dpo.DPOConfig, optim_config: optim.OptimConfig,
        train: loop.TrainConfig, checkpoint_config: checkpoint.CheckpointConfig,
        mesh_config: MeshConfig, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir` on the preference file; returns the summary (also in
  summary.json). With `dpo_config.reference == 'precomputed'` every record needs
  ref_chosen_logp / ref_rejected_logp (`dpo.write_reference_logps`)."""
  mesh = mesh_from_config(mesh_config)
  in_step = dpo_config.reference == "in_step"

  def batches(built):
    data = dataclasses.replace(
        pipeline.for_model(built.abstract_model, model.hf_dir), kind="preference",
        batch_size=built.local_batch, with_ref_logps=not in_step,
        context_length=built.abstract_model.config.text.max_position_embeddings)
    return (iter(make_dataset(PreferenceSource(preferences, image_roots or None), tokenizer,
                              data)), data)

  def step(built):
    return steps.jit_train_step(dpo.dpo_step, built.shardings, mesh, graphdef=built.graphdef,
                                tx=built.tx, loss=dpo_config.loss(),
                                noisy_rejected=dpo_config.noisy_rejected,
                                accum_steps=train.grad_accum_steps,
                                logits_chunk=train.logits_chunk)

  reference = training_run.StateExtra(
      "ref", dpo.reference_part, lambda state: dpo.with_reference(state)["ref"])
  return training_run.run(
      workdir=workdir, model=model, tokenizer=tokenizer, optim_config=optim_config, train=train,
      checkpoint_config=checkpoint_config, mesh=mesh, batches=batches, steps=step,
      extras=(reference,) if in_step else (), name="dpo", stop_at=stop_at)
