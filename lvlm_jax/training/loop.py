"""The training loop: batches in, jitted steps, metrics out, checkpoints, preemption.

Every process runs the same loop on its own data shard. Each step takes this process's next
batch, forms the global batch, and calls the step compiled (ahead of time, once per batch shape)
for it. A SIGTERM (preemption) makes the loop save and return at the next step boundary; a
restarted run resumes from the latest checkpoint with the same data order.
"""

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from lvlm_jax import preemption
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.sharding import global_batch
from lvlm_jax.training.checkpoint import Checkpointer
from lvlm_jax.training.metrics import MetricsWriter, compiled_flops
from lvlm_jax.training.steps import release_freed_host_memory

Hook = Callable[[dict[str, Any], int], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long and how the loop runs."""
  num_steps: int = help_field(1000, "Optimizer updates in the whole run (the schedule spans them).")
  batch_size: int = help_field(32, "Global batch size (examples per update over all processes).")
  grad_accum_steps: int = help_field(1, "Split each batch into this many micro-batches, "
                                     "accumulated before one update: same result, "
                                     "less activation memory.")
  log_every: int = help_field(10, "Write train metrics every this many steps.")
  eval_every: int = help_field(0, "Also evaluate every this many steps during training, into the "
                               "metrics (the evaluation stages before and after training run "
                               "anyway); 0: never during training.")
  logits_chunk: int = help_field(0, "Compute the LM head this many positions at a time (0: all at "
                                 "once); saves the float32 [B, T, V] logits' memory.")
  peak_flops: float = help_field(0.0, "Peak FLOP/s of one device for MFU; 0 takes it from the "
                                 "device table (TPU/GPU) or measures the CPU.")
  seed: int = help_field(0, "Seed of the training RNG (dropout); model.init_seed and "
                         "data.pipeline.seed seed the initialisation and the data order.")
  progress_bar: bool = help_field(True, "Show a progress bar with ETA (process 0).")
  tensorboard: bool = help_field(True, "Also write TensorBoard event files (workdir/tensorboard).")

  def __post_init__(self):
    if self.num_steps < 1 or self.batch_size < 1 or self.grad_accum_steps < 1 or self.log_every < 1:
      raise UserError("train.num_steps, batch_size, grad_accum_steps and log_every must be >= 1")
    if self.batch_size % self.grad_accum_steps:
      raise UserError(f"train.batch_size={self.batch_size} is not a multiple of "
                      f"train.grad_accum_steps={self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class Phase:
  """A stretch of training with its own step function and its own way of making batches.

  The phases of a run repeat in order until `TrainConfig.num_steps` (SC-Tune: 200 describer
  steps, 100 locator steps, again and again). `next_batch(state, batches)` returns this process's
  next batch; an on-policy phase makes it from the current state (a rollout), drawing its inputs
  from `batches`, whose position is checkpointed. `enter(state)` runs when the phase begins (at
  its first step, also after a resume that lands exactly there): reset the optimizer, change the
  learning rate, re-sync a frozen snapshot. A checkpoint holds the state after `enter`, so a run
  resumed mid-phase continues exactly.
  """
  name: str
  num_steps: int
  step: Callable
  next_batch: Callable[[dict[str, Any], Iterator], dict[str, np.ndarray]] = (
      lambda state, batches: next(batches))
  enter: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def phase_at(phases: tuple[Phase, ...], step_index: int) -> tuple[int, bool]:
  """(index of the phase that update `step_index` (0-based) belongs to, whether it is that
  phase's first update)."""
  offset = step_index % sum(p.num_steps for p in phases)
  for index, phase in enumerate(phases):
    if offset < phase.num_steps:
      return index, offset == 0
    offset -= phase.num_steps
  raise AssertionError("unreachable")


class _Compiled:
  """The step compiled once per batch shape (length buckets give a few), with its FLOPs."""

  def __init__(self, step: Callable):
    self._step, self._cache = step, {}

  def __call__(self, state, batch) -> tuple[Callable, float | None, float]:
    """(compiled step, its FLOPs, seconds spent compiling it now: 0 when it was cached)."""
    key = tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))
    if key in self._cache:
      return (*self._cache[key], 0.0)
    start = time.perf_counter()
    compiled = self._step.lower(state, batch).compile()
    release_freed_host_memory()  # what the compiler freed, see there
    self._cache[key] = (compiled, compiled_flops(compiled))
    return (*self._cache[key], time.perf_counter() - start)


def _skip_metrics(batches) -> dict[str, float]:
  counts = getattr(batches, "skip_counts", None)
  if counts is None:
    return {}
  out = {f"skipped/{reason}": float(n) for reason, n in counts.items()}
  out["examples_seen"] = float(getattr(batches, "examples_seen", 0))
  return out


def _stop_if_not_finite(metrics: dict[str, Any], step: int,
                        checkpointer: Checkpointer | None) -> None:
  """Raises a UserError naming `step` if its loss or gradient norm is NaN or infinite: its update
  has already spoilt the state, which must not be saved over the last good checkpoint (a save
  of an earlier step still in flight is finished first)."""
  for name in ("loss", "grad_norm"):
    if name in metrics and not np.isfinite(float(metrics[name])):
      kept = None
      if checkpointer is not None:
        checkpointer.wait()
        kept = checkpointer.latest_step()
      raise UserError(
          f"step {step}: {name} is {float(metrics[name])}; the run stopped without saving "
          f"(last good checkpoint: {'step ' + str(kept) if kept is not None else 'none'}). "
          "Lower optim.lr, set optim.clip_norm, or check the data")


def train(state: dict[str, Any], *, phases: tuple[Phase, ...], batches: Iterator, mesh: Mesh,
          config: TrainConfig, checkpointer: Checkpointer | None, writer: MetricsWriter,
          peak: tuple[float | None, str] = (None, "unknown"),
          hooks: tuple[Hook, ...] = (), stop_at: int | None = None) -> tuple[dict[str, Any], str]:
  """Runs the jitted steps (donating the state) from `state["step"]` to `config.num_steps`.

  phases: the run's phases (see Phase; one Phase of config.num_steps for a plain run).
  batches: this process's batches or rollout inputs (a Grain iterator; its position is
  checkpointed). hooks: evaluations `hook(state, step) -> metrics`, run every
  `config.eval_every` steps. stop_at: return after this step as a preemption would (tests).
  Returns (state, 'done' | 'preempted').
  """
  compiled_steps = [_Compiled(p.step) for p in phases]
  start = int(state["step"])
  bar = tqdm.tqdm(total=config.num_steps, initial=start, disable=not (
      config.progress_bar and writer.enabled), dynamic_ncols=True, desc="train")
  # Throughput is measured over the steps since the last log, less compilation and evaluation.
  window_start, window_steps, compile_seconds = time.perf_counter(), 0, 0.0
  in_flight = None  # the previous step's metrics: the host runs at most one step ahead
  status = "done"
  with preemption.during(), jax.set_mesh(mesh):
    for step_index in range(start, config.num_steps):
      index, first = phase_at(phases, step_index)
      phase = phases[index]
      if first and phase.enter is not None:
        state = phase.enter(state)
      try:
        local = phase.next_batch(state, batches)
      except StopIteration:
        raise UserError(f"the data ran out after {step_index} steps; set "
                        "data.pipeline.num_epochs=None (repeat) or fewer train.num_steps") from None
      batch = global_batch(local, mesh)
      compiled, flops, compile_time = compiled_steps[index](state, batch)
      compile_seconds += compile_time
      state, metrics = compiled(state, batch)
      if in_flight is not None:
        # One step queued behind the running one keeps the device busy; more would only make
        # the progress bar run ahead of the device (and hold batches in memory).
        jax.block_until_ready(in_flight)
        _stop_if_not_finite(in_flight, step_index, checkpointer)
      in_flight = metrics
      done, window_steps = step_index + 1, window_steps + 1
      bar.update(1)
      logging = done % config.log_every == 0 or done == config.num_steps
      if logging:
        values = {k: float(v) for k, v in metrics.items()}  # waits for the step
        seconds = (time.perf_counter() - window_start - compile_seconds) / window_steps
        # Tokens of this step over the mean step time of the window.
        values.update(step_time=seconds, tokens_per_s=values.pop("tokens") / seconds)
        if flops and peak[0]:
          values["mfu"] = flops / seconds / peak[0]
        if compile_seconds:
          values["compile_s"] = compile_seconds
        if len(phases) > 1:
          values["phase"] = float(index)
        values.update(_skip_metrics(batches))
        writer.write(done, values)
        bar.set_postfix(loss=f"{values['loss']:.4f}")
        window_start, window_steps, compile_seconds = time.perf_counter(), 0, 0.0
      if config.eval_every and done % config.eval_every == 0 and done != config.num_steps:
        for hook in hooks:
          writer.write(done, hook(state, done), prefix="eval")
        window_start, window_steps, compile_seconds = time.perf_counter(), 0, 0.0
      stopping = stop_at is not None and done >= stop_at
      # With several processes, asking whether any was preempted is a collective that waits for
      # the step; do it only where the loop waits anyway.
      if (jax.process_count() == 1 or logging) and preemption.anywhere():
        stopping = True
      if checkpointer is not None:
        force = stopping or done == config.num_steps
        if force or checkpointer.due(done):
          _stop_if_not_finite(metrics, done, checkpointer)
        checkpointer.save(done, state, batches, force=force)
      if stopping:
        status = "preempted"
        break
  bar.close()
  if checkpointer is not None:
    checkpointer.wait()
  return state, status
