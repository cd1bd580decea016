"""Supervised fine-tuning: next-token cross-entropy on the assistant turns of conversations.

`run` does the whole job: build the model (HF directory or from scratch, LoRA optional) and its
sharded train state, resume from the workdir's latest checkpoint if there is one, train, and
export the result. Workdir layout:
  config.json          the resolved config of the run
  checkpoints/<step>/  train state + data iterator position (training/checkpoint.py)
  metrics.jsonl, tensorboard/
  summary.json         shapes-world metrics before and after training, wall time
  export/hf/           the final model as an HF directory (+ tokenizer); export/lora/ the adapters
"""

import dataclasses
import json
import os
import time

import jax
from ml_collections import config_dict

from lvlm_jax.dataclass_config import from_config_dict, help_lines, to_config_dict
from lvlm_jax.errors import UserError
from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
from lvlm_jax.methods import setup
from lvlm_jax.sharding import MeshConfig, abstract_tree, mesh_from_config
from lvlm_jax.training import checkpoint, loop, metrics, optim, state as train_state, steps

SECTIONS = {"model": setup.ModelConfig, "data": setup.DataSources, "optim": optim.OptimConfig,
            "train": loop.TrainConfig, "checkpoint": checkpoint.CheckpointConfig,
            "mesh": MeshConfig, "eval": ShapesEvalConfig}
EXCLUDED = {"data": setup.DERIVED_PIPELINE_FIELDS}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  model: setup.ModelConfig
  data: setup.DataSources
  optim: optim.OptimConfig
  train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig


def default_config() -> config_dict.ConfigDict:
  """Every SFT setting at its default; config files start from this and change what they need."""
  config = config_dict.ConfigDict()
  config.method = "sft"
  for name, cls in SECTIONS.items():
    config[name] = to_config_dict(cls(), exclude=EXCLUDED.get(name, ()))
  return config


def config_help() -> list[str]:
  lines = ["  config.method: the method to run ('sft')."]
  for name, cls in SECTIONS.items():
    lines += help_lines(cls, f"config.{name}", EXCLUDED.get(name, ()))
  return lines


def parse(config: config_dict.ConfigDict | dict) -> SFTConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  values = config.to_dict() if isinstance(config, config_dict.ConfigDict) else dict(config)
  values.pop("method", None)
  parsed = from_config_dict(SFTConfig, values, "config")
  if not parsed.checkpoint.save_frozen and not parsed.model.hf_dir:
    raise UserError("checkpoint.save_frozen=False needs model.hf_dir to re-read frozen weights "
                    "from; a new model's weights exist only in its checkpoints")
  return parsed


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _format_metrics(values: dict[str, float]) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def _initial_state(config: SFTConfig, tokenizer, mesh, trainable, tx, abstract, shardings,
                   checkpointer: checkpoint.Checkpointer, batches) -> tuple[dict, int | None]:
  """(train state, step it was restored from or None): the latest checkpoint if there is one
  (with the data iterator moved to its position), else the model's initial weights."""
  latest = checkpointer.latest_step()
  if latest is None:
    params, frozen = setup.load_params(config.model, tokenizer, mesh, trainable, shardings)
    return train_state.init_state(params, frozen, tx, config.train.seed, shardings), None
  state = checkpointer.restore(latest, abstract_tree(abstract, shardings), batches)
  if "frozen" not in state:  # checkpoint.save_frozen=False: the frozen base comes from hf_dir
    state["frozen"] = setup.load_params(config.model, tokenizer, mesh, trainable, shardings)[1]
  return state, latest


def _export(config: SFTConfig, model, tokenizer, workdir: str) -> None:
  export = os.path.join(workdir, "export")
  if config.checkpoint.export_hf:
    checkpoint.export_hf(model, os.path.join(export, "hf"), config.checkpoint.export_dtype,
                         tokenizer, data=setup.pipeline_config(config.data, model, config.model, 1))
  if config.checkpoint.export_lora and config.model.use_lora:
    checkpoint.export_lora(model, os.path.join(export, "lora"), config.model.hf_dir)


def run(config: SFTConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary (also written to summary.json).

  Call `sharding.initialize(config.mesh)` first in multi-process runs. stop_at: stop after this
  step as a preemption would (tests).
  """
  started = time.time()
  os.makedirs(workdir, exist_ok=True)
  if raw_config is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(raw_config.to_json_best_effort(indent=2))
  mesh = mesh_from_config(config.mesh)
  tokenizer = setup.load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  abstract_model = setup.abstract_model(config.model, tokenizer)
  setup.check_vocabulary(abstract_model, tokenizer)
  trainable = optim.trainable_filter(config.optim)
  graphdef, abstract_params, abstract_frozen = train_state.split_model(abstract_model, trainable)
  tx = optim.make_optimizer(config.optim, config.train.num_steps, abstract_params)
  abstract = train_state.abstract_state(abstract_params, abstract_frozen, tx)
  shardings = train_state.state_shardings(abstract, mesh)
  _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
       f"processes | parameters: {train_state.count_params(abstract_params):,} trainable, "
       f"{train_state.count_params(abstract_frozen):,} frozen")

  local_batch = setup.per_process_batch(config.train.batch_size, mesh,
                                        config.train.grad_accum_steps)
  data_config = setup.pipeline_config(config.data, abstract_model, config.model, local_batch)
  batches = setup.training_batches(config.data, tokenizer, data_config)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  state, resumed_from = _initial_state(config, tokenizer, mesh, trainable, tx, abstract,
                                       shardings, checkpointer, batches)
  if resumed_from is not None:
    _log(f"resuming from step {resumed_from} in {workdir}")

  writer = metrics.MetricsWriter(workdir, tensorboard=config.train.tensorboard)
  hooks, evaluations = (), []
  before_path = os.path.join(workdir, "eval_before.json")
  if config.eval.yes_no or config.eval.grounding or config.eval.captions:
    evaluator = ShapesEvaluator(tokenizer, data_config, setup.held_out_world(config.data.shapes),
                                config.eval, mesh)

    def evaluate(s, step):
      del step
      evaluations.append(evaluator(train_state.merge(graphdef, s)))
      return evaluations[-1]

    hooks = (evaluate,)
    if resumed_from is None:
      with jax.set_mesh(mesh):
        writer.write(0, evaluate(state, 0), prefix="eval")
      if jax.process_index() == 0:
        with open(before_path, "w") as f:
          json.dump(evaluations[-1], f)

  peak = metrics.peak_flops(config.train.peak_flops)
  _log(f"MFU peak: {peak[1]}")
  step = steps.jit_train_step(steps.sft_step, shardings, mesh, graphdef=graphdef, tx=tx,
                              accum_steps=config.train.grad_accum_steps,
                              logits_chunk=config.train.logits_chunk)
  state, status = loop.train(state, step=step, batches=batches, mesh=mesh, config=config.train,
                             checkpointer=checkpointer, writer=writer, peak=peak, hooks=hooks,
                             stop_at=stop_at)
  checkpointer.close()
  writer.close()
  summary = {"status": status, "step": int(state["step"]), "wall_time_s": time.time() - started}
  if status == "done":
    _export(config, train_state.merge(graphdef, state), tokenizer, workdir)
    if evaluations:
      before = {}
      if os.path.exists(before_path):
        with open(before_path) as f:
          before = json.load(f)
      summary.update(before=before, after=evaluations[-1])
      _log(f"shapes world before: {_format_metrics(before)}")
      _log(f"shapes world after:  {_format_metrics(evaluations[-1])}")
  else:
    _log(f"stopped at step {summary['step']}: checkpoint saved; run the same command to resume")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary
