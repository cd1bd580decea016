"""The shapes world through TFDS array_record files equals ShapesSource, record for record."""

import pickle

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lvlm_jax.data import shapes, tfds_shapes
from lvlm_jax.errors import UserError

CONFIG = shapes.ShapesConfig(seed=5, image_size=32)
N = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  path = tmp_path_factory.mktemp("tfds")
  for task in shapes.TASKS:
    tfds_shapes.build_shapes_tfds(path, task, N, CONFIG)
  return path


@pytest.mark.parametrize("task", shapes.TASKS)
def test_records_equal_shapes_source(data_dir, task):
  source = tfds_shapes.shapes_tfds_source(data_dir, task)
  reference = shapes.ShapesSource(CONFIG, task, N)
  assert len(source) == N
  for i in range(N):
    got, want = source[i], reference[i]
    got_images, want_images = got.pop("images"), want.pop("images")
    assert len(got_images) == len(want_images) == (2 if task == "pair" else 1)
    for x, y in zip(got_images, want_images):
      assert x.dtype == np.uint8 and x.shape == (32, 32, 3)
      np.testing.assert_array_equal(x, y)
    assert got == want


def test_raw_tfds_record_types(data_dir):
  raw = tfds.data_source("shapes_world/grounding", data_dir=str(data_dir), split="train", download=False)[0]
  assert raw["box"].dtype == np.float32 and raw["box"].shape == (4,)
  assert isinstance(raw["scene"], bytes) and isinstance(raw["expression"], bytes)


def test_grain_reads_it_after_pickling(data_dir):
  source = pickle.loads(pickle.dumps(tfds_shapes.shapes_tfds_source(data_dir, "pair")))
  dataset = grain.MapDataset.source(source).shuffle(seed=1)
  assert sorted(dataset[i]["id"] for i in range(N)) == [f"shapes-pair-5-{i}" for i in range(N)]


def test_rebuild_reuses_or_refuses(data_dir):
  path = tfds_shapes.build_shapes_tfds(data_dir, "caption", N, CONFIG)
  assert path == str(data_dir / "shapes_world" / "caption" / "1.0.0")
  with pytest.raises(UserError, match="another world or size"):
    tfds_shapes.build_shapes_tfds(data_dir, "caption", N + 1, CONFIG)
  with pytest.raises(UserError, match="another world or size"):
    tfds_shapes.build_shapes_tfds(data_dir, "caption", N, shapes.ShapesConfig(seed=6, image_size=32))


def test_missing_dataset_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="build_shapes_tfds"):
    tfds_shapes.shapes_tfds_source(tmp_path, "caption")
  with pytest.raises(UserError, match="task"):
    tfds_shapes.shapes_tfds_source(tmp_path, "vqa")
