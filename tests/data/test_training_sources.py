"""Training sources: conversation files repeated per epoch as the config says; the curriculum's
simpler scenes first, then the mix, resumable."""

import json
from collections import Counter

import grain
import numpy as np
import pytest

from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import ShapesConfig
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.data.training_sources import (Curriculum, DataSources, training_batches,
                                            training_source)
from lvlm_jax.errors import UserError

PIPELINE = DataConfig(kind="sft", batch_size=4, length_buckets=(96,), tokens_per_image=4,
                      image=ImageProcessing(size=16), read_threads=1, system_prompt="")
WORLD = ShapesConfig(max_objects=3, min_objects=2, shapes=("circle", "square"),
                     colors=("red", "blue"))
TASKS = (("caption", 40), ("grounding", 40))


def batches(it, n):
  return [next(it) for _ in range(n)]


def assert_same(got, want):
  for a, b in zip(got, want, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_curriculum_draws_its_scenes_first_then_the_mix_and_resumes_in_either():
  tokenizer = shapes_tokenizer()
  mix = DataSources(shapes_tasks=TASKS, shapes=WORLD, pipeline=PIPELINE)
  simple = DataSources(shapes_tasks=(("grounding", 40),),
                       shapes=ShapesConfig(max_objects=1, min_objects=1, shapes=WORLD.shapes,
                                           colors=WORLD.colors), pipeline=PIPELINE)
  curriculum = DataSources(shapes_tasks=TASKS, shapes=WORLD, pipeline=PIPELINE,
                           curriculum=Curriculum(steps=2, shapes_tasks=(("grounding", 40),)))
  it = training_batches(curriculum, tokenizer, PIPELINE)
  assert isinstance(it, grain.DatasetIterator)  # Grain's Orbax handler saves its position
  got = batches(it, 4)
  assert_same(got[:2], batches(training_batches(simple, tokenizer, PIPELINE), 2))
  assert_same(got[2:], batches(training_batches(mix, tokenizer, PIPELINE), 2))
  assert it.examples_seen == 16

  for stop in (1, 3):  # inside the simpler scenes, and after the switch
    it = training_batches(curriculum, tokenizer, PIPELINE)
    batches(it, stop)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    resumed = training_batches(curriculum, tokenizer, PIPELINE)
    resumed.set_state(state)
    assert_same(batches(resumed, 4 - stop), got[stop:])


def test_no_curriculum_is_the_plain_mix():
  tokenizer = shapes_tokenizer()
  mix = DataSources(shapes_tasks=TASKS, shapes=WORLD, pipeline=PIPELINE)
  assert type(training_batches(mix, tokenizer, PIPELINE)).__name__ == "BatchIterator"


def _file(path, name: str, count: int) -> str:
  with open(path, "w") as f:
    for i in range(count):
      f.write(json.dumps({"id": f"{name}{i}", "conversations": [
          {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
  return str(path)


def test_each_file_the_stated_number_of_times_per_epoch(tmp_path):
  """CaD-VI's recipe: the base file once, phase 1 listed twice, phase 2 once, beside 4 shapes
  captions; one epoch holds every record of a file exactly its count of times."""
  files = (_file(tmp_path / "base.jsonl", "base", 5), _file(tmp_path / "p1.jsonl", "p1", 3),
           _file(tmp_path / "p2.jsonl", "p2", 2))
  source = training_source(DataSources(shapes_tasks=(("caption", 4),), conversations=files,
                                       conversation_repeats=(1, 2, 1)))
  assert len(source) == 4 + 5 + 2 * 3 + 2
  seen = Counter(source[i]["id"] for i in range(len(source)))
  assert {k: v for k, v in seen.items() if not k.startswith("shapes")} == {
      **{f"base{i}": 1 for i in range(5)}, **{f"p1{i}": 2 for i in range(3)},
      **{f"p2{i}": 1 for i in range(2)}}
  assert sum(v for k, v in seen.items() if k.startswith("shapes")) == 4
  one = training_source(DataSources(shapes_tasks=(), conversations=files[1:2],
                                    conversation_repeats=(3,)))
  assert Counter(one[i]["id"] for i in range(len(one))) == {f"p1{i}": 3 for i in range(3)}


def test_repeats_need_one_count_per_file(tmp_path):
  path = _file(tmp_path / "a.jsonl", "a", 2)
  with pytest.raises(UserError, match="one count per file"):
    training_source(DataSources(shapes_tasks=(), conversations=(path,),
                                conversation_repeats=(1, 2)))
