"""Public benchmarks after each evaluated stage: `pipeline.benchmarks` in any method's config.

    config.pipeline.benchmarks = (("pope", "/data/pope/output/coco", "/data/coco/val2014"),
                                  ("chair", "/data/coco/annotations", "/data/coco/val2014"))

Each entry is (benchmark, data[, images]) as `python -m lvlm_jax.evaluate --benchmark NAME
--data DATA --images IMAGES` takes them (`lvlm_jax/eval/benchmarks/`). After every stage that
evaluates a model (base, and each trained stage's export), the pipeline gets one more stage per
entry, `<stage>/<benchmark>`, which runs that evaluation on the stage's model with the method's
own prompts and template: predictions and metrics in `workdir/benchmarks/<label>/<benchmark>/`,
the metrics in summary.json's "eval" as "<label>/<benchmark>" and in the printed tables.

Like every stage it resumes: the predictions log keeps what was answered before a kill. A
benchmark's answers belong to one model: when the stage's model has changed since (its
training stage ran again), the old predictions are deleted and the benchmark starts over.
"""

import hashlib
import json
import os
import shutil

import jax
from jax.experimental import multihost_utils

from lvlm_jax.errors import UserError


def labels(entries: tuple) -> list[str]:
  """Each entry's label: its benchmark's name, or name:file-stem where a name repeats (two
  RefCOCO splits)."""
  names = [e[0] for e in entries]
  return [name if names.count(name) == 1 else
          f"{name}:{os.path.splitext(os.path.basename(entry[1].rstrip('/')))[0]}"
          for name, entry in zip(names, entries)]


def check(entries: tuple) -> None:
  """A UserError naming `pipeline.benchmarks[i]` for an entry that cannot run."""
  from lvlm_jax.eval.benchmarks import BENCHMARKS
  for i, entry in enumerate(entries):
    where = f"pipeline.benchmarks[{i}]={entry!r}"
    if not 2 <= len(entry) <= 3:
      raise UserError(f"{where}: expected (benchmark, data) or (benchmark, data, images)")
    if entry[0] not in BENCHMARKS:
      raise UserError(f"{where}: unknown benchmark; known: {', '.join(sorted(BENCHMARKS))}")
    if getattr(BENCHMARKS[entry[0]], "judge", None) is not None:
      raise UserError(f"{where}: {entry[0]} is rated by a judge LLM; run it with "
                      "`python -m lvlm_jax.evaluate --benchmark cadqa --judge DIR` instead")
    for path, what in zip(entry[1:], ("data", "images")):
      if not os.path.exists(path):
        raise UserError(f"{where}: {what} {path}: no such file or folder")
  named = labels(entries)
  repeated = [label for label in named if named.count(label) > 1]
  if repeated:
    raise UserError(f"pipeline.benchmarks has {repeated[0]} twice")


def _fingerprint(model_dir: str) -> str:
  """What identifies a model directory's contents cheaply: its files' names, sizes and times."""
  entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                   for e in os.scandir(model_dir) if e.is_file())
  return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _fresh(output_dir: str, model_dir: str) -> None:
  """Empties output_dir when its predictions are of another version of the model."""
  path = os.path.join(output_dir, "model.json")
  mark = {"model": os.path.abspath(model_dir), "fingerprint": _fingerprint(model_dir)}
  if jax.process_index() == 0:
    try:
      with open(path) as f:
        before = json.load(f)
    except (OSError, ValueError):
      before = None
    if before != mark:
      shutil.rmtree(output_dir, ignore_errors=True)
      os.makedirs(output_dir)
      with open(path, "w") as f:
        json.dump(mark, f)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("benchmark output checked")


def runner(entry: tuple, model_dir: str, output_dir: str, settings, batch_size: int,
           limit: int):
  """The run() of the stage: the benchmark's metrics for the model in model_dir."""
  def run() -> dict:
    from lvlm_jax import evaluate
    from lvlm_jax.eval.benchmarks import evaluation
    _fresh(output_dir, model_dir)
    argv = ["--model", model_dir, "--benchmark", entry[0], "--data", entry[1],
            "--output_dir", output_dir, "--batch_size", str(batch_size), "--limit", str(limit)]
    if len(entry) == 3:
      argv += ["--images", entry[2]]
    return evaluation.run(evaluate.parse_args(argv), settings, evaluate.load_evaluated_model)
  return run
