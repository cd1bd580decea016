"""Training sources: the curriculum's simpler scenes first, then the mix, resumable."""

import json

import grain
import numpy as np

from lvlm_jax.data.images import ImageProcessing
from lvlm_jax.data.pipeline import DataConfig
from lvlm_jax.data.shapes import ShapesConfig
from lvlm_jax.data.shapes_tokenizer import shapes_tokenizer
from lvlm_jax.data.training_sources import Curriculum, DataSources, training_batches

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
