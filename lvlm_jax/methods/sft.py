"""Supervised fine-tuning: next-token cross-entropy on the assistant turns of conversations.

A pipeline of three stages (methods/pipeline.py):
  eval_base   shapes-world metrics of the starting model (HF directory, or a new model as
              training initialises it)
  sft         training (methods/training_run.py): build, resume from the latest checkpoint,
              train, export
  eval_sft    the same metrics of the exported model
Workdir layout:
  config.json, pipeline.json, summary.json ({"status", "eval": {"base", "sft"}, ...}), eval/
  checkpoints/<step>/  train state + data iterator position (training/checkpoint.py)
  metrics.jsonl, tensorboard/, train_summary.json (the training stage's own)
  export/hf/           the final model as an HF directory (+ tokenizer); export/lora/ the adapters
"""

import dataclasses
import json
import os

import jax
from ml_collections import config_dict

from lvlm_jax.data import training_sources
from lvlm_jax.data.shapes import held_out_world
from lvlm_jax.data.tokenizer import load_tokenizer
from lvlm_jax.dataclass_config import method_defaults, method_help, parse_method
from lvlm_jax.errors import UserError
from lvlm_jax.eval.shapes import ShapesEvalConfig, ShapesEvaluator
from lvlm_jax.methods import training_run
from lvlm_jax.methods.pipeline import Pipeline, PipelineConfig, Stage
from lvlm_jax.models import building, hf
from lvlm_jax.sharding import MeshConfig, mesh_from_config
from lvlm_jax.training import checkpoint, loop, optim, state as train_state, steps

SECTIONS = {"model": building.ModelConfig, "data": training_sources.DataSources, "optim": optim.OptimConfig,
            "train": loop.TrainConfig, "checkpoint": checkpoint.CheckpointConfig,
            "mesh": MeshConfig, "eval": ShapesEvalConfig, "pipeline": PipelineConfig}
EXCLUDED = {"data": training_sources.DERIVED_PIPELINE_FIELDS}


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  model: building.ModelConfig
  data: training_sources.DataSources
  optim: optim.OptimConfig
  train: loop.TrainConfig
  checkpoint: checkpoint.CheckpointConfig
  mesh: MeshConfig
  eval: ShapesEvalConfig
  pipeline: PipelineConfig = PipelineConfig()


def default_config() -> config_dict.ConfigDict:
  """Every SFT setting at its default; config files start from this and change what they need."""
  return method_defaults("sft", SECTIONS, EXCLUDED)


def config_help() -> list[str]:
  return method_help("sft", SECTIONS, EXCLUDED)


def parse(config: config_dict.ConfigDict | dict) -> SFTConfig:
  """The typed config; a UserError names any unknown key or bad value."""
  parsed = parse_method(SFTConfig, config)
  if not parsed.checkpoint.save_frozen and not parsed.model.hf_dir:
    raise UserError("checkpoint.save_frozen=False needs model.hf_dir to re-read frozen weights "
                    "from; a new model's weights exist only in its checkpoints")
  return parsed


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(f"[sft] {message}", flush=True)


def config_key(config, *sections: str) -> str:
  """The named sections of a typed config as one JSON text: what a stage depends on."""
  return json.dumps({name: dataclasses.asdict(getattr(config, name)) for name in sections},
                    sort_keys=True, default=str)


def evaluate_model(model, tokenizer, mesh, data, hf_dir: str,
                   config: ShapesEvalConfig) -> dict[str, float]:
  """The shapes-world metrics of `model` on the held-out world (what `evaluate` reports). data:
  a method's data section (its `pipeline` and `shapes` world); hf_dir: the model's directory, whose
  preprocessor config sets the image processing ('' for a new model)."""
  pipeline = training_sources.pipeline_config(data, model, hf_dir, config.batch_size)
  evaluator = ShapesEvaluator(tokenizer, pipeline, held_out_world(data.shapes), config, mesh)
  with jax.set_mesh(mesh):
    return evaluator(model)


def train_stage(config: SFTConfig, workdir: str, tokenizer, mesh, stop_at: int | None = None,
                summary_file: str = "train_summary.json") -> dict:
  """The training stage: its summary, status 'done' (exported) or 'preempted' (checkpoint
  saved), and the step reached."""
  def batches(built):
    data = training_sources.pipeline_config(config.data, built.abstract_model,
                                            config.model.hf_dir, built.local_batch)
    return training_sources.training_batches(config.data, tokenizer, data), data

  def step(built):
    return steps.jit_train_step(steps.sft_step, built.shardings, mesh, graphdef=built.graphdef,
                                tx=built.tx, accum_steps=config.train.grad_accum_steps,
                                logits_chunk=config.train.logits_chunk)

  def hooks(built):
    if not (config.train.eval_every and config.eval.enabled):
      return ()
    return (lambda state, step_index: evaluate_model(
        train_state.merge(built.graphdef, state), tokenizer, mesh, config.data,
        config.model.hf_dir, config.eval),)

  return training_run.run(
      workdir=workdir, model=config.model, tokenizer=tokenizer, optim_config=config.optim,
      train=config.train, checkpoint_config=config.checkpoint, mesh=mesh, batches=batches,
      steps=step, hooks=hooks, name="sft", summary_file=summary_file,
      fingerprint=config_key(config, "model", "data", "optim", "train", "checkpoint"),
      stop_at=stop_at)


def run(config: SFTConfig, workdir: str, *, raw_config: config_dict.ConfigDict | None = None,
        stop_at: int | None = None) -> dict:
  """Runs (or resumes) the SFT pipeline in `workdir`; returns the summary (also summary.json).

  Call `sharding.initialize(config.mesh)` first in multi-process runs. stop_at: stop training
  after this step as a preemption would (tests).
  """
  mesh = mesh_from_config(config.mesh)
  tokenizer = load_tokenizer(config.model, (config.data.pipeline.grounding_prompt,))
  export = os.path.join(workdir, "export", "hf")

  def eval_base():
    if not config.eval.enabled:
      return None
    return evaluate_model(training_run.initial_model(config.model, tokenizer, mesh), tokenizer,
                          mesh, config.data, config.model.hf_dir, config.eval)

  def eval_sft():
    if not (config.eval.enabled and config.checkpoint.export_hf):
      return None
    model = hf.load_model(export, mesh=mesh, dtype=config.model.dtype,
                          param_dtype=config.model.param_dtype)
    return evaluate_model(model, tokenizer, mesh, config.data, config.model.hf_dir, config.eval)

  stages = [Stage("eval_base", eval_base, eval_label="base",
                  key=config_key(config, "model", "data", "eval"), model=config.model.hf_dir),
            Stage("sft", lambda: train_stage(config, workdir, tokenizer, mesh, stop_at),
                  key=config_key(config, "model", "data", "optim", "train", "checkpoint")),
            Stage("eval_sft", eval_sft, eval_label="sft", key=config_key(config, "eval"),
                  model=export if config.checkpoint.export_hf else "")]
  summary = Pipeline("sft", workdir, stages, config.pipeline, raw_config, config).run()
  if summary["status"] == "done" and config.checkpoint.export_hf:
    _log(f"the trained model (an HF directory, with its tokenizer): {export}")
    _log(f"to train again from scratch, delete {workdir} or pass --workdir elsewhere; the same "
         "command in this workdir does nothing more")
  return summary
