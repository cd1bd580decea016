"""Benchmark test helpers: one tiny model's generation service shared by every benchmark's
tests (imported into each test module: a nested conftest.py would shadow the suite's
`conftest` module that other tests import from), tiny images, and the model's answers to a
benchmark's files."""

import functools

import numpy as np
import pytest
from PIL import Image


@functools.cache
def _service(model_dir: str):
  from lvlm_jax.generate import generation_service
  from lvlm_jax.models import hf
  return generation_service(model_dir, hf.load_model(model_dir), batch_size=4, pad_to=16)


@pytest.fixture
def bench_service(tiny_shapes_export):
  return _service(tiny_shapes_export)


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
