"""Which sources a training run mixes, and the batches they become.

`DataSources` is the `data` section of an SFT config: shapes-world tasks, LLaVA conversation
files and grounding files, mixed into one random-access source (`training_source`) that the
Grain pipeline (data/pipeline.py) turns into this process's batches.
"""

import dataclasses
from collections import Counter

import grain
from flax import nnx

from lvlm_jax.data import sources as data_sources
from lvlm_jax.data.images import BadImage
from lvlm_jax.data.pipeline import DataConfig, make_dataset
from lvlm_jax.data.shapes import SFT_TASKS, ShapesConfig, ShapesSource
from lvlm_jax.data.text import BoxFormat
from lvlm_jax.dataclass_config import help_field
from lvlm_jax.errors import UserError
from lvlm_jax.models.lvlm import LVLM


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Simpler scenes first: the first `steps` updates draw `shapes_tasks` from the shapes world
  with at most `max_objects` objects a scene, the rest of the run the configured mix."""
  steps: int = help_field(0, "Updates on the simpler scenes before the mix (0: none). A new "
                          "model that has learned to find the one object of a scene learns to "
                          "pick one of two in a few hundred steps; from scratch on scenes of "
                          "two it stays on a plateau for far longer (README 'Quickstart').")
  shapes_tasks: tuple[tuple[str, int], ...] = help_field(
      (), "(task, number of records) pairs of those steps; empty: data.shapes_tasks.")
  max_objects: int = help_field(1, "Most objects a scene of those steps has.")

  def __post_init__(self):
    if self.steps < 0 or self.max_objects < 1:
      raise UserError("data.curriculum: steps must be >= 0 and max_objects >= 1")


@dataclasses.dataclass(frozen=True)
class DataSources:
  """Where the training examples come from (all sources are mixed) and how they become batches."""
  shapes_tasks: tuple[tuple[str, int], ...] = help_field(
      (("caption", 2000), ("grounding", 2000), ("yes_no", 2000)), "(task, number of records) pairs "
      f"from the built-in shapes world; tasks: {SFT_TASKS}.")
  shapes: ShapesConfig = help_field(ShapesConfig(), "The shapes world the shapes tasks draw from.")
  conversations: tuple[str, ...] = help_field((), "LLaVA-format conversation "
                                              "files (JSON or JSONL).")
  conversation_repeats: tuple[int, ...] = help_field(
      (), "Times each conversations file is seen per epoch, one count per file (LLaVA/CaD-VI "
      "list a file twice to upsample it); () sees each once.")
  grounding: tuple[str, ...] = help_field((), "Grounding files (image + box + expression; JSONL), "
                                          "trained as box-text answers.")
  image_roots: tuple[str, ...] = help_field((), "Folders searched for relative image paths "
                                            "(default: each data file's folder).")
  pipeline: DataConfig = help_field(DataConfig(), "Batching: length buckets, chat "
                                    "template, workers, ...")
  curriculum: Curriculum = help_field(Curriculum(), "Simpler shapes scenes for the first steps.")

  def __post_init__(self):
    if self.curriculum.steps and not (self.curriculum.shapes_tasks or self.shapes_tasks):
      raise UserError("data.curriculum.steps needs shapes tasks (data.curriculum.shapes_tasks or "
                      "data.shapes_tasks)")


# Set by the run, not by the user: from train.batch_size, the model and the processor config.
DERIVED_PIPELINE_FIELDS = ("pipeline.kind", "pipeline.batch_size", "pipeline.tokens_per_image",
                           "pipeline.image", "pipeline.anyres")


class GroundingAsConversation:
  """A grounding source as conversations: the question from `prompt`, the box text as answer."""

  def __init__(self, source, prompt: str, box_format: BoxFormat):
    if box_format.style == "pixels_json":
      # Its text depends on each image's size after the model's resize, unknown before loading.
      raise UserError("data.pipeline.box_format: pixel boxes (pixels_json) cannot train from "
                      "grounding records as conversations; use a grid box format for SFT "
                      "(SC-Tune and the evaluators write pixel boxes per image)")
    self.source, self.prompt, self.box_format = source, prompt, box_format
    self.skipped = getattr(source, "skipped", {})

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    record = dict(self.source[index])
    if record.get("expression") is None:
      # The pipeline turns this into a counted skip, as it does for a missing image.
      raise BadImage("no_expression", f"{record.get('origin', record.get('id'))}: a grounding "
                     "record without an expression")
    record["conversations"] = [
        {"from": "human", "value": self.prompt.format(expression=record["expression"])},
        {"from": "gpt", "value": self.box_format.to_text(record["box"])}]
    return record


def training_source(config: DataSources):
  """Every configured source, mixed into one random-access source of conversation records."""
  pipeline = config.pipeline
  parts = []
  for task, count in config.shapes_tasks:
    if task not in SFT_TASKS:
      raise UserError(f"data.shapes_tasks: task {task!r} cannot train SFT; use {SFT_TASKS}")
    source = ShapesSource(config.shapes, task, count, box_format=pipeline.box_format)
    if task == "grounding":
      source = GroundingAsConversation(source, pipeline.grounding_prompt, pipeline.box_format)
    parts.append(source)
  if len(config.conversation_repeats) not in (0, len(config.conversations)):
    raise UserError(f"data.conversation_repeats={config.conversation_repeats} needs one count per "
                    f"file of data.conversations ({len(config.conversations)})")
  repeats = [1] * len(parts) + list(config.conversation_repeats or [1] * len(config.conversations))
  roots = config.image_roots or None
  parts += [data_sources.ConversationSource(path, roots) for path in config.conversations]
  parts += [GroundingAsConversation(data_sources.GroundingSource(path, roots),
                                    pipeline.grounding_prompt, pipeline.box_format)
            for path in config.grounding]
  repeats += [1] * (len(parts) - len(repeats))
  if not parts:
    raise UserError("no training data: set data.shapes_tasks, data.conversations or data.grounding")
  if len(parts) == 1 and repeats == [1]:
    return parts[0]
  return data_sources.Mixture(parts, repeats=repeats)


def pipeline_config(config: DataSources, model: nnx.Module, hf_dir: str,
                    per_process_batch: int) -> DataConfig:
  """The data layer's config with the fields the run decides filled in (`hf_dir`: the model's
  HF directory, whose preprocessor config sets the image processing; '' for a new model)."""
  text = model.config.text if isinstance(model, LVLM) else model.config
  return dataclasses.replace(config.pipeline.for_model(model, hf_dir), kind="sft",
                             batch_size=per_process_batch,
                             context_length=text.max_position_embeddings)


def training_batches(config: DataSources, tokenizer, data_config: DataConfig):
  """This process's shard of the training batches: a resumable Grain iterator (with a
  curriculum, the first `curriculum.steps` batches from its simpler scenes, then the mix)."""
  batches = iter(make_dataset(training_source(config), tokenizer, data_config))
  curriculum = config.curriculum
  if not curriculum.steps:
    return batches
  simple = dataclasses.replace(
      config, shapes=dataclasses.replace(
          config.shapes, max_objects=curriculum.max_objects,
          min_objects=min(config.shapes.min_objects, curriculum.max_objects)),
      shapes_tasks=curriculum.shapes_tasks or config.shapes_tasks, conversations=(),
      conversation_repeats=(), grounding=(),
      curriculum=Curriculum())
  return SequentialBatches(iter(make_dataset(training_source(simple), tokenizer, data_config)),
                           curriculum.steps, batches)


class SequentialBatches(grain.DatasetIterator):
  """`count` batches of `first`, then those of `then`: a Grain iterator (Grain's Orbax handler
  saves its position) that counts the skips of both."""

  def __init__(self, first: grain.DatasetIterator, count: int, then: grain.DatasetIterator):
    super().__init__((first, then))
    self._first, self._count, self._then, self._drawn = first, count, then, 0

  def __next__(self):
    self._drawn += 1
    return next(self._first if self._drawn <= self._count else self._then)

  @property
  def examples_seen(self) -> int:
    return self._first.examples_seen + self._then.examples_seen

  @property
  def skip_counts(self) -> dict[str, int]:
    return dict(Counter(self._first.skip_counts) + Counter(self._then.skip_counts))

  def get_state(self) -> dict:
    return {"drawn": self._drawn, "first": self._first.get_state(),
            "then": self._then.get_state()}

  def set_state(self, state: dict) -> None:
    self._first.set_state(state["first"])
    self._then.set_state(state["then"])
    self._drawn = state["drawn"]

  def __str__(self) -> str:
    return f"SequentialBatches(first {self._count} of {self._first}, then {self._then})"
