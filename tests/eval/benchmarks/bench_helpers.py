"""Benchmark test helpers: tiny images, and a tiny model's answers to a benchmark's files."""

import numpy as np
from PIL import Image


def save_image(path, value: int, size=(12, 10)) -> None:
  """A small flat-colour JPEG or PNG (by the suffix) at `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def answered(benchmark, data, images, service, out_dir, max_new_tokens=8):
  """(items, answers by id, metrics) of the tiny model on the benchmark's files."""
  from lvlm_jax.eval.benchmarks import files, runner
  from lvlm_jax.eval.benchmarks.predictions import PredictionLog
  items = benchmark.load(str(data), None if images is None else str(images))
  log = PredictionLog(str(out_dir / "predictions.jsonl"))
  records = runner.answer(items, service, log, files.folder(
      None if images is None else str(images), str(data)), max_new_tokens)
  answers = {i: r["answer"] for i, r in records.items() if "answer" in r}
  scored = [item for item in items if item.id in answers]
  return items, answers, benchmark.score(scored, answers)
