"""A method as a list of resumable stages over one workdir; the one way every method runs.

A stage has a name and a function. A work stage's function leaves its artifacts in the workdir
(each under its final name only when complete, `lvlm_jax/artifacts.py`) and returns 'done' or
'preempted'; rerun, it skips or resumes what is already there (generation after its last
complete batch, training from its last checkpoint). An evaluation stage's function returns
metrics, which land in `workdir/eval/<label>.json` and in the summary.

    workdir/config.json     the config of the run (written once accepted; see `run`)
    workdir/pipeline.json   which stages are done, their wall time summed over attempts
    workdir/summary.json    {"status", "wall_time_s", "stages": [...], "eval": {label: metrics}}
    workdir/.lock           held while a run is live: a second launch there is refused

A rerun skips every stage pipeline.json marks done; a rerun of a finished pipeline says so and
writes nothing. A torn pipeline.json or eval file (a crash mid-write on a filesystem without
atomic rename) only makes its stages run again, which find their artifacts and return at once.
`pipeline.benchmarks` adds public benchmarks after each evaluation stage that names its model
(`lvlm_jax/methods/stage_benchmarks.py`). SIGTERM (`lvlm_jax.preemption`) stops the pipeline
at the next safe point of its stage, or before the next stage. Process 0 writes; with several hosts the workdir must be shared.
"""

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from lvlm_jax import preemption
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.artifacts import read_json, write_json

DONE, PREEMPTED, PARTIAL = "done", "preempted", "partial"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Which stages this launch runs (at pod scale, generation and training stages are often
  separate jobs on different slices)."""
  only_stage: str = help_field("", "Run just this stage (every stage before it must be done), "
                               "then stop; '' runs all.")
  stop_after: str = help_field("", "Stop after this stage is done; '' runs to the end.")
  benchmarks: tuple[tuple[str, ...], ...] = help_field(
      (), "Public benchmarks to run on the model of every evaluated stage (base and each trained "
      "stage), each (benchmark, data) or (benchmark, data, images) as `evaluate --benchmark "
      "--data --images` take them, e.g. (('pope', '/data/pope/output/coco', "
      "'/data/coco/val2014'),); each is a stage <stage>/<benchmark> with its metrics in the "
      "summary as <label>/<benchmark> (lvlm_jax/methods/stage_benchmarks.py).")
  benchmark_batch_size: int = help_field(8, "Prompts decoded together in those benchmarks.")
  benchmark_limit: int = help_field(0, "Ask only each benchmark's first N items (0: all; "
                                    "CHAIR's default is 500 images).")


@dataclasses.dataclass(frozen=True)
class Stage:
  """name: unique in the pipeline. run(): 'done' | 'preempted' for a work stage (or a training
  run's summary dict with that "status", whose other entries such as "step" are kept in the
  stage's record); the metrics dict for an evaluation stage (eval_label set), or None when there
  is nothing to evaluate. key: what the stage's result depends on (e.g. its config sections as
  JSON): a done stage whose key has changed runs again (a training stage then resumes from its
  checkpoints, e.g. to train longer), and so does every stage after it. model: an evaluation
  stage's model directory, which `pipeline.benchmarks` are run on after it ('' for none)."""
  name: str
  run: Callable[[], Any]
  eval_label: str = ""
  key: str = ""
  model: str = ""


def _log(method: str, message: str) -> None:
  if jax.process_index() == 0:
    print(f"[{method}] {message}", flush=True)


def _read(path: str) -> Any | None:
  """A JSON artifact, or None when it is missing or torn."""
  try:
    return read_json(path)
  except (OSError, ValueError):
    return None


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` (process 0), released by the kernel when the process
  dies, so kill -9 never leaves a stale lock. A second live run in the same workdir would delete
  the first one's in-progress checkpoints (Orbax cleans up unfinished saves at start)."""

  def __init__(self, workdir: str):
    self.path, self._file = os.path.join(workdir, ".lock"), None

  def __enter__(self):
    if jax.process_index():
      return self
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise UserError(f"{os.path.dirname(self.path) or '.'} is in use by a live run ({holder}); "
                      "wait for it to end or use another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"pid {os.getpid()} on {os.uname().nodename}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    self._file.flush()
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      self._file.close()


def _with_benchmarks(stages: list[Stage], config: PipelineConfig, workdir: str,
                     settings) -> list[Stage]:
  """stages with one stage per benchmark after each evaluation stage that names its model."""
  from lvlm_jax.methods import stage_benchmarks
  if settings is None:
    raise ValueError("pipeline.benchmarks needs the method's config (Pipeline settings=)")
  stage_benchmarks.check(config.benchmarks)
  out = []
  for stage in stages:
    out.append(stage)
    if not (stage.eval_label and stage.model):
      continue
    for entry, label in zip(config.benchmarks, stage_benchmarks.labels(config.benchmarks)):
      output_dir = os.path.join(workdir, "benchmarks", stage.eval_label, label.replace(":", "_"))
      out.append(Stage(
          f"{stage.name}/{label}", stage_benchmarks.runner(
              entry, stage.model, output_dir, settings, config.benchmark_batch_size,
              config.benchmark_limit),
          eval_label=f"{stage.eval_label}/{label}",
          key=json.dumps([list(entry), config.benchmark_limit])))
  if len(out) == len(stages):
    raise UserError("pipeline.benchmarks: no stage of this method evaluates a model they can "
                    "be asked of")
  return out


def _config_json(raw_config) -> str:
  return raw_config.to_json_best_effort(indent=2)


class Pipeline:
  """The stages of one method run in `workdir`; `run()` runs (or resumes) them."""

  def __init__(self, method: str, workdir: str, stages: list[Stage],
               config: PipelineConfig = PipelineConfig(), raw_config=None, settings=None):
    """settings: the method's parsed config, whose prompts and template `config.benchmarks`
    are asked with (needed only when there are benchmarks)."""
    if config.benchmarks:
      stages = _with_benchmarks(stages, config, workdir, settings)
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
      raise ValueError(f"stage names repeat: {names}")
    for key in ("only_stage", "stop_after"):
      if getattr(config, key) and getattr(config, key) not in names:
        raise UserError(f"pipeline.{key}={getattr(config, key)!r} is not a stage of {method}: "
                        f"{', '.join(names)}")
    self.method, self.workdir, self.stages = method, workdir, stages
    self.config, self.raw_config = config, raw_config
    self._state_path = os.path.join(workdir, "pipeline.json")

  def _state(self) -> dict:
    state = _read(self._state_path)
    return state if isinstance(state, dict) and isinstance(state.get("stages"), dict) else {
        "stages": {}}

  def _eval_path(self, label: str) -> str:
    return os.path.join(self.workdir, "eval", f"{label}.json")

  def _done(self, state: dict, stage: Stage) -> bool:
    entry = state["stages"].get(stage.name, {})
    if entry.get("status") != DONE or entry.get("key", "") != stage.key:
      return False
    # An evaluation is done only with its metrics on disk (None: there was nothing to measure).
    return not stage.eval_label or state["stages"][stage.name].get("evaluated") is False or (
        isinstance(_read(self._eval_path(stage.eval_label)), dict))

  def _selected(self) -> list[Stage]:
    names = [s.name for s in self.stages]
    if self.config.only_stage:
      return [self.stages[names.index(self.config.only_stage)]]
    if self.config.stop_after:
      return self.stages[:names.index(self.config.stop_after) + 1]
    return self.stages

  def _summary(self, state: dict, status: str) -> dict:
    stages, evals = [], {}
    for stage in self.stages:
      entry = state["stages"].get(stage.name, {})
      stages.append({"name": stage.name, **entry, "status": entry.get("status", "pending"),
                     "wall_time_s": entry.get("wall_time_s", 0.0),
                     "attempts": entry.get("attempts", 0)})
      if stage.eval_label and entry.get("status") == DONE:
        metrics = _read(self._eval_path(stage.eval_label))
        if isinstance(metrics, dict):
          evals[stage.eval_label] = metrics
    return {"status": status, "wall_time_s": sum(s["wall_time_s"] for s in stages),
            "stages": stages, "eval": evals}

  def print_table(self, summary: dict) -> None:
    """Every evaluation's metrics, one row per evaluated stage, in stage order: one table for
    the method's own evaluations, one per benchmark (labels '<stage>/<benchmark>')."""
    groups = {}
    for label, metrics in summary["eval"].items():
      stage, _, benchmark = label.partition("/")
      groups.setdefault(benchmark, {})[stage] = metrics
    for benchmark, evals in groups.items():
      keys = []
      for metrics in evals.values():
        keys += [k for k, v in metrics.items() if isinstance(v, (int, float))
                 and not isinstance(v, bool) and k not in keys]
      width = max(len(label) for label in evals)
      rows = [" " * width + "  " + "  ".join(keys)]
      for label, metrics in evals.items():
        cells = [f"{metrics[k]:.4f}".rjust(len(k)) if isinstance(metrics.get(k), (int, float))
                 else "-".rjust(len(k)) for k in keys]
        rows.append(label.ljust(width) + "  " + "  ".join(cells))
      title = f"{benchmark} by stage" if benchmark else "metrics by stage"
      _log(self.method, f"{title}:\n" + "\n".join("  " + r for r in rows))

  def _record(self, state: dict, stage: Stage, status: str, seconds: float, **extra) -> None:
    entry = state["stages"].setdefault(stage.name, {"wall_time_s": 0.0, "attempts": 0})
    entry.update(status=status, wall_time_s=entry["wall_time_s"] + seconds,
                 attempts=entry["attempts"] + 1, key=stage.key, **extra)
    write_json(self._state_path, state)

  def run(self) -> dict:
    """Runs the selected stages that are not done yet; returns the summary (also summary.json).
    Status: 'done' (every stage), 'partial' (only_stage / stop_after reached), 'preempted'."""
    state = self._state()
    selected = self._selected()
    names = [s.name for s in self.stages]
    if self.config.only_stage:
      missing = [s.name for s in self.stages[:names.index(self.config.only_stage)]
                 if not self._done(state, s)]
      if missing:
        raise UserError(f"pipeline.only_stage={self.config.only_stage!r} needs the stages before "
                        f"it done first: {', '.join(missing)}")
    if all(self._done(state, s) for s in selected):
      summary = _read(os.path.join(self.workdir, "summary.json"))
      if not isinstance(summary, dict):
        summary = self._summary(state, DONE if len(selected) == len(self.stages) else PARTIAL)
        write_json(os.path.join(self.workdir, "summary.json"), summary)
      _log(self.method, f"{self.workdir}: already finished "
           f"({', '.join(s.name for s in selected)}); nothing to do")
      self.print_table(summary)
      return summary
    if jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
    with WorkdirLock(self.workdir):
      return self._run_stages(state, selected)

  def _run_stages(self, state: dict, selected: list[Stage]) -> dict:
    config_path = os.path.join(self.workdir, "config.json")
    # A config.json already there stays until this launch's config has been accepted (a work
    # stage ran with it, or the launch ended): a config refused by a stage (one that does not
    # match the checkpoints) must not make the run unreadable for `evaluate --workdir`.
    if self.raw_config is not None and not os.path.exists(config_path):
      self._write_config(config_path)
    status = DONE if len(selected) == len(self.stages) else PARTIAL
    changed = False  # a stage ran again: the ones after it must too
    for stage in selected:
      if not changed and self._done(state, stage):
        continue
      changed = True
      if preemption.anywhere():
        status = PREEMPTED
        break
      previous = state["stages"].get(stage.name)
      _log(self.method, f"stage {stage.name}: " + (
          f"resuming (attempt {previous['attempts'] + 1})" if previous else "starting"))
      started = time.time()
      try:
        result = stage.run()
      except preemption.Preempted:
        result = PREEMPTED
      seconds = time.time() - started
      if self.raw_config is not None and not stage.eval_label:
        self._write_config(config_path)  # a work stage took this config: it is the run's now
      if stage.eval_label:
        if result == PREEMPTED:
          self._record(state, stage, PREEMPTED, seconds)
          status = PREEMPTED
          break
        if result is not None:
          write_json(self._eval_path(stage.eval_label), result)
        self._record(state, stage, DONE, seconds, evaluated=result is not None)
        continue
      info = {}
      if isinstance(result, dict):  # a training run's summary: status, step, ...
        info = {k: v for k, v in result.items() if k not in ("status", "wall_time_s")}
        result = result["status"]
      if result not in (DONE, PREEMPTED):
        raise TypeError(f"stage {stage.name} returned {result!r}, not 'done' or 'preempted'")
      self._record(state, stage, result, seconds, **info)
      if result == PREEMPTED:
        status = PREEMPTED
        break
      _log(self.method, f"stage {stage.name}: done in {seconds:.1f} s")
    summary = self._summary(state, status)
    if self.raw_config is not None and status != PREEMPTED:
      self._write_config(config_path)
    write_json(os.path.join(self.workdir, "summary.json"), summary)
    if status == PREEMPTED:
      _log(self.method, "stopped: everything finished is saved; run the same command to resume")
    else:
      self.print_table(summary)
    return summary

  def _write_config(self, path: str) -> None:
    if jax.process_index() == 0:
      text = _config_json(self.raw_config)
      try:
        with open(path) as f:
          if f.read() == text:
            return
      except OSError:
        pass
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
