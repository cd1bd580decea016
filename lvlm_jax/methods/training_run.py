"""One training run in one directory: build, restore or initialise, loop, export. Every training
stage of every method (SFT, DPO, SC-Tune's phases) goes through `run`.

    <dir>/checkpoints/<step>/   train state + data position (training/checkpoint.py)
    <dir>/metrics.jsonl, tensorboard/, wall_time.json
    <dir>/<summary_file>        {"status": "done" | "preempted", "step", "wall_time_s"}
    <dir>/export/hf/            the final model as an HF directory (+ tokenizer); export/lora/

What differs between methods comes in as three functions of the `Built` run (its model
structure, optimizer, shardings): the batches, the step function or phases, and the
evaluations during training.
"""

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from lvlm_jax.artifacts import read_json, write_json
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.models import building
from lvlm_jax.sharding import abstract_tree, per_process_batch
from lvlm_jax.training import checkpoint, loop, metrics, optim, state as train_state


@dataclasses.dataclass(frozen=True)
class Built:
  """What a run is made of before any weight is loaded."""
  graphdef: nnx.GraphDef
  abstract_model: nnx.Module  # shapes only (nnx.eval_shape)
  trainable: Any  # the NNX filter of the trained parameters
  tx: optax.GradientTransformation
  shardings: dict[str, Any]  # of every train state leaf
  mesh: Mesh
  local_batch: int  # rows this process feeds per step


@dataclasses.dataclass(frozen=True)
class StateExtra:
  """A train state entry beyond params/frozen/opt_state (checkpointed with them): built from the
  abstract params for the state's structure, and from the initial state for its value. DPO's
  in-step reference and SC-Tune's frozen snapshot are such entries."""
  name: str
  abstract: Callable[[nnx.State], Any]
  initial: Callable[[dict[str, Any]], Any]


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def finished(workdir: str, num_steps: int, summary_file: str = "summary.json",
             fingerprint: str = "") -> bool:
  """Whether a run in `workdir` completed its `num_steps` with the same `fingerprint` (its
  config) and exported. A torn summary reads as not finished; a run asked for more steps, or with
  another config, goes back to its checkpoints (which resume it, or refuse the config)."""
  try:
    summary = read_json(os.path.join(workdir, summary_file))
  except (OSError, ValueError):
    return False
  return (isinstance(summary, dict) and summary.get("status") == "done"
          and summary.get("step") == num_steps and summary.get("fingerprint", "") == fingerprint)


def build(model: building.ModelConfig, tokenizer, optim_config: optim.OptimConfig,
          train: loop.TrainConfig, mesh: Mesh, extras: tuple[StateExtra, ...] = ()
          ) -> tuple[Built, dict[str, Any]]:
  """(the run's structure, the abstract train state), allocating nothing."""
  abstract_model = building.abstract_model(model, tokenizer)
  building.check_vocabulary(abstract_model, tokenizer)
  trainable = optim.trainable_filter(optim_config)
  graphdef, abstract_params, abstract_frozen = train_state.split_model(abstract_model, trainable)
  tx = optim.make_optimizer(optim_config, train.num_steps, abstract_params)
  abstract = train_state.abstract_state(abstract_params, abstract_frozen, tx)
  for extra in extras:
    abstract[extra.name] = extra.abstract(abstract_params)
  shardings = train_state.state_shardings(abstract, mesh)
  local_batch = per_process_batch(train.batch_size, mesh, train.grad_accum_steps)
  built = Built(graphdef, abstract_model, trainable, tx, shardings, mesh, local_batch)
  _log(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} "
       f"processes | parameters: {train_state.count_params(abstract_params):,} trainable, "
       f"{train_state.count_params(abstract_frozen):,} frozen")
  return built, abstract


def _initial_state(model: building.ModelConfig, tokenizer, built: Built, abstract: dict[str, Any],
                   train: loop.TrainConfig, checkpointer: checkpoint.Checkpointer, batches,
                   extras: tuple[StateExtra, ...]) -> tuple[dict[str, Any], int | None]:
  """(train state, step it was restored from or None): the latest checkpoint if there is one
  (the data iterator moved to its position), else the model's initial weights."""
  latest = checkpointer.latest_step()
  if latest is None:
    params, frozen = building.load_params(model, tokenizer, built.mesh, built.trainable,
                                          built.shardings)
    state = train_state.init_state(params, frozen, built.tx, train.seed, built.shardings)
    for extra in extras:
      state[extra.name] = extra.initial(state)
    return state, None
  state = checkpointer.restore(latest, abstract_tree(abstract, built.shardings), batches)
  if "frozen" not in state:  # checkpoint.save_frozen=False: the frozen base comes from hf_dir
    state["frozen"] = building.load_params(model, tokenizer, built.mesh, built.trainable,
                                           built.shardings)[1]
  return state, latest


def initial_model(model: building.ModelConfig, tokenizer, mesh: Mesh) -> nnx.Module:
  """The model a run starts from (read from hf_dir, or initialised as training initialises it),
  on its shardings."""
  abstract_model = building.abstract_model(model, tokenizer)
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  shardings = train_state.state_shardings({"params": params, "frozen": rest}, mesh)
  params, rest = building.load_params(model, tokenizer, mesh, nnx.Param, shardings)
  return nnx.merge(graphdef, params, rest)


def export(final: nnx.Module, model: building.ModelConfig, tokenizer,
           config: checkpoint.CheckpointConfig, workdir: str, data: DataConfig) -> None:
  """The HF directory (with the chat template and image processing of `data`, the run's) and
  the LoRA adapters, as the checkpoint config asks."""
  directory = os.path.join(workdir, "export")
  if config.export_hf:
    checkpoint.export_hf(final, os.path.join(directory, "hf"), config.export_dtype, tokenizer,
                         data=data)
  if config.export_lora and model.use_lora:
    checkpoint.export_lora(final, os.path.join(directory, "lora"), model.hf_dir)


def run(*, workdir: str, model: building.ModelConfig, tokenizer, optim_config: optim.OptimConfig,
        train: loop.TrainConfig, checkpoint_config: checkpoint.CheckpointConfig, mesh: Mesh,
        batches: Callable[[Built], tuple[Iterator, DataConfig]],
        steps: Callable[[Built], Callable | tuple],
        hooks: Callable[[Built], tuple] = lambda built: (),
        extras: tuple[StateExtra, ...] = (), name: str = "train",
        summary_file: str = "summary.json", fingerprint: str = "",
        stop_at: int | None = None) -> dict:
  """Trains (or resumes) in `workdir`; returns the summary (also summary.json, atomically).

  batches(built): (this process's batch iterator, whose position is checkpointed, and the data
  config it was made with, whose template and image processing the export keeps). steps(built): the
  jitted step function, or a tuple of `loop.Phase`s. hooks(built): evaluations during training.
  fingerprint: the run's config as text, kept in the summary. stop_at: stop after this step as a
  preemption would (tests). A run already finished (same steps and fingerprint) returns its
  summary at once.
  """
  summary_path = os.path.join(workdir, summary_file)
  if finished(workdir, train.num_steps, summary_file, fingerprint):
    _log(f"{name}: finished already in {workdir}")
    return read_json(summary_path)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  built, abstract = build(model, tokenizer, optim_config, train, mesh, extras)
  data, data_config = batches(built)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), checkpoint_config)
  state, resumed_from = _initial_state(model, tokenizer, built, abstract, train, checkpointer,
                                       data, extras)
  _log(f"{name}: resuming from step {resumed_from} of {train.num_steps} in {workdir}"
       if resumed_from is not None else f"{name}: {train.num_steps} steps in {workdir}")
  writer = metrics.MetricsWriter(workdir, tensorboard=train.tensorboard,
                                 resumed_from=resumed_from or 0)
  peak = metrics.peak_flops(train.peak_flops)
  _log(f"MFU peak: {peak[1]}")
  phases = steps(built)
  if not isinstance(phases, tuple):  # one step function for the whole run
    phases = (loop.Phase("train", train.num_steps, phases),)
  state, status = loop.train(state, phases=phases, batches=data, mesh=mesh, config=train,
                             checkpointer=checkpointer, writer=writer, peak=peak,
                             hooks=hooks(built), stop_at=stop_at)
  checkpointer.close()
  if status == "done":
    export(train_state.merge(built.graphdef, state), model, tokenizer, checkpoint_config,
           workdir, data_config)
  else:
    _log(f"{name}: stopped at step {int(state['step'])}: checkpoint saved; run the same "
         "command to resume")
  summary = {"status": status, "step": int(state["step"]), "wall_time_s": writer.wall_time_s(),
             "fingerprint": fingerprint}
  writer.close()
  write_json(summary_path, summary)
  return summary
