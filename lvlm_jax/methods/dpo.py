"""A DPO training run on a preference JSONL: model, sharded train state, loop, checkpoints, export.

The DPO counterpart of `sft.run`, used by the methods whose stages train on preference pairs
(STIC stage 1; CSR's rounds). Workdir layout as SFT's: checkpoints/, metrics.jsonl, tensorboard/,
summary.json, export/hf (adapters merged, with the tokenizer) and export/lora.
"""

import dataclasses
import math
import os
import time


from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.sources import PreferenceSource
from lvlm_jax.methods import setup
from lvlm_jax.methods.artifacts import write_json
from lvlm_jax.sharding import MeshConfig, abstract_tree, mesh_from_config
from lvlm_jax.training import checkpoint, dpo, loop, metrics, optim, state as train_state, steps


def num_steps(records: int, epochs: float, batch_size: int) -> int:
  """Updates for `epochs` passes over `records` examples in batches of `batch_size`."""
  return max(1, math.ceil(epochs * records / batch_size))


def run(*, model: setup.ModelConfig, tokenizer, preferences: str, image_roots: tuple[str, ...],
        pipeline: DataConfig, dpo_config: dpo.DPOConfig, optim_config: optim.OptimConfig,
        train: loop.TrainConfig, checkpoint_config: checkpoint.CheckpointConfig,
        mesh_config: MeshConfig, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir` on the preference file; returns the summary (also in
  summary.json). With `dpo_config.reference == 'precomputed'` every record needs
  ref_chosen_logp / ref_rejected_logp (`dpo.write_reference_logps`)."""
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_from_config(mesh_config)
  in_step = dpo_config.reference == "in_step"
  abstract_model = setup.abstract_model(model, tokenizer)
  trainable = optim.trainable_filter(optim_config)
  graphdef, abstract_params, abstract_frozen = train_state.split_model(abstract_model, trainable)
  tx = optim.make_optimizer(optim_config, train.num_steps, abstract_params)
  abstract = train_state.abstract_state(abstract_params, abstract_frozen, tx)
  if in_step:
    abstract["ref"] = dpo.reference_part(abstract_params)
  shardings = train_state.state_shardings(abstract, mesh)

  local_batch = setup.per_process_batch(train.batch_size, mesh, train.grad_accum_steps)
  data = dataclasses.replace(
      pipeline, kind="preference", batch_size=local_batch, with_ref_logps=not in_step,
      tokens_per_image=abstract_model.config.tokens_per_image,
      context_length=abstract_model.config.text.max_position_embeddings,
      image=setup.image_processing(model, abstract_model))
  batches = iter(make_dataset(PreferenceSource(preferences, image_roots or None), tokenizer, data))

  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint_config)
  latest = checkpointer.latest_step()
  if latest is None:
    params, frozen = setup.load_params(model, tokenizer, mesh, trainable, shardings)
    state = train_state.init_state(params, frozen, tx, train.seed, shardings)
    if in_step:
      state = dpo.with_reference(state)
  else:
    state = checkpointer.restore(latest, abstract_tree(abstract, shardings), batches)
    if "frozen" not in state:
      state["frozen"] = setup.load_params(model, tokenizer, mesh, trainable, shardings)[1]

  writer = metrics.MetricsWriter(workdir)
  step = steps.jit_train_step(dpo.dpo_step, shardings, mesh, graphdef=graphdef, tx=tx,
                              loss=dpo_config.loss(), noisy_rejected=dpo_config.noisy_rejected,
                              accum_steps=train.grad_accum_steps, logits_chunk=train.logits_chunk)
  state, status = loop.train(state, step=step, batches=batches, mesh=mesh, config=train,
                             checkpointer=checkpointer, writer=writer,
                             peak=metrics.peak_flops(train.peak_flops), stop_at=stop_at)
  checkpointer.close()
  writer.close()
  summary = {"status": status, "step": int(state["step"]), "wall_time_s": time.time() - started}
  if status == "done":
    final = train_state.merge(graphdef, state)
    export = os.path.join(workdir, "export")
    checkpoint.export_hf(final, os.path.join(export, "hf"), checkpoint_config.export_dtype,
                         tokenizer, data=data)
    if checkpoint_config.export_lora and model.use_lora:
      checkpoint.export_lora(final, os.path.join(export, "lora"), model.hf_dir)
  write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
