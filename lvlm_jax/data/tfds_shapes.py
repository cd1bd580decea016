"""The shapes world as a TFDS dataset in array_record files, read back without TensorFlow.

`build_shapes_tfds` writes one task of a `ShapesSource` to `{data_dir}/shapes_world/{task}/1.0.0`;
`shapes_tfds_source` reads it through `tfds.data_source` and decodes each record to exactly the
schema `ShapesSource` returns, in the same order, so the two are interchangeable Grain sources. This
is the template for serving any pre-built dataset from array_record files.
"""

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lvlm_jax.data import shapes
from lvlm_jax.errors import UserError

NAME = "shapes_world"
VERSION = "1.0.0"


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """One config per task of `ShapesSource`. The world and the example count are constructor
  arguments, stored in the dataset's metadata; reading needs neither."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=task) for task in shapes.TASKS]

  def __init__(self, *, world: shapes.ShapesConfig | None = None, num_examples: int = 0, **kwargs):
    self._world = world
    self._num_examples = num_examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    features = {
        "id": text,
        # Every task stores a list of images, so single- and two-image tasks decode alike.
        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="png")),
        "scene": text,  # JSON
    }
    task = self.builder_config.name
    if task in ("caption", "yes_no", "region", "pair"):
      features["conversations"] = tfds.features.Sequence({"from": text, "value": text})
    if task == "yes_no":
      features["answer"] = text
    if task in ("grounding", "region"):
      features["box"] = tfds.features.Tensor(shape=(4,), dtype=np.float32)
      features["expression"] = text
    if task == "region":
      features["full"] = tfds.features.Tensor(shape=(), dtype=np.bool_)
      features["object"] = tfds.features.Tensor(shape=(), dtype=np.int32)
    if task == "pair":
      features["differences"] = text  # JSON
    metadata = None
    if self._world is not None:
      metadata = tfds.core.MetadataDict(world=dataclasses.asdict(self._world),
                                        num_examples=self._num_examples)
    # Unshuffled, so that record i here is record i of ShapesSource.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 metadata=metadata, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    if self._world is None:
      raise UserError(f"{NAME} is generated, not downloaded: build it with build_shapes_tfds(...)")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    source = shapes.ShapesSource(self._world, self.builder_config.name, self._num_examples)
    for i in range(len(source)):
      record = dict(source[i])
      record["images"] = [_png(image) for image in record["images"]]
      record["scene"] = json.dumps(record["scene"])
      if "box" in record:
        record["box"] = np.asarray(record["box"], np.float32)
      if "differences" in record:
        record["differences"] = json.dumps(record["differences"])
      yield i, record


def build_shapes_tfds(data_dir: str | os.PathLike, task: str, num_examples: int,
                      config: shapes.ShapesConfig) -> str:
  """Writes `num_examples` records of `task` (train split) and returns the dataset's directory.

  An existing build with the same world and size is reused; a different one is refused.
  """
  # Validates task and num_examples with the user-facing messages of ShapesSource.
  shapes.ShapesSource(config, task, num_examples)
  builder = ShapesWorld(world=config, num_examples=num_examples, data_dir=os.fspath(data_dir),
                        config=task, file_format="array_record")
  path = os.fspath(builder.data_dir)
  if os.path.exists(os.path.join(path, "dataset_info.json")):
    stored = tfds.builder_from_directory(path).info.metadata or {}
    wanted = {"world": json.loads(json.dumps(dataclasses.asdict(config))), "num_examples": num_examples}
    if dict(stored) != wanted:
      raise UserError(f"{path} already holds a {NAME}/{task} build of another world or size "
                      f"(num_examples={stored.get('num_examples')}, world={stored.get('world')}); "
                      f"pass a new data_dir or delete that directory")
    return path
  builder.download_and_prepare()
  return path


def shapes_tfds_source(data_dir: str | os.PathLike, task: str, split: str = "train") -> "ShapesTfdsSource":
  """A Grain random-access source over a build of `build_shapes_tfds`, with ShapesSource's records."""
  if task not in shapes.TASKS:
    raise UserError(f"shapes task {task!r} is unknown; choose one of {shapes.TASKS}")
  path = os.path.join(os.fspath(data_dir), NAME, task, VERSION)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    raise UserError(f"no {NAME}/{task} dataset under {data_dir} (looked for {path}); "
                    f"build it with build_shapes_tfds")
  return ShapesTfdsSource(tfds.data_source(f"{NAME}/{task}", data_dir=os.fspath(data_dir), split=split,
                                           download=False))


class ShapesTfdsSource:
  """Wraps a TFDS random-access source and decodes its records to ShapesSource's schema. Picklable."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f"ShapesTfdsSource({self.source!r})"

  def __getitem__(self, index: int) -> dict[str, Any]:
    raw = self.source[index]
    record = {"id": raw["id"].decode(), "images": [np.asarray(im, np.uint8) for im in raw["images"]]}
    if "conversations" in raw:
      conv = raw["conversations"]
      record["conversations"] = [{"from": f.decode(), "value": v.decode()}
                                 for f, v in zip(conv["from"], conv["value"])]
    if "answer" in raw:
      record["answer"] = raw["answer"].decode()
    if "box" in raw:
      record["box"] = [float(v) for v in raw["box"]]
      record["expression"] = raw["expression"].decode()
    if "full" in raw:
      record["full"], record["object"] = bool(raw["full"]), int(raw["object"])
    if "differences" in raw:
      record["differences"] = json.loads(raw["differences"])
    record["scene"] = json.loads(raw["scene"])
    return record


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (TFDS encodes numpy images only with TensorFlow)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()
